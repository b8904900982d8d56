"""Kernel benchmark on a CUDA GPU: ``python -m kernels.bench`` (see docs/BENCHMARKS.md for the numbers).

For every Llama linear shape (K x N) and token count M it times, in the same run, the bitbybit
kernels and ``torch.nn.functional.linear`` in bf16, each as CUDA-graph replays of one call per
weight copy; the copies are rotated (enough of them to exceed the L2 several times) so no
kernel reads its weights from cache, and the trials of bf16 and of every linear kernel at one
(shape, M) alternate in random order, so all of them run under the same clocks
(:func:`graph_times_us`; activation quantization alone is timed on its own, as the copy is).
Bandwidth is reported as a percentage of a device-to-device copy measured in the same run,
counting the bytes the op must move (packed weights, scales, zero points and row scales,
activations in, output out). Each record also has the floor of those bytes at that size: the time of a
streaming read of as many bytes (a copy for activation quantization, which writes as much as it reads),
timed in the same rotation as the kernels (``floor_us``, and ``floor_pct`` = floor / kernel time; above
4 MiB only): small transfers do not reach the copy bandwidth, so this is what a kernel that only moved its
bytes would take.

Writes ``docs/results/kernels-h200.json`` (a list of ``{"kernel", "K", "N", "M", "us", "bf16_us",
"speedup", "bw_pct", "floor_us", "floor_pct", "config", "pdl", "copy_tbps"}``; ``pdl``: the kernels and the floor ran
with programmatic dependent launch, :mod:`kernels.pdl`, so each call's launch overlaps the previous call's end, as
between the layers of a model whose kernels all use it; bf16 ``F.linear`` runs without) and prints a markdown table.
``w{b}a{a}-mma`` times the int8 tensor-core kernel (:mod:`kernels.triton_mma`, tiles from ``mma8_config``) and
``w{b}a{a}-mma-norescale`` the same without its per-group rescale (wrong numbers; the difference is the rescale's time). ``--tune`` first picks, per shape,
the fastest of a few kernel configurations and writes ``kernels/triton_table.json``; ``--sass``
prints the compiler report (registers, spills, instruction mix of the main loop) of every
kernel variant that ran.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from .gluon_gemm import WARPS as WS_WARPS
from .gluon_gemv import MAX_TOKENS as MMA_MAX_TOKENS
from .gluon_stream import stream_tokens
from .grid import quantize_weight
from .ops import PackedLinear, pack_linear
from .device import sm_count
from .pdl import pdl_for, release_next_grid, wait_prior_grid_if
from .triton_actquant import actquant_kernel
from .triton_gemm import gemm_kernel
from .triton_gemv import gemv_kernel
from .triton_gemv_h2 import gemv_h2_kernel
from .triton_mma import mma_kernel
from .triton_ops import (MMA_MAX_ROWS, TABLE, Config, choose_config, fp32_gemv_tile, gemv_mma_config, gemv_split,
                          launch_actquant, launch_linear, launch_linear_wa, mma8_config, save_table, table_key)

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672),
          (28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
KERNELS = ["w2a16", "w4a16", "w3a16", "w8a16", "w2a2", "w4a4", "actquant2"]
QUICK_SHAPES = [(8192, 8192), (4096, 14336)]
QUICK_MS = [1, 16, 64, 1024]
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "kernels-h200.json"
# (BN, groups per step, warps) of the half2 GEMV that --tune tries for 2/4-bit weights at M <= 4; the one-warp
# tiles took 0-14 % less time than (256, 2, 2) at M = 1, 2 in scripts/gemv_ab.py (docs/results/gemv-tiles-ab-h200.json)
H2_TILES = [(256, 1, 2), (256, 2, 2), (512, 1, 4), (512, 2, 4), (128, 2, 1), (128, 1, 1), (64, 2, 1)]
# whole-column half2 tiles (many groups per step, about one program per SM) that --tune tries at M <= 2: at M = 1 they
# took 4-37 % less time than the tuned split-K tiles in the session-9 probe (docs/BENCHMARKS.md)
WHOLE_COLUMN_TILES = [(32, 32, 4), (32, 32, 8), (16, 64, 4), (16, 32, 4), (64, 16, 8)]
# (BM, BN, stages) of the warp-specialized kernel (BK 64) that --tune tries from 129 tokens; each won some shape in
# scripts/gemm_ab.py (docs/results/gemm-ws-ab-h200-s12.json), (128, 64, 6) none
WS_TILES = [(128, 128, 4), (128, 128, 6), (256, 128, 4), (128, 256, 4), (256, 64, 5)]
# (BN, BK, warps) and stages of the TMA-ring GEMV (Hopper) that --tune tries for 2/4-bit weights at 1..4 tokens
STREAM_TILES = [(16, 1024, 4), (32, 512, 4), (32, 1024, 4), (32, 1024, 8), (64, 256, 4), (64, 512, 4), (64, 512, 8)]
STREAM_STAGES = [2, 3, 4]


def graph_times_us(call_lists: list[list], trials: int = 7, min_ms: float = 20.0) -> list[float]:
    """Median time per call (µs) of CUDA-graph replays of each list of ``calls`` (run once each, in order).

    One graph per list; every trial replays each graph for at least ``min_ms``, the graphs in a fresh
    (seeded) random order, so that all lists are timed under the same mix of clocks: on a power-capped
    GPU a compute-bound kernel runs slower right after another one and faster after a memory-bound one.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for calls in call_lists:
            for f in calls:  # warm up: compile, allocate, fill the counters
                f()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for calls in call_lists:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in calls:
                f()
        graphs.append(graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = []
    for graph in graphs:
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        reps.append(max(1, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3))))
    times = [[] for _ in graphs]
    order = random.Random(0)
    for _ in range(trials):
        for i in order.sample(range(len(graphs)), len(graphs)):
            start.record()
            for _ in range(reps[i]):
                graphs[i].replay()
            end.record()
            torch.cuda.synchronize()
            times[i].append(start.elapsed_time(end) * 1e3 / (reps[i] * len(call_lists[i])))
    return [statistics.median(t) for t in times]


