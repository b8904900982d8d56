"""A/B (H200): the TMA-ring GEMV (:mod:`kernels.gluon_stream`) streaming its weights before it waits for the previous
kernel (PDL, :mod:`kernels.pdl`), against the same kernel waiting first, with the bare read of the same bytes (waiting
first, and reading before its wait) and bf16 ``F.linear``, all in one graph-timed rotation per cell.

Variants (``gluon_stream.PROBE``, set as each call is captured): ``wait_first`` (the kernel before this session),
``weights_first`` (the loader warp issues its copies at once; only the consumers, which read the activations, wait),
``early`` (``weights_first``, and each program lets the next kernel launch once its loader has issued the last copy).

Every variant is checked twice with PDL: one call into a NaN-poisoned output against the float64 reference
(``rel_err`` <= 1e-2), and a chain of four layers, each reading the previous one's output, bit-identical to the chain
launched without PDL. Writes JSON records to ``--out`` after every cell; exits 1 if a check failed.

GPU: ``python3 scripts/prefetch_ab.py --out $OUT/prefetch-ab.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import gluon_stream, pdl  # noqa: E402
from kernels.bench import (SHAPES, bf16_calls, bf16_weights, copies_for, floor_calls, graph_times_us,  # noqa: E402
                           kernel_calls, linear_call, make_layers, packed_bytes, parse_shapes)
from kernels.reference import linear_wa, linear_wa16  # noqa: E402
from kernels.triton_ops import choose_config  # noqa: E402

MAX_ERR = 1e-2
VARIANTS = {"wait_first": dict(weights_first=False, early_trigger=False),
            "weights_first": dict(weights_first=True, early_trigger=False),
            "early": dict(weights_first=True, early_trigger=True)}
# (weight bits, activation bits or None, tokens): the cells the ring serves
CELLS = [(2, None, 1), (4, None, 1), (2, 2, 1), (2, None, 2), (4, None, 2)]


def under(variant: str, calls: list, pdl_on: bool = True) -> list:
    """``calls`` launched with the ring's ``variant`` and PDL on or off (both read as each kernel launches)."""
    def launch(f):
        before = dict(gluon_stream.PROBE), pdl.ENABLED
        gluon_stream.PROBE.update(VARIANTS[variant])
        pdl.ENABLED = pdl_on
        try:
            f()
        finally:
            gluon_stream.PROBE.update(before[0])
            pdl.ENABLED = before[1]
    return [lambda f=f: launch(f) for f in calls]


def rel_err(layer, x: torch.Tensor, act_bits: int | None, variant: str) -> float:
    """One call with PDL into a NaN-poisoned output against the float64 reference (inf if an output was not
    written)."""
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=x.device)
    under(variant, [linear_call(layer, x, out, None, act_bits)])[0]()
    if out.isnan().any():
        return float("inf")
    qw = layer.to_quantized_weight()
    ref = linear_wa(x.double(), qw, layer.bits, act_bits) if act_bits else linear_wa16(x.double(), qw, layer.bits)
    return ((out.double() - ref).norm() / ref.norm()).item()


def chain_equal(layers, x: torch.Tensor, act_bits: int | None, variant: str) -> bool:
    """Four square layers back to back (each reads the previous one's output) with PDL, as a captured graph replayed
    five times, bit-identical to the chain without PDL."""
    def chain(inp):
        for layer in layers:
            out = torch.empty(inp.shape[0], layer.out_features, dtype=inp.dtype, device=inp.device)
            linear_call(layer, inp, out, None, act_bits)()
            inp = out
        return inp
    result = {}
    under(variant, [lambda: result.setdefault("plain", chain(x))], pdl_on=False)[0]()
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()

    def capture():
        with torch.cuda.graph(graph):
            result["graph"] = chain(static_x)
    under(variant, [capture])[0]()
    ok = True
    for _ in range(5):
        graph.replay()
        ok &= torch.equal(result["graph"], result["plain"])
    return ok and bool(result["plain"].isfinite().all())


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/prefetch_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="KxN,... (default: the benchmark's eight)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    start, records, failures = time.time(), [], 0
    for k, n in args.shapes:
        layers = {b: make_layers(k, n, b, copies_for(n * k * b // 8)) for b in (2, 4)}
        w16 = bf16_weights(k, n)
        for bits, act, m in CELLS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            rec = dict(kernel=f"w{bits}a{act or 16}", K=k, N=n, M=m, config=str(choose_config(bits, m, n, k)),
                       bytes=packed_bytes(layers[bits][0]))
            calls = {"bf16": bf16_calls(x, w16, torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))}
            for variant in VARIANTS:
                err = rel_err(layers[bits][0], x, act, variant)
                rec[f"{variant}_err"] = float(f"{err:.3g}")
                failures += not err <= MAX_ERR
                calls[variant] = under(variant, kernel_calls(layers[bits], x, None, act))
            for early in (False, True):
                calls["floor_early" if early else "floor"] = floor_calls(rec["bytes"], False, early)
            times = dict(zip(calls, graph_times_us(list(calls.values()), trials=9, min_ms=10.0)))
            rec.update({f"{name}_us": round(t, 2) for name, t in times.items()})
            rec.update({f"{name}_x": round(times["bf16"] / t, 3) for name, t in times.items() if name != "bf16"})
            records.append(rec)
            print(json.dumps(rec), flush=True)
            args.out.write_text(json.dumps(records, indent=1) + "\n")
        del layers, w16
        torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    for bits, act, m in CELLS:
        square = make_layers(4096, 4096, bits, 4)
        x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
        for variant in VARIANTS:
            ok = chain_equal(square, x, act, variant)
            failures += not ok
            records.append(dict(check="pdl_chain", kernel=f"w{bits}a{act or 16}", M=m, variant=variant, equal=ok))
            print(f"chain w{bits}a{act or 16} M={m} {variant}: {'equal' if ok else 'DIFFERENT'}", flush=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(records)} records, {failures} failed checks, {time.time() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
