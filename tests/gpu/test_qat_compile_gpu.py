"""QAT's compiled fake quantization on a CUDA GPU (inductor + Triton) against the eager format code.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_qat_compile_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.fakequant import FakeQuantLinear
from kernels.split import split_region_index

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_compiled_fake_weight_is_the_exported_weight(bits: int) -> None:
    """The fake weight traced by the compiled training step equals the eager one (the checkpoint's codes),
    but for rare codes that a scale one ulp off may move at an exact rounding tie: at most 1e-4 of them."""
    torch.manual_seed(0)
    lin = FakeQuantLinear(nn.Linear(1408, 512, bias=False).cuda(), split_region_index(range(0, 1408, 20), 1408, 32),
                          1e-3)
    got = torch.compile(lin.fake_weight)(bits)
    want = lin.fake_weight(bits)
    assert (got != want).float().mean().item() <= 1e-4
