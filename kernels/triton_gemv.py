"""W{b}A16 GEMV on CUDA cores for decode-sized M (1..16 tokens), the memory-bound case.

Each program owns ``BN`` output columns and a range of K groups, walked ``BG`` groups per step
with the next step's packed words loaded before the current step is computed (register double
buffering), so every thread keeps a load in flight while it computes. A thread holds several
columns of each packed word row (the serving layout keeps the packed codes K-major, so those
columns are contiguous: 16-byte loads), so every activation it loads serves all of them, and it
holds all ``BG`` groups of its columns, so the per-group sums below never cross threads.

Dequantization without an integer-to-float conversion or a subtraction per code: a shifted copy
of the word puts code ``q`` (``P`` bits) at mantissa bit ``p`` of a float whose exponent bits are
OR-ed in by the same LOP3, so the float is exactly ``2^(23-p) + q`` (``2^S`` times that for the
lower planes of a multi-plane code). One FFMA per code and token accumulates ``v * x``; the
offsets ``sum_k 2^(23-p_k) x_k`` (``XO``) depend only on the activations and are subtracted once
per group. One shifted copy serves ``WIN / P`` codes (``p`` in ``[23 - WIN, 23 - P]``), so a
32-bit word costs 4 shifts for 16-bit inputs (``WIN = 8``: offsets at most 2^8, products exact,
the accumulation loses at most 8 of fp32's 24 bits) and one shift per code for fp32 inputs
(``WIN = P``). Per group and column the zero point and scale then cost two FMAs:
``acc += c * (d - zero * X)`` with ``X = sum_k x_k``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import release_next_grid, wait_prior_grid_if
from .triton_common import e4m3_scaled, finish, load_act

MAGIC_BITS = 0x4B000000  # exponent field of 2^23 (150 << 23); passed at run time so no constant gets folded


@triton.jit
def _x_tile(x_ptr, stride_xm, tok, g, g_hi, M, K, Kp, Kq, split_ptr, HAS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
            kk):
    """Activations ``[BM, BG, 32]``: columns ``kk`` of groups ``g`` (0 off the input and for groups >= ``g_hi``)."""
    k = (g * 32)[None, :, None] + kk[None, None, :]
    valid = (g < g_hi)[None, :, None]
    m = tok[:, None, None]
    if EVEN_K:
        return tl.load(x_ptr + m * stride_xm + k, mask=valid & (m < M), other=0.0)
    return load_act(x_ptr, stride_xm, m, tl.where(valid, k, Kq), M, K, Kp, Kq, split_ptr, HAS_SPLIT)


@triton.jit
def _sz_bytes(s_ptr, z_ptr, g, g_hi, cols4, cmask, stride_sg, stride_sn):
    """Scale and zero bytes ``[1, BG, 1, BN]`` of groups ``g``, 4 columns per thread like the words (same layout)."""
    pmask = (g < g_hi)[None, :, None, None] & cmask[None, None, None, :]
    poffs = g[None, :, None, None] * stride_sg + cols4[None, None, None, :] * stride_sn
    return tl.load(s_ptr + poffs, mask=pmask, other=0), tl.load(z_ptr + poffs, mask=pmask, other=0)


@triton.jit
def _offset_coef(i, P: tl.constexpr, S: tl.constexpr, WIN: tl.constexpr):
    """``2^S * 2^(23 - p)`` for slot ``i`` of a plane (the offset its code carries), as fp32 bits."""
    NV: tl.constexpr = WIN // P
    return ((127 + S + WIN - P * (i % NV)) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _code(words, magic, i: tl.constexpr, P: tl.constexpr, S: tl.constexpr, WIN: tl.constexpr):
    """Slot ``i``'s code ``q`` of every word as the float ``2^S * (2^(23 - p) + q)`` (one shift per ``WIN / P`` slots)."""
    NV: tl.constexpr = WIN // P
    p: tl.constexpr = 23 - WIN + P * (i % NV)  # mantissa bit the code lands on
    s: tl.constexpr = p - P * i  # shift that puts it there
    if s >= 0:
        ws = words << s
    else:
        ws = words >> (-s)
    e = (magic + ((S - p) << 23)).to(tl.uint32, bitcast=True)  # exponent field of 2^(S + 23 - p)
    return ((ws & (((1 << P) - 1) << p)) | e).to(tl.float32, bitcast=True)


