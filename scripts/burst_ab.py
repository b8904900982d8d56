"""A/B (H200): the whole-tile GEMV (``Config("gemv_burst")``, :mod:`kernels.gluon_burst`) and the cp.async-fed ring
(:mod:`kernels.gluon_cpring`, ``cp_*``: column tile, codes per step, warps, slots, programs along K, prepared groups)
against the dispatch's choice (the TMA ring), the bare read of the same bytes and bf16 ``F.linear``, all in one
graph-timed rotation per shape.

Every candidate is first checked against the float64 reference of the layer's quantized weight (``err``: relative
error of a fresh call); a candidate that fails to launch is reported with its error and left out of the timing.

Probe variants of the whole-tile kernel (``loadonly_*``: its loads and reductions without the arithmetic, at its own
register count and at 80; ``_nofix``: no reduction across programs; ``tiled_*``: each program's tile stored
contiguously; ``nofix_*``: the arithmetic without the reduction across programs; the last two give wrong sums, so
they are timed only).

GPU: ``python3 scripts/burst_ab.py --bits 2,4 --ms 1 --out $OUT/burst-ab.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bench import (SHAPES, bf16_calls, bf16_weights, copies_for, floor_calls, graph_times_us,  # noqa: E402
                           kernel_calls, linear_call, make_layers, packed_bytes, parse_shapes)
from kernels.grid import dequantize  # noqa: E402
from kernels.triton_ops import Config, choose_config, gluon_scale_args  # noqa: E402
from kernels.gluon_cpring import launch_gemv_cp  # noqa: E402
from kernels.gluon_burst import burst_split, launch_gemv_burst  # noqa: E402

# (block_n, codes of K per program, warps) by code width: 4 groups per thread at 2 bits, 2 or 4 at 4 bits
TILES = {2: [(128, 1024, 8), (64, 1024, 4), (64, 2048, 8), (32, 2048, 4), (128, 512, 4), (32, 1024, 2),
             (16, 2048, 2), (128, 2048, 16)],
         4: [(128, 512, 8), (64, 512, 4), (128, 1024, 8), (64, 1024, 4), (32, 1024, 2), (128, 1024, 16)]}


# PROBE (bn, bk, warps, stages, programs per SM, chunk groups)
CP = {2: [(32, 1024, 4, 4, 2, 128), (32, 1024, 4, 4, 1, 256), (64, 512, 4, 4, 2, 128), (32, 512, 4, 6, 4, 128),
          (16, 1024, 4, 4, 6, 128), (32, 1024, 8, 4, 2, 256), (64, 512, 4, 3, 3, 128), (32, 512, 4, 4, 4, 256)],
      4: [(32, 512, 4, 4, 2, 128), (32, 512, 4, 6, 4, 128), (64, 256, 4, 4, 2, 128), (16, 1024, 4, 4, 4, 128),
          (32, 1024, 8, 3, 2, 256)]}


def cp_calls(layers, x, bits, bn, bk, w, st, pps, chunk):
    k, n = layers[0].in_features, layers[0].out_features
    tiles = n // bn
    steps = k // bk
    split = max(1, min(steps // 2, round(pps * 132 / tiles)))
    ws = torch.empty(tiles * split * bn * 2, device="cuda")
    cnt = torch.zeros(tiles, dtype=torch.int32, device="cuda")
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device="cuda")
    args = gluon_scale_args(bits, 8, k)
    return [lambda lay=lay: launch_gemv_cp(x, lay.packed, lay.scales, lay.zeros, lay.row_scale, None, None, bits,
                                           *args, 1, bn, bk, st, w, split, chunk, ws, cnt, out)
            for lay in layers], out, split


def name_of(cfg: Config) -> str:
    return f"burst{cfg.block_m}_{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}"


def shape_record(bits: int, k: int, n: int, m: int) -> dict:
    """Check and time every candidate of one shape and token count."""
    layers = make_layers(k, n, bits, copies_for(n * k * bits // 8))
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = dequantize(layers[0].to_quantized_weight(), bits, dtype=torch.float64)
    ref = x.double() @ w.T
    del w
    rec = dict(bits=bits, K=k, N=n, M=m, bytes=packed_bytes(layers[0]), table=str(choose_config(bits, m, n, k)))
    calls = {"table": kernel_calls(layers, x, None, None)}
    for bn, bk, warps in TILES[bits]:
        cfg = Config("gemv_burst", 1 if m == 1 else 2, bn, bk, num_warps=warps)
        try:
            fns = kernel_calls(layers, x, cfg, None)
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            linear_call(layers[0], x, out, cfg, None)()
            err = ((out.double() - ref).norm() / ref.norm()).item()
        except Exception as e:  # a tile the kernel refuses or that does not compile
            rec[f"{name_of(cfg)}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        rec[f"{name_of(cfg)}_err"] = err
        calls[name_of(cfg)] = fns
    for bn, bk, w in TILES[bits][:2]:  # PROBE: the same programs without their arithmetic
        split = burst_split(k, bk // 32)
        ws = torch.empty(n // bn * split * bn, device="cuda")
        cnt = torch.zeros(n // bn, dtype=torch.int32, device="cuda")
        o = torch.empty(m, n, dtype=x.dtype, device="cuda")
        args = gluon_scale_args(bits, 8, k)
        for regs, nofix in ((None, False), (80, False), (None, True)):
            calls[f"loadonly_{bn}x{bk}w{w}r{regs}" + ("_nofix" if nofix else "")] = [
                lambda lay=lay, regs=regs, bn=bn, gs=bk // 32, w=w, ws=ws, cnt=cnt, nofix=nofix: launch_gemv_burst(
                    x, lay.packed, lay.scales, lay.zeros, lay.row_scale, None, None, bits, *args, 1, bn, gs, w, ws,
                    cnt, o, arith=False, maxnreg=regs, nofix=nofix) for lay in layers]
    for bn, bk, w in TILES[bits][:2]:  # PROBE: each program's tile contiguous, with and without the arithmetic
        split, gs, tn = burst_split(k, bk // 32), bk // 32, n // bn
        tl_layers = [(lay.packed.t().reshape(split, gs * bits, tn, bn).permute(2, 0, 1, 3).contiguous(),
                      lay.scales.view(torch.uint8).t().reshape(split, gs, tn, bn).permute(2, 0, 1, 3).contiguous(),
                      lay.zeros.t().reshape(split, gs, tn, bn).permute(2, 0, 1, 3).contiguous(), lay.row_scale)
                     for lay in layers]
        ws = torch.empty(tn * split * bn, device="cuda")
        cnt = torch.zeros(tn, dtype=torch.int32, device="cuda")
        o = torch.empty(m, n, dtype=x.dtype, device="cuda")
        args = gluon_scale_args(bits, 8, k)
        for arith in (True, False):
            fns = [lambda t=t, arith=arith, bn=bn, gs=gs, w=w, ws=ws, cnt=cnt, o=o: launch_gemv_burst(
                x, *t, None, None, bits, *args, 1, bn, gs, w, ws, cnt, o, arith=arith, tiled=True) for t in tl_layers]
            name = f"tiled_{bn}x{bk}w{w}" + ("" if arith else "_loadonly")
            o.fill_(float("nan"))
            fns[0]()
            if arith:
                rec[f"{name}_err"] = ((o.double() - ref).norm() / ref.norm()).item()
            calls[name] = fns
    for bn, bk, w in TILES[bits][:2]:  # PROBE: with the arithmetic, no reduction across programs
        split, gs = burst_split(k, bk // 32), bk // 32
        ws = torch.empty(n // bn * split * bn, device="cuda")
        cnt = torch.zeros(n // bn, dtype=torch.int32, device="cuda")
        o = torch.empty(m, n, dtype=x.dtype, device="cuda")
        args = gluon_scale_args(bits, 8, k)
        calls[f"nofix_{bn}x{bk}w{w}"] = [
            lambda lay=lay, bn=bn, gs=gs, w=w, ws=ws, cnt=cnt, o=o: launch_gemv_burst(
                x, lay.packed, lay.scales, lay.zeros, lay.row_scale, None, None, bits, *args, 1, bn, gs, w, ws, cnt, o,
                nofix=True) for lay in layers]
    for bn, bk, w, st, pps, chunk in CP[bits]:
        try:
            fns, out, split = cp_calls(layers, x, bits, bn, bk, w, st, pps, chunk)
            name = f"cp_{bn}x{bk}w{w}s{st}p{split}c{chunk}"
            out.fill_(float("nan"))
            fns[0]()
            rec[f"{name}_err"] = ((out.double() - ref).norm() / ref.norm()).item()
            calls[name] = fns
        except Exception as e:
            rec[f"cp_{bn}x{bk}w{w}s{st}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    calls["floor"] = floor_calls(rec["bytes"], False)
    out16 = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    calls["bf16"] = bf16_calls(x, bf16_weights(k, n), out16)
    times = graph_times_us(list(calls.values()), trials=9, min_ms=10.0)
    us = dict(zip(calls, times))
    rec.update({f"{name}_us": round(t, 2) for name, t in us.items()})
    rec.update({f"{name}_x": round(us["bf16"] / t, 2) for name, t in us.items() if name != "bf16"})
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/burst_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="2,4", help="code widths (default %(default)s)")
    ap.add_argument("--ms", default="1", help="token counts, 1 or 2 (default %(default)s)")
    ap.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="KxN,... (default: the benchmark's)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    records = []
    for bits in (int(b) for b in args.bits.split(",")):
        for k, n in args.shapes:
            for m in (int(v) for v in args.ms.split(",")):
                rec = shape_record(bits, k, n, m)
                print(json.dumps(rec), flush=True)
                records.append(rec)
                args.out.write_text(json.dumps(records, indent=1) + "\n")
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
