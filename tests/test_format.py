"""Properties of the nested-grid format (kernels/): codec, grids, slicing, packing, splitting, reference ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from kernels import (
    dequantize,
    dequantize_activations,
    expand_input,
    fold_split,
    linear_wa,
    linear_wa16,
    pack_codes,
    quantize_activations,
    quantize_split_weight,
    quantize_weight,
    slice_codes,
    split_region_index,
    split_weight,
    unpack_codes,
)
from kernels.e4m3 import E4M3_MAX, decode_e4m3, encode_e4m3, split_row_scale
from kernels.grid import affine_params, padded_width, quantize_onto_nested_grid
from kernels.ops import linear, pack_linear

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(1, 12), st.integers(1, 100))
seeds = st.integers(0, 2**31 - 1)


def rand(shape, seed, scale=1.0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def all_positive_e4m3() -> torch.Tensor:
    """Every finite positive E4M3 value, ascending."""
    return torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


# ---- E4M3 codec -------------------------------------------------------------------------------

def test_e4m3_decode_agrees_with_torch():
    bits = torch.arange(256, dtype=torch.uint8)
    ref = bits.view(torch.float8_e4m3fn).float()
    got = decode_e4m3(bits)
    same = (got == ref) | (got.isnan() & ref.isnan())
    assert same.all()


def test_e4m3_encode_is_identity_on_representable_values():
    values = all_positive_e4m3()
    assert torch.equal(encode_e4m3(values).float(), values)
    assert torch.equal(encode_e4m3(values), values.to(torch.float8_e4m3fn))


@SETTINGS
@given(st.floats(2.0**-9, E4M3_MAX, allow_nan=False, allow_infinity=False))
def test_e4m3_encode_rounds_up_to_the_next_value(x):
    table = all_positive_e4m3()
    got = encode_e4m3(torch.tensor([x])).float().item()
    expected = table[table >= torch.tensor(x, dtype=torch.float32)].min().item()
    assert got == expected


def test_row_scale_keeps_scales_in_range_and_never_below():
    scales = torch.logspace(-8, 4, 64).reshape(4, 16) * torch.rand(4, 16).add(0.5)
    e4, row = split_row_scale(scales)
    decoded = decode_e4m3(e4) * row[:, None]
    assert e4.dtype == torch.float8_e4m3fn and row.dtype == torch.float32
    assert (decode_e4m3(e4) <= E4M3_MAX).all()
    assert (decoded >= scales * (1 - 1e-6)).all()  # rounded up (FP32 rounding aside)
    in_span = scales >= scales.amax(1, keepdim=True) * 2.0**-17
    assert (decoded[in_span] <= scales[in_span] * 1.125 + 1e-30).all()  # at most one E4M3 step up


def test_e4m3_rejects_bad_scales():
    with pytest.raises(ValueError, match="NaN"):
        encode_e4m3(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="448"):
        encode_e4m3(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="floating"):
        encode_e4m3(torch.tensor([1]))


# ---- master grid and nested slicing -----------------------------------------------------------

@SETTINGS
@given(shapes, seeds, st.sampled_from([8, 16, 32, 64]))
def test_quantize_weight_layout(shape, seed, group_size):
    w = rand(shape, seed)
    qw = quantize_weight(w, group_size)
    kq = padded_width(shape[1], group_size)
    assert qw.codes.shape == (shape[0], kq) and qw.codes.dtype == torch.uint8
    assert qw.scales.shape == (shape[0], kq // group_size) and qw.scales.dtype == torch.float8_e4m3fn
    assert qw.zeros.shape == qw.scales.shape and qw.zeros.dtype == torch.uint8
    assert qw.row_scale.shape == (shape[0],) and qw.in_features == shape[1]


@SETTINGS
@given(shapes, seeds, st.integers(1, 8))
@example((8, 54), 343, 6)  # a quotient just below 60.5 that an fp32 zero-point addition rounded up to it
@example((12, 100), 408, 8)  # a quotient of exactly -51.5: the master rounding's tie goes to even
def test_slicing_equals_quantizing_onto_the_coarse_grid(shape, seed, bits):
    w = rand(shape, seed)
    qw = quantize_weight(w)
    wp = torch.nn.functional.pad(w, (0, qw.codes.shape[1] - shape[1]))
    direct = quantize_onto_nested_grid(wp, qw.step(), qw.zeros.float(), bits)
    assert torch.equal(slice_codes(qw.codes, bits), direct)


@SETTINGS
@given(shapes, seeds, st.integers(1, 8), st.sampled_from([1e-3, 1.0, 50.0]))
def test_dequantization_error_within_half_a_coarse_step(shape, seed, bits, scale):
    w = rand(shape, seed, scale)
    qw = quantize_weight(w)
    step_b, _ = affine_params(qw, bits)
    bound = step_b.repeat_interleave(qw.group_size, dim=1)[:, : shape[1]] / 2
    err = (dequantize(qw, bits)[:, : shape[1]] - w).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()


def test_truncation_error_bound_is_wider_than_centre():
    w = rand((64, 256), 0)
    qw = quantize_weight(w)
    for bits in (2, 3, 4):
        step = qw.step().repeat_interleave(32, dim=1)
        trunc = (dequantize(qw, bits, rule="truncate") - w).abs()
        assert (trunc <= step * (2 ** (8 - bits) - 0.5) * (1 + 1e-5)).all()
        centre = ((dequantize(qw, bits) - w) ** 2).mean()
        assert centre < ((dequantize(qw, bits, rule="truncate") - w) ** 2).mean()


def test_eight_bit_slice_is_the_master_grid():
    w = rand((8, 64), 3)
    qw = quantize_weight(w)
    assert torch.equal(slice_codes(qw.codes, 8), qw.codes)
    step, zero = affine_params(qw, 8)
    assert torch.equal(zero, qw.zeros.float()) and torch.equal(step, qw.step())


def test_all_zero_rows_and_groups_reconstruct_near_zero():
    """Zero is not a level of the centre-rule grid below 8 bits; all-zero groups get the smallest step."""
    w = torch.zeros(3, 64)
    w[1, :32] = rand((32,), 1)
    for bits in (8, 4, 2):
        out = dequantize(quantize_weight(w), bits)
        assert out[0].abs().max() < 1e-25
        assert out[1, 32:].abs().max() <= 1e-3 * w[1].abs().max()
        assert torch.isfinite(out).all()


# ---- packing ----------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 8), st.integers(1, 6), st.integers(1, 4), seeds)
def test_pack_unpack_round_trip(bits, rows, groups, seed):
    codes = torch.randint(0, 2**bits, (rows, 32 * groups), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, groups * bits)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_three_bit_top_plane_is_the_two_bit_slice():
    qw = quantize_weight(rand((4, 64), 5))
    packed3 = pack_codes(slice_codes(qw.codes, 3), 3)
    assert torch.equal(packed3[:, : 64 * 2 // 32], pack_codes(slice_codes(qw.codes, 2), 2))


def test_pack_layout_is_little_end_first():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 1] = 3
    assert pack_codes(codes, 2)[0, 0].item() == 3 << 2


# ---- outlier channel splitting ----------------------------------------------------------------

@SETTINGS
@given(st.floats(-100, 100, allow_nan=False), st.floats(0.01, 10))
def test_split_identity_on_a_fixed_grid(w, s):
    frac = (w / s) % 1.0
    assume(abs(frac - 0.5) > 1e-6)  # exact ties break round-to-nearest's symmetry
    wt, st_ = torch.tensor(w, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    code = lambda v: torch.round(v / st_)  # noqa: E731  (Q(v) = s * code(v))
    assert code((wt + st_ / 2) / 2) + code((wt - st_ / 2) / 2) == code(wt)


def test_split_layer_quantized_output_is_unchanged_on_the_fixed_grid():
    w, x = rand((32, 80), 1, dtype=torch.float64), rand((5, 80), 2, dtype=torch.float64)
    s = 0.25
    idx = split_region_index([0, 7, 41, 79], 80, 32)
    ws = split_weight(w, idx, s, 32).double()
    q = lambda v: torch.round(v / s) * s  # noqa: E731
    y_plain = x @ q(w).T
    y_split = expand_input(x, idx, 32) @ q(ws).T
    assert torch.allclose(y_split, y_plain, rtol=0, atol=1e-12)
    assert torch.allclose(fold_split(ws, idx, 80, 32), w.float().double(), atol=1e-6)


def test_split_with_rederived_scales_lowers_the_error():
    from kernels.format_study import outlier_problem, rel_mse
    w, x = outlier_problem(seed=3, n=256, k=512, tokens=64)
    idx = split_region_index((x.norm(dim=0) * w.abs().amax(0)).topk(16).indices, 512, 32)
    y = x.double() @ w.double().T
    for bits in (2, 3, 4):
        plain = rel_mse(linear_wa16(x.double(), quantize_weight(w), bits), y)
        split = rel_mse(linear_wa16(x.double(), quantize_split_weight(w, idx), bits), y)
        assert split < plain


def test_split_region_segments_own_their_k_slices():
    idx = split_region_index([5, 70, 3, 127, 64], 128, 32, segments=2)
    assert idx.numel() == 64
    first, second = idx[:32], idx[32:]
    assert set(first[first >= 0].tolist()) == {3, 5} and set(second[second >= 0].tolist()) == {64, 70, 127}
    with pytest.raises(ValueError, match="segments"):
        split_region_index([1], 100, 32, segments=3)
    with pytest.raises(ValueError, match="split channels"):
        split_region_index([100], 100, 32)


def test_expand_input_layout():
    x = torch.arange(1.0, 41.0).reshape(1, 40)
    idx = torch.tensor([3, -1] + [-1] * 30, dtype=torch.int32)
    xe = expand_input(x, idx, 32)
    assert xe.shape == (1, 96)
    assert torch.equal(xe[0, :40], x[0]) and torch.equal(xe[0, 40:64], torch.zeros(24))
    assert xe[0, 64].item() == 4.0 and torch.equal(xe[0, 65:], torch.zeros(31))


# ---- activation quantization ------------------------------------------------------------------

@SETTINGS
@given(st.tuples(st.integers(1, 6), st.integers(1, 90)), seeds, st.integers(2, 8))
def test_activation_error_within_half_a_step(shape, seed, bits):
    x = rand(shape, seed, 3.0)
    qa = quantize_activations(x, bits)
    err = (dequantize_activations(qa)[..., : shape[1]] - x).abs()
    step = qa.step().repeat_interleave(32, dim=-1)[..., : shape[1]]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert int(qa.codes.max()) < 2**bits


def test_activation_padding_and_empty_slots_are_exact_zeros():
    x = rand((3, 40), 0)
    idx = torch.tensor([1] + [-1] * 31, dtype=torch.int32)
    deq = dequantize_activations(quantize_activations(x, 2, idx))
    assert torch.equal(deq[:, 40:64], torch.zeros(3, 24)) and torch.equal(deq[:, 65:], torch.zeros(3, 31))


# ---- reference ops ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_wa16_equals_dequantize_then_matmul_float64(bits):
    w, x = rand((48, 100), 1), rand((7, 100), 2, dtype=torch.float64)
    idx = split_region_index([2, 50, 99], 100, 32)
    qw = quantize_split_weight(w, idx)
    folded = fold_split(dequantize(qw, bits, dtype=torch.float64), idx, 100, 32)
    ref = x @ folded.T
    assert torch.allclose(linear_wa16(x, qw, bits), ref, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_integer_path_equals_float64_of_the_same_values(bits):
    w, x = rand((40, 70), 3), rand((2, 3, 70), 4, dtype=torch.float64)
    idx = split_region_index([0, 69], 70, 32)
    qw = quantize_split_weight(w, idx)
    qa = quantize_activations(x, bits, idx)
    ref = dequantize_activations(qa, torch.float64) @ dequantize(qw, bits, dtype=torch.float64).T
    got = linear_wa(x, qw, bits, bits)
    assert got.shape == (2, 3, 40)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linear_matches_reference(bits):
    w, x = rand((16, 64), 5), rand((3, 64), 6)
    qw = quantize_weight(w)
    layer = pack_linear(qw, bits)
    assert layer.packed.shape == (16, 64 * bits // 32)
    assert torch.equal(linear(x, layer), linear_wa16(x, qw, bits))
    assert torch.equal(linear(x, layer, act_bits=2), linear_wa(x, qw, bits, 2))


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("w, match", [
    (torch.ones(4, 4, dtype=torch.int32), "floating"),
    (torch.ones(4), "2-D"),
    (torch.ones(2, 3, 4), "2-D"),
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
])
def test_bad_weights_raise_value_error(w, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(w)


@pytest.mark.parametrize("group_size", [0, -32, 2.5])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.ones(2, 64), group_size)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_bad_bits(bits):
    qw = quantize_weight(torch.ones(2, 64))
    with pytest.raises(ValueError, match="bits"):
        slice_codes(qw.codes, bits)
    with pytest.raises(ValueError, match="bits"):
        quantize_activations(torch.ones(2, 64), bits)


def test_bad_layer_input():
    qw = quantize_weight(torch.ones(2, 64))
    with pytest.raises(ValueError, match="features"):
        linear_wa16(torch.ones(1, 63), qw, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(2, 40, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="exceeds"):
        pack_codes(torch.full((2, 32), 4, dtype=torch.uint8), 2)
