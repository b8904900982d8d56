"""Per-token activation quantization (the W{b}A{a} input side), fused with the OCS gather.

One program quantizes one token exactly like :func:`kernels.actquant.quantize_activations`:
the expanded row ``[x | 0 pad | x[split_index]]`` in groups of 32, asymmetric grid with zero
included, E4M3 group scales rounded up under the per-token factor ``max_g(scale) / 448``
(``ALL_ZERO_ROW_SCALE`` for an all-zero token), round-half-even codes. Quotients are correctly
rounded (``div_rn`` per group; per element a reciprocal and Markstein's correction) so codes,
scales and zeros are bit-identical to the reference.

It writes what the linear kernels read: ``xq = (code - zero) * e4m3 * 2^-a`` in fp16 (exact for
a <= 7: at most 11 significant bits) and ``token_scale * 2^a``, so ``xq * token_scale`` is the
dequantized activation and the weight kernels run unchanged on ``xq``. With ``DEQUANT`` it writes
the dequantized activation ``(code - zero) * step`` itself, in the output's dtype (what cuBLAS
reads on the dense path of many tokens: no separate scaling pass). Optionally it also writes the
codes, E4M3 bytes and zeros (the format's :class:`QuantizedActivations`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import e4m3
from .pdl import release_next_grid, wait_prior_grid_if
from .triton_common import e4m3_scaled, load_act

_MAGIC_RINT = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 half-to-even in fp32
ALL_ZERO_ROW_SCALE = tl.constexpr(e4m3.ALL_ZERO_ROW_SCALE)


@triton.jit
def _rint(v):
    return (v + _MAGIC_RINT) - _MAGIC_RINT


@triton.jit
def e4m3_round_up(r):
    """Byte (int32) of the smallest E4M3 value >= r, for r in [2^-9, 448] (:func:`kernels.e4m3.encode_e4m3`)."""
    bits = r.to(tl.int32, bitcast=True)
    exp = (bits >> 23) - 127
    man = bits & 0x7FFFFF
    m3 = (man >> 20) + ((man & 0xFFFFF) != 0).to(tl.int32)
    normal = ((exp + 7) << 3) + m3  # a mantissa carry (m3 == 8) rolls into the exponent field
    scaled = r * 512.0  # subnormals: multiples of 2^-9
    sub = scaled.to(tl.int32)
    sub = sub + (sub.to(tl.float32) < scaled).to(tl.int32)
    return tl.minimum(tl.where(exp >= -6, normal, sub), 0x7E)


@triton.jit
def filled(like, value):
    """A float32 tensor of ``like``'s shape (and layout) filled with ``value``: ``tl.full`` needs a layout in Gluon."""
    return tl.where(like == like, value, value).to(tl.float32)


@triton.jit
def group_range(x, QMAX: tl.constexpr):
    """Per group (row) of ``x [BG, 32]``: its minimum with zero included (<= 0) and its raw scale, the range (zero
    included) over ``QMAX``, in fp32. The extremes are taken in ``x``'s own dtype (exact; packed on 16-bit floats)."""
    lo = tl.minimum(tl.min(x, axis=1).to(tl.float32), 0.0)
    hi = tl.maximum(tl.max(x, axis=1).to(tl.float32), 0.0)
    return lo, tl.div_rn(hi - lo, filled(lo, QMAX))


