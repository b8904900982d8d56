"""Packed 16-bit pair arithmetic for the Triton kernels: two fp16 or bf16 values in one uint32 container.

The GPU runs one PTX instruction per pair (``fma.rn.f16x2``, ``add.rn.bf16x2``, ``cvt.rn.f16x2.f32``, ...)
through ``tl.inline_asm_elementwise``. The interpreter has no inline PTX: with ``ASM`` off every helper
computes the same values with plain Triton ops on the halves (one rounding per result), so the CPU
tests run the same algorithm. ``BF16`` (constexpr) picks bf16 halves, else fp16.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ASM = os.environ.get("TRITON_INTERPRET") != "1"  # inline PTX on the GPU, plain-op twins under the interpreter
F16_ONE = 0x64006400  # the fp16 pair (1024, 1024): ORed onto codes at mantissa bits, an exact float of them
BF16_ONE = 0x43004300  # the bf16 pair (128, 128)


@triton.jit
def minus_centre(p, P: tl.constexpr, BF16: tl.constexpr):
    """Bits of the pair ``-(M + 2^p C)`` (``M`` = 128 in bf16, 1024 in fp16, ``C = 2^(P-1)``): added to the pair
    ``M + 2^p q`` that a LOP3 with the pair ``(M, M)`` makes of a ``P``-bit code ``q`` at mantissa bit ``p``, it
    leaves ``2^p (q - C)`` exactly."""
    MAGIC: tl.constexpr = 0x4300 if BF16 else 0x6400
    return (0x8000 | (MAGIC + ((1 << (P - 1)) << p))) * 0x10001


@triton.jit
def halves(v, BF16: tl.constexpr):
    """The halves (low, high) of pair containers ``v`` (uint32), as float32."""
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    lo = (v & 0xFFFF).to(tl.uint16).to(dt, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.uint16).to(dt, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _bits16(v, BF16: tl.constexpr):
    """fp16 / bf16 bits (uint32) of ``v``, rounded to nearest even once (bf16 by hand from the fp32 bits: the
    interpreter's own cast truncates)."""
    if BF16:
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        return (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def join(lo, hi, BF16: tl.constexpr):
    """Pair containers of ``lo`` and ``hi`` (each rounded once)."""
    return _bits16(lo, BF16) | (_bits16(hi, BF16) << 16)


@triton.jit
def splat(v, BF16: tl.constexpr, ASM: tl.constexpr):
    """The pair ``(v, v)`` of float32 ``v``, rounded once: ``cvt.rn.{f16,bf16}x2.f32``."""
    if ASM:
        if BF16:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", [v], dtype=tl.uint32,
                                             is_pure=True, pack=1)
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $1;", "=r,r", [v], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    return join(v, v, BF16)


@triton.jit
def pair_fma(a, b, c, BF16: tl.constexpr, ASM: tl.constexpr):
    """``a * b + c`` on pair containers (uint32, broadcast), rounded once per half: ``fma.rn.{f16,bf16}x2``."""
    if ASM:
        if BF16:
            return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.uint32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    al, ah = halves(a, BF16)
    bl, bh = halves(b, BF16)
    cl, ch = halves(c, BF16)
    # float64: the product of two 16-bit values is exact, so the one rounding is the cast
    return join(al.to(tl.float64) * bl + cl, ah.to(tl.float64) * bh + ch, BF16)


@triton.jit
def hadd2_asm(a, b):
    """fp16 pair sum (``add.rn.f16x2``); with :func:`hadd2_plain`, its interpreter twin, a ``tl.reduce`` combiner."""
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.uint32, is_pure=True,
                                     pack=1)


@triton.jit
def hadd2_plain(a, b):
    al, ah = halves(a, False)
    bl, bh = halves(b, False)
    return join(al + bl, ah + bh, False)  # the sum of two fp16 values is exact in fp32


@triton.jit
def half2_sum(v, ASM: tl.constexpr):
    """float32 ``low + high`` of fp16 pair containers ``v``."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{.reg .b16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, h;"
            " add.f32 $0, a, b;}", "=f,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    lo, hi = halves(v, False)
    return lo + hi


@triton.jit
def low_halves(a, b, ASM: tl.constexpr):
    """The container of ``a``'s low half (low) and ``b``'s low half (high): one ``prmt.b32`` (byte permute)."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    return (a & 0xFFFF) | (b << 16)


@triton.jit
def high_halves(a, b, ASM: tl.constexpr):
    """The container of ``a``'s high half (low) and ``b``'s high half (high): one ``prmt.b32``."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    return (a >> 16) | (b & 0xFFFF0000)


@triton.jit
def pair_add(a, b, BF16: tl.constexpr, ASM: tl.constexpr):
    """``a + b`` on pair containers (uint32, broadcast), rounded once per half: ``add.rn.{f16,bf16}x2``."""
    if ASM:
        if BF16:
            return tl.inline_asm_elementwise("add.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.uint32,
                                             is_pure=True, pack=1)
        return hadd2_asm(a, b)
    al, ah = halves(a, BF16)
    bl, bh = halves(b, BF16)
    return join(al.to(tl.float64) + bl, ah.to(tl.float64) + bh, BF16)
