"""W{b}A16 GEMV for one or two tokens whose programs load their whole tile at once (Gluon): ``Config("gemv_burst")``.

Why: at one token the TMA-ring GEMV (:mod:`kernels.gluon_stream`) stops near 80 % of a bare read of the same bytes
even with free arithmetic (docs/BENCHMARKS.md, session 24), while the bare read, which reaches the 5x-bf16 goal,
moves its bytes by plain 16-byte loads from many short programs that each issue all of their loads at once. This
kernel is that read with the arithmetic added: a program owns ``BN`` output columns over ``GS`` groups of K
(``GS * 32`` codes), issues the loads of all of its codes, scale and zero bytes into registers first, prepares its
slice of the activations in shared memory while they are in flight, then computes. Many such programs share an SM,
so the bytes in flight are what their registers hold, and a program's arithmetic overlaps the others' loads.

The arithmetic is the ring GEMV's (:func:`kernels.gluon_stream._step_terms`: ``dp2a`` on the code bytes against the
activations rounded to 16-bit integers per group, the scale and zero point per group in fp32), so the outputs agree
with it up to the order of the fp32 sums. The ``K / (32 GS)`` programs of a column tile add their partial sums in a
fixed order: each stores its ``[T, BN]`` partial in a workspace, and the last of them to finish (a self-resetting
counter per tile, as :func:`kernels.triton_common.finish`) sums them and writes the output.

Launched with programmatic dependent launch (:mod:`kernels.pdl`): the activations, the workspace and the counters
may be the previous kernel's, so nothing is read before :func:`~kernels.pdl.wait_prior_grid`.

Scope: 2- and 4-bit K-major codes (``kernels.ops.k_major``), one or two tokens of bf16/fp16 activations with unit
stride along K (or the fp16 ``xq`` of quantized activations with its token scales), no split channels, ``N % 16 ==
0``, Hopper. Gluon has no interpreter: tested on the GPU only.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .device import compute_capability
from .gluon_gemm import cta_barrier, reinterpret
from .gluon_stream import GROUP, along, load_x, prepare_x, step_terms
from .grid import GROUP_SIZE
from .pdl import launch_dependents, pdl_for, wait_prior_grid
from .triton_common import store_scaled

BURST_BITS = (2, 4)
BURST_TOKENS = (1, 2)


@gluon.jit
def _split_sum(part, off_n, ws_ptr, cnt_ptr, y_ptr, rs_ptr, ts_ptr, bias_ptr, M, N, stride_ym, SPLIT_K: gl.constexpr,
               COL_MULT: gl.constexpr, HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Write ``part [T, BN]`` (fp32 sums of this program's slice of K) as ``y[:, off_n:]``: directly without split-K,
    else through the workspace, summed in split order by the tile's last program to finish."""
    T: gl.constexpr = part.shape[0]
    BN: gl.constexpr = part.shape[1]
    LO: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, gl.num_warps()], [1, 0])
    part = gl.convert_layout(part, LO)
    rows = gl.arange(0, T, layout=gl.SliceLayout(1, LO))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, LO))
    if SPLIT_K == 1:
        store_scaled(part, rows, off_n + cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS,
                     HAS_BIAS)
    else:
        tile = gl.program_id(0)
        offs = gl.expand_dims(rows, 1) * BN + gl.expand_dims(cols, 0)
        base = ws_ptr + tile * (SPLIT_K * T * BN)
        gl.store(base + gl.program_id(1) * (T * BN) + offs, part)
        cta_barrier()
        arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = gl.zeros_like(part)
            for s in gl.static_range(SPLIT_K):  # unrolled: every partial's load in flight at once
                total += gl.load(base + s * (T * BN) + offs, cache_modifier=".cg")
            gl.atomic_xchg(cnt_ptr + tile, 0)
            store_scaled(total, rows, off_n + cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT,
                         HAS_TS, HAS_BIAS)


