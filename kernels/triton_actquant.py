"""Per-token activation quantization (the W{b}A{a} input side), fused with the OCS gather.

One program quantizes one token exactly like :func:`kernels.actquant.quantize_activations`:
the expanded row ``[x | 0 pad | x[split_index]]`` in groups of 32, asymmetric grid with zero
included, E4M3 group scales rounded up under the per-token factor ``max_g(scale) / 448``
(``ALL_ZERO_ROW_SCALE`` for an all-zero token), round-half-even codes. Divisions are IEEE (``div_rn``) so codes, scales and zeros are
bit-identical to the reference.

It writes what the linear kernels read: ``xq = (code - zero) * e4m3 * 2^-a`` in fp16 (exact for
a <= 7: at most 11 significant bits) and ``token_scale * 2^a``, so ``xq * token_scale`` is the
dequantized activation and the weight kernels run unchanged on ``xq``. Optionally it also
writes the codes, E4M3 bytes and zeros (the format's :class:`QuantizedActivations`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import e4m3
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
def actquant_kernel(x_ptr, split_ptr, xq_ptr, ts_ptr, codes_ptr, scales_ptr, zeros_ptr, M, K, Kp, Kq, stride_xm,
                    stride_qm, QMAX: tl.constexpr, XQ_MUL: tl.constexpr, BKQ: tl.constexpr,
                    HAS_SPLIT: tl.constexpr, WRITE_CODES: tl.constexpr):
    """Quantize token ``program_id(0)``; ``BKQ`` is Kq rounded up to a power of two."""
    m = tl.program_id(0)
    NG: tl.constexpr = BKQ // 32
    k = tl.arange(0, BKQ)
    x = load_act(x_ptr, stride_xm, m, k, M, K, Kp, Kq, split_ptr, HAS_SPLIT).to(tl.float32)
    xg = tl.reshape(x, (NG, 32))
    lo = tl.minimum(tl.min(xg, axis=1), 0.0)
    hi = tl.maximum(tl.max(xg, axis=1), 0.0)
    raw = tl.div_rn(hi - lo, tl.full([NG], QMAX, tl.float32))
    gvalid = tl.arange(0, NG) * 32 < Kq
    ts = tl.div_rn(tl.max(tl.where(gvalid, raw, 0.0), axis=0), 448.0)
    ts = tl.where(ts > 0, ts, ALL_ZERO_ROW_SCALE)
    ratio = tl.minimum(tl.maximum(tl.div_rn(raw, tl.full([NG], 1.0, tl.float32) * ts), 0.001953125), 448.0)
    byte = e4m3_round_up(ratio)
    e4m3 = e4m3_scaled(byte) * 256.0
    step = e4m3 * ts
    zero = tl.minimum(tl.maximum(_rint(tl.div_rn(-lo, step)), 0.0), QMAX)
    code = _rint(tl.div_rn(xg, tl.broadcast_to(step[:, None], (NG, 32)))) + zero[:, None]
    code = tl.minimum(tl.maximum(code, 0.0), QMAX)
    xq = (code - zero[:, None]) * (e4m3 * XQ_MUL)[:, None]
    kmask = k < Kq
    tl.store(xq_ptr + m * stride_qm + k, tl.reshape(xq, (BKQ,)).to(xq_ptr.dtype.element_ty), mask=kmask)
    tl.store(ts_ptr + m, ts * (1.0 / XQ_MUL))
    if WRITE_CODES:
        tl.store(codes_ptr + m * stride_qm + k, tl.reshape(code, (BKQ,)).to(tl.uint8), mask=kmask)
        g = tl.arange(0, NG)
        tl.store(scales_ptr + m * (Kq // 32) + g, byte.to(tl.uint8), mask=gvalid)
        tl.store(zeros_ptr + m * (Kq // 32) + g, zero.to(tl.uint8), mask=gvalid)
