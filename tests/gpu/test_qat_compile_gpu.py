"""QAT's compiled fake quantization on a CUDA GPU (inductor + Triton) against the eager format code.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_qat_compile_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.fakequant import FakeQuantLinear
from kernels.grid import affine_params
from kernels.split import split_region_index

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FLOAT_TOL = 1e-3  # of a step: inductor reorders the dequantization arithmetic, so the last bits differ
MOVED_MAX = 1e-4  # fraction of codes that a scale one ulp off may move at an exact rounding tie


def assert_same_codes(got: torch.Tensor, want: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> None:
    """``got`` encodes ``want``'s b-bit codes (grid ``w = step * (code - zero)``, per element ``[N, Kq]``):
    the codes read back from both differ for at most ``MOVED_MAX`` of the elements, and elsewhere the
    values agree to ``FLOAT_TOL`` of the step."""
    moved = torch.round(got / step + zero) != torch.round(want / step + zero)
    off = (got - want).abs() / step
    assert moved.float().mean().item() <= MOVED_MAX
    assert off[~moved].max().item() <= FLOAT_TOL


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_compiled_fake_weight_is_the_exported_weight(bits: int) -> None:
    """The fake weight traced by the compiled training step encodes the eager one's codes (the checkpoint's)."""
    torch.manual_seed(0)
    lin = FakeQuantLinear(nn.Linear(1408, 512, bias=False).cuda(), split_region_index(range(0, 1408, 20), 1408, 32),
                          1e-3)
    got = torch.compile(lin.fake_weight)(bits)
    want = lin.fake_weight(bits)
    step, zero = (p.repeat_interleave(lin.group_size, dim=1) for p in affine_params(lin.quantized(), bits))
    assert_same_codes(got.detach(), want.detach(), step, zero)
