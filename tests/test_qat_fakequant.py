"""kernels.fakequant: QAT's forward pass is the serving numerics, its gradient straight-through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.fakequant import FakeQuantLinear
from kernels.reference import linear_wa, linear_wa16
from kernels.split import split_region_index, split_step


def _layer(k: int = 80, n: int = 24, split=(1, 5, 40)) -> tuple[nn.Linear, FakeQuantLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=True)
    idx = split_region_index(split, k, 32)
    return lin, FakeQuantLinear(lin, idx, split_step(lin.weight.detach(), 2))


def test_full_precision_split_layer_equals_the_original() -> None:
    lin, fq = _layer()
    x = torch.randn(3, 7, 80)
    assert torch.allclose(fq(x), lin(x), atol=1e-5)
    assert torch.allclose(fq.float_weight(), lin.weight, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_fake_quant_forward_is_the_reference_op(bits: int) -> None:
    """What QAT trains through is exactly what the exported checkpoint serves."""
    _, fq = _layer()
    x = torch.randn(5, 80, dtype=torch.float64)
    fq.bits = bits
    ref = linear_wa16(x, fq.quantized(), bits, bias=fq.bias)
    assert torch.allclose(fq(x.float()).double(), ref, atol=1e-4)
    fq.act_bits = 2
    ref_a2 = linear_wa(x.float(), fq.quantized(), bits, 2, bias=fq.bias)
    assert torch.allclose(fq(x.float()), ref_a2, atol=1e-4)


def test_gradient_is_straight_through() -> None:
    _, fq = _layer()
    x = torch.randn(6, 80)
    fq.bits = 2
    fq(x).sum().backward()
    g_quant = fq.weight.grad.clone()
    fq.weight.grad = None
    fq.bits = None
    fq(x).sum().backward()
    assert torch.equal(g_quant, fq.weight.grad)


def test_quantized_cache_follows_weight_updates() -> None:
    _, fq = _layer()
    before = fq.quantized().codes.clone()
    with torch.no_grad():
        fq.weight.mul_(-1)
    assert not torch.equal(fq.quantized().codes, before)