@triton.jit
def _pick(t, i: tl.constexpr, n: tl.constexpr):
    """``t[..., i]`` of ``t [A, B, C, n]`` (n a power of two) by halving splits, which are register renames."""
    for b in tl.static_range(5):  # n <= 32
        if (1 << b) < n:
            even, odd = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2], t.shape[3] // 2, 2)))
            if (i >> b) & 1:
                t = odd
            else:
                t = even
    return tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2]))


@triton.jit
def _plane(words, xt, magic, P: tl.constexpr, S: tl.constexpr, WIN: tl.constexpr, BM: tl.constexpr,
           BG: tl.constexpr):
    """``[BM, BG, BN]``: the sum over this plane's codes of ``v * x``; ``words [1, BG, P, BN]``, ``xt [BM, BG, 32]``."""
    SLOTS: tl.constexpr = 32 // P
    xr = tl.reshape(xt, (BM, BG, P, SLOTS))  # column k of a group = word row * SLOTS + slot
    part = _code(words, magic, 0, P, S, WIN) * _pick(xr, 0, SLOTS)[:, :, :, None]
    for i in tl.static_range(1, SLOTS):
        part += _code(words, magic, i, P, S, WIN) * _pick(xr, i, SLOTS)[:, :, :, None]
    return tl.sum(part, axis=2)


