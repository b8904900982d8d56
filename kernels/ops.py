"""Serving-time linear ops: one entry point for every caller (vLLM plugin, CPU server, eval).

``pack_linear`` turns a layer's master codes into its serving form at one precision (the
b-bit slice, packed; the master copy is no longer needed), and ``linear`` runs it: Triton
kernels (``torch.ops.bitbybit.*`` while torch.compile traces, the same functions directly in eager
code: :func:`kernels.triton_ops.ops_for`) on CUDA, the reference ops elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import GROUP_SIZE, QuantizedWeight, check_bits, slice_codes
from .packing import pack_codes, unpack_to_master
from .reference import linear_wa, linear_wa16
from .triton_ops import ops_for


def k_major(t: torch.Tensor) -> torch.Tensor:
    """The same ``[N, X]`` tensor stored column-major (stride ``(1, N)``), the layout the kernels read."""
    return t.T.contiguous().T


@dataclass
class PackedLinear:
    """A linear layer at one serving precision.

    ``packed`` int32 [N, Kq*bits/32] (:func:`kernels.packing.pack_codes` of the b-bit slice);
    ``scales`` e4m3 [N, G]; ``zeros`` uint8 [N, G] (master grid); ``row_scale`` fp32 [N];
    ``split_index`` int32 [R] or None. ``packed``, ``scales`` and ``zeros`` are stored K-major
    (stride ``(1, N)``, :func:`k_major`): a packed word row is contiguous across output channels,
    which is what the kernels' loads need. Their values and shapes are the row-major ones; the
    kernels read any strides (row-major storage only runs slower).
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
        codes = unpack_to_master(self.packed, self.bits, self.master_bits)
        return QuantizedWeight(codes, self.scales, self.zeros, self.row_scale, self.in_features,
                               self.group_size, self.master_bits, self.split_index)


def pack_linear(qw: QuantizedWeight, bits: int) -> PackedLinear:
    """Slice master codes to ``bits`` and pack them; the result no longer references the master codes."""
    check_bits(bits, qw.master_bits)
    packed = pack_codes(slice_codes(qw.codes, bits, qw.master_bits), bits)
    return PackedLinear(k_major(packed), k_major(qw.scales), k_major(qw.zeros), qw.row_scale, qw.split_index, bits,
                        qw.in_features, qw.group_size, qw.master_bits)


def uses_triton(x: torch.Tensor, layer: PackedLinear) -> bool:
    """Whether :func:`linear` runs the Triton kernels: CUDA input, group size 32, 16/32-bit floats."""
    return (x.is_cuda and layer.group_size == GROUP_SIZE
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def linear(x: torch.Tensor, layer: PackedLinear, act_bits: int | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` at the layer's precision; ``act_bits`` < 16 quantizes activations too."""
    quantize_input = act_bits is not None and act_bits < 16
    if uses_triton(x, layer):
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
        ops = ops_for(x)
        args = (layer.packed, layer.scales, layer.zeros, layer.row_scale)
        if not quantize_input:
            return ops.linear(x, *args, layer.split_index, None, bias, layer.bits, layer.master_bits,
                              layer.in_features, x.dtype)
        check_bits(act_bits)
        return ops.linear_wa(x, *args, layer.split_index, bias, layer.bits, layer.master_bits, act_bits, x.dtype,
                             "auto")
    qw = layer.to_quantized_weight()
    if not quantize_input:
        return linear_wa16(x, qw, layer.bits, bias=bias)
    return linear_wa(x, qw, layer.bits, act_bits, bias=bias)
