"""Tensor-parallel slices of quantized layers (kernels/shard.py) against the unsharded layer."""

from __future__ import annotations

import pytest
import torch

from kernels import (
    dequantize,
    fold_split,
    linear_wa,
    linear_wa16,
    pack_codes,
    quantize_split_weight,
    quantize_weight,
    slice_codes,
    split_region_index,
)
from kernels.grid import QuantizedWeight
from kernels.shard import (
    check_row_shard,
    row_shard_split_index,
    shard_column_parallel,
    shard_row_parallel,
    supported_row_tp_sizes,
    row_shard_groups,
    take_groups,
    take_packed_groups,
)

GS = 32


def split_layer(n: int, k: int, channels: list[int], segments: int, seed: int = 0) -> QuantizedWeight:
    torch.manual_seed(seed)
    idx = split_region_index(channels, k, GS, segments)
    return quantize_split_weight(torch.randn(n, k), idx)


def folded(qw: QuantizedWeight, bits: int) -> torch.Tensor:
    """The float [N, K] weight a layer represents at ``bits``, split columns added back."""
    w = dequantize(qw, bits, dtype=torch.float64)
    if qw.split_index is None:
        return w[:, :qw.in_features]
    return fold_split(w, qw.split_index, qw.in_features, qw.group_size)


@pytest.mark.parametrize("tp", [2, 4])
def test_row_shards_are_exact_slices_with_their_split_channels(tp):
    k = 256
    channels = [3, 5, 70, 100, 130, 131, 200, 255]
    qw = split_layer(48, k, channels, segments=4)
    full = folded(qw, 2)
    seen = []
    for rank in range(tp):
        local = shard_row_parallel(qw, 4, rank, tp)
        assert local.in_features == k // tp
        assert local.codes.shape == (48, k // tp + qw.split_index.numel() // tp)
        assert local.scales.shape == local.zeros.shape == (48, local.codes.shape[1] // GS)
        assert torch.equal(local.row_scale, qw.row_scale)
        assert torch.equal(folded(local, 2), full[:, rank * k // tp:(rank + 1) * k // tp])
        used = local.split_index[local.split_index >= 0]
        seen += (used + rank * k // tp).tolist()
    assert sorted(seen) == channels


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_shard_outputs_sum_to_the_unsharded_output(tp):
    qw = split_layer(24, 256, [1, 2, 90, 170, 250], segments=4, seed=1)
    x = torch.randn(5, 256, dtype=torch.float64)
    parts = [linear_wa16(x[:, r * 256 // tp:(r + 1) * 256 // tp], shard_row_parallel(qw, 4, r, tp), 3)
             for r in range(tp)]
    torch.testing.assert_close(sum(parts), linear_wa16(x, qw, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act_bits", [2, 4])
def test_row_shards_with_activation_quantization_are_as_accurate(act_bits):
    """W2A{a}: each rank derives its own per-token FP32 factor, so TP = 2 is not bit-equal to TP = 1,
    but its activation-quantization error (against W2A16) is the same size."""
    qw = split_layer(64, 256, [7, 77, 177, 200], segments=2, seed=2)
    x = torch.randn(16, 256, dtype=torch.float64)
    a16 = linear_wa16(x, qw, 2)
    tp2 = sum(linear_wa(x[:, r * 128:(r + 1) * 128], shard_row_parallel(qw, 2, r, 2), 2, act_bits) for r in range(2))
    tp1 = linear_wa(x, qw, 2, act_bits)
    assert (tp2 - a16).norm() <= 1.1 * (tp1 - a16).norm()


def test_column_shards_are_row_blocks():
    qw = split_layer(64, 96, [4, 50], segments=1, seed=3)
    x = torch.randn(3, 96, dtype=torch.float64)
    outs = [linear_wa16(x, shard_column_parallel(qw, r, 4), 2) for r in range(4)]
    torch.testing.assert_close(torch.cat(outs, dim=1), linear_wa16(x, qw, 2), rtol=1e-12, atol=1e-12)


def test_layer_without_splits_and_unpadded_k():
    torch.manual_seed(4)
    qw = quantize_weight(torch.randn(16, 128))
    local = shard_row_parallel(qw, 1, 1, 2)
    assert local.split_index is None and local.codes.shape == (16, 64)
    assert torch.equal(local.codes, qw.codes[:, 64:]) and torch.equal(local.zeros, qw.zeros[:, 2:])


@pytest.mark.parametrize("k, slots, segments, tp, match, sizes", [
    (172, 0, 1, 2, "not a multiple", [1]),
    (256, 32, 1, 2, "1 segment", [1]),
    (256, 64, 2, 4, "2 segment", [1, 2]),
    (1408, 0, 1, 8, "not a multiple", [1, 2, 4, 11]),
])
def test_unsupported_sizes_fail_naming_the_supported_ones(k, slots, segments, tp, match, sizes):
    with pytest.raises(ValueError, match=match) as err:
        check_row_shard(k, slots, segments, GS, tp, name="mlp.down_proj")
    assert f"supported sizes for this layer: {sizes}" in str(err.value) and "mlp.down_proj" in str(err.value)
    assert supported_row_tp_sizes(k, slots, segments, GS) == sizes


def test_split_index_outside_the_segment_layout_is_rejected():
    bad = torch.tensor([200] + [-1] * 31 + [5] + [-1] * 31, dtype=torch.int32)  # channels in the wrong segments
    with pytest.raises(ValueError, match="outside its input slice"):
        row_shard_split_index(bad, 256, 2, 0, 2)


def test_take_groups_keeps_fp8_bits():
    qw = split_layer(8, 128, [9], segments=1, seed=5)
    groups = torch.tensor([3, 0])
    got = take_groups(qw.scales, groups, 1)
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8), qw.scales.view(torch.uint8)[:, [3, 0]])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("tp", [2, 4])
def test_packed_row_shards_are_the_packed_slices_of_the_rank(bits, tp):
    """A compact checkpoint's packed codes, cut per rank, equal the rank's master-code slice packed at b."""
    qw = split_layer(16, 256, [3, 70, 130, 255], segments=4, seed=6)
    packed = pack_codes(slice_codes(qw.codes, bits), bits)
    for rank in range(tp):
        groups = row_shard_groups(256, qw.split_index.numel(), 4, GS, rank, tp)
        want = pack_codes(slice_codes(shard_row_parallel(qw, 4, rank, tp).codes, bits), bits)
        assert torch.equal(take_packed_groups(packed, groups, bits, GS), want)
