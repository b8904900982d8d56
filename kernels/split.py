"""Rounding-aware outlier channel splitting (OCS): the layout of split input channels.

A split input channel c is duplicated; its weight column w becomes (w - s/2)/2 in place and
(w + s/2)/2 in a new column. On a fixed round-to-nearest grid of step s (grid points at
multiples of s), Q((w + s/2)/2) + Q((w - s/2)/2) = Q(w), so the quantized layer output is
unchanged; re-deriving the group scales (the column's range has halved) is what lowers the
error. bitbybit uses the step of the *lowest trained precision* (2 bits by default) of the
column's group, where rounding error matters most.

Layout of a layer with split channels (``Kq`` columns in all)::

    [ 0, K )             original input channels (split ones hold (w - s/2)/2)
    [ K, Kp )            zero padding to a whole group, Kp = padded_width(K)
    [ Kp, Kp + R )       the split region: R slots, R a multiple of the group size

``split_index [R]`` (int32) gives each slot's source channel, -1 for an empty slot (weight and
activation are 0 there). The region is cut into ``segments`` equal parts; segment j holds only
channels of the j-th K/segments slice, so a tensor-parallel rank that owns that slice of K owns
its split slots and whole groups: K-sharded layers (o_proj, down_proj) serve at any TP size
that divides ``segments``.
"""

from __future__ import annotations

import torch

from .e4m3 import value_checks
from .grid import GROUP_SIZE, MASTER_BITS, QuantizedWeight, check_weight, padded_width, quantize_groups, quantize_weight


def split_region_index(channels, in_features: int, group_size: int, segments: int = 1) -> torch.Tensor:
    """Build ``split_index [R]`` (int32, -1 = empty) for the given source channels.

    Channels are sorted and placed in the segment that owns them; every segment is padded to
    the same whole number of groups. No channels gives an empty region (R = 0).
    """
    chans = torch.as_tensor(channels, dtype=torch.int64).flatten().unique()
    if segments < 1 or in_features % segments or (segments > 1 and (in_features // segments) % group_size):
        raise ValueError(
            f"segments={segments} must divide in_features={in_features} into slices of whole groups of {group_size}"
        )
    if chans.numel() and (chans.min() < 0 or chans.max() >= in_features):
        raise ValueError(f"split channels must lie in [0, {in_features}), got {chans.min().item()}..{chans.max().item()}")
    if chans.numel() == 0:
        return torch.empty(0, dtype=torch.int32)
    width = in_features // segments
    parts = [chans[(chans >= j * width) & (chans < (j + 1) * width)] for j in range(segments)]
    slots = padded_width(max(p.numel() for p in parts), group_size)
    out = torch.full((segments, slots), -1, dtype=torch.int32)
    for j, p in enumerate(parts):
        out[j, : p.numel()] = p.to(torch.int32)
    return out.flatten()


def check_split_index(split_index: torch.Tensor, in_features: int, group_size: int) -> None:
    """Validate a split index against a layer's K and group size."""
    if split_index.dim() != 1 or split_index.numel() % group_size:
        raise ValueError(f"split_index must be 1-D with a length that is a multiple of {group_size}, got {tuple(split_index.shape)}")
    if value_checks() and split_index.numel() and (split_index.min() < -1 or split_index.max() >= in_features):
        raise ValueError(f"split_index entries must be -1 or in [0, {in_features})")


def quantized_width(in_features: int, split_slots: int, group_size: int) -> int:
    """Kq: columns of the quantized weight (padded K plus the split region)."""
    return padded_width(in_features, group_size) + split_slots


def split_weight(w: torch.Tensor, split_index: torch.Tensor, step: torch.Tensor | float, group_size: int) -> torch.Tensor:
    """Expand ``w [N, K]`` to the split layout ``[N, Kq]``.

    ``step`` is the grid step s used for the rounding-aware split: a scalar, per-row ``[N]``, or
    per-(row, source channel) ``[N, K]``. Returns float32 zeros in padding and empty slots.
    """
    n, k = w.shape
    check_split_index(split_index, k, group_size)
    kp = padded_width(k, group_size)
    out = torch.zeros(n, kp + split_index.numel(), dtype=torch.float32, device=w.device)
    out[:, :k] = w.float()
    used = split_index >= 0
    if not used.any():
        return out
    src = split_index[used].long()
    slots = kp + torch.nonzero(used).flatten()
    s = torch.as_tensor(step, dtype=torch.float32, device=w.device)
    if s.dim() == 2:  # per (row, source channel)
        s = s[:, src]
    elif s.dim() == 1:  # per row
        s = s.unsqueeze(1)
    col = w.float()[:, src]
    out[:, src] = (col - s / 2) / 2
    out[:, slots] = (col + s / 2) / 2
    return out


def fold_split(w_split: torch.Tensor, split_index: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`split_weight` in float: add each split slot back onto its source column."""
    kp = padded_width(in_features, group_size)
    out = w_split[:, :in_features].clone()
    used = split_index >= 0
    if used.any():
        out.index_add_(1, split_index[used].long(), w_split[:, kp + torch.nonzero(used).flatten()])
    return out


def expand_input(x: torch.Tensor, split_index: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Activations ``[..., K]`` -> ``[..., Kq]``: zero padding, then the gathered split channels."""
    k = x.shape[-1]
    kp = padded_width(k, group_size)
    parts = [x, x.new_zeros(*x.shape[:-1], kp - k)]
    if split_index is not None and split_index.numel():
        idx = split_index.to(device=x.device, dtype=torch.long)
        gathered = x[..., idx.clamp(min=0)] * (idx >= 0).to(x.dtype)
        parts.append(gathered)
    return torch.cat(parts, dim=-1)


def split_step(w: torch.Tensor, bits: int, group_size: int = GROUP_SIZE, master_bits: int = MASTER_BITS) -> torch.Tensor:
    """The b-bit nested step of every weight ``[N, K]`` in the unsplit layer's grid (the split's s)."""
    step = quantize_weight(w, group_size, master_bits).step() * 2 ** (master_bits - bits)
    return step.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]


def quantize_split_weight(w: torch.Tensor, split_index: torch.Tensor, split_bits: int = 2,
                          group_size: int = GROUP_SIZE, master_bits: int = MASTER_BITS) -> QuantizedWeight:
    """Split ``w [N, K]`` with the ``split_bits`` step of its own grid, then quantize with re-derived scales."""
    check_weight(w)
    ws = split_weight(w, split_index, split_step(w, split_bits, group_size, master_bits), group_size)
    return quantize_split_layout(ws, w.shape[1], split_index, group_size, master_bits)


def quantize_split_layout(ws: torch.Tensor, in_features: int, split_index: torch.Tensor,
                          group_size: int = GROUP_SIZE, master_bits: int = MASTER_BITS) -> QuantizedWeight:
    """Quantize a weight already in the split layout ``[N, Kq]`` (e.g. trained by QAT)."""
    check_weight(ws)
    check_split_index(split_index, in_features, group_size)
    if ws.shape[1] != quantized_width(in_features, split_index.numel(), group_size):
        raise ValueError(f"split-layout weight has {ws.shape[1]} columns, expected "
                         f"{quantized_width(in_features, split_index.numel(), group_size)}")
    codes, scales, zeros, row_scale = quantize_groups(ws.float(), group_size, master_bits)
    return QuantizedWeight(codes, scales, zeros, row_scale, in_features, group_size, master_bits,
                           split_index.to(torch.int32))