def graph_time_us(calls: list, trials: int = 7, min_ms: float = 20.0) -> float:
    """Median time per call (µs) of CUDA-graph replays of ``calls`` (:func:`graph_times_us` of one list)."""
    return graph_times_us([calls], trials, min_ms)[0]


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written) of a 2 GiB ``copy_``.

    Timed with events on the stream, not in a graph: a captured copy becomes a memcpy node that
    the copy engines serve, about a third slower than the SM copy kernel.
    """
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(12):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def copies_for(bytes_each: int) -> int:
    """Weight copies to rotate so one pass reads at least three L2 capacities."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(64, math.ceil(3 * l2 / bytes_each)))


# Below this many bytes a streaming kernel is bound by its launch and ramp, not by the bytes, and is no floor
# (activation quantization of at most 4 MiB beat it by up to 35 % on the H200): such records get no floor
FLOOR_MIN_BYTES = 4 << 20


@triton.jit
def _stream_kernel(src, dst, n, COPY: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, PDL: tl.constexpr):
    """Stream ``n`` int32 words of ``src``: copy them into ``dst``, or read them (one xor per program into ``dst``).
    ``PDL``: launched as the kernels it is the floor of are (:mod:`kernels.pdl`)."""
    wait_prior_grid_if(PDL)
    offs = tl.program_id(0) * (BLOCK * ITERS) + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):  # all loads in flight at once
        o = offs + i * BLOCK
        v = tl.load(src + o, mask=o < n, other=0)
        if COPY:
            tl.store(dst + o, v, mask=o < n)
        else:
            acc ^= v
    if not COPY:
        release_next_grid(PDL)
        tl.store(dst + tl.program_id(0), tl.xor_sum(acc, 0))


