"""A/B of the tensor-core tile orientations (``Config("gemm")``: ``x @ W^T``; ``"gemm_t"``: ``W @ x^T``) on a CUDA GPU.

For every weight width, shape (K x N) and token count M it times, as ``kernels.bench`` times
(CUDA-graph replays over enough weight copies that L2 does not help), bf16 ``F.linear``, the
configuration the dispatch picks today (``current``: table or rule), what the rule alone would pick (``rule``:
:func:`~kernels.triton_ops.hopper_config`, else :func:`~kernels.triton_ops.default_config`; ``portable``: the latter
alone, the rule off Hopper) and a grid of tile configurations of both orientations (:func:`grid`), plus the dense path
from 128 tokens on. Every
configuration is first checked once against the float64 reference op
(``kernels.reference.linear_wa16``) into a NaN-poisoned output; ``rel_err`` must stay <= 1e-2.

Writes JSON records to ``--out`` after every shape, prints each timing and the best of each
orientation per (shape, M); exits 1 if a correctness check failed.

GPU: ``python3 scripts/gemm_ab.py --out $OUT/gemm_ab.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bench import (WS_TILES, WS_WARPS, bf16_calls, bf16_weights, copies_for, graph_time_us,  # noqa: E402
                           make_layers, parse_shapes, stream_configs, time_kernel)
from kernels.reference import linear_wa16  # noqa: E402
from kernels.gluon_gemv import MAX_TOKENS, token_rows  # noqa: E402
from kernels.gluon_gemm_ra import RA_BITS, ra_ring_depths  # noqa: E402
from kernels.triton_ops import Config, choose_config, default_config, hopper_config, ra_rule_config  # noqa: E402
from gemv_ab import run  # noqa: E402  (this script's folder is on sys.path when it runs)

SHAPES = "8192x8192,4096x14336,28672x8192"
MS = "16,32,64,128,256,1024"
MAX_ERR = 1e-2
SMS = 132


def split_for(tiles: int, kq: int, bk: int) -> int:
    """Split-K for about two programs per SM, each with at least four K steps."""
    split = 1
    while tiles * split < 2 * SMS and kq // (bk * split) >= 8 and split < 32:
        split *= 2
    return split


def ra_grid(bits: int, m: int, n: int, kq: int) -> list[Config]:
    """The register-operand wgmma kernel's configurations (16..256 tokens): the rule's
    (:func:`~kernels.triton_ops.ra_rule_config`) with its split halved, as is and doubled, on the two deepest rings that
    fit two programs per SM (:func:`~kernels.gluon_gemm_ra.ra_ring_depths`)."""
    if not 16 <= m <= 256:
        return []
    rule = ra_rule_config(bits, m, n, kq, SMS)
    return [replace(rule, split_k=s, num_stages=st) for st in ra_ring_depths(rule.block_m, max(RA_BITS))[-2:]
            for s in sorted({max(rule.split_k // 2, 1), rule.split_k, 2 * rule.split_k})]


def grid(bits: int, m: int, n: int, kq: int) -> list[Config]:
    """Tile configurations to time: 1..4 tokens, the TMA-ring GEMV; few tokens, split-K tiles of both orientations
    (``gemm`` also with 64-row tiles, wgmma's A height); many tokens, the large tiles of both (``gemm_t`` up to 256
    tokens wide, without and with split-K), the warp-specialized tiles and the dense path; 16..256 tokens, the
    register-operand wgmma kernel (:func:`ra_grid`)."""
    out = ra_grid(bits, m, n, kq)
    if m <= 4:  # the TMA-ring GEMV: whole columns per program, steps in flight
        out += stream_configs(m)
    if m <= MAX_TOKENS:  # the tensor-core decode kernel: 32 or 64 channels per program, 1..8 rows of warps along
        for channels in (32, 64):  # K, split-K for 8..32 warps per SM
            for rows in (1, 2, 4, 8):
                warps = channels // 32 * rows
                tiles = triton.cdiv(n, channels)
                out += [Config("gemv_mma", token_rows(m), channels, 128, split_k=sk, num_warps=warps)
                        for sk in (1, 2, 4, 8, 16) if 8 * SMS <= tiles * sk * warps <= 32 * SMS
                        and kq // (128 * sk * rows) >= 2]
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        for kernel, bms in (("gemm_t", (bm,)), ("gemm", sorted({bm, 64}))):
            for bmk in bms:
                for bn in (64, 128):
                    for bk in (64, 128):
                        s = split_for(triton.cdiv(m, bmk) * triton.cdiv(n, bn), kq, bk)
                        out += [Config(kernel, bmk, bn, bk, split_k=sk, num_warps=4, num_stages=3)
                                for sk in sorted({s, 2 * s})]
        return out
    out += [Config("gemm", bm, bn, bk, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                      (128, 128, 128, 8, 3), (128, 256, 64, 8, 4))]
    # W @ x^T: block_m tokens are wgmma's N (up to 256), block_n weight rows 64 per warpgroup
    for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (256, 64, 64, 4, 3),
                              (256, 128, 32, 8, 4), (256, 128, 128, 8, 2), (128, 128, 128, 8, 3)):
        bm = min(bm, max(64, triton.next_power_of_2(m)))
        s = split_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), kq, bk)
        out += [Config("gemm_t", bm, bn, bk, split_k=sk, num_warps=w, num_stages=st) for sk in sorted({1, s})]
    # the warp-specialized kernel (Hopper): 8 MMA warps and a producer warpgroup
    out += [Config("gemm_ws", bm, bn, 64, num_warps=WS_WARPS, num_stages=st)
            for bm, bn, st in WS_TILES + [(128, 64, 6)]]
    return list(dict.fromkeys(out + [Config("dense", 0, 64, 128, num_warps=4)]))


def rel_err(layer, x: torch.Tensor, ref: torch.Tensor, cfg: Config) -> float:
    """Relative error of one call into a NaN-poisoned output against ``ref`` (inf if an output was not written)."""
    out = run(layer, x, cfg)
    if out.isnan().any():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/gemm_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="K x N shapes, comma-separated (default %(default)s)")
    ap.add_argument("--ms", default=MS, help="token counts, comma-separated (default %(default)s)")
    ap.add_argument("--bits", default="2", help="weight widths, comma-separated (default %(default)s)")
    ap.add_argument("--kernels", default="current,gemm_t,gemm,gemm_ra,gemm_ws,dense",
                    help="which of the grid's kernels (and of the labels current, rule, portable) to time, "
                         "comma-separated (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    start, records, failures = time.time(), [], 0
    for bits in map(int, args.bits.split(",")):
        for k, n in parse_shapes(args.shapes):
            layers = make_layers(k, n, bits, copies_for(n * k * bits // 8))
            w16 = bf16_weights(k, n)
            for m in map(int, args.ms.split(",")):
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                y16 = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                bf16_us = graph_time_us(bf16_calls(x, w16, y16),
                                        trials=3, min_ms=5.0)
                xc = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                ref = linear_wa16(xc.double(), layers[0].to_quantized_weight(), bits)
                named = [("current", choose_config(bits, m, n, k)),
                         ("rule", hopper_config(bits, m, n, k) or default_config(bits, m, n, k)),
                         ("portable", default_config(bits, m, n, k))]
                labels = args.kernels.split(",")
                for label, cfg in [(lab, c) for lab, c in named + [(c.kernel, c) for c in grid(bits, m, n, k)]
                                   if lab in labels]:
                    rec = dict(bits=bits, K=k, N=n, M=m, label=label, config=cfg.__dict__, bf16_us=round(bf16_us, 2))
                    try:
                        err = rel_err(layers[0], xc, ref, cfg)
                        us = time_kernel(layers, x, cfg, None, trials=3, min_ms=5.0)
                    except Exception as e:  # a configuration that does not compile (e.g. out of shared memory)
                        print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    failures += not err <= MAX_ERR
                    rec.update(us=round(us, 2), speedup=round(bf16_us / us, 3), rel_err=float(f"{err:.3g}"))
                    records.append(rec)
                    print(f"W{bits} {k}x{n} M={m:4d} {label:8s} {us:8.1f} us {bf16_us / us:5.2f}x err {err:.1e} "
                          f"{cfg}" + ("" if err <= MAX_ERR else "  FAILED"), flush=True)
                args.out.write_text(json.dumps(records, indent=1) + "\n")
            del layers, w16
            torch.cuda.empty_cache()
    print("\nbest per orientation (speedup over bf16):")
    for key in dict.fromkeys((r["bits"], r["K"], r["N"], r["M"]) for r in records):
        rows = [r for r in records if (r["bits"], r["K"], r["N"], r["M"]) == key and r["rel_err"] <= MAX_ERR]
        best = {lab: max((r for r in rows if r["label"] == lab), key=lambda r: r["speedup"], default=None)
                for lab in ("current", "rule", "portable", "gemv_tma", "gemv_mma", "gemm_t", "gemm", "gemm_ra", "gemm_ws", "dense")}
        print(f"W{key[0]} {key[1]}x{key[2]} M={key[3]:4d}: " + "  ".join(
            f"{lab} {r['speedup']:.2f}x" for lab, r in best.items() if r))
    print(f"{len(records)} timings, {failures} failed checks, {time.time() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
