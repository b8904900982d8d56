"""kernels.qmodel: bitbybit checkpoints as transformers models (quantized and dequantized paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from kernels.checkpoint import QuantConfig
from kernels.qmodel import QuantLinear, load_dequantized, load_quantized, quant_linears, set_act_bits
from kernels.split import quantize_split_weight, split_region_index
from qat.export import export_checkpoint


def _export_rtn(model: nn.Module, tokenizer, out: Path, split_every: int = 7,
                quant_config: QuantConfig | None = None) -> Path:
    """Every decoder linear quantized with a few split channels (every ``split_every``-th input channel)."""
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            idx = split_region_index(range(0, mod.in_features, split_every), mod.in_features, 32)
            layers[name] = quantize_split_weight(mod.weight.detach(), idx)
    return export_checkpoint(model, tokenizer, layers, quant_config or QuantConfig(), out)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return _export_rtn(model, AutoTokenizer.from_pretrained(tiny_llama_dir), tmp_path_factory.mktemp("ckpt"))


def _ids(n: int = 24) -> torch.Tensor:
    return torch.randint(3, 200, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantized_and_dequantized_paths_agree(tiny_ckpt: Path, bits: int) -> None:
    """W{b}A16 through QuantLinear (reference ops) equals the float model with dequantized, folded weights."""
    quant, _, _ = load_quantized(tiny_ckpt, bits=bits)
    deq, _ = load_dequantized(tiny_ckpt, bits=bits)
    x = _ids()
    with torch.no_grad():
        a, b = quant(x).logits, deq(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_loader_builds_quant_linears_without_float_weights(tiny_ckpt: Path) -> None:
    model, tokenizer, qc = load_quantized(tiny_ckpt, bits=2)
    layers = dict(quant_linears(model))
    assert len(layers) == 3 * 7 and qc.default_bits == 2
    assert all(m.bits == 2 for m in layers.values())
    assert not any(isinstance(m, nn.Linear) and n != "lm_head" for n, m in model.named_modules())
    assert not any(p.is_meta for p in model.parameters())
    assert tokenizer.chat_template  # the exporter added the plain template


def test_lower_bits_lose_more(tiny_ckpt: Path) -> None:
    """Nested slices: the error to the 8-bit output grows as the precision drops."""
    x = _ids()
    with torch.no_grad():
        outs = {b: load_quantized(tiny_ckpt, bits=b)[0](x).logits for b in (8, 4, 2)}
    err = {b: (outs[b] - outs[8]).abs().mean().item() for b in (4, 2)}
    assert 0 < err[4] < err[2]


def test_activation_bits_switch_without_reloading(tiny_ckpt: Path) -> None:
    model, _, _ = load_quantized(tiny_ckpt, bits=4)
    x = _ids()
    with torch.no_grad():
        a16 = model(x).logits
        set_act_bits(model, 2)
        a2 = model(x).logits
        set_act_bits(model, None)
        again = model(x).logits
    assert torch.equal(a16, again)
    assert not torch.allclose(a16, a2)
    loaded_a2, _, _ = load_quantized(tiny_ckpt, bits=4, act_bits=2)
    with torch.no_grad():
        assert torch.equal(loaded_a2(x).logits, a2)


def test_dtype_casts_keep_the_format(tiny_ckpt: Path) -> None:
    model, _, _ = load_quantized(tiny_ckpt, bits=2)
    model.to(torch.bfloat16)
    layer = next(m for _, m in quant_linears(model)).layer
    assert layer.scales.dtype == torch.float8_e4m3fn
    assert layer.row_scale.dtype == torch.float32 and layer.packed.dtype == torch.int32
    with torch.no_grad():
        assert model(_ids()).logits.dtype == torch.bfloat16


def test_bits_outside_the_trained_set(tiny_ckpt: Path) -> None:
    with pytest.warns(UserWarning, match="not trained for"):
        load_quantized(tiny_ckpt, bits=5)
    with pytest.raises(ValueError, match="1..8"):
        load_quantized(tiny_ckpt, bits=9)


def test_generate_runs_on_the_quantized_model(tiny_ckpt: Path) -> None:
    model, tokenizer, _ = load_quantized(tiny_ckpt, bits=2)
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_missing_tensor_and_unsupported_architecture_are_named(tiny_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.zeros"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.zeros"):
        load_quantized(broken)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported"):
        load_quantized(broken)


def test_qwen2_with_biases(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Qwen2 (q/k/v biases) loads through the same code; biases stay float."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            nn.init.normal_(mod.bias, std=0.5)
    ckpt = _export_rtn(model, tokenizer, tmp_path / "ckpt")
    quant, _, _ = load_quantized(ckpt, bits=8)
    q = quant.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and torch.equal(q.bias, model.model.layers[0].self_attn.q_proj.bias)
    deq, _ = load_dequantized(ckpt, bits=8)
    x = _ids(12)
    with torch.no_grad():
        assert torch.allclose(quant(x).logits, deq(x).logits, atol=1e-4)
        assert torch.allclose(quant(x).logits, model(x).logits, atol=0.05)


@pytest.mark.parametrize("bits", [2, 3])
def test_compact_export_serves_the_full_checkpoints_weights(tiny_llama_dir: Path, tiny_ckpt: Path, tmp_path: Path,
                                                           bits: int) -> None:
    """The same layers exported compact (only the B-bit codes): the served weights at B are bit-identical,
    the codes take B/8 of the bytes, and any other precision is refused naming the stored one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    qc = QuantConfig(trained_bits=[bits], default_bits=bits, stored_bits=bits)
    ckpt = _export_rtn(model, AutoTokenizer.from_pretrained(tiny_llama_dir), tmp_path / "compact", quant_config=qc)
    full, _, _ = load_quantized(tiny_ckpt, bits=bits)
    small, _, small_qc = load_quantized(ckpt)
    assert small_qc.compact and small_qc.default_bits == bits
    full_layers, small_layers = dict(quant_linears(full)), dict(quant_linears(small))
    assert full_layers.keys() == small_layers.keys()
    for name, layer in small_layers.items():
        want = full_layers[name].layer
        for f in ("packed", "scales", "zeros", "row_scale", "split_index"):
            got, ref = getattr(layer.layer, f), getattr(want, f)
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                               ref.view(torch.uint8) if ref.dtype == torch.float8_e4m3fn else ref), f"{name}.{f}"
    x = _ids()
    deq_full, _ = load_dequantized(tiny_ckpt, bits=bits)
    deq_small, _ = load_dequantized(ckpt)
    with torch.no_grad():
        assert torch.equal(small(x).logits, full(x).logits)
        assert torch.equal(deq_small(x).logits, deq_full(x).logits)
    codes = sum(m.layer.packed.numel() * 4 for m in small_layers.values())
    saved = codes * 8 // bits - codes
    size = {p: (p / "model.safetensors").stat().st_size for p in (tiny_ckpt, ckpt)}
    assert abs(size[tiny_ckpt] - size[ckpt] - saved) < 2048  # the rest: safetensors header differences
    with pytest.raises(ValueError, match=f"compact {bits}-bit export.*asked for 8"):
        load_quantized(ckpt, bits=8)
    with pytest.raises(ValueError, match=f"compact {bits}-bit export"):
        load_dequantized(ckpt, bits=4)
