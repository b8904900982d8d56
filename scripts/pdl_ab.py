"""A/B of programmatic dependent launch (:mod:`kernels.pdl`) for the decode-sized linears on a CUDA GPU.

For every shape (K x N), token count M and weight width it times, as ``kernels.bench`` times (CUDA-graph replays of
one call per rotated weight copy, the lists' trials in random order), bf16 ``F.linear`` and the dispatch's own
configuration, W{b}A16 and W{b}A{b}, each launched without and with PDL (``kernels.pdl.ENABLED`` as each call is
captured). Every (M, width, mode) is first checked with PDL against the float64 reference op into a NaN-poisoned
output (``rel_err`` <= 1e-2).

Writes JSON records to ``--out`` after every shape and prints each cell; exits 1 if a check failed.

GPU: ``python3 scripts/pdl_ab.py --out $OUT/pdl_ab.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import pdl  # noqa: E402
from kernels.bench import (SHAPES, bf16_calls, bf16_weights, copies_for, graph_times_us, kernel_calls,  # noqa: E402
                           linear_call, make_layers, parse_shapes)
from kernels.reference import linear_wa, linear_wa16  # noqa: E402
from kernels.triton_ops import choose_config  # noqa: E402

MAX_ERR = 1e-2


def with_pdl(enabled: bool, calls: list) -> list:
    """``calls`` launched with PDL on or off (the flag is read as each kernel launches, so also at graph capture)."""
    def launch(f):
        before, pdl.ENABLED = pdl.ENABLED, enabled
        try:
            f()
        finally:
            pdl.ENABLED = before
    return [lambda f=f: launch(f) for f in calls]


def rel_err(layer, x: torch.Tensor, act_bits: int | None) -> float:
    """One call with PDL into a NaN-poisoned output against the float64 reference (inf if an output was not written)."""
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=x.device)
    with_pdl(True, [linear_call(layer, x, out, None, act_bits)])[0]()
    if out.isnan().any():
        return float("inf")
    qw = layer.to_quantized_weight()
    ref = linear_wa(x.double(), qw, layer.bits, act_bits) if act_bits else linear_wa16(x.double(), qw, layer.bits)
    return ((out.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/pdl_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                    help="K x N shapes, comma-separated (default: the benchmark's eight)")
    ap.add_argument("--ms", default="1,2,4,8,16", help="token counts, comma-separated (default %(default)s)")
    ap.add_argument("--bits", default="2,4", help="weight widths, comma-separated (default %(default)s)")
    ap.add_argument("--modes", default="a16,ab", help="a16 (W{b}A16) and/or ab (W{b}A{b}) (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    start, records, failures = time.time(), [], 0
    widths = [int(b) for b in args.bits.split(",")]
    modes = args.modes.split(",")
    for k, n in parse_shapes(args.shapes):
        layers = {b: make_layers(k, n, b, copies_for(n * k * b // 8)) for b in widths}
        w16 = bf16_weights(k, n)
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            xc = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            cells = [(b, None if mode == "a16" else b) for b in widths for mode in modes]
            lists = [bf16_calls(x, w16, torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))]
            errs = []
            for b, act in cells:
                errs.append(rel_err(layers[b][0], xc, act))
                calls = kernel_calls(layers[b], x, None, act)
                lists += [with_pdl(False, calls), with_pdl(True, calls)]
            times = graph_times_us(lists, trials=5, min_ms=5.0)
            bf16_us = times[0]
            for i, ((b, act), err) in enumerate(zip(cells, errs)):
                off, on = times[1 + 2 * i], times[2 + 2 * i]
                failures += not err <= MAX_ERR
                rec = dict(kernel=f"w{b}a{act or 16}", K=k, N=n, M=m, config=choose_config(b, m, n, k).__dict__,
                           bf16_us=round(bf16_us, 2), us_off=round(off, 2), us_pdl=round(on, 2),
                           speedup_off=round(bf16_us / off, 3), speedup_pdl=round(bf16_us / on, 3),
                           gain=round(off / on, 3), rel_err=float(f"{err:.3g}"))
                records.append(rec)
                print(f"{rec['kernel']:6s} {k}x{n} M={m:3d}  off {off:7.2f} us {rec['speedup_off']:5.2f}x  "
                      f"pdl {on:7.2f} us {rec['speedup_pdl']:5.2f}x  gain {rec['gain']:5.3f}  err {err:.1e}"
                      + ("" if err <= MAX_ERR else "  FAILED"), flush=True)
            args.out.write_text(json.dumps(records, indent=1) + "\n")
        del layers, w16
        torch.cuda.empty_cache()
    print(f"{len(records)} cells, {failures} failed checks, {time.time() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
