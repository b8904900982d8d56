"""Nested integer grids: master quantization, slicing to b bits, dequantization.

A weight matrix ``W [N, K]`` is cut into groups of ``group_size`` consecutive input channels
(K is padded with zero columns to a multiple of the group size). Each group gets an
asymmetric grid from its min/max (zero always included):

    step  = (max - min) / (2^8 - 1), rounded UP to E4M3 times the row's FP32 factor
    zero  = round(-min / step)                      (uint8)
    code  = clamp(round(w / step) + zero, 0, 255)   (uint8, the master code)

The b-bit code is ``code >> (8 - b)``; it indexes a cell of 2^(8-b) master codes, and is
reconstructed at the centre of that cell (``SLICING = "centre"``):

    w_b = step * (2^(8-b) * code_b + (2^(8-b) - 1) / 2 - zero)

which is exactly round-to-nearest onto the coarse grid of step ``step * 2^(8-b)``; error at
most half the coarse step. FORMAT.md has the measurements behind this choice (against plain
truncation and a rounded shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .e4m3 import decode_e4m3, exact_divisor, split_row_scale, value_checks

MASTER_BITS = 8
GROUP_SIZE = 32
SLICING = "centre"
SLICING_RULES = ("truncate", "centre", "round")


def check_bits(bits: int, master_bits: int = MASTER_BITS) -> int:
    """Validate a precision: an int in 1..master_bits."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= master_bits:
        raise ValueError(f"bits must be an integer in 1..{master_bits}, got {bits!r}")
    return bits


def check_group_size(group_size: int) -> int:
    """Validate a group size: a positive int."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return group_size


def padded_width(k: int, group_size: int) -> int:
    """K rounded up to a whole number of groups."""
    return -(-k // group_size) * group_size


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Append zero columns so the last dim is a multiple of ``group_size``."""
    k = w.shape[-1]
    extra = padded_width(k, group_size) - k
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def check_weight(w: torch.Tensor) -> None:
    """A weight must be a finite 2-D floating tensor."""
    if not isinstance(w, torch.Tensor) or not torch.is_floating_point(w):
        raise ValueError(f"weight must be a floating torch.Tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D [out_features, in_features] tensor, got shape {tuple(w.shape)}")
    if value_checks() and not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; fix the model before quantizing")


