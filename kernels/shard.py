"""Tensor-parallel slices of a quantized layer (the split layout of :mod:`kernels.split`, cut per rank).

Column-parallel layers (N-sharded: qkv, gate_up) need nothing new: output rows are independent,
so a rank keeps whole rows and the full input layout, split region included.

A row-parallel layer (K-sharded: o_proj, down_proj) at tensor-parallel size T gives rank r the
input channels ``[r*K/T, (r+1)*K/T)``. Its slice of the ``[N, Kq]`` layout is

    groups of the original columns [r*K/T, (r+1)*K/T)
    groups of split segments [r*S/T, (r+1)*S/T)     (S = segments; R/T slots)

which is itself an ordinary bitbybit layer: ``in_features = K/T``, no padding, ``R/T`` split
slots whose indices are shifted to the rank's channels (-1 stays -1). The rank's input
``x[..., r*K/T:(r+1)*K/T]`` then expands (:func:`kernels.split.expand_input`) to exactly that
layout, and the ranks' outputs sum to the unsharded layer's output.

Conditions (checked by :func:`check_row_shard`): T = 1 always works; T > 1 needs K to be a
multiple of ``T * group_size`` (whole groups, no padding) and, when the layer has split slots,
T to divide ``segments``. Weights are sliced exactly; only W{b}A{a} activation quantization
differs across T, because each rank derives its per-token FP32 factor from its own groups.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .grid import QuantizedWeight, padded_width
from .packing import pack_codes, unpack_codes

MAX_TP_SIZE = 16


def row_shard_problem(in_features: int, split_slots: int, segments: int, group_size: int, tp_size: int) -> str | None:
    """Why a row-parallel layer cannot be cut into ``tp_size`` ranks, or None if it can."""
    if tp_size < 1:
        return f"tensor-parallel size must be >= 1, got {tp_size}"
    if tp_size == 1:
        return None
    if in_features % (tp_size * group_size):
        return (f"in_features={in_features} is not a multiple of tp_size * group_size = {tp_size} * {group_size}, "
                "so groups would straddle ranks")
    if split_slots and segments % tp_size:
        return f"its split region has {segments} segment(s), which tp_size={tp_size} does not divide"
    return None


def supported_row_tp_sizes(in_features: int, split_slots: int, segments: int, group_size: int,
                           limit: int = MAX_TP_SIZE) -> list[int]:
    """Every tensor-parallel size up to ``limit`` that a row-parallel layer supports."""
    return [t for t in range(1, limit + 1)
            if row_shard_problem(in_features, split_slots, segments, group_size, t) is None]


def check_row_shard(in_features: int, split_slots: int, segments: int, group_size: int, tp_size: int,
                    name: str = "layer") -> None:
    """Raise a ValueError naming the supported sizes if ``tp_size`` cannot shard this row-parallel layer."""
    problem = row_shard_problem(in_features, split_slots, segments, group_size, tp_size)
    if problem is not None:
        sizes = supported_row_tp_sizes(in_features, split_slots, segments, group_size)
        raise ValueError(f"{name} cannot be row-sharded at tensor-parallel size {tp_size}: {problem}; "
                         f"supported sizes for this layer: {sizes}")


def row_shard_groups(in_features: int, split_slots: int, segments: int, group_size: int,
                     rank: int, tp_size: int) -> torch.Tensor:
    """Indices (int64) of the groups of the full ``[N, Kq]`` layout that ``rank`` owns, in local order."""
    check_row_shard(in_features, split_slots, segments, group_size, tp_size)
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside 0..{tp_size - 1}")
    orig = padded_width(in_features, group_size) // group_size // tp_size
    split = split_slots // group_size // tp_size
    first_split = padded_width(in_features, group_size) // group_size
    return torch.cat([torch.arange(rank * orig, (rank + 1) * orig),
                      first_split + torch.arange(rank * split, (rank + 1) * split)])


def take_groups(t: torch.Tensor, groups: torch.Tensor, group_width: int) -> torch.Tensor:
    """The columns of ``t [N, G * group_width]`` that belong to ``groups`` (any dtype, FP8 included)."""
    cols = (groups.to(t.device).unsqueeze(1) * group_width + torch.arange(group_width, device=t.device)).flatten()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).index_select(1, cols).view(t.dtype)
    return t.index_select(1, cols)


def take_packed_groups(packed: torch.Tensor, groups: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The ``groups`` of a packed b-bit tensor (``int32 [N, Kq*b/32]``, :func:`kernels.packing.pack_codes`), packed.

    A compact checkpoint's codes are bit planes, so a group's words are not one contiguous run;
    unpacking, taking the groups and repacking is exact.
    """
    return pack_codes(take_groups(unpack_codes(packed, bits), groups, group_size), bits)


def row_shard_split_index(split_index: torch.Tensor | None, in_features: int, segments: int,
                          rank: int, tp_size: int) -> torch.Tensor | None:
    """The rank's split slots with indices local to its channels (-1 stays -1); None without splits."""
    if split_index is None or split_index.numel() == 0:
        return None
    if tp_size == 1:
        return split_index.to(torch.int32)
    if segments % tp_size or split_index.numel() % tp_size:
        raise ValueError(f"a split region of {segments} segment(s) cannot be cut for tp_size={tp_size}")
    width = split_index.numel() // tp_size
    local = split_index[rank * width:(rank + 1) * width].to(torch.int32)
    start = rank * (in_features // tp_size)
    outside = (local >= 0) & ((local < start) | (local >= start + in_features // tp_size))
    if outside.any():
        raise ValueError(f"split slots of rank {rank} hold channels outside its input slice; "
                         "the split index does not follow the segment layout")
    return torch.where(local >= 0, local - start, local)


def shard_row_parallel(qw: QuantizedWeight, segments: int, rank: int, tp_size: int) -> QuantizedWeight:
    """Rank ``rank``'s slice of a row-parallel layer: a layer of ``in_features / tp_size`` inputs."""
    slots = 0 if qw.split_index is None else qw.split_index.numel()
    groups = row_shard_groups(qw.in_features, slots, segments, qw.group_size, rank, tp_size)
    return replace(
        qw,
        codes=take_groups(qw.codes, groups, qw.group_size),
        scales=take_groups(qw.scales, groups, 1),
        zeros=take_groups(qw.zeros, groups, 1),
        in_features=qw.in_features // tp_size,
        split_index=row_shard_split_index(qw.split_index, qw.in_features, segments, rank, tp_size),
    )


def shard_column_parallel(qw: QuantizedWeight, rank: int, tp_size: int) -> QuantizedWeight:
    """Rank ``rank``'s slice of a column-parallel layer: its block of output rows, full input layout."""
    if qw.out_features % tp_size or not 0 <= rank < tp_size:
        raise ValueError(f"cannot take rank {rank} of {tp_size} from {qw.out_features} output rows")
    n = qw.out_features // tp_size
    rows = slice(rank * n, (rank + 1) * n)
    return replace(qw, codes=qw.codes[rows], scales=qw.scales[rows], zeros=qw.zeros[rows],
                   row_scale=qw.row_scale[rows])
