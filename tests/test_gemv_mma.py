"""The pair arithmetic of the tensor-core decode kernel (``kernels.gluon_gemv``), emulated exactly on the CPU.

The kernel itself is Gluon (no interpreter): ``tests/gpu/test_kernels_gpu.py::test_gemv_mma`` runs it on the GPU.
Here: every code pair a window of :func:`pair_windows` reads turns into the 16-bit pair ``(2^(E-p) + q, ...)``, and
the pair FMA by ``(c, c)`` plus ``(-2^(E-p) c, ...)`` leaves ``q c`` exactly, for every code and every E4M3 scale;
and the zero terms' ``-z c`` split into a bf16 hi and lo part (the A operand of their ``mma.sync``) loses nothing.
"""

from __future__ import annotations

import pytest
import torch

from kernels.e4m3 import E4M3_MAX
from kernels.gluon_gemv import pair_windows
from kernels.triton_ops import weight_args


def halves(v: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dt = torch.bfloat16 if bf16 else torch.float16
    lo = (v & 0xFFFF).to(torch.int16).view(dt)  # int32 -> int16 keeps the low 16 bits
    hi = ((v >> 16) & 0xFFFF).to(torch.int16).view(dt)
    return lo.double(), hi.double()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("bf16", [False, True])
def test_windows_make_exact_scaled_codes(bits, bf16):
    e = 7 if bf16 else 10
    one = 0x4300 if bf16 else 0x6400
    per_word = 32 // bits
    codes = torch.randint(0, 1 << bits, (4096, per_word), generator=torch.Generator().manual_seed(bits + 2 * bf16))
    words = (codes << (bits * torch.arange(per_word))).sum(1)  # code j at bits * j, as the packing stores it
    scales = torch.arange(1, 127, dtype=torch.int64)  # every positive E4M3 byte below NaN (0x7F)
    c = (scales.to(torch.uint8).view(torch.float8_e4m3fn).double() / 256)
    assert c.max() * 256 <= E4M3_MAX
    dt = torch.bfloat16 if bf16 else torch.float16
    windows = pair_windows(bits, bf16)
    assert len(windows) == 16 // bits
    for i, (shift, p) in enumerate(windows):
        assert 0 <= p <= e - bits and shift == bits * i - p
        mask = ((1 << bits) - 1 << p) * 0x10001
        pair = ((words >> shift) & mask) | ((one - (p << e)) * 0x10001)
        lo, hi = halves(pair, bf16)
        base = 2.0 ** (e - p)
        assert torch.equal(lo, base + codes[:, i].double())
        assert torch.equal(hi, base + codes[:, i + 16 // bits].double())
        # the pair FMA rounds once: (base + q) c - base c must come out as q c, exactly representable
        q = torch.arange(1 << bits, dtype=torch.float64)[:, None]
        addend = (-base * c).to(dt).double()
        assert torch.equal(addend, -base * c)  # the addend pair itself is exact
        out = ((base + q) * c[None, :] + addend[None, :]).to(dt).double()
        assert torch.equal(out, q * c[None, :])


def split_bf16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's ``SPLIT_ASM`` on fp32 ``v``: ``hi`` = v rounded to bf16, ``lo`` = the rest rounded to bf16."""
    hi = v.to(torch.bfloat16).float()
    return hi, (v - hi).to(torch.bfloat16).float()


@pytest.mark.parametrize("bits, master_bits", [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8)])
def test_zero_terms_split_exactly(bits, master_bits):
    """``-c (z - ZOFF) ZMUL`` as the kernel computes it in fp32, for every E4M3 scale and every zero point of the
    master grid, equals ``hi + lo`` of its bf16 split exactly (at most 13 significant bits); a group sum keeps 16
    significant bits."""
    _, _, consts = weight_args(bits, master_bits, 256)
    c = torch.arange(0, 127, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).float() / 256
    z = torch.arange(1 << master_bits, dtype=torch.float32)
    v = c[:, None] * ((consts["ZOFF"] - z[None, :]) * consts["ZMUL"])
    exact = c.double()[:, None] * ((consts["ZOFF"] - z.double()[None, :]) * consts["ZMUL"])
    assert torch.equal(v.double(), exact)
    hi, lo = split_bf16(v)
    assert torch.equal(hi.double() + lo.double(), exact)
    x = torch.randn(100000, generator=torch.Generator().manual_seed(0)) * 100
    hi, lo = split_bf16(x)
    assert ((hi.double() + lo.double() - x.double()).abs() <= x.double().abs() * 2.0 ** -16).all()
