"""A/B of activation-quantization launches (``kernels.triton_ops.ActQuantTile``) for many tokens, on a CUDA GPU.

For every row width K and token count M it times the launch the dispatch picks today
(``actquant_tile``, labelled ``current``) and a grid of others: one chunk per row (the row padded
to a power of two of groups, in registers, one pass) with 8/16/32 warps, chunks of 32/64/128
groups (two passes over the row) with 4/8 warps and 1 or 3 pipeline stages, and the Gluon kernel
that stages each row in shared memory (``staged``: groups per chunk, warps, columns per thread). Every launch is
first checked bit for bit against ``current`` on fresh random rows (xq and the token scale;
``current`` itself is checked against the CPU reference by ``tests/gpu``). Timing as
``kernels.bench`` times (CUDA-graph replays over enough input copies that L2 does not help);
bandwidth counts the bf16 input read, the fp16 ``xq`` written and the token scales, as a
percentage of a device-to-device copy measured in the same run.

GPU: ``python3 scripts/actquant_ab.py --out $OUT/actquant_ab.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bench import copies_for, copy_bandwidth, graph_time_us  # noqa: E402
from kernels.triton_ops import ActQuantTile, actquant_tile, launch_actquant  # noqa: E402

KS = [4096, 8192, 11008, 14336, 28672]
MS = [1024, 4096]
# the staged kernel's (groups per chunk, warps, columns per thread) tried
STAGED = [(64, 8, 8), (64, 4, 16), (128, 8, 16), (64, 2, 32), (128, 4, 32), (256, 8, 32)]


def tiles(groups: int) -> dict[str, ActQuantTile]:
    """The launches compared for rows of ``groups`` groups, by label."""
    one = 1 << (groups - 1).bit_length()
    out = {f"one-w{w}": ActQuantTile(one, w) for w in (8, 16, 32)}
    for bg in (32, 64, 128):
        if bg < groups:
            out.update({f"chunk{bg}-w{w}-s{s}": ActQuantTile(bg, w, s) for w in (4, 8) for s in (1, 3)})
    out.update({f"staged{bg}-w{w}-c{c}": ActQuantTile(bg, w, staged=True, columns=c) for bg, w, c in STAGED})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/actquant_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="row widths K, comma-separated (default %(default)s)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts M, comma-separated (default %(default)s)")
    ap.add_argument("--bits", type=int, default=2, help="activation bits (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    start = time.time()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    records, failures = [], 0
    for k in map(int, args.ks.split(",")):
        for m in map(int, args.ms.split(",")):
            xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies_for(2 * m * k))]
            current = actquant_tile(xs[0], k)
            ref_q, ref_ts = launch_actquant(xs[0], None, args.bits, tile=current)
            nbytes = 4 * m * k + 4 * m
            for label, tile in {"current": current, **tiles(k // 32)}.items():
                xq, ts = launch_actquant(xs[0], None, args.bits, tile=tile)
                exact = bool(torch.equal(xq, ref_q) and torch.equal(ts, ref_ts))
                failures += not exact
                us = graph_time_us([lambda x=x: launch_actquant(x, None, args.bits, tile=tile) for x in xs],
                                   trials=5, min_ms=10.0)
                rec = dict(K=k, M=m, label=label, tile=tile.__dict__, us=round(us, 2),
                           bw_pct=round(100 * nbytes / (us * 1e-6) / bw, 1), exact=exact)
                records.append(rec)
                print(f"K={k:5d} M={m:4d} {label:16s} {us:8.2f} us {rec['bw_pct']:5.1f}% bw"
                      + ("" if exact else "  MISMATCH"), flush=True)
            args.out.write_text(json.dumps(dict(copy_tbps=round(bw / 1e12, 3), records=records), indent=1) + "\n")
            del xs
    print("\nbest per shape:")
    for k, m in dict.fromkeys((r["K"], r["M"]) for r in records):
        rows = [r for r in records if (r["K"], r["M"]) == (k, m) and r["exact"]]
        best = min(rows, key=lambda r: r["us"])
        cur = next(r for r in rows if r["label"] == "current")
        print(f"K={k:5d} M={m:4d}: current {cur['bw_pct']:5.1f}%  best {best['label']} {best['bw_pct']:5.1f}%")
    print(f"{time.time() - start:.0f} s; {failures} mismatches")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
