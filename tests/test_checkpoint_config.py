"""quantization_config parsing and per-layer checkpoint tensors (kernels/checkpoint.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import dequantize, pack_codes, quantize_split_weight, slice_codes, split_region_index
from kernels.checkpoint import QuantConfig, layer_from_tensors, layer_tensors, read_quant_config


def test_defaults_round_trip_through_json():
    qc = QuantConfig()
    again = QuantConfig.from_dict(json.loads(json.dumps(qc.to_dict())))
    assert again == qc and qc.to_dict()["quant_method"] == "bitbybit"
    assert qc.trained_bits == [8, 4, 3, 2] and qc.default_bits == 2 and qc.group_size == 32


@pytest.mark.parametrize("kwargs, match", [
    ({"trained_bits": [8, 9]}, "bits"),
    ({"trained_bits": []}, "at least one"),
    ({"default_bits": 3, "trained_bits": [8, 2]}, "default_bits"),
    ({"group_size": 0}, "group_size"),
    ({"quant_method": "gptq"}, "quant_method"),
    ({"format_version": 99}, "format_version"),
    ({"scale_format": "e8m0"}, "scale_format"),
    ({"stored_bits": 9}, "stored_bits must be an integer in 1..8"),
    ({"stored_bits": 2}, r"compact checkpoint stores only its 2-bit codes.*trained_bits must be \[2\]"),
    ({"stored_bits": 2, "trained_bits": [2], "default_bits": 2, "group_size": 16}, "multiple of 32"),
])
def test_invalid_configs_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_resolve_bits():
    qc = QuantConfig(trained_bits=[8, 4, 2], default_bits=2)
    assert qc.resolve_bits(None) == 2 and qc.resolve_bits(4) == 4
    with pytest.warns(UserWarning, match=r"trained: \[2, 4, 8\]"):
        assert qc.resolve_bits(3) == 3
    with pytest.raises(ValueError, match="1..8"):
        qc.resolve_bits(9)


def test_unquantized_modules():
    qc = QuantConfig()
    assert not qc.is_quantized("lm_head") and not qc.is_quantized("model.embed_tokens")
    assert qc.is_quantized("model.layers.0.self_attn.q_proj")


def test_read_quant_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_quant_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no bitbybit quantization_config"):
        read_quant_config(tmp_path)


def test_layer_tensors_round_trip_through_safetensors(tmp_path):
    name = "model.layers.0.mlp.down_proj"
    w = torch.randn(24, 172)
    idx = split_region_index([1, 170], 172, 32)
    qw = quantize_split_weight(w, idx)
    qc = QuantConfig(splits={name: {"index": idx.tolist(), "segments": 1}})
    save_file(layer_tensors(name, qw), tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded[f"{name}.scales"].dtype == torch.float8_e4m3fn
    back = layer_from_tensors(name, loaded, 172, qc)
    for bits in (8, 2):
        assert torch.equal(dequantize(back, bits), dequantize(qw, bits))
    assert torch.equal(back.split_index, idx)


def test_layer_from_tensors_rejects_mismatches():
    name = "model.layers.0.self_attn.o_proj"
    qw = quantize_split_weight(torch.randn(8, 64), split_region_index([3], 64, 32))
    tensors = layer_tensors(name, qw)
    with pytest.raises(ValueError, match="disagrees"):
        layer_from_tensors(name, tensors, 64, QuantConfig())
    qc = QuantConfig(splits={name: {"index": qw.split_index.tolist()}})
    with pytest.raises(ValueError, match="codes: expected"):
        layer_from_tensors(name, tensors, 96, qc)
    tensors.pop(f"{name}.zeros")
    with pytest.raises(ValueError, match="missing tensor"):
        layer_from_tensors(name, tensors, 64, qc)


def compact(bits: int, **kwargs) -> QuantConfig:
    return QuantConfig(trained_bits=[bits], default_bits=bits, stored_bits=bits, **kwargs)


def test_compact_config_round_trips_and_serves_only_its_precision():
    qc = compact(2)
    assert qc.compact and not QuantConfig().compact and QuantConfig().stored_bits == 8
    assert QuantConfig.from_dict(json.loads(json.dumps(qc.to_dict()))) == qc
    assert qc.codes_suffix == "packed" and qc.stored_codes(96) == (torch.int32, 6)
    assert QuantConfig().codes_suffix == "codes" and QuantConfig().stored_codes(96) == (torch.uint8, 96)
    assert qc.resolve_bits(None) == 2 and qc.resolve_bits(2) == 2
    with pytest.raises(ValueError, match=r"compact 2-bit export.*serves at 2 bits only \(asked for 4\)"):
        qc.resolve_bits(4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compact_layer_serves_exactly_the_full_layers_slice(tmp_path, bits):
    """``P.packed`` is the B-bit slice packed: B/8 of the master codes' bytes, and the same weight at B."""
    name = "model.layers.0.mlp.down_proj"
    idx = split_region_index([1, 170], 172, 32)
    qw = quantize_split_weight(torch.randn(24, 172), idx)
    splits = {name: {"index": idx.tolist(), "segments": 1}}
    save_file(layer_tensors(name, qw, bits), tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    assert f"{name}.codes" not in loaded
    packed = loaded[f"{name}.packed"]
    assert packed.dtype == torch.int32 and packed.numel() * 4 == qw.codes.numel() * bits // 8
    assert torch.equal(packed, pack_codes(slice_codes(qw.codes, bits), bits))
    back = layer_from_tensors(name, loaded, 172, compact(bits, splits=splits))
    assert torch.equal(slice_codes(back.codes, bits), slice_codes(qw.codes, bits))
    assert torch.equal(dequantize(back, bits), dequantize(qw, bits))
    with pytest.raises(ValueError, match=r"missing tensor .*\.packed \(config.json says it is a compact export\)"):
        layer_from_tensors(name, layer_tensors(name, qw), 172, compact(bits, splits=splits))
    with pytest.raises(ValueError, match="packed: expected torch.int32"):
        layer_from_tensors(name, loaded, 172, compact(bits + 1, splits=splits))
