"""QAT's compiled fake quantization on a CUDA GPU (inductor + Triton) against the eager format code.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_qat_compile_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from test_qat_compile import assert_same_grid_values, compiled_and_eager_fake_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_compiled_fake_weight_is_the_exported_weight(bits: int) -> None:
    """The fake weight traced by the compiled training step is the eager (exported) one but at near-tie roundings:
    Triton's fp32 division is approximate, so a master code or a group's zero point may round the other way."""
    assert_same_grid_values(*compiled_and_eager_fake_weight(bits, "cuda"), bits)
