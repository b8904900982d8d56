"""W{b}A16 GEMV on packed half2 arithmetic (``Config("gemv_h2", ...)``: the default for 2- and 4-bit weights at M <= 4).

Same work split as :mod:`kernels.triton_gemv` (``BN`` columns and a K range per program,
``BG`` groups per step, operands loaded a step ahead, split-K reduced by the last program), but
the codes are dequantized and multiplied two at a time in fp16 (Marlin's trick), so a 2-bit code
costs about 1.5 instructions at M = 1 (LOP3, HADD2, HFMA2 per pair) instead of 3.3:

* Dequantization: a packed word holds ``SLOTS = 32 / P`` codes, code ``i`` at bits ``[i P, i P + P)``,
  so its two 16-bit halves hold codes ``t`` and ``t + SLOTS / 2``. ``(w >> 8 s) & (mask << P j) |
  0x64006400`` (one LOP3; one shift per 8 bits) is the half2 ``1024 + 2^(P j) q`` exactly, and one
  ``add.f16x2`` of ``-(1024 + 2^(P j) C)`` makes it ``2^(P j) (q - C)``, exact (``C = 2^(P-1)``
  centres the codes, which keeps the fp16 sums small).
* Products: one ``fma.rn.f16x2`` per code pair and token accumulates ``2^(P j) (q - C) x'`` in fp16
  over one group (16 pairs; the word rows of a group in parallel chains, added at the end), with
  ``x' = x 2^(e - P j)``: ``2^e`` per token and group puts ``max |x 2^e|`` in ``[2^(7-P), 2^(8-P))``
  (exact, whatever the activations' magnitude) and the pair of slot ``j`` is prescaled by
  ``2^(-P j)``, so every product is ``(q - C) x 2^e`` (at most 128, the sums at most 2048: far
  from fp16's range). The group's two halves are converted to fp32 and summed, the zero point is
  applied as in the fp32 kernel (``- (zero - C) sum x 2^e``), and the scale times ``2^-e``
  accumulates groups in fp32.
* The activations of a step are loaded as the two halves of every pair (so a thread packs the
  pairs it holds), reduced within a warp, scaled, rounded to fp16 and packed into half2 words
  cooperatively (once per program), then broadcast to every thread. ``UNROLL=2`` computes two
  steps per loop iteration, so the loads need no register copies.
* Whole-column tiles (``BG >= WHOLE_COLUMN_BG``: few columns, many groups per step, little or no
  split-K; the tuned choice at one token) keep one accumulator per group slot and sum them after the
  loop, since their groups are spread over warps.

The half2 arithmetic is :mod:`kernels.triton_pairs` (inline PTX on the GPU, plain-op twins under the
interpreter, so the CPU tests run the same algorithm). Single-plane codes only (2, 4 and 8 bits), 16-bit activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import release_next_grid, wait_prior_grid_if
from .triton_common import e4m3_scaled, finish
from .triton_pairs import hadd2_asm, hadd2_plain, half2_sum, join, minus_centre, pair_add, pair_fma
from .triton_gemv import _load_rows, _pick, _program_tile, _sz_bytes, _x_tile

H2_BITS = (2, 4, 8)  # single-plane widths
# Tiles with at least this many groups per step are whole-column tiles (few columns, little or no split-K): a step's
# groups are spread over threads and warps, so each group slot keeps its own accumulator until the loop ends
WHOLE_COLUMN_BG = tl.constexpr(8)


def check_h2(bits: int, x_dtype: torch.dtype) -> None:
    """Raise unless the half2 GEMV serves this layer and input (single-plane codes, 16-bit activations)."""
    if bits not in H2_BITS or x_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemv_h2 serves {H2_BITS}-bit weights on fp16/bf16 inputs, got {bits} bits, {x_dtype}")


@triton.jit
def _max_sum(amax, asum, bmax, bsum):
    return tl.maximum(amax, bmax), asum + bsum


@triton.jit
def _x_pairs(xlo, xhi, P: tl.constexpr):
    """Per token and group: the activations as 16 half2 pairs, ``sum_k x_k 2^e`` and ``2^-e``.

    ``xlo, xhi [BM, BG, 16]``: halves 0 and 1 of pair ``u = r HALF + t`` (word row r, slot t),
    loaded separately so that a pair is packed in the thread that holds both halves.
    ``2^e`` puts ``max |x 2^e|`` in ``[2^(7-P), 2^(8-P))`` and the pair of slot ``t`` (bit offset
    ``P j`` within its byte) holds ``x 2^(e - P j)``, which the code's ``2^(P j)`` multiplies back,
    so every product is ``(q - C) x 2^e``, at most 128, and the slot with the largest ``j`` has its
    max in ``[0.5, 1)`` (fp16 normal down to 2^-14 of the max). ``e`` is clamped so the powers of
    two stay normal fp32 numbers.
    """
    HALF: tl.constexpr = 16 // P
    PJ: tl.constexpr = 8 - P  # P j of the highest slot of a byte
    xl = xlo.to(tl.float32)
    xh = xhi.to(tl.float32)
    # one cooperative reduction for both, over the element-wise max and sum of the two halves
    amax, xsum = tl.reduce((tl.maximum(tl.abs(xl), tl.abs(xh)), xl + xh), 2, _max_sum)
    expo = tl.maximum(tl.minimum(amax.to(tl.int32, bitcast=True) >> 23, 252), PJ)
    jbits = P * ((tl.arange(0, 16) % HALF) % (8 // P))  # P j of each pair's slot
    scale = ((253 + PJ - expo)[:, :, None] - jbits[None, None, :] << 23).to(tl.float32, bitcast=True)
    pairs = join(xl * scale, xh * scale, False)
    up = ((253 + PJ - expo) << 23).to(tl.float32, bitcast=True)
    return pairs, xsum * up, ((expo + 1 - PJ) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _group_dots(words, xr, one, P: tl.constexpr, ASM: tl.constexpr):
    """``[BM, BG, BN]`` float32: per token, group and column, ``sum_k (q_k - C) x_k 2^e`` over the group's codes.

    ``words [1, BG, P, BN]`` (uint32, word row r of each group), ``xr [BM, BG, P, SLOTS / 2]``
    half2 activation pairs of :func:`_x_pairs` (pair t of row r: columns ``r SLOTS + t`` and
    ``r SLOTS + t + SLOTS / 2``), ``one`` the half2 (1024, 1024) bits (a run-time value, so that
    the LOP3 takes the mask as its immediate).
    """
    HALF: tl.constexpr = 16 // P  # code pairs per word
    PER_BYTE: tl.constexpr = 8 // P
    acc = tl.zeros([xr.shape[0], words.shape[1], P, words.shape[3]], tl.uint32)
    for t in tl.static_range(HALF):
        j = t % PER_BYTE
        mask = (((1 << P) - 1) << (P * j)) * 0x10001
        v = ((words >> (8 * (t // PER_BYTE))) & mask) | one  # half2 1024 + 2^Pj q, exact
        # minus half2 (1024 + 2^Pj C), C = 2^(P-1): 2^Pj (q - C), exact
        q = pair_add(v, tl.full([1, 1, 1, 1], minus_centre(P * j, P, False), tl.uint32), False, ASM)
        acc = pair_fma(q, _pick(xr, t, HALF)[:, :, :, None], acc, False, ASM)
    if ASM:
        acc = tl.reduce(acc, 2, hadd2_asm)
    else:
        acc = tl.reduce(acc, 2, hadd2_plain)
    return half2_sum(acc, ASM)


@triton.jit
def _h2_step(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g0, g_hi, tok, kk, cols, cmask, cols4, M, K, Kp, Kq, stride_xm,
             stride_ww, stride_wn, stride_sg, stride_sn, P0: tl.constexpr, BG: tl.constexpr, HALF: tl.constexpr,
             HAS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
    """The step at group ``g0`` as loaded: words, the two halves of the activation pairs (columns ``kk`` and
    ``kk + HALF``), scale and zero bytes."""
    gs = g0 + tl.arange(0, BG)
    words = _load_rows(w_ptr, stride_ww, stride_wn, 0, g0, g_hi, cols, cmask, P0, BG)
    xlo = _x_tile(x_ptr, stride_xm, tok, gs, g_hi, M, K, Kp, Kq, split_ptr, HAS_SPLIT, EVEN_K, kk)
    xhi = _x_tile(x_ptr, stride_xm, tok, gs, g_hi, M, K, Kp, Kq, split_ptr, HAS_SPLIT, EVEN_K, kk + HALF)
    sbytes, zbytes = _sz_bytes(s_ptr, z_ptr, gs, g_hi, cols4, cmask, stride_sg, stride_sn)
    return words, xlo, xhi, sbytes, zbytes


@triton.jit
def _h2_accumulate(acc, words, xlo, xhi, sbytes, zbytes, one, zoff: tl.constexpr, ZMUL: tl.constexpr, P: tl.constexpr,
                   BM: tl.constexpr, BG: tl.constexpr, ASM: tl.constexpr, DEFER: tl.constexpr):
    """``acc [BM, BN]`` plus one step's ``sum_g scale (sum_k (q_k - zero) x_k)`` (operands as :func:`_h2_step` loads them);
    with ``DEFER`` ``acc [BM, BG, BN]`` plus the step's terms per group (summed over groups after the loop)."""
    HALF: tl.constexpr = 16 // P
    c = tl.sum(e4m3_scaled(sbytes), axis=2)  # [1, BG, BN] (a sum over the size-1 axis: the words' layout)
    zc = tl.sum(zbytes.to(tl.float32), axis=2) * ZMUL - zoff * ZMUL  # one FFMA, exact
    pairs, xsum, down = _x_pairs(xlo, xhi, P)
    pairs = tl.sum(pairs[:, :, :, None], axis=3)  # broadcast after the packing (see triton_gemv)
    d = _group_dots(words, tl.reshape(pairs, (BM, BG, P, HALF)), one, P, ASM)
    term = (c * down[:, :, None]) * (d - zc * xsum[:, :, None])
    if DEFER:
        acc = acc + term
    else:
        acc = acc + tl.sum(term, axis=1)
    return acc