@dataclass
class QuantizedWeight:
    """A linear layer's weight at the master precision, in the checkpoint's format.

    ``codes``: uint8 [N, Kq] master codes; ``scales``: float8_e4m3fn [N, Kq/group_size];
    ``zeros``: uint8 [N, Kq/group_size]; ``row_scale``: float32 [N]. ``Kq`` is the
    quantized width (padded, split columns included); ``in_features`` the layer's true K;
    ``split_index``: int32 [R] source channel of each split slot (-1 empty), or None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    row_scale: torch.Tensor
    in_features: int
    group_size: int = GROUP_SIZE
    master_bits: int = MASTER_BITS
    split_index: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def step(self) -> torch.Tensor:
        """Master grid step per group, float32 [N, G]."""
        return decode_e4m3(self.scales) * self.row_scale.unsqueeze(-1)


def group_grid(x: torch.Tensor, group_size: int, bits: int, symmetric: bool = False):
    """Grid of each group of a padded 2-D tensor ``[R, Kq]`` (rows: output channels or tokens).

    Asymmetric (default): min/max with zero included, ``zero = round(-min / step)``.
    Symmetric: ``step = amax / (2^(b-1) - 1)``, ``zero = 2^(b-1)``.
    Returns ``(scales_e4m3 [R, G], row_scale [R], step [R, G] fp32, zeros [R, G] fp32 integral)``;
    the step is the decoded (stored) one, so codes computed with it reproduce exactly on load.
    """
    r, kq = x.shape
    g = x.detach().float().reshape(r, kq // group_size, group_size)
    qmax = 2**bits - 1
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric grids need at least 2 bits")
        raw = g.abs().amax(-1) / exact_divisor(2 ** (bits - 1) - 1, g)
    else:
        lo = g.amin(-1).clamp(max=0)
        raw = (g.amax(-1).clamp(min=0) - lo) / exact_divisor(qmax, g)
    scales, row_scale = split_row_scale(raw)
    step = decode_e4m3(scales) * row_scale.unsqueeze(-1)
    if symmetric:
        zeros = torch.full_like(step, 2 ** (bits - 1))
    else:
        zeros = torch.round(-lo / step).clamp(0, qmax)
    return scales, row_scale, step, zeros


def quantize_groups(x: torch.Tensor, group_size: int, bits: int, symmetric: bool = False):
    """Quantize a padded 2-D tensor ``[R, Kq]`` group-wise.

    Returns ``(codes uint8 [R, Kq], scales e4m3 [R, G], zeros uint8 [R, G], row_scale fp32 [R])``.
    Shared by weights (master codes) and activations (dynamic, per token).
    """
    scales, row_scale, step, zeros = group_grid(x, group_size, bits, symmetric)
    r = x.shape[0]
    g = x.float().reshape(r, -1, group_size)
    codes = torch.round(g / step.unsqueeze(-1)) + zeros.unsqueeze(-1)
    codes = codes.clamp(0, 2**bits - 1).reshape(r, -1).to(torch.uint8)
    return codes, scales, zeros.to(torch.uint8), row_scale


def quantize_weight(w: torch.Tensor, group_size: int = GROUP_SIZE, master_bits: int = MASTER_BITS) -> QuantizedWeight:
    """Quantize a float weight ``[N, K]`` (already in the split layout if channels are split) to master codes."""
    check_weight(w)
    check_group_size(group_size)
    check_bits(master_bits, 8)
    codes, scales, zeros, row_scale = quantize_groups(pad_columns(w.float(), group_size), group_size, master_bits)
    return QuantizedWeight(codes, scales, zeros, row_scale, w.shape[1], group_size, master_bits)


def slice_codes(codes: torch.Tensor, bits: int, master_bits: int = MASTER_BITS, rule: str = SLICING) -> torch.Tensor:
    """Master codes -> b-bit codes (same dtype). ``truncate``/``centre`` shift right; ``round`` rounds the shift."""
    check_bits(bits, master_bits)
    shift = master_bits - bits
    if rule in ("truncate", "centre"):
        return codes >> shift
    if rule == "round":
        if shift == 0:
            return codes
        rounded = (codes.to(torch.int32) + (1 << (shift - 1))) >> shift
        return rounded.clamp(max=2**bits - 1).to(codes.dtype)
    raise ValueError(f"unknown slicing rule {rule!r}; choose one of {SLICING_RULES}")


def cell_offset(bits: int, master_bits: int = MASTER_BITS, rule: str = SLICING) -> float:
    """Where inside its cell of master codes a b-bit code is reconstructed (in master steps)."""
    if rule not in SLICING_RULES:
        raise ValueError(f"unknown slicing rule {rule!r}; choose one of {SLICING_RULES}")
    return (2 ** (master_bits - bits) - 1) / 2 if rule == "centre" else 0.0


def affine_params(qw: QuantizedWeight, bits: int, rule: str = SLICING) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(step_b, zero_b)`` float32 [N, G] with ``w = step_b * (code_b - zero_b)``.

    ``step_b = step * 2^(8-b)``; ``zero_b = (zero - offset) / 2^(8-b)`` is fractional for b < 8
    under the centre rule. Kernels compute the same two numbers from the stored bytes.
    """
    check_bits(bits, qw.master_bits)
    mult = 2 ** (qw.master_bits - bits)
    step_b = qw.step() * mult
    zero_b = (qw.zeros.float() - cell_offset(bits, qw.master_bits, rule)) / mult
    return step_b, zero_b


def dequantize(qw: QuantizedWeight, bits: int | None = None, rule: str = SLICING, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight ``[N, Kq]`` that the b-bit slice of ``qw`` represents (padding and split columns included)."""
    bits = qw.master_bits if bits is None else bits
    step_b, zero_b = affine_params(qw, bits, rule)
    q = slice_codes(qw.codes, bits, qw.master_bits, rule)
    n, kq = q.shape
    g = q.reshape(n, -1, qw.group_size).to(dtype)
    w = (g - zero_b.to(dtype).unsqueeze(-1)) * step_b.to(dtype).unsqueeze(-1)
    return w.reshape(n, kq)


def quantize_onto_nested_grid(w: torch.Tensor, step: torch.Tensor, zeros: torch.Tensor, bits: int,
                              group_size: int = GROUP_SIZE, master_bits: int = MASTER_BITS) -> torch.Tensor:
    """Round-to-nearest of ``w [N, Kq]`` directly onto the coarse b-bit grid of given master (step, zeros).

    The coarse grid has step ``step * 2^(8-b)`` and points at the cell centres. Used to show that
    slicing master codes equals quantizing straight onto the coarse grid. The quotient ``w / step`` is
    the fp32 one the master quantizer uses, and its exact halves go to the even neighbour as there
    (``torch.round``); the rest is exact in float64 (adding the zero point in fp32 could carry a
    quotient just below ``k + 1/2`` across it).
    """
    mult = 2 ** (master_bits - bits)
    n = w.shape[0]
    u = (w.float().reshape(n, -1, group_size) / step.unsqueeze(-1)).double()
    u = torch.where(u - torch.floor(u) == 0.5, torch.round(u), u)  # master ties, half to even
    x = u + zeros.double().unsqueeze(-1)  # position in master steps, zero at 0
    q = torch.floor((x + 0.5) / mult).clamp(0, 2**bits - 1)
    return q.reshape(n, -1).to(torch.uint8)
