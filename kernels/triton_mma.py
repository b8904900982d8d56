"""W{b}A{a} linear on int8 tensor cores (experimental: on the H200 slower than the default path; docs/BENCHMARKS.md).

The activations come as codes (``launch_actquant(..., write_codes=True)``: uint8 codes ``qx``,
E4M3 bytes and integer zero points ``zx`` per token and 32-group), the weights in the packed
nested layout. Per group ``g`` of 32 input channels (one int8 MMA k-step):

    A[m, i] = qx - zx[m, g]               in [-(2^a - 1), 2^a - 1]: int8 for a <= 7
    B[i, n] = qw - 2^(b-1)                 in [-2^(b-1), 2^(b-1) - 1]: int8 for b <= 8
    D[m, n] = sum_i A B                    tl.dot, int32, exact
    acc[m, n] += cx[m] cw[n] (D - zw'[n] SA[m])

with ``SA[m] = sum_i A`` (the group's activation sum) and ``zw' = zw - 2^(b-1)``. This is the
reference's bracket exactly: the weight zero point ``zw = (zero - (2^(8-b) - 1)/2) / 2^(8-b)`` is
not an integer for b < 8 (and ``qw - zero`` does not fit int8 at b = 8), so the weights are
centred by the integer ``2^(b-1)`` and the fractional rest becomes the rank-1 correction
``sum_i A (qw - zw) = D - zw' SA``; the activation zero point is an integer and is subtracted
before the MMA. ``cx = e4m3_x / 256``, ``cw = e4m3_w / 256``; the epilogue multiplies by
``row_scale * 2^(8-b) * 2^16`` (``COL_MULT`` holds the constants and ``2^-a``, as the token scale
from ``launch_actquant`` carries ``2^a``), adds the bias and writes the output dtype.

Per (token, output, group) the rescale is 4 CUDA-core instructions (I2F, FMUL ``cx cw``, FFMA
``D - zw' SA``, FFMA into ``acc``) against the MMA's 32 MACs. ``RESCALE=False`` skips it (no
scale or weight-zero loads, no activation sums, int32 partials accumulated across groups by
the MMA): numerically wrong, for timing how much of the kernel the rescale is.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import e4m3_scaled, finish
from .triton_gemm import _gathered_plane


@triton.jit
def _weight_codes(w_ptr, stride_ww, stride_wn, g, Kq, R1, R2, cols, cmask, P0: tl.constexpr, S0: tl.constexpr,
                  P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr, S2: tl.constexpr):
    """b-bit codes of group ``g``, ``[32, BN]`` (uint32) in K order: plane 0 from its ``P0`` word rows, the lower
    planes gathered."""
    SL0: tl.constexpr = 32 // P0
    i = tl.arange(0, SL0)[:, None, None]
    w = tl.arange(0, P0)[None, :, None]
    n = cols[None, None, :]
    nmask = cmask[None, None, :]
    words = tl.load(w_ptr + (g * P0 + w) * stride_ww + n * stride_wn, mask=nmask, other=0).to(tl.uint32, bitcast=True)
    q = ((words >> (i * P0).to(tl.uint32)) & ((1 << P0) - 1)) << S0
    if P1 > 0:
        q = q | _gathered_plane(w_ptr, stride_ww, stride_wn, R1, g * 32, SL0 * w + i, n, nmask, Kq, P1, S1)
    if P2 > 0:
        q = q | _gathered_plane(w_ptr, stride_ww, stride_wn, R2, g * 32, SL0 * w + i, n, nmask, Kq, P2, S2)
    return tl.reshape(tl.permute(q, (1, 0, 2)), (32, cols.shape[0]))  # column k = word row * SL0 + slot


@triton.jit
def _computed_once(v):
    """``v`` (a column vector), behind a sum over a size-1 axis so the compiler loads and converts it once per column
    and broadcasts it (shared memory) instead of redoing both in the accumulator's layout: 32 columns per thread
    (sm_90 SASS of the 128 x 128 tile: 1073 -> 640 instructions per group and thread)."""
    return tl.sum(v[:, None], axis=1)


@triton.jit
def mma_kernel(xc_ptr, xs_ptr, xz_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
               M, N, Kq, stride_ym, stride_ww, stride_wn, stride_sg, stride_sn, R1, R2,
               P0: tl.constexpr, S0: tl.constexpr, P1: tl.constexpr, S1: tl.constexpr, P2: tl.constexpr,
               S2: tl.constexpr, ZOFF: tl.constexpr, ZMUL: tl.constexpr, CW: tl.constexpr, COL_MULT: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, SPLIT_K, RESCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y = dequant(codes) @ W_b^T``; grid (cdiv(M, BM) * cdiv(N, BN), SPLIT_K), the M tiles of one N tile adjacent.

    ``xc`` uint8 ``[M, Kq]``, ``xs``/``xz`` uint8 ``[M, Kq / 32]`` (contiguous); ``CW = 2^(b-1)``.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    rows = (pid % num_m) * BM + tl.arange(0, BM)
    cols = (pid // num_m) * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < N
    ks = tl.arange(0, 32)
    G = Kq // 32
    per_split = tl.cdiv(G, SPLIT_K)
    acc = tl.zeros([BM, BN], tl.float32 if RESCALE else tl.int32)
    for g in range(pid_k * per_split, tl.minimum(G, (pid_k + 1) * per_split)):
        zx = tl.load(xz_ptr + rows * G + g, mask=rmask, other=0)
        qx = tl.load(xc_ptr + rows[:, None] * Kq + g * 32 + ks[None, :], mask=rmask[:, None], other=0)
        a = (qx.to(tl.int16) - zx.to(tl.int16)[:, None]).to(tl.int8)
        qw = _weight_codes(w_ptr, stride_ww, stride_wn, g, Kq, R1, R2, cols, cmask, P0, S0, P1, S1, P2, S2)
        b = (qw.to(tl.int32, bitcast=True) - CW).to(tl.int8)
        if RESCALE:
            d = tl.dot(a, b, out_dtype=tl.int32)
            cx = e4m3_scaled(tl.load(xs_ptr + rows * G + g, mask=rmask, other=0))
            offs = g * stride_sg + cols * stride_sn
            cw = _computed_once(e4m3_scaled(tl.load(s_ptr + offs, mask=cmask, other=0)))
            zw = _computed_once(tl.load(z_ptr + offs, mask=cmask, other=0).to(tl.float32) * ZMUL - (ZOFF * ZMUL + CW))
            sa = tl.sum(a.to(tl.int32), axis=1).to(tl.float32)
            acc += (cx[:, None] * cw[None, :]) * (d.to(tl.float32) - sa[:, None] * zw[None, :])
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    finish(acc.to(tl.float32), rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr, pid,
           pid_k, COL_MULT, SPLIT_K, True, HAS_BIAS)
