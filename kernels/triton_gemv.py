"""W{b}A16 GEMV on CUDA cores for one or two tokens (decode), the memory-bound case.

Each program owns ``BN`` output columns and a range of K groups; a thread holds several columns
of one packed word row (the serving layout keeps the packed codes K-major, so those columns are
contiguous), so each activation it loads serves all of them. Per group and column the kernel
forms ``d = sum_k x_k q_k`` and ``X = sum_k x_k`` and adds ``scale * (d - zero * X)``: the zero
point and scale cost two FMAs per 32 weights, not one per weight.

A code is never shifted down: each 16-bit half of a word is put under the exponent of 2^23
once (``half | 0x4B000000``); then ``half & (0x4B000000 | mask << b)`` read as a float is
``2^23 + q * 2^b``, one FADD removes the 2^23 exactly, and the 2^-b goes into the activation. A weight costs one LOP3, one FADD and one FFMA
per token; the integer-to-float instruction (I2FP), which runs at a fraction of the FMA rate
on Hopper, is never used.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import e4m3_scaled, finish, load_act

MAGIC_BITS = 0x4B000000  # the float 2^23: its low 23 mantissa bits hold an integer exactly
_MAGIC_BITS = tl.constexpr(MAGIC_BITS)
_MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _act(x_ptr, stride_xm, m, k, gmask, M, K, Kp, Kq, split_ptr, HAS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
    """Activations of token ``m`` at columns ``k`` (one per group) as fp32.

    With ``EVEN_K`` (K a multiple of 32, no split slots) every column of a valid group is real
    input, so the group mask is the whole mask: no per-element compares.
    """
    if EVEN_K:
        return tl.load(x_ptr + m * stride_xm + k, mask=gmask, other=0.0).to(tl.float32)
    return load_act(x_ptr, stride_xm, m, k, M, K, Kp, Kq, split_ptr, HAS_SPLIT).to(tl.float32)


@triton.jit
def _plane(d0, d1, X0, X1, x_ptr, stride_xm, M, K, Kp, Kq, split_ptr, w_ptr, stride_ww, stride_wn, row0, g, gmask,
           cols, cmask, magic, P: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, SUM_X: tl.constexpr,
           HAS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
    """Accumulate one bit plane (width ``P``, weight ``2^S`` in the code) of groups ``g`` into ``d``."""
    SLOTS: tl.constexpr = 32 // P
    for j in tl.static_range(P):
        wrow = row0 + g * P + j
        lo = tl.load(w_ptr + wrow[:, None] * stride_ww + cols[None, :] * stride_wn,
                     mask=gmask[:, None] & cmask[None, :], other=0).to(tl.uint32, bitcast=True)
        lo_f = lo | magic  # each 16-bit half under the exponent of 2^23 (the & below clears the rest)
        hi_f = (lo >> 16) | magic
        for i in tl.static_range(SLOTS):
            k = g * 32 + (j * SLOTS + i)
            off = (P * i) % 16  # the code's bit offset in its half
            if P * i < 16:
                half = lo_f
            else:
                half = hi_f
            q = (half & (_MAGIC_BITS | (((1 << P) - 1) << off))).to(tl.float32, bitcast=True) - _MAGIC
            x0 = _act(x_ptr, stride_xm, 0, k, gmask, M, K, Kp, Kq, split_ptr, HAS_SPLIT, EVEN_K)
            d0 += q * (x0 * ((1 << S) / (1 << off)))[:, None]
            if SUM_X:
                X0 += x0
            if BM == 2:
                x1 = _act(x_ptr, stride_xm, 1, k, gmask, M, K, Kp, Kq, split_ptr, HAS_SPLIT, EVEN_K)
                d1 += q * (x1 * ((1 << S) / (1 << off)))[:, None]
                if SUM_X:
                    X1 += x1
    return d0, d1, X0, X1


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, split_ptr, y_ptr, ws_ptr, cnt_ptr,
                M, N, K, Kp, Kq, stride_xm, stride_ym, stride_ww, stride_wn, stride_sg, stride_sn, R1, R2, magic,
                P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
                S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, COL_MULT: tl.constexpr,
                BM: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
                HAS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y[:M] = x[:M] @ W^T`` for M <= BM <= 2; grid (cdiv(N, BN), SPLIT_K).

    ``magic`` is :data:`MAGIC_BITS`, passed at run time: as a compile-time constant the compiler
    folds it into every per-code mask and then spends a register move per code.
    """
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
                                stride_wn, 0, g, gmask, cols, cmask, magic, P0, S0, BM, True, HAS_SPLIT, EVEN_K)
        if P1 > 0:
            d0, d1, X0, X1 = _plane(d0, d1, X0, X1, x_ptr, stride_xm, M, K, Kp, Kq, split_ptr, w_ptr, stride_ww,
                                    stride_wn, R1, g, gmask, cols, cmask, magic, P1, S1, BM, False, HAS_SPLIT, EVEN_K)
        if P2 > 0:
            d0, d1, X0, X1 = _plane(d0, d1, X0, X1, x_ptr, stride_xm, M, K, Kp, Kq, split_ptr, w_ptr, stride_ww,
                                    stride_wn, R2, g, gmask, cols, cmask, magic, P2, S2, BM, False, HAS_SPLIT, EVEN_K)
        acc0 += c * (d0 - zb * X0[:, None])
        if BM == 2:
            acc1 += c * (d1 - zb * X1[:, None])
    y = tl.sum(acc0, axis=0)[None, :]
    if BM == 2:
        y = tl.permute(tl.join(tl.sum(acc0, axis=0), tl.sum(acc1, axis=0)), (1, 0))
    finish(y, tl.arange(0, BM), cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr, pid_n, pid_k,
           COL_MULT, SPLIT_K, HAS_TS, HAS_BIAS)
