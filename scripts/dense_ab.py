"""A/B of the dense path of many tokens (dequantize to a transient bf16 copy, then cuBLAS) on a CUDA GPU.

For every shape (K x N) and token count M it times, as ``kernels.bench`` times (CUDA-graph replays
over enough weight copies that L2 does not help; per M all of the following in turn, trial by trial):

* ``bf16``: ``F.linear`` on bf16 weights (the baseline of every ratio);
* ``cublas_dq``: ``torch.mm`` on weights that are already dequantized (the same values the dense
  path multiplies: what cuBLAS alone costs on them; it can differ from ``bf16``, whose weights are
  random bf16 numbers);
* ``dequant``: the dequantization kernel alone (:func:`kernels.triton_ops.dequant_weight`) per tile
  (``--tiles``), with its bandwidth as a percentage of a copy measured in the same run (bytes: the
  packed weight, scales, zeros and row scales read, the bf16 copy written);
* ``current`` (the configuration the dispatch picks) and the whole dense path per tile, every one
  first checked against the float64 reference op (``kernels.reference.linear_wa16``) into a
  NaN-poisoned output (``rel_err`` <= 1e-2).

(Commit ``d2fef1f`` of this script also timed the dense path in slices of output columns through one
reusable buffer, so that a slice's copy could stay in L2: no gain on the H200, docs/BENCHMARKS.md.)

Writes JSON records to ``--out`` after every shape; exits 1 if a correctness check failed.

GPU: ``python3 scripts/dense_ab.py --out $OUT/dense_ab.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bench import (bf16_calls, bf16_weights, copies_for, copy_bandwidth, graph_time_us,  # noqa: E402
                           graph_times_us, kernel_calls, make_layers, packed_bytes, parse_shapes)
from kernels.reference import linear_wa16  # noqa: E402
from kernels.triton_ops import Config, choose_config, dequant_weight  # noqa: E402
from gemm_ab import MAX_ERR, rel_err  # noqa: E402  (this script's folder is on sys.path when it runs)

SHAPES = "8192x8192,4096x14336,14336x4096,28672x8192"
MS = "256,1024,4096"
TILES = "64x64x4,32x128x4,64x128x4,128x64x4,128x128x8,32x256x4,64x256x8"


def parse_tiles(text: str) -> list[Config]:
    """``BNxBKxWARPS,...`` -> dense configurations."""
    return [Config("dense", 0, bn, bk, num_warps=w) for bn, bk, w in
            (tuple(int(v) for v in t.split("x")) for t in text.split(","))]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/dense_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="K x N shapes, comma-separated (default %(default)s)")
    ap.add_argument("--ms", default=MS, help="token counts, comma-separated (default %(default)s)")
    ap.add_argument("--tiles", default=TILES,
                    help="dequantization tiles BNxBKxWARPS, comma-separated (default %(default)s)")
    ap.add_argument("--bits", type=int, default=2, help="weight width (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    start, records, failures = time.time(), [], 0
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    tiles = parse_tiles(args.tiles)
    for k, n in parse_shapes(args.shapes):
        layers = make_layers(k, n, args.bits, copies_for(n * k * args.bits // 8))
        w16 = bf16_weights(k, n)
        dense = [dequant_weight(lay.packed, lay.scales, lay.zeros, lay.row_scale, args.bits, lay.master_bits,
                                tiles[0], torch.empty(n, k, dtype=torch.bfloat16, device="cuda"))
                 for lay in layers[:len(w16)]]
        buf = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        base = dict(bits=args.bits, K=k, N=n)

        def record(label: str, us: float, **extra) -> None:
            records.append(dict(base, label=label, us=round(us, 2), **extra))
            print(f"{k}x{n} {label:10s} {us:9.1f} us " + " ".join(f"{a}={b}" for a, b in extra.items()), flush=True)

        dq_bytes = packed_bytes(layers[0]) + 2 * n * k
        for cfg in tiles:
            us = graph_time_us([lambda lay=lay, cfg=cfg: dequant_weight(lay.packed, lay.scales, lay.zeros,
                                                                         lay.row_scale, args.bits, lay.master_bits,
                                                                         cfg, buf) for lay in layers],
                               trials=3, min_ms=5.0)
            record("dequant", us, config=cfg.__dict__, bw_pct=round(100 * dq_bytes / (us * 1e-6) / bw, 1))
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            xc = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = linear_wa16(xc.double(), layers[0].to_quantized_weight(), args.bits)
            runs = [("current", choose_config(args.bits, m, n, k))] + [("dense", cfg) for cfg in tiles]
            errs = [rel_err(layers[0], xc, ref, cfg) for _, cfg in runs]
            times = graph_times_us([bf16_calls(x, w16, y),
                                    [lambda w=w: torch.mm(x, w.T, out=y) for w in dense]]
                                   + [kernel_calls(layers, x, cfg, None) for _, cfg in runs], trials=5, min_ms=5.0)
            bf16_us = times[0]
            record("bf16", bf16_us, M=m)
            record("cublas_dq", times[1], M=m, speedup=round(bf16_us / times[1], 3))
            for (label, cfg), err, us in zip(runs, errs, times[2:]):
                failures += not err <= MAX_ERR
                record(label, us, M=m, config=cfg.__dict__, speedup=round(bf16_us / us, 3),
                       rel_err=float(f"{err:.3g}"), **({} if err <= MAX_ERR else {"FAILED": True}))
            args.out.write_text(json.dumps(dict(copy_tbps=round(bw / 1e12, 3), records=records), indent=1) + "\n")
        del layers, w16, dense, buf
        torch.cuda.empty_cache()
    print("\nbest per shape and M (speedup over bf16):")
    for key in dict.fromkeys((r["K"], r["N"], r.get("M")) for r in records if "M" in r):
        rows = [r for r in records if (r["K"], r["N"], r.get("M")) == key and "speedup" in r and "FAILED" not in r]
        best = {lab: max((r for r in rows if r["label"] == lab), key=lambda r: r["speedup"], default=None)
                for lab in ("current", "cublas_dq", "dense")}
        print(f"{key[0]}x{key[1]} M={key[2]:4d}: " + "  ".join(
            f"{lab} {r['speedup']:.2f}x" + (f" {r['config']['block_n']}x{r['config']['block_k']}"
                                            if "config" in r else "")
            for lab, r in best.items() if r))
    print(f"{len(records)} records, {failures} failed checks, {time.time() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
