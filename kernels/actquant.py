"""Dynamic per-token activation quantization (W{b}A{b} mode).

Activations are first put in the layer's input layout (padding + gathered split channels,
:func:`kernels.split.expand_input`), then quantized per token in groups of ``group_size``
along K, with E4M3 group scales and one FP32 factor per token, exactly like weight groups.
The grid is asymmetric (``ACT_SYMMETRIC = False``): at 2 bits it has 4 levels against the
symmetric grid's 3, and FORMAT.md measures it as the lower-error choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .e4m3 import decode_e4m3
from .grid import GROUP_SIZE, check_bits, check_group_size, quantize_groups
from .split import expand_input

ACT_SYMMETRIC = False


@dataclass
class QuantizedActivations:
    """``codes`` uint8 [..., Kq]; ``scales`` e4m3 [..., G]; ``zeros`` uint8 [..., G]; ``token_scale`` fp32 [...]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    token_scale: torch.Tensor
    bits: int
    group_size: int

    def step(self) -> torch.Tensor:
        """Grid step per (token, group), float32 [..., G]."""
        return decode_e4m3(self.scales) * self.token_scale.unsqueeze(-1)


def quantize_activations(x: torch.Tensor, bits: int, split_index: torch.Tensor | None = None,
                         group_size: int = GROUP_SIZE, symmetric: bool = ACT_SYMMETRIC) -> QuantizedActivations:
    """Quantize activations ``[..., K]`` per token, after padding and gathering split channels."""
    check_bits(bits)
    check_group_size(group_size)
    if not torch.is_floating_point(x):
        raise ValueError(f"activations must be floating point, got {x.dtype}")
    xe = expand_input(x, split_index, group_size)
    lead, kq = xe.shape[:-1], xe.shape[-1]
    codes, scales, zeros, token_scale = quantize_groups(xe.reshape(-1, kq), group_size, bits, symmetric)
    g = kq // group_size
    return QuantizedActivations(codes.reshape(*lead, kq), scales.reshape(*lead, g), zeros.reshape(*lead, g),
                                token_scale.reshape(lead), bits, group_size)


def dequantize_activations(qa: QuantizedActivations, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float activations ``[..., Kq]`` that ``qa`` represents."""
    lead, kq = qa.codes.shape[:-1], qa.codes.shape[-1]
    g = qa.codes.reshape(*lead, -1, qa.group_size).to(dtype)
    x = (g - qa.zeros.to(dtype).unsqueeze(-1)) * qa.step().to(dtype).unsqueeze(-1)
    return x.reshape(*lead, kq)
