"""A/B (H200): the decode kernel fed by a TMA ring (:mod:`kernels.gluon_gemv_ring`, ``ring_w{warps}s{stages}``)
against the dispatch's choice (``table``), the bare read of the same bytes and bf16 ``F.linear``, all in one
graph-timed rotation per cell.

Every candidate is first checked into a NaN-poisoned output against the float64 reference of the layer's quantized
weight (``*_err``, must be <= 1e-2); one that fails to launch is reported with its error and left out of the timing.
Writes JSON records to ``--out`` after every cell and exits 1 if a check failed.

GPU: ``python3 scripts/ring_mma_ab.py --out $OUT/ring-mma-ab.json [--bits 2,4] [--ms 2,4,8,16] [--shapes ...]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bench import (SHAPES, bf16_calls, bf16_weights, copies_for, floor_calls, graph_times_us,  # noqa: E402
                           kernel_calls, make_layers, packed_bytes, parse_shapes)
from kernels.gluon_gemv_ring import launch_gemv_ring  # noqa: E402
from kernels.reference import linear_wa16  # noqa: E402
from kernels.triton_ops import choose_config, gluon_scale_args  # noqa: E402

MAX_ERR = 1e-2
CANDIDATES = [(4, 2), (4, 4), (8, 2), (8, 3)]  # (consumer warps, stages)


def ring_calls(layers, x: torch.Tensor, warps: int, stages: int, out: torch.Tensor) -> list:
    args = gluon_scale_args(layers[0].bits, 8, layers[0].in_features)
    return [lambda lay=lay: launch_gemv_ring(x, lay.packed, lay.scales, lay.zeros, lay.row_scale, None, None,
                                             lay.bits, *args, warps, stages, out) for lay in layers]


def cell(bits: int, k: int, n: int, m: int, layers, w16) -> tuple[dict, int]:
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = linear_wa16(x.double(), layers[0].to_quantized_weight(), bits)
    rec = dict(kernel=f"w{bits}a16", K=k, N=n, M=m, bytes=packed_bytes(layers[0]),
               table=str(choose_config(bits, m, n, k)))
    failures = 0
    calls = {"table": kernel_calls(layers, x, None, None)}
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    for warps, stages in CANDIDATES:
        name = f"ring_w{warps}s{stages}"
        try:
            fns = ring_calls(layers, x, warps, stages, out)
            out.fill_(float("nan"))
            fns[0]()
            err = ((out.double() - ref).norm() / ref.norm()).item() if not out.isnan().any() else float("inf")
        except Exception as e:  # a candidate that does not compile or launch
            rec[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            failures += 1
            continue
        rec[f"{name}_err"] = float(f"{err:.3g}")
        failures += not err <= MAX_ERR
        calls[name] = fns
    calls["floor"] = floor_calls(rec["bytes"], False)
    calls["bf16"] = bf16_calls(x, w16, torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
    times = dict(zip(calls, graph_times_us(list(calls.values()), trials=7, min_ms=8.0)))
    rec.update({f"{name}_us": round(t, 2) for name, t in times.items()})
    rec.update({f"{name}_x": round(times["bf16"] / t, 3) for name, t in times.items() if name != "bf16"})
    return rec, failures


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/ring_mma_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="2,4", help="code widths (default %(default)s)")
    ap.add_argument("--ms", default="2,4,8,16", help="token counts (default %(default)s)")
    ap.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="KxN,... (default: the benchmark's eight)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    start, records, failures = time.time(), [], 0
    for k, n in args.shapes:
        w16 = bf16_weights(k, n)
        for bits in (int(b) for b in args.bits.split(",")):
            layers = make_layers(k, n, bits, copies_for(n * k * bits // 8))
            for m in (int(v) for v in args.ms.split(",")):
                rec, bad = cell(bits, k, n, m, layers, w16)
                failures += bad
                records.append(rec)
                print(json.dumps(rec), flush=True)
                args.out.write_text(json.dumps(records, indent=1) + "\n")
            del layers
            torch.cuda.empty_cache()
    print(f"{len(records)} cells, {failures} failed checks, {time.time() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