@triton.jit
def _load_rows(w_ptr, stride_ww, stride_wn, row0, g0, g_hi, cols, cmask, P: tl.constexpr, BG: tl.constexpr):
    """Packed words ``[1, BG, P, BN]`` (uint32) of groups ``g0 .. g0 + BG`` of one plane (word rows from ``row0``)."""
    g = g0 + tl.arange(0, BG)[None, :, None, None]
    r = tl.arange(0, P)[None, None, :, None]
    ptrs = w_ptr + (row0 + g * P + r) * stride_ww + cols[None, None, None, :] * stride_wn
    return tl.load(ptrs, mask=(g < g_hi) & cmask[None, None, None, :], other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _program_tile(N, Kq, SPLIT_K, BN: tl.constexpr, BG: tl.constexpr):
    """This program's columns (and mask), the same with 4-column runs marked, and its group range ``[g_lo, g_hi)``."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    G = Kq // 32
    per_split = tl.cdiv(tl.cdiv(G, SPLIT_K), BG) * BG
    g_lo = tl.program_id(1) * per_split
    return cols, cols < N, tl.max_contiguous(cols, 4), g_lo, tl.minimum(G, g_lo + per_split)


@triton.jit
def _step_operands(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g0, g_hi, tok, kk, cols, cmask, cols4, M, K, Kp, Kq, stride_xm,
                   stride_ww, stride_wn, stride_sg, stride_sn, P0: tl.constexpr, BG: tl.constexpr,
                   HAS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
    """The step at group ``g0`` as loaded: words of plane 0, activations (columns ``kk``), scale and zero bytes."""
    gs = g0 + tl.arange(0, BG)
    words = _load_rows(w_ptr, stride_ww, stride_wn, 0, g0, g_hi, cols, cmask, P0, BG)
    xt = _x_tile(x_ptr, stride_xm, tok, gs, g_hi, M, K, Kp, Kq, split_ptr, HAS_SPLIT, EVEN_K, kk)
    sbytes, zbytes = _sz_bytes(s_ptr, z_ptr, gs, g_hi, cols4, cmask, stride_sg, stride_sn)
    return words, xt, sbytes, zbytes


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, split_ptr, y_ptr, ws_ptr, cnt_ptr,
                M, N, K, Kp, Kq, stride_xm, stride_ym, stride_ww, stride_wn, stride_sg, stride_sn, R1, R2, magic,
                P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
                S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, COL_MULT: tl.constexpr,
                BM: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, SPLIT_K, WIN: tl.constexpr,
                HAS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr,
                PDL: tl.constexpr = False):
    """``y[:M] = x[:M] @ W^T`` for M <= BM; grid (cdiv(N, BN), SPLIT_K).

    ``magic`` is :data:`MAGIC_BITS`; ``WIN`` the mantissa window of one shifted word copy
    (8 for 16-bit activations, ``P0`` for fp32 ones, whose products are not exact); ``PDL``
    waits for the previous kernel first and lets the next one launch before the epilogue (:mod:`kernels.pdl`).
    """
    wait_prior_grid_if(PDL)
    cols, cmask, cols4, g_lo, g_hi = _program_tile(N, Kq, SPLIT_K, BN, BG)
    tok = tl.arange(0, BM)
    kk = tl.arange(0, 32)
    # offset coefficient of every column of a group (all planes), for XO = sum_k coef_k x_k
    coef = _offset_coef((kk % (32 // P0)), P0, S0, WIN)
    if P1 > 0:
        coef += _offset_coef((kk % (32 // P1)), P1, S1, WIN)
    if P2 > 0:
        coef += _offset_coef((kk % (32 // P2)), P2, S2, WIN)
    acc = tl.zeros([BM, BN], tl.float32)
    # every operand of a step is loaded one step ahead and used as loaded (conversions happen at use)
    nxt, nxt_x, nxt_s, nxt_z = _step_operands(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g_lo, g_hi, tok, kk, cols, cmask, cols4,
                                              M, K, Kp, Kq, stride_xm, stride_ww, stride_wn, stride_sg, stride_sn,
                                              P0, BG, HAS_SPLIT, EVEN_K)
    for g0 in range(g_lo, g_hi, BG):
        words, xt, sbytes, zbytes = nxt, nxt_x, nxt_s, nxt_z
        nxt, nxt_x, nxt_s, nxt_z = _step_operands(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g0 + BG, g_hi, tok, kk, cols,
                                                  cmask, cols4, M, K, Kp, Kq, stride_xm, stride_ww, stride_wn, stride_sg,
                                                  stride_sn, P0, BG, HAS_SPLIT, EVEN_K)
        c = tl.sum(e4m3_scaled(sbytes), axis=2)  # (a sum over the size-1 axis: the words' register layout)
        zb = (tl.sum(zbytes.to(tl.float32), axis=2) - ZOFF) * ZMUL
        xt = xt.to(tl.float32)
        # per (token, group): X = sum x and XO = sum coef * x, cooperatively over the program's threads
        X = tl.sum(xt, axis=2)
        XO = tl.sum(xt * coef[None, None, :], axis=2)
        # every thread needs all of xt (a broadcast through shared memory); the sum over a size-1 axis keeps
        # the compiler from moving that broadcast before the bf16 -> fp32 conversion, which would then run
        # in every thread instead of once per element
        xt = tl.sum(xt[:, :, :, None], axis=3)
        d = _plane(words, xt, magic, P0, S0, WIN, BM, BG)
        if P1 > 0:
            w1 = _load_rows(w_ptr, stride_ww, stride_wn, R1, g0, g_hi, cols, cmask, P1, BG)
            d += _plane(w1, xt, magic, P1, S1, WIN, BM, BG)
        if P2 > 0:
            w2 = _load_rows(w_ptr, stride_ww, stride_wn, R2, g0, g_hi, cols, cmask, P2, BG)
            d += _plane(w2, xt, magic, P2, S2, WIN, BM, BG)
        t = zb * X[:, :, None] + XO[:, :, None]
        acc += tl.sum(c * (d - t), axis=1)
    release_next_grid(PDL)
    finish(acc, tok, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr, tl.program_id(0),
           tl.program_id(1), COL_MULT, SPLIT_K, HAS_TS, HAS_BIAS)
