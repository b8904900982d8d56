"""PROBE: W{b}A16 GEMV whose consumer threads feed their own cp.async ring (no loader warp, no mbarriers)."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .gluon_burst import _split_sum
from .gluon_gemm import cta_barrier, reinterpret
from .gluon_stream import GROUP, along, load_x, prepare_x, step_terms
from .grid import GROUP_SIZE
from .pdl import pdl_for, wait_prior_grid

async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _issue(w_ptr, s_ptr, z_ptr, stride_w, stride_s, Kq, N, off_n, step, last, code_bufs, scale_bufs, zero_bufs,
           slot, L4: gl.constexpr):
    GS: gl.constexpr = scale_bufs.type.shape[1]
    BN: gl.constexpr = scale_bufs.type.shape[2]
    P: gl.constexpr = code_bufs.type.shape[2]
    LW: gl.constexpr = gl.SliceLayout(0, L4)
    LG: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, L4))
    g = step * GS + along(GS, 0, 3, LW)
    c = off_n + along(BN, 2, 3, LW)
    ok = step < last
    async_load(code_bufs.index(slot), w_ptr + (g * P + along(P, 1, 3, LW)) * stride_w + c,
               mask=(g * GROUP < Kq) & (c < N) & ok)
    gg = step * GS + along(GS, 0, 2, LG)
    cg = off_n + along(BN, 1, 2, LG)
    bm = (gg * GROUP < Kq) & (cg < N) & ok
    async_load(scale_bufs.index(slot), s_ptr + gg * stride_s + cg, mask=bm)
    async_load(zero_bufs.index(slot), z_ptr + gg * stride_s + cg, mask=bm)
    async_copy.commit_group()


@gluon.jit
def gemv_cp_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, Kq,
                   stride_xm, stride_ym, stride_w, stride_s, per_split, T: gl.constexpr, P: gl.constexpr,
                   GS: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, NSUB: gl.constexpr,
                   SPLIT_K: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr, COL_MULT: gl.constexpr,
                   HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    W: gl.constexpr = gl.num_warps()
    HALF: gl.constexpr = 16 // P
    TC: gl.constexpr = BN // 4
    TR: gl.constexpr = 32 * W // TC
    gl.static_assert(GS % TR == 0, "groups per step must spread evenly over the threads of a column")
    L4: gl.constexpr = gl.BlockedLayout([T, GS // TR, P, 4], [1, 32 // TC, 1, TC], [1, W, 1, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(0, L4)
    LG: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, L4))
    LX: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(2, L4))
    wait_prior_grid()
    off_n = gl.program_id(0) * BN
    first = gl.program_id(1) * per_split
    last = gl.minimum(first + per_split, gl.cdiv(Kq, GS * GROUP))

    code_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, GS, P, BN], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    scale_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, GS, BN], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    zero_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, GS, BN], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    xp_smem = gl.allocate_shared_memory(gl.uint32, [NSUB * HALF, T, GS, P], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    sums_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    xs_smem = gl.allocate_shared_memory(gl.float32, [NSUB, T, GS], sums_layout)
    xd_smem = gl.allocate_shared_memory(gl.float32, [NSUB, T, GS], sums_layout)
    xp_steps = reinterpret(xp_smem, gl.uint32, [NSUB * HALF, T, GS, P], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    xs_steps = reinterpret(xs_smem, gl.float32, [NSUB, T, GS], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    xd_steps = reinterpret(xd_smem, gl.float32, [NSUB, T, GS], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))

    for p0 in gl.static_range(STAGES - 1):
        _issue(w_ptr, s_ptr, z_ptr, stride_w, stride_s, Kq, N, off_n, first + p0, last, code_bufs, scale_bufs,
               zero_bufs, p0, L4)
    acc = gl.zeros([T, GS, BN], gl.float32, gl.SliceLayout(2, L4))
    chunk0 = first // NSUB
    for c in range(chunk0, gl.cdiv(last, NSUB)):
        cta_barrier()
        prepare_x(load_x(x_ptr, stride_xm, M, Kq, c, T, NSUB, P, GS), xp_smem, xs_smem, xd_smem, P)
        cta_barrier()
        for i in range(gl.maximum(c * NSUB, first), gl.minimum(c * NSUB + NSUB, last)):
            j = i - first
            _issue(w_ptr, s_ptr, z_ptr, stride_w, stride_s, Kq, N, off_n, i + STAGES - 1, last, code_bufs,
                   scale_bufs, zero_bufs, (j + STAGES - 1) % STAGES, L4)
            async_copy.wait_group(STAGES - 1)
            slot = j % STAGES
            words = code_bufs.index(slot).load(LW)
            sb = scale_bufs.index(slot).load(LG)
            zb = zero_bufs.index(slot).load(LG)
            u = i - c * NSUB
            acc += step_terms(words, sb, zb, xp_steps, u * HALF, xs_steps.index(u).load(LX),
                              xd_steps.index(u).load(LX), ZOFF, ZMUL, P, L4)
    _split_sum(gl.sum(acc, axis=1), off_n, ws_ptr, cnt_ptr, y_ptr, rs_ptr, ts_ptr, bias_ptr, M, N, stride_ym,
               SPLIT_K, COL_MULT, HAS_TS, HAS_BIAS)


def launch_gemv_cp(x, packed, scales, zeros, row_scale, token_scale, bias, bits, col_mult, zoff, zmul, tokens,
                   block_n, block_k, stages, warps, split, chunk_groups, ws, counters, y):
    m, kq = x.shape
    n = scales.shape[0]
    gs = block_k // GROUP_SIZE
    n_steps = triton.cdiv(kq, block_k)
    per_split = triton.cdiv(n_steps, split)
    split = triton.cdiv(n_steps, per_split)
    tiles = triton.cdiv(n, block_n)
    gemv_cp_kernel[(tiles, split)](
        x, packed, scales.view(torch.uint8), zeros, row_scale, token_scale if token_scale is not None else row_scale,
        bias if bias is not None else row_scale, y, ws, counters, m, n, kq, x.stride(0), y.stride(0),
        packed.stride(1), scales.stride(1), per_split, T=tokens, P=bits, GS=gs, BN=block_n, STAGES=stages,
        NSUB=max(1, chunk_groups // gs), SPLIT_K=split, ZOFF=zoff, ZMUL=zmul, COL_MULT=col_mult,
        HAS_TS=token_scale is not None, HAS_BIAS=bias is not None, num_warps=warps, launch_pdl=pdl_for(x))
    return y
