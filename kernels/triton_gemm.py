"""W{b}A16 (and, on quantized activations, W{b}A{a}) linear on tensor cores, any M.

Each program owns a ``BM x BN`` output tile (optionally one of ``SPLIT_K`` slices of K) and per
``BK`` step dequantizes a ``BN x BK`` weight tile in registers into the activation dtype. The
packed words are read K-major (contiguous along N) and unpacked as ``[slot, word row, column]``
so every thread keeps whole words; a permute + reshape puts the codes in natural K order without
moving data. ``row_scale`` (and the token scale of quantized activations) is applied once per
output in the epilogue.

Two orientations of the product (``X_FIRST``):

* ``acc[BM, BN] += x_tile @ W_tile^T`` (``Config("gemm")``): the activations are wgmma's A operand,
  loaded into shared memory by ``cp.async`` a few steps ahead, and the dequantized weights its B
  operand, stored to shared memory; a step's wgmmas issue back to back and are waited for once.
  wgmma's A has 64 rows, so fewer tokens leave rows of the MMA idle (the tensor cores are idle
  most of the time here anyway) or, with ``BM < 64``, Triton uses ``mma.sync`` tiles.
* ``acc[BN, BM] += W_tile @ x_tile^T`` (``Config("gemm_t")``): the dequantized weights are wgmma's
  register operand (staged through shared memory into its register layout) and the activations
  the shared-memory operand, which fits decode sizes (BM = 16 is wgmma's N); 2- and 4-bit codes are
  dequantized two per instruction (:func:`_dequant_pairs`). Triton 3.6 (the H200's) keeps up to 7 of a
  step's wgmmas in flight; an offline Triton 3.9 build waits for each.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import release_next_grid, wait_prior_grid_if
from .triton_common import e4m3_scaled, finish, load_act
from .triton_pairs import minus_centre, pair_add, pair_fma, splat


@triton.jit
def _gathered_plane(w_ptr, stride_ww, stride_wn, row0, k0, kk, n, nmask, Kq, P: tl.constexpr, S: tl.constexpr):
    """Codes of a secondary bit plane (multi-plane precisions) at tile offsets ``kk``, shifted to weight ``2^S``."""
    SLOTS: tl.constexpr = 32 // P
    k = k0 + kk
    words = tl.load(w_ptr + (row0 + k // SLOTS) * stride_ww + n * stride_wn, mask=(k < Kq) & nmask,
                    other=0).to(tl.uint32, bitcast=True)
    return ((words >> ((k % SLOTS) * P).to(tl.uint32)) & ((1 << P) - 1)) << S


@triton.jit
def _dequant_pairs(words, c, zc, one, P: tl.constexpr, OP_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """``[BN, BK]`` ``(code - zero_b) * c`` in ``OP_DTYPE`` (16-bit), two codes per instruction.

    ``words [1, BKW, BN]``, ``c``, ``zc = zero_b * c`` per word row (fp32, exact). A word's halves hold codes
    ``t`` and ``t + HALF``; ``(w >> s) & (mask << p) | one`` (one LOP3, ``one`` the pair (M, M): 128 in bf16,
    1024 in fp16, a run-time value so the mask stays the immediate) is the pair ``M + 2^p q`` exactly, with
    ``p`` stepping by ``P`` while the code fits the mantissa (and, in fp16, ``c 2^-p`` stays representable:
    ``p <= 7``), so one shift serves several slots. One add gives ``2^p (q - C)`` exactly (``C = 2^(P-1)``), one
    FMA ``2^p (q - C) * c 2^-p + (C - zero_b) c``, rounded once; ``(C - zero_b) c`` is rounded to ``OP_DTYPE``
    first (the only other rounding: at most 2^-9 of ``|C - zero_b| c`` in bf16, against the fp32 path's exact
    operand). Putting the halves back in K order costs a byte permute per pair (the activations permuted instead
    would no longer be copied to shared memory asynchronously: 35-100 % slower on the H200, session 10).
    """
    BF16: tl.constexpr = OP_DTYPE == tl.bfloat16
    HALF: tl.constexpr = 16 // P
    NPOS: tl.constexpr = (7 - P) // P + 1 if BF16 else min(7, 10 - P) // P + 1  # slots per shifted copy
    C: tl.constexpr = 1 << (P - 1)
    t = tl.arange(0, HALF)[:, None, None]
    p = P * (t % NPOS)
    v = ((words >> (P * t - p).to(tl.uint32)) & ((((1 << P) - 1) << p) * 0x10001).to(tl.uint32)) | one
    u = pair_add(v, minus_centre(p, P, BF16).to(tl.uint32), BF16, ASM)
    w = pair_fma(u, splat(c * (1.0 / (1 << p).to(tl.float32)), BF16, ASM), splat(C * c - zc, BF16, ASM), BF16, ASM)
    lo = (w & 0xFFFF).to(tl.uint16).to(OP_DTYPE, bitcast=True)
    hi = (w >> 16).to(tl.uint16).to(OP_DTYPE, bitcast=True)
    return tl.reshape(tl.permute(tl.join(lo, hi), (2, 1, 3, 0)), (words.shape[2], HALF * 2 * words.shape[1]))


@triton.jit
def dequant_tile(w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, k0, Kq, R1, R2, magic, one, cols,
                 cmask, P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
                 S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, BK: tl.constexpr,
                 OP_DTYPE: tl.constexpr, PAIRS: tl.constexpr = False, ASM: tl.constexpr = False):
    """Weight tile ``[BN, BK]`` for K columns ``k0..k0+BK``: ``(code - zero_b) * e4m3 / 256`` in ``OP_DTYPE``.

    Single-plane codes (2, 4, 8 bits) skip the integer-to-float conversion, as in the GEMV
    (:mod:`kernels.triton_gemv`): a shifted copy of the word, shared by ``8 / P`` slots, puts the
    code at mantissa bit ``p`` (15..15 + 8 - P) and the same LOP3 ORs in the exponent of
    ``2^(23-p)`` (``magic`` at run time, so ptxas does not rematerialize it per code), giving
    ``v = 2^(23-p) + q``; one FFMA forms ``v * c - (2^(23-p) + zero_b) * c = (q - zero_b) * c``,
    exact in fp32 (the subtrahend has at most ~20 significant bits). With ``PAIRS`` (2- and 4-bit codes,
    16-bit ``OP_DTYPE``) two codes per instruction instead (:func:`_dequant_pairs`; ``ASM`` as in
    :mod:`kernels.triton_pairs`).
    """
    SL0: tl.constexpr = 32 // P0
    BKW: tl.constexpr = BK // SL0
    w = tl.arange(0, BKW)[None, :, None]
    i = tl.arange(0, SL0)[:, None, None]
    n = cols[None, None, :]
    nmask = cmask[None, None, :]
    row = k0 // SL0 + w
    rmask = (row < Kq // SL0) & nmask
    words = tl.load(w_ptr + row * stride_ww + n * stride_wn, mask=rmask, other=0).to(tl.uint32, bitcast=True)
    poffs = (k0 // 32 + w // P0) * stride_sg + n * stride_sn
    c = e4m3_scaled(tl.load(s_ptr + poffs, mask=rmask, other=0))
    zc = (tl.load(z_ptr + poffs, mask=rmask, other=0).to(tl.float32) - ZOFF) * ZMUL * c
    if PAIRS:
        return _dequant_pairs(words, c, zc, one, P0, OP_DTYPE, ASM)
    if P1 == 0:
        p = 15 + P0 * (i % (8 // P0))  # mantissa bit of slot i's code; shift p - P0 * i puts it there
        shifted = (words << tl.maximum(p - P0 * i, 0).to(tl.uint32)) >> tl.maximum(P0 * i - p, 0).to(tl.uint32)
        e = (magic - (p << 23)).to(tl.uint32, bitcast=True)  # exponent field of 2^(23 - p)
        v = ((shifted & (((1 << P0) - 1) << p).to(tl.uint32)) | e).to(tl.float32, bitcast=True)
        off = ((150 - p) << 23).to(tl.float32, bitcast=True)  # 2^(23 - p)
        b = v * c - (off * c + zc)
    else:
        q = ((words >> (i * P0).to(tl.uint32)) & ((1 << P0) - 1)) << S0
        q = q | _gathered_plane(w_ptr, stride_ww, stride_wn, R1, k0, SL0 * w + i, n, nmask, Kq, P1, S1)
        if P2 > 0:
            q = q | _gathered_plane(w_ptr, stride_ww, stride_wn, R2, k0, SL0 * w + i, n, nmask, Kq, P2, S2)
        b = q.to(tl.float32) * c - zc
    return tl.reshape(tl.permute(b.to(OP_DTYPE), (2, 1, 0)), (cols.shape[0], BK))


@triton.jit
def gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, split_ptr, y_ptr, ws_ptr, cnt_ptr,
                M, N, K, Kp, Kq, stride_xm, stride_ym, stride_ww, stride_wn, stride_sg, stride_sn, R1, R2, magic, one,
                P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
                S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, COL_MULT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                SPLIT_K, HAS_SPLIT: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr,
                X_FIRST: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False):
    """``y = x @ W^T``; grid (cdiv(M, BM) * cdiv(N, BN), SPLIT_K), M tiles grouped by GROUP_M for L2 reuse;
    ``X_FIRST`` the orientation of the product (module docstring); ``PDL`` waits for the previous kernel first and
    lets the next one launch before the epilogue (:mod:`kernels.pdl`)."""
    wait_prior_grid_if(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    op_dtype: tl.constexpr = x_ptr.dtype.element_ty
    # W @ x^T with 2- or 4-bit codes and 16-bit activations: two codes per dequantization instruction
    PAIRS: tl.constexpr = (not X_FIRST) and P1 == 0 and P0 <= 4 and op_dtype != tl.float32
    n_tiles = tl.cdiv(Kq, BK)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    acc = tl.zeros([BM, BN] if X_FIRST else [BN, BM], tl.float32)
    for kt in range(pid_k * per_split, tl.minimum(n_tiles, (pid_k + 1) * per_split)):
        k0 = kt * BK
        a = load_act(x_ptr, stride_xm, rows[:, None], k0 + tl.arange(0, BK)[None, :], M, K, Kp, Kq, split_ptr,
                     HAS_SPLIT)
        w = dequant_tile(w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, k0, Kq, R1, R2, magic, one,
                         cols, cmask, P0, S0, P1, S1, P2, S2, ZOFF, ZMUL, BK, op_dtype, PAIRS, ASM)
        if X_FIRST:
            acc = tl.dot(a, tl.trans(w), acc)
        else:
            acc = tl.dot(w, tl.trans(a), acc)
    release_next_grid(PDL)
    finish(acc if X_FIRST else tl.trans(acc), rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr,
           cnt_ptr, pid_m * num_n + pid_n, pid_k, COL_MULT, SPLIT_K, HAS_TS, HAS_BIAS)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, z_ptr, rs_ptr, out_ptr, N, Kq, stride_ww, stride_wn, stride_sg, stride_sn, R1, R2, magic,
                   P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
                   S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, COL_MULT: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
    """The dense weight ``out [N, Kq] = W_b`` (row scale included) for large-M calls; grid (cdiv(N, BN), cdiv(Kq, BK))."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < N
    k0 = tl.program_id(1) * BK
    w = dequant_tile(w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, k0, Kq, R1, R2, magic, 0,
                     cols, cmask, P0, S0, P1, S1, P2, S2, ZOFF, ZMUL, BK, tl.float32)
    w = w * (tl.load(rs_ptr + cols, mask=cmask, other=0.0) * COL_MULT)[:, None]
    ks = k0 + tl.arange(0, BK)
    tl.store(out_ptr + cols[:, None] * Kq + ks[None, :], w.to(out_ptr.dtype.element_ty),
             mask=cmask[:, None] & (ks < Kq)[None, :])
