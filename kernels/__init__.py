"""bitbybit kernels: the nested-grid format, its reference ops and (on CUDA) Triton kernels.

This package is the single source of truth for the format; trainer, exporter, vLLM plugin
and server all call it. See docs/FORMAT.md.
"""

from .actquant import ACT_SYMMETRIC, QuantizedActivations, dequantize_activations, quantize_activations
from .e4m3 import E4M3_MAX, decode_e4m3, encode_e4m3, split_row_scale
from .grid import (
    GROUP_SIZE,
    MASTER_BITS,
    SLICING,
    QuantizedWeight,
    affine_params,
    check_bits,
    dequantize,
    quantize_groups,
    quantize_weight,
    slice_codes,
)
from .packing import pack_codes, plane_widths, unpack_codes
from .reference import linear_wa, linear_wa16
from .split import (
    expand_input,
    fold_split,
    quantize_split_layout,
    quantize_split_weight,
    split_region_index,
    split_step,
    split_weight,
)

__all__ = [
    "ACT_SYMMETRIC", "E4M3_MAX", "GROUP_SIZE", "MASTER_BITS", "SLICING",
    "QuantizedActivations", "QuantizedWeight",
    "affine_params", "check_bits", "decode_e4m3", "dequantize", "dequantize_activations", "encode_e4m3",
    "expand_input", "fold_split", "linear_wa", "linear_wa16", "pack_codes", "plane_widths",
    "quantize_activations", "quantize_groups", "quantize_split_layout", "quantize_split_weight", "quantize_weight", "slice_codes", "split_region_index",
    "split_row_scale", "split_step", "split_weight", "unpack_codes",
]