@gluon.jit
def gemv_burst_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, Kq,
                      stride_xm, stride_ym, stride_w, stride_s, T: gl.constexpr, P: gl.constexpr, GS: gl.constexpr,
                      BN: gl.constexpr, SPLIT_K: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr,
                      COL_MULT: gl.constexpr, HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr,
                      ARITH: gl.constexpr = True, TILED: gl.constexpr = False,
                      NOFIX: gl.constexpr = False):
    """``y [M, N] = x [M, Kq] @ W_b^T`` for ``M <= T`` tokens; program ``(j, s)`` owns columns ``j BN ..`` over groups
    ``s GS ..`` (grid ``(cdiv(N, BN), SPLIT_K)``); see the module docstring. ``w_ptr``: the K-major words (``[Kq P /
    32, N]``, row stride ``stride_w``), ``s_ptr``, ``z_ptr``: the scale and zero bytes (``[G, N]``, row stride
    ``stride_s``)."""
    W: gl.constexpr = gl.num_warps()
    HALF: gl.constexpr = 16 // P
    TC: gl.constexpr = BN // 4  # threads along a row of columns
    TR: gl.constexpr = 32 * W // TC  # threads sharing a column
    gl.static_assert(GS % TR == 0, "the program's groups must spread evenly over the threads of a column")
    # [token, group, word row, column]: a thread holds every token of its groups and 4 consecutive columns
    L4: gl.constexpr = gl.BlockedLayout([T, GS // TR, P, 4], [1, 32 // TC, 1, TC], [1, W, 1, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(0, L4)  # [GS, P, BN]
    LG: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, L4))  # [GS, BN]
    LX: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(2, L4))  # [T, GS]
    wait_prior_grid()  # PDL: the activations, workspace, counters and output may be the last kernel's
    off_n = gl.program_id(0) * BN
    g0 = gl.program_id(1) * GS

    # every load of the tile first: the codes, scale and zero bytes are in flight while the activations are prepared
    g = g0 + along(GS, 0, 3, LW)
    c = off_n + along(BN, 2, 3, LW)
    gg = g0 + along(GS, 0, 2, LG)
    cg = off_n + along(BN, 1, 2, LG)
    byte_mask = (gg * GROUP < Kq) & (cg < N)
    if TILED:  # PROBE: each program's tile contiguous ([tiles, SPLIT_K, rows, BN])
        tile0 = gl.program_id(0) * SPLIT_K + gl.program_id(1)
        words = gl.load(w_ptr + tile0 * (GS * P * BN) + (along(GS, 0, 3, LW) * P + along(P, 1, 3, LW)) * BN
                        + along(BN, 2, 3, LW))
        sb = gl.load(s_ptr + tile0 * (GS * BN) + along(GS, 0, 2, LG) * BN + along(BN, 1, 2, LG))
        zb = gl.load(z_ptr + tile0 * (GS * BN) + along(GS, 0, 2, LG) * BN + along(BN, 1, 2, LG))
    else:
        words = gl.load(w_ptr + (g * P + along(P, 1, 3, LW)) * stride_w + c, mask=(g * GROUP < Kq) & (c < N),
                        other=0)
        sb = gl.load(s_ptr + gg * stride_s + cg, mask=byte_mask, other=0)
        zb = gl.load(z_ptr + gg * stride_s + cg, mask=byte_mask, other=0)

    if not ARITH:  # PROBE: the loads and the sums across threads and programs only
        part = gl.sum(gl.convert_layout(gl.sum(words, axis=1), LG) + sb.to(gl.int32) + zb.to(gl.int32), axis=0)
        part = part.to(gl.float32)
        if NOFIX:  # PROBE: each program's partial stored, no reduction across programs
            offs = gl.arange(0, BN, layout=part.type.layout)
            gl.store(ws_ptr + (gl.program_id(0) * SPLIT_K + gl.program_id(1)) * BN + offs, part)
            return
        _split_sum(gl.expand_dims(part, 0), off_n, ws_ptr, cnt_ptr, y_ptr, rs_ptr, ts_ptr, bias_ptr, M, N,
                   stride_ym, SPLIT_K, COL_MULT, HAS_TS, HAS_BIAS)
        return
    xp_smem = gl.allocate_shared_memory(gl.uint32, [HALF, T, GS, P], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    sums_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    xs_smem = gl.allocate_shared_memory(gl.float32, [1, T, GS], sums_layout)
    xd_smem = gl.allocate_shared_memory(gl.float32, [1, T, GS], sums_layout)
    prepare_x(load_x(x_ptr, stride_xm, M, Kq, gl.program_id(1), T, 1, P, GS), xp_smem, xs_smem, xd_smem, P)
    cta_barrier()
    # read back per pair slot (in layouts of the rank an entry has)
    xp_slots = reinterpret(xp_smem, gl.uint32, [HALF, T, GS, P], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    entry_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    xs = reinterpret(xs_smem, gl.float32, [1, T, GS], entry_layout).index(0).load(LX)
    xd = reinterpret(xd_smem, gl.float32, [1, T, GS], entry_layout).index(0).load(LX)
    terms = step_terms(words, sb, zb, xp_slots, 0, xs, xd, ZOFF, ZMUL, P, L4)
    launch_dependents()  # only the sums across threads and programs are left
    if NOFIX:  # PROBE: each program's partial stored, no reduction across programs
        part = gl.convert_layout(gl.sum(gl.sum(terms, axis=1), axis=0), gl.BlockedLayout([1], [32], [W], [0]))
        gl.store(ws_ptr + (gl.program_id(0) * SPLIT_K + gl.program_id(1)) * BN
                 + gl.arange(0, BN, layout=part.type.layout), part)
        return
    _split_sum(gl.sum(terms, axis=1), off_n, ws_ptr, cnt_ptr, y_ptr, rs_ptr, ts_ptr, bias_ptr, M, N, stride_ym,
               SPLIT_K, COL_MULT, HAS_TS, HAS_BIAS)


def burst_gemv_supported(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, kq: int,
                         has_split: bool, tokens: int) -> bool:
    """Whether :func:`launch_gemv_burst` takes this call on ``tokens``-token programs (else the caller runs another
    kernel)."""
    return (bits in BURST_BITS and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and not has_split
            and tokens in BURST_TOKENS and x.shape[0] <= tokens and x.shape[1] == kq and x.stride(1) == 1
            and packed.stride(0) == 1 and scales.stride(0) == 1 and scales.shape[0] % 16 == 0
            and compute_capability(x.device)[0] == 9)


def burst_split(kq: int, groups: int) -> int:
    """Programs along K of a launch whose programs take ``groups`` groups each."""
    return triton.cdiv(kq // GROUP_SIZE, groups)


def launch_gemv_burst(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                      col_mult: float, zoff: float, zmul: float, tokens: int, block_n: int, groups: int, warps: int,
                      ws: torch.Tensor, counters: torch.Tensor, y: torch.Tensor, arith: bool = True,
                      maxnreg: int | None = None, tiled: bool = False,
                      nofix: bool = False) -> torch.Tensor:
    """``y = x @ W_b^T`` for up to ``tokens`` tokens (:func:`burst_gemv_supported`) with :func:`gemv_burst_kernel`:
    programs of ``block_n`` columns (16, 32, 64 or 128) over ``groups`` groups of K (a power of two) on ``warps``
    warps; ``ws``: at least ``cdiv(N, block_n) * burst_split(Kq, groups) * tokens * block_n`` floats where that split
    is more than 1, ``counters``: one zeroed int32 per column tile."""
    m, kq = x.shape
    n = y.shape[1]
    split = burst_split(kq, groups)
    rows = 32 * warps // (block_n // 4) if block_n in (16, 32, 64, 128) else 0
    tiles = triton.cdiv(n, block_n)
    if (tokens not in BURST_TOKENS or m > tokens or not rows or groups & (groups - 1) or groups % rows
            or (split > 1 and (ws.numel() < tiles * split * tokens * block_n or counters.numel() < tiles))):
        raise ValueError(f"gemv_burst takes block_m 1 or 2 tokens (at least the call's), block_n 16, 32, 64 or 128, "
                         f"a power-of-two number of groups per program that the {rows} threads sharing a column "
                         f"divide, and a workspace and counters for its split-K; got {m} "
                         f"tokens on block_m {tokens}, {block_n} columns, {groups} groups, {warps} warps")
    gemv_burst_kernel[(tiles, split)](
        x, packed, scales.view(torch.uint8), zeros, row_scale, token_scale if token_scale is not None else row_scale,
        bias if bias is not None else row_scale, y, ws, counters, m, n, kq, x.stride(0), y.stride(0),
        packed.stride(1), scales.stride(1), T=tokens, P=bits, GS=groups, BN=block_n, SPLIT_K=split, ZOFF=zoff,
        ZMUL=zmul, COL_MULT=col_mult, HAS_TS=token_scale is not None, HAS_BIAS=bias is not None, num_warps=warps,
        launch_pdl=pdl_for(x), ARITH=arith, TILED=tiled, NOFIX=nofix, maxnreg=maxnreg)
    return y
