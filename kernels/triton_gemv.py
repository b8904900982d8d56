"""W{b}A16 GEMV on CUDA cores for one or two tokens (decode), the memory-bound case.

Each program owns ``BN`` output columns and a range of K groups; a thread holds several columns
of one packed word row (the serving layout keeps the packed codes K-major, so those columns are
contiguous), so each activation it loads serves all of them. Per group and column the kernel
forms ``d = sum_k x_k q_k`` and ``X = sum_k x_k`` and adds ``scale * (d - zero * X)``: the zero
point and scale cost two FMAs per 32 weights, not one per weight.

A code is never shifted down: ``word & (mask << p*i)`` is converted as an unsigned integer
(``q * 2^(p*i)``, exact) and the 2^-(p*i) goes into the activation, so a weight costs one
LOP3, one I2FP and one FFMA per token.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import e4m3_scaled, finish, load_act


@triton.jit
def _plane(d0, d1, X0, X1, x_ptr, stride_xm, M, K, Kp, Kq, split_ptr, w_ptr, stride_ww, stride_wn, row0, g, gmask,
           cols, cmask, P: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, SUM_X: tl.constexpr,
           HAS_SPLIT: tl.constexpr):
    """Accumulate one bit plane (width ``P``, weight ``2^S`` in the code) of groups ``g`` into ``d``."""
    SLOTS: tl.constexpr = 32 // P
    for j in tl.static_range(P):
        wrow = row0 + g * P + j
        words = tl.load(w_ptr + wrow[:, None] * stride_ww + cols[None, :] * stride_wn,
                        mask=gmask[:, None] & cmask[None, :], other=0).to(tl.uint32, bitcast=True)
        for i in tl.static_range(SLOTS):
            k = g * 32 + (j * SLOTS + i)
            q = (words & tl.full([1, 1], ((1 << P) - 1) << (P * i), tl.uint32)).to(tl.float32)
            x0 = load_act(x_ptr, stride_xm, 0, k, M, K, Kp, Kq, split_ptr, HAS_SPLIT).to(tl.float32)
            d0 += q * (x0 * (2.0 ** (S - P * i)))[:, None]
            if SUM_X:
                X0 += x0
            if BM == 2:
                x1 = load_act(x_ptr, stride_xm, 1, k, M, K, Kp, Kq, split_ptr, HAS_SPLIT).to(tl.float32)
                d1 += q * (x1 * (2.0 ** (S - P * i)))[:, None]
                if SUM_X:
                    X1 += x1
    return d0, d1, X0, X1


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, split_ptr, y_ptr, ws_ptr, cnt_ptr,
                M, N, K, Kp, Kq, stride_xm, stride_ym, stride_ww, stride_wn, stride_sg, stride_sn, R1, R2,
                P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
                S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, COL_MULT: tl.constexpr,
                BM: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
                HAS_SPLIT: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y[:M] = x[:M] @ W^T`` for M <= BM <= 2; grid (cdiv(N, BN), SPLIT_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    G = Kq // 32
    per_split = tl.cdiv(tl.cdiv(G, SPLIT_K), BG) * BG
    g_lo = pid_k * per_split
    g_hi = tl.minimum(G, g_lo + per_split)
    acc0 = tl.zeros([BG, BN], tl.float32)
    acc1 = tl.zeros([BG, BN], tl.float32)
    for g0 in range(g_lo, g_hi, BG):
        g = g0 + tl.arange(0, BG)
        gmask = g < g_hi
        pmask = gmask[:, None] & cmask[None, :]
        poffs = g[:, None] * stride_sg + cols[None, :] * stride_sn
        c = e4m3_scaled(tl.load(s_ptr + poffs, mask=pmask, other=0))
        zb = (tl.load(z_ptr + poffs, mask=pmask, other=0).to(tl.float32) - ZOFF) * ZMUL
        d0 = tl.zeros([BG, BN], tl.float32)
        d1 = tl.zeros([BG, BN], tl.float32)
        X0 = tl.zeros([BG], tl.float32)
        X1 = tl.zeros([BG], tl.float32)
        d0, d1, X0, X1 = _plane(d0, d1, X0, X1, x_ptr, stride_xm, M, K, Kp, Kq, split_ptr, w_ptr, stride_ww,
                                stride_wn, 0, g, gmask, cols, cmask, P0, S0, BM, True, HAS_SPLIT)
        if P1 > 0:
            d0, d1, X0, X1 = _plane(d0, d1, X0, X1, x_ptr, stride_xm, M, K, Kp, Kq, split_ptr, w_ptr, stride_ww,
                                    stride_wn, R1, g, gmask, cols, cmask, P1, S1, BM, False, HAS_SPLIT)
        if P2 > 0:
            d0, d1, X0, X1 = _plane(d0, d1, X0, X1, x_ptr, stride_xm, M, K, Kp, Kq, split_ptr, w_ptr, stride_ww,
                                    stride_wn, R2, g, gmask, cols, cmask, P2, S2, BM, False, HAS_SPLIT)
        acc0 += c * (d0 - zb * X0[:, None])
        if BM == 2:
            acc1 += c * (d1 - zb * X1[:, None])
    y = tl.sum(acc0, axis=0)[None, :]
    if BM == 2:
        y = tl.permute(tl.join(tl.sum(acc0, axis=0), tl.sum(acc1, axis=0)), (1, 0))
    finish(y, tl.arange(0, BM), cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr, pid_n, pid_k,
           COL_MULT, SPLIT_K, HAS_TS, HAS_BIAS)