@triton.jit
def gemv_h2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, split_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, Kp, Kq, stride_xm, stride_ym, stride_ww, stride_wn, stride_sg, stride_sn, one,
                   P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
                   S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, COL_MULT: tl.constexpr,
                   BM: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, SPLIT_K, HAS_SPLIT: tl.constexpr,
                   EVEN_K: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                   UNROLL: tl.constexpr = 2, PDL: tl.constexpr = False):
    """``y[:M] = x[:M] @ W^T`` for M <= BM (single-plane codes, 16-bit ``x``); grid (cdiv(N, BN), SPLIT_K).

    The arguments are :func:`kernels.triton_gemv.gemv_kernel`'s without ``R1, R2, magic, WIN``, and
    ``one`` (:data:`kernels.triton_pairs.F16_ONE`); ``ASM`` selects inline PTX (GPU) or its plain-op twins (interpreter);
    ``UNROLL`` (1 or 2) steps per loop iteration (a step past ``g_hi`` loads nothing and adds exactly 0); ``PDL``
    waits for the previous kernel first and lets the next one launch before the epilogue (:mod:`kernels.pdl`).
    """
    wait_prior_grid_if(PDL)
    tl.static_assert(P1 == 0 and (P0 == 2 or P0 == 4 or P0 == 8))
    cols, cmask, cols4, g_lo, g_hi = _program_tile(N, Kq, SPLIT_K, BN, UNROLL * BG)  # splits of whole loop iterations
    tok = tl.arange(0, BM)
    HALF: tl.constexpr = 16 // P0
    u = tl.arange(0, 16)  # pair u = r * HALF + t (word row r, slot t): column r * 2 HALF + t of the group (half 0)
    kk = (u // HALF) * (2 * HALF) + u % HALF
    zoff: tl.constexpr = ZOFF + (1 << (P0 - 1)) / ZMUL  # (zero_b - C) = (zero - zoff) * ZMUL
    # whole-column tiles sum their per-group accumulators once, after the loop, instead of across warps every step
    DEFER: tl.constexpr = BG >= WHOLE_COLUMN_BG
    if DEFER:
        acc = tl.zeros([BM, BG, BN], tl.float32)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
    w0, xl0, xh0, s0, z0 = _h2_step(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g_lo, g_hi, tok, kk, cols, cmask, cols4, M,
                                    K, Kp, Kq, stride_xm, stride_ww, stride_wn, stride_sg, stride_sn, P0, BG, HALF,
                                    HAS_SPLIT, EVEN_K)
    for g0 in range(g_lo, g_hi, UNROLL * BG):
        if UNROLL == 2:  # step 2i + 2 loads into step 2i's registers while step 2i + 1 computes: no register copies
            w1, xl1, xh1, s1, z1 = _h2_step(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g0 + BG, g_hi, tok, kk, cols, cmask,
                                            cols4, M, K, Kp, Kq, stride_xm, stride_ww, stride_wn, stride_sg, stride_sn,
                                            P0, BG, HALF, HAS_SPLIT, EVEN_K)
            acc = _h2_accumulate(acc, w0, xl0, xh0, s0, z0, one, zoff, ZMUL, P0, BM, BG, ASM, DEFER)
            w0, xl0, xh0, s0, z0 = _h2_step(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g0 + 2 * BG, g_hi, tok, kk, cols,
                                            cmask, cols4, M, K, Kp, Kq, stride_xm, stride_ww, stride_wn, stride_sg,
                                            stride_sn, P0, BG, HALF, HAS_SPLIT, EVEN_K)
            acc = _h2_accumulate(acc, w1, xl1, xh1, s1, z1, one, zoff, ZMUL, P0, BM, BG, ASM, DEFER)
        else:  # the next step is loaded while this one computes
            w1, xl1, xh1, s1, z1 = w0, xl0, xh0, s0, z0
            w0, xl0, xh0, s0, z0 = _h2_step(x_ptr, w_ptr, s_ptr, z_ptr, split_ptr, g0 + BG, g_hi, tok, kk, cols, cmask,
                                            cols4, M, K, Kp, Kq, stride_xm, stride_ww, stride_wn, stride_sg, stride_sn,
                                            P0, BG, HALF, HAS_SPLIT, EVEN_K)
            acc = _h2_accumulate(acc, w1, xl1, xh1, s1, z1, one, zoff, ZMUL, P0, BM, BG, ASM, DEFER)
    if DEFER:
        total = tl.sum(acc, axis=1)
    else:
        total = acc
    release_next_grid(PDL)
    finish(total, tok, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr, tl.program_id(0),
           tl.program_id(1), COL_MULT, SPLIT_K, HAS_TS, HAS_BIAS)