def floor_calls(nbytes: int, copy: bool) -> list:
    """Calls that move ``nbytes`` (read them, or copy: read half, write half) over rotated buffers, for
    :func:`graph_times_us`: the least time a kernel that moves those bytes needs. 4 x 2048 words per
    program on 4 warps (the fastest, or within 2 % of it, of six variants at every size of 5 MB and more
    tried on the H200: session 9, docs/BENCHMARKS.md); smaller blocks on small sizes, so that every SM gets
    about four programs."""
    iters = 4
    n = max(1, (nbytes // 2 if copy else nbytes) // 4)
    sms = sm_count(torch.device("cuda"))
    block = min(2048, max(128, triton.next_power_of_2(triton.cdiv(n, iters * 4 * sms))))
    stride = triton.cdiv(n, 256) * 256  # 1 KiB-aligned copies
    copies = copies_for(nbytes)
    src = torch.zeros(copies * stride, dtype=torch.int32, device="cuda")
    grid = (triton.cdiv(n, block * iters),)
    dst = torch.empty(copies * stride if copy else grid[0], dtype=torch.int32, device="cuda")
    views = [(src[i * stride:], dst[i * stride:] if copy else dst) for i in range(copies)]
    pdl = pdl_for(src)
    return [lambda s=s, d=d: _stream_kernel[grid](s, d, n, COPY=copy, BLOCK=block, ITERS=iters, PDL=pdl, num_warps=4,
                                                  launch_pdl=pdl)
            for s, d in views]


def bf16_weights(k: int, n: int) -> list[torch.Tensor]:
    """Rotated bf16 weight copies ``[N, K]`` (N(0, 0.02^2)) for the ``F.linear`` baseline."""
    return [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies_for(2 * n * k))]


def bf16_calls(x: torch.Tensor, w16: list[torch.Tensor], out: torch.Tensor) -> list:
    """One bf16 ``F.linear`` call per weight copy (into ``out``), for :func:`graph_times_us`."""
    return [lambda w=w: torch.nn.functional.linear(x, w, out=out) for w in w16]


def packed_bytes(layer: PackedLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.packed, layer.scales, layer.zeros, layer.row_scale))


def make_layers(k: int, n: int, bits: int, count: int) -> list[PackedLinear]:
    """``count`` packed layers (different random weights) at ``bits``, one master quantization reused."""
    w = torch.randn(n, k, device="cuda") * 0.02
    layers = []
    for i in range(count):
        qw = quantize_weight(w if i == 0 else w.roll(i, 0))
        layers.append(pack_linear(qw, bits))
    return layers


def linear_call(layer: PackedLinear, x: torch.Tensor, out: torch.Tensor, cfg: Config | None, act_bits: int | None,
                rescale: bool = True):
    if act_bits is None:
        return lambda: launch_linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, None, None, None,
                                     layer.bits, 8, layer.in_features, x.dtype, cfg, out)
    return lambda: launch_linear_wa(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, None, None,
                                    layer.bits, 8, act_bits, x.dtype, cfg, out, rescale)


def kernel_calls(layers: list[PackedLinear], x: torch.Tensor, cfg: Config | None, act_bits: int | None,
                 rescale: bool = True) -> list:
    """One linear call per weight copy (into one shared output), for :func:`graph_times_us`."""
    out = torch.empty(x.shape[0], layers[0].out_features, dtype=x.dtype, device="cuda")
    return [linear_call(layer, x, out, cfg, act_bits, rescale) for layer in layers]


def time_kernel(layers: list[PackedLinear], x: torch.Tensor, cfg: Config | None, act_bits: int | None,
                rescale: bool = True, **timing) -> float:
    return graph_time_us(kernel_calls(layers, x, cfg, act_bits, rescale), **timing)


def stream_configs(m: int) -> list[Config]:
    """The TMA-ring GEMV's configurations to try for ``m`` (1..4) tokens (:data:`STREAM_TILES` x
    :data:`STREAM_STAGES`, on programs of :func:`~kernels.gluon_stream.stream_tokens` tokens); those that do not fit
    the shared memory for a shape are refused at launch."""
    return [Config("gemv_tma", stream_tokens(m), bn, bk, num_warps=w, num_stages=st) for bn, bk, w in STREAM_TILES
            for st in STREAM_STAGES]


