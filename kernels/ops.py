"""Serving-time linear ops: one entry point for every caller (vLLM plugin, CPU server, eval).

``pack_linear`` turns a layer's master codes into its serving form at one precision (the
b-bit slice, packed; the master copy is no longer needed), and ``linear`` runs it: Triton
kernels on CUDA, the reference ops elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import QuantizedWeight, check_bits, slice_codes
from .packing import pack_codes, unpack_codes
from .reference import linear_wa, linear_wa16


@dataclass
class PackedLinear:
    """A linear layer at one serving precision.

    ``packed`` int32 [N, Kq*bits/32] (:func:`kernels.packing.pack_codes` of the b-bit slice);
    ``scales`` e4m3 [N, G]; ``zeros`` uint8 [N, G] (master grid); ``row_scale`` fp32 [N];
    ``split_index`` int32 [R] or None.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    row_scale: torch.Tensor
    split_index: torch.Tensor | None
    bits: int
    in_features: int
    group_size: int
    master_bits: int = 8

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def to_quantized_weight(self) -> QuantizedWeight:
        """The equivalent QuantizedWeight (b-bit codes re-expanded to master positions) for the reference ops."""
        codes = unpack_codes(self.packed, self.bits) << (self.master_bits - self.bits)
        return QuantizedWeight(codes, self.scales, self.zeros, self.row_scale, self.in_features,
                               self.group_size, self.master_bits, self.split_index)


def pack_linear(qw: QuantizedWeight, bits: int) -> PackedLinear:
    """Slice master codes to ``bits`` and pack them; the result no longer references the master codes."""
    check_bits(bits, qw.master_bits)
    packed = pack_codes(slice_codes(qw.codes, bits, qw.master_bits), bits)
    return PackedLinear(packed, qw.scales, qw.zeros, qw.row_scale, qw.split_index, bits, qw.in_features,
                        qw.group_size, qw.master_bits)


def linear(x: torch.Tensor, layer: PackedLinear, act_bits: int | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` at the layer's precision; ``act_bits`` < 16 quantizes activations too."""
    qw = layer.to_quantized_weight()
    if act_bits is None or act_bits >= 16:
        return linear_wa16(x, qw, layer.bits, bias=bias)
    return linear_wa(x, qw, layer.bits, act_bits, bias=bias)