@triton.jit
def _chunk(x_ptr, stride_xm, m, g, M, K, Kp, Kq, split_ptr, QMAX: tl.constexpr, HAS_SPLIT: tl.constexpr):
    """Groups ``g`` of token ``m``: their values ``[BG, 32]`` (fp32), column index, min (<= 0) and raw scale."""
    k = g[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = load_act(x_ptr, stride_xm, m, k, M, K, Kp, Kq, split_ptr, HAS_SPLIT).to(tl.float32)
    lo, raw = group_range(x, QMAX)
    return x, k, lo, raw


@triton.jit
def quantize_groups(x, k, g, lo, raw, ts, m, kmask, gmask, G, xq_ptr, codes_ptr, scales_ptr, zeros_ptr, stride_qm,
                    QMAX: tl.constexpr, XQ_MUL: tl.constexpr, WRITE_CODES: tl.constexpr, DEQUANT: tl.constexpr):
    """Codes of groups ``g`` (values ``x [BG, 32]`` at columns ``k``, ranges ``lo``/``raw`` from :func:`group_range`)
    under token scale ``ts``; writes xq (or the dequantized values, ``DEQUANT``) where ``kmask`` and, with
    ``WRITE_CODES``, the codes, and the scale and zero bytes of the ``G`` groups per row where ``gmask``."""
    BG: tl.constexpr = x.shape[0]
    ratio = tl.minimum(tl.maximum(tl.div_rn(raw, filled(raw, 1.0) * ts), 0.001953125), 448.0)
    byte = e4m3_round_up(ratio)
    e4m3 = e4m3_scaled(byte) * 256.0
    step = e4m3 * ts
    zero = tl.minimum(tl.maximum(_rint(tl.div_rn(-lo, step)), 0.0), QMAX)
    r = tl.div_rn(filled(step, 1.0), step)[:, None]
    stepb = tl.broadcast_to(step[:, None], (BG, 32))
    q = x * r
    q = tl.fma(tl.fma(-stepb, q, x), r, q)  # == div_rn(x, step)
    centred = tl.minimum(tl.maximum(_rint(q), -zero[:, None]), QMAX - zero[:, None])  # code - zero, exact
    xq = centred * (step if DEQUANT else e4m3 * XQ_MUL)[:, None]
    tl.store(xq_ptr + m * stride_qm + k, xq.to(xq_ptr.dtype.element_ty), mask=kmask)
    if WRITE_CODES:
        tl.store(codes_ptr + m * stride_qm + k, (centred + zero[:, None]).to(tl.uint8), mask=kmask)
        tl.store(scales_ptr + m * G + g, byte.to(tl.uint8), mask=gmask)
        tl.store(zeros_ptr + m * G + g, zero.to(tl.uint8), mask=gmask)


@triton.jit
def token_scale(rmax, ts_ptr, m, XQ_MUL: tl.constexpr):
    ts = tl.div_rn(tl.max(rmax, axis=0), 448.0)
    ts = tl.where(ts > 0, ts, ALL_ZERO_ROW_SCALE)
    tl.store(ts_ptr + m, ts * (1.0 / XQ_MUL))
    return ts


@triton.jit
def actquant_kernel(x_ptr, split_ptr, xq_ptr, ts_ptr, codes_ptr, scales_ptr, zeros_ptr, M, K, Kp, Kq, stride_xm,
                    stride_qm, QMAX: tl.constexpr, XQ_MUL: tl.constexpr, BG: tl.constexpr,
                    HAS_SPLIT: tl.constexpr, WRITE_CODES: tl.constexpr, ONE_CHUNK: tl.constexpr,
                    DEQUANT: tl.constexpr = False, STAGES: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Quantize token ``program_id(0)`` in chunks of ``BG`` groups: a pass for the token scale, then the codes.

    The second pass re-reads the row (an L2 hit); with ``ONE_CHUNK`` (``BG * 32 >= Kq``) the row
    stays in registers and there is one pass. ``STAGES`` > 1 software-pipelines the chunk loops'
    loads (``tl.range(num_stages=...)``). ``x / step`` per element is one reciprocal per
    group and Markstein's correction, ``q = x r; q += (x - q step) r`` with ``r = 1/step`` correctly
    rounded, which is the correctly rounded quotient (as ``div_rn``) for normal operands. ``PDL``:
    lets the next kernel launch at once and waits for the previous one (:mod:`kernels.pdl`).
    """
    release_next_grid(PDL)  # the linear that reads xq may launch now (it waits for this kernel to finish)
    wait_prior_grid_if(PDL)
    m = tl.program_id(0)
    G = Kq // 32
    gg = tl.arange(0, BG)
    if ONE_CHUNK:
        x, k, lo, raw = _chunk(x_ptr, stride_xm, m, gg, M, K, Kp, Kq, split_ptr, QMAX, HAS_SPLIT)
        ts = token_scale(tl.where(gg < G, raw, 0.0), ts_ptr, m, XQ_MUL)
        quantize_groups(x, k, gg, lo, raw, ts, m, k < Kq, gg < G, G, xq_ptr, codes_ptr, scales_ptr, zeros_ptr,
                        stride_qm, QMAX, XQ_MUL, WRITE_CODES, DEQUANT)
    else:
        rmax = tl.zeros([BG], tl.float32)
        for g0 in tl.range(0, G, BG, num_stages=STAGES):
            _, _, _, raw = _chunk(x_ptr, stride_xm, m, g0 + gg, M, K, Kp, Kq, split_ptr, QMAX, HAS_SPLIT)
            rmax = tl.maximum(rmax, tl.where(g0 + gg < G, raw, 0.0))
        ts = token_scale(rmax, ts_ptr, m, XQ_MUL)
        for g0 in tl.range(0, G, BG, num_stages=STAGES):
            x, k, lo, raw = _chunk(x_ptr, stride_xm, m, g0 + gg, M, K, Kp, Kq, split_ptr, QMAX, HAS_SPLIT)
            quantize_groups(x, k, g0 + gg, lo, raw, ts, m, k < Kq, g0 + gg < G, G, xq_ptr, codes_ptr, scales_ptr,
                            zeros_ptr, stride_qm, QMAX, XQ_MUL, WRITE_CODES, DEQUANT)