def candidates(bits: int, m: int, n: int, kq: int) -> list[Config]:
    """Configurations ``--tune`` tries for M tokens on an N x Kq weight at ``bits``: the half2 GEMV's tiles
    (:data:`H2_TILES`) for 2/4-bit weights at M <= 4, the fp32 GEMV's at M <= 2, the tensor-core decode kernel's
    programs for 2/4-bit weights up to 16 tokens (the rule's rows of warps and split, each also halved and doubled),
    tensor-core tiles for the rest (split-K up to 512 tokens), the dense path from 65 tokens and the warp-specialized
    kernel's tiles (:data:`WS_TILES`) from 129; at 1..4 tokens also the TMA-ring GEMV's (:func:`stream_configs`)."""
    decode = []
    if m <= MMA_MAX_TOKENS and bits in (2, 4):
        rule = gemv_mma_config(bits, m, n, kq)
        wn = rule.block_n // 32
        rows = rule.num_warps // wn
        decode = [replace(rule, num_warps=r * wn, split_k=s)
                  for r in sorted({max(rows // 2, 1), rows, min(2 * rows, MMA_MAX_ROWS)})
                  for s in sorted({max(rule.split_k // 2, 1), rule.split_k, 2 * rule.split_k})]
    if m <= 4 and bits in (2, 4):
        bm = m if m <= 2 else 4
        decode += [Config("gemv_h2", bm, bn, bg, split_k=s * gemv_split(n, kq, bn, bg), num_warps=w)
                   for bn, bg, w in H2_TILES for s in (1, 2)]
        if m <= 2:
            decode += [Config("gemv_h2", bm, bn, bg, split_k=s * gemv_split(n, kq, bn, bg), num_warps=w)
                       for bn, bg, w in WHOLE_COLUMN_TILES for s in (1, 2, 4)]
        decode += stream_configs(m)
    if m <= 2:
        bm, bn, bg, w = fp32_gemv_tile(bits, m)
        tiles = [(bn, bg, w), (bn // 2, bg, w // 2), (2 * bn, bg, 2 * w)]
        if bm == 1:
            tiles.append((bn, 3 - bg, w))
        return [Config("gemv", bm, bn, bg, split_k=s, num_warps=w) for bn, bg, w in tiles
                for s in (gemv_split(n, kq, bn, bg), 2 * gemv_split(n, kq, bn, bg))] + decode
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        tiles = ([Config("gemm_t", bm, bn, bk, split_k=s, num_warps=4, num_stages=3 if bk == 128 else 2)
                  for bn in (32, 64, 128) for bk in (128, 256) for s in (4, 8, 16, 32)]
                 + [Config("gemm_t", bm, 128, 128, split_k=s, num_warps=8, num_stages=3) for s in (4, 8, 16)])
        if m > 32:  # x @ W^T on 64-row tiles (docs/results/gemm-ab-h200.json: wins at 64 tokens only)
            tiles += [Config("gemm", 64, bn, 128, split_k=s, num_warps=4, num_stages=3) for bn in (64, 128)
                      for s in (4, 8, 16)]
        return tiles + decode
    dense = [Config("dense", 0, 64, 128, num_warps=4)]
    if m <= 128:  # one 128-row tile: split-K keeps every SM busy
        return [Config("gemm", bm, bn, bk, split_k=s, num_warps=w, num_stages=3)
                for bm, bn, bk, w in ((64, 128, 128, 4), (128, 128, 64, 8), (128, 128, 128, 8))
                for s in (1, 2, 4)] + dense
    # the warp-specialized kernel (Hopper, 2- and 4-bit codes) from 129 tokens
    ws = [Config("gemm_ws", bm, bn, 64, num_warps=WS_WARPS, num_stages=st) for bm, bn, st in WS_TILES
          if bits in (2, 4)]
    if m <= 512:
        return [Config("gemm", bm, bn, bk, split_k=s, num_warps=w, num_stages=3)
                for bm, bn, bk, w in ((64, 128, 128, 4), (128, 128, 64, 8), (128, 128, 128, 8))
                for s in (1, 2, 4)] + ws + dense
    return [Config("gemm", bm, bn, bk, num_warps=w, num_stages=3)
            for bm, bn, bk, w in ((128, 128, 64, 8), (128, 256, 64, 8))] + ws + dense


def tune(shapes, ms, bits_list, budget_s: float) -> None:
    """Time :func:`candidates` per (bits, shape, M bucket) and save the winners into the table."""
    t_end = time.monotonic() + budget_s
    for bits in bits_list:
        for k, n in shapes:
            layers = make_layers(k, n, bits, copies_for(n * k * bits // 8))
            for m in ms:
                if time.monotonic() > t_end:
                    print(f"tuning budget spent; {table_key(bits, k, n, m)} and later keep their entry or the rule")
                    return
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                timed = []
                for cfg in candidates(bits, m, n, k):
                    try:
                        timed.append((time_kernel(layers, x, cfg, None, trials=3, min_ms=5.0), cfg))
                    except Exception as e:  # a configuration that does not compile (e.g. out of shared memory)
                        print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
                best_us, best = min(timed, key=lambda t: t[0])
                TABLE[table_key(bits, k, n, m)] = best
                save_table(TABLE)
                print(f"tuned {table_key(bits, k, n, m)}: {best_us:.1f} us {best}", flush=True)
            del layers
            torch.cuda.empty_cache()


def bench(shapes, ms, kernels, bw: float, save=None) -> list[dict]:
    """Time every kernel and bf16 at every (shape, M); returns the records (also passed to ``save`` after each shape)."""
    records = []
    for k, n in shapes:
        w16 = bf16_weights(k, n)
        bits_needed = sorted({int(re.match(r"w(\d)", kn).group(1)) for kn in kernels if kn.startswith("w")})
        layers = {b: make_layers(k, n, b, copies_for(n * k * b // 8)) for b in bits_needed}
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            y16 = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            io = 2 * m * k + 2 * m * n
            calls = {"bf16": bf16_calls(x, w16, y16)}
            moved = {}  # kernel -> (bytes it must move, configuration)
            for name in kernels:
                if name.startswith("actquant"):
                    bits = int(name[len("actquant"):])
                    xs = [x] + [torch.randn_like(x) for _ in range(copies_for(2 * m * k) - 1)]
                    calls[name] = [lambda xi=xi, bits=bits: launch_actquant(xi, None, bits) for xi in xs]
                    moved[name] = (2 * m * k + 2 * m * k + 4 * m, None)
                else:
                    wb, ab, variant = re.fullmatch(r"w(\d)a(\d+)(-mma|-mma-norescale)?", name).groups()
                    wb, act = int(wb), None if ab == "16" else int(ab)
                    cfg = mma8_config(m, n, k) if variant else None
                    calls[name] = kernel_calls(layers[wb], x, cfg, act, rescale=variant != "-mma-norescale")
                    moved[name] = (packed_bytes(layers[wb][0]) + io, cfg or choose_config(wb, m, n, k))
            alone = [name for name in calls if name.startswith("actquant")]  # a bandwidth figure, like the copy's
            floors = {}  # (bytes, copy) -> name of its floor's calls, timed with the kernels that move those bytes
            for name in kernels:
                key = (moved[name][0], name in alone)
                if key not in floors and key[0] > FLOOR_MIN_BYTES:
                    floors[key] = f"floor{len(floors)}"
                    calls[floors[key]] = floor_calls(*key)
                    if key[1]:
                        alone.append(floors[key])
            times = dict(zip(alone, graph_times_us([calls.pop(name) for name in alone])))
            times.update(zip(calls, graph_times_us(list(calls.values()), trials=11, min_ms=10.0)))
            bf16_us = times["bf16"]
            for name in kernels:
                us, (nbytes, cfg) = times[name], moved[name]
                floor = floors.get((nbytes, name in alone))
                floor_us = None if floor is None else times[floor]
                rec = dict(kernel=name, K=k, N=n, M=m, us=round(us, 2), bf16_us=round(bf16_us, 2),
                           speedup=round(bf16_us / us, 2), bw_pct=round(100 * nbytes / (us * 1e-6) / bw, 1),
                           floor_us=floor_us and round(floor_us, 2),
                           floor_pct=floor_us and round(100 * floor_us / us, 1),
                           config=None if cfg is None else cfg.__dict__, pdl=pdl_for(x))
                records.append(rec)
                floor_text = "" if floor_us is None else f"  floor {floor_us:6.1f} us ({rec['floor_pct']:.0f}%)"
                print(f"{name:9s} K={k:5d} N={n:5d} M={m:4d}  {us:8.1f} us  bf16 {bf16_us:8.1f} us  "
                      f"x{rec['speedup']:5.2f}  {rec['bw_pct']:5.1f}% bw{floor_text}", flush=True)
        del w16, layers
        torch.cuda.empty_cache()
        if save:
            save(records)
    return records


def markdown(records: list[dict]) -> str:
    """One table per kernel: rows K x N, columns M, cells 'speedup (bw%)'."""
    out = []
    for name in dict.fromkeys(r["kernel"] for r in records):
        rows = [r for r in records if r["kernel"] == name]
        ms = sorted({r["M"] for r in rows})
        out.append(f"\n**{name}**: speedup over bf16 `F.linear` (% of copy bandwidth)\n")
        out.append("| K x N | " + " | ".join(f"M={m}" for m in ms) + " |")
        out.append("|---|" + "---|" * len(ms))
        for k, n in dict.fromkeys((r["K"], r["N"]) for r in rows):
            cells = {r["M"]: f"{r['speedup']:.2f} ({r['bw_pct']:.0f}%)" for r in rows if (r["K"], r["N"]) == (k, n)}
            out.append(f"| {k} x {n} | " + " | ".join(cells.get(m, "") for m in ms) + " |")
    return "\n".join(out)


def _loop_mix(sass: str, skip: tuple[str, ...] = ()) -> tuple[int, Counter]:
    """Instruction mix of the largest backward-branch loop of a SASS listing, among the loops that hold none of the
    instructions in ``skip`` (e.g. ``SETMAXREG``: a warp-specialized kernel's dispatch loop of its worker warps)."""
    lines = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", l).group(1), 16) for l in lines]
    best: list[str] = []
    for l, a in zip(lines, addr):
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", l)
        if m and int(m.group(1), 16) < a:
            body = [x for x, b in zip(lines, addr) if int(m.group(1), 16) <= b <= a]
            if not any(op in x for x in body for op in skip):
                best = max(best, body, key=len)
    ops = Counter()
    for l in best:
        t = l.split()[1]
        t = l.split()[2] if t.startswith("@") else t
        ops[t.rstrip(";")] += 1
    return len(best), ops


def sass_report(kernels: tuple = (gemv_kernel, gemv_h2_kernel, gemm_kernel, mma_kernel, actquant_kernel)) -> list[dict]:
    """Registers, spills, shared memory and main-loop instruction mix of every compiled variant of ``kernels``."""
    report = []
    for fn in kernels:
        for caches in fn.device_caches.values():
            for key, kernel in caches[0].items():
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
                n, ops = _loop_mix(sass)
                report.append(dict(kernel=fn.__name__, key=str(key), num_warps=kernel.metadata.num_warps,
                                   num_stages=kernel.metadata.num_stages, regs=kernel.n_regs,
                                   spills=kernel.n_spills, shared=kernel.metadata.shared,
                                   loop_instructions=n, loop_mix=dict(ops.most_common(16))))
    return report


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def main() -> None:
    shapes_text = lambda shapes: ", ".join(f"{k}x{n}" for k, n in shapes)  # noqa: E731
    ap = argparse.ArgumentParser(
        prog="python -m kernels.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Kernel benchmark on a CUDA GPU: the bitbybit Triton kernels against bf16 F.linear, per Llama\n"
                    "linear shape (K x N) and token count M, as CUDA-graph replays over rotated weight copies (no L2\n"
                    "hits); bandwidth as a percentage of a device-to-device copy. Prints a markdown table of\n"
                    "speedups and writes JSON records (docs/BENCHMARKS.md has the numbers).",
        epilog="examples:\n"
               "  python -m kernels.bench --quick\n"
               "  python -m kernels.bench --kernels w2a16,w4a16 --shapes 8192x8192 --ms 1,16 --out /tmp/k.json\n"
               "  python -m kernels.bench --kernels w2a2,w2a2-mma,w2a2-mma-norescale --ms 256,1024 --out /tmp/m.json\n"
               "  python -m kernels.bench --tune --shapes 8192x8192,4096x14336 --kernels w2a16,w4a16 --ms 1,2\n")
    ap.add_argument("--quick", action="store_true",
                    help=f"a short run: shapes {shapes_text(QUICK_SHAPES)}, M {','.join(map(str, QUICK_MS))} "
                         "(--shapes/--ms still override)")
    ap.add_argument("--shapes", type=parse_shapes, metavar="KxN,...",
                    help="comma-separated in_features x out_features, e.g. 8192x8192,4096x14336 "
                         f"(default: {shapes_text(SHAPES)})")
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], metavar="M,...",
                    help=f"comma-separated token counts (rows of the activation) (default: {','.join(map(str, MS))})")
    ap.add_argument("--kernels", type=lambda s: s.split(","), default=KERNELS, metavar="NAME,...",
                    help="comma-separated: w{b}a16 (weights only), w{b}a{a} (activations quantized too), "
                         "w{b}a{a}-mma (the int8 tensor-core kernel, a <= 7), w{b}a{a}-mma-norescale (the same "
                         "without its per-group rescale: wrong numbers, for the time breakdown), "
                         f"actquant{{a}} (activation quantization alone) (default: {','.join(KERNELS)})")
    ap.add_argument("--tune", action="store_true",
                    help="first time a few W2/W4 kernel configs per shape and M, save the fastest into "
                         "kernels/triton_table.json")
    ap.add_argument("--tune-budget", type=float, default=300.0, metavar="S",
                    help="seconds of tuning at most; the rest keep the default rule (default %(default)g)")
    ap.add_argument("--out", type=Path, default=RESULTS, metavar="FILE",
                    help="JSON records to write, after every shape (default: docs/results/kernels-h200.json)")
    ap.add_argument("--append", action="store_true",
                    help="merge into --out (records of the same kernel/K/N/M replaced) instead of overwriting it")
    ap.add_argument("--sass", type=Path, metavar="FILE",
                    help="write the compiler report (registers, spills, main-loop instruction mix) of the kernels "
                         "that ran here as JSON; needs cuobjdump")
    args = ap.parse_args()
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    ms = args.ms or (QUICK_MS if args.quick else MS)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.tune:
        tune(shapes, ms, [2, 4], args.tune_budget)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.append and args.out.exists() else []

    def save(records: list[dict]) -> list[dict]:
        """Write ``records`` (merged into the old file with ``--append``) after every shape, so a cut run keeps its part."""
        for rec in records:
            rec["copy_tbps"] = round(bw / 1e12, 3)
        fresh = {(r["kernel"], r["K"], r["N"], r["M"]) for r in records}
        merged = [r for r in old if (r["kernel"], r["K"], r["N"], r["M"]) not in fresh] + records
        args.out.write_text(json.dumps(merged, indent=1) + "\n")
        return merged

    print(markdown(save(bench(shapes, ms, args.kernels, bw, save))))
    if args.sass:
        args.sass.write_text(json.dumps(sass_report(), indent=1) + "\n")


if __name__ == "__main__":
    main()
