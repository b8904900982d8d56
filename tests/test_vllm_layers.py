"""The bitbybit LinearMethod in vLLM's real Llama linear layers (vLLM 0.28 on the CPU).

The four quantizable linears of a decoder layer are built as vLLM's LlamaAttention / LlamaMLP
build them (QKVParallelLinear, RowParallelLinear, MergedColumnParallelLinear), loaded from a
checkpoint's safetensors by vLLM's own ``LlamaModel.load_weights`` (q/k/v -> qkv_proj, gate/up ->
gate_up_proj), post-processed by vLLM's process_weights_after_loading,
and compared with the checkpoint read by kernels.checkpoint and run by the reference ops.
Tensor parallelism is simulated per rank (``vllm_tp``) and checked slice by slice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (`make install` adds its CPU build)")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from vllm.config import ModelConfig  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: E402
from vllm.model_executor.model_loader.utils import process_weights_after_loading  # noqa: E402
from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator  # noqa: E402
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaModel  # noqa: E402

from bitbybit_vllm.config import ACT_BITS_ENV, BITS_ENV, BitbybitConfig  # noqa: E402
from bitbybit_vllm.linear import BitbybitLinearMethod  # noqa: E402
from bitbybit_vllm.tp import supported_tp_sizes, tp_problem  # noqa: E402
from kernels import pack_codes, quantize_split_weight, slice_codes, split_region_index  # noqa: E402
from kernels.checkpoint import QuantConfig, layer_from_tensors, layer_tensors  # noqa: E402
from kernels.grid import QuantizedWeight  # noqa: E402
from kernels.reference import linear_wa, linear_wa16  # noqa: E402
from kernels.shard import shard_row_parallel  # noqa: E402

pytestmark = pytest.mark.usefixtures("vllm_cpu")

@dataclass
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    layers: int

    @classmethod
    def of(cls, ckpt: Path) -> Shape:
        c = json.loads((ckpt / "config.json").read_text())
        return cls(c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                   c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], c["intermediate_size"],
                   c["num_hidden_layers"])

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """HF module -> (out_features, in_features) of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"self_attn.q_proj": (q, self.hidden), "self_attn.k_proj": (kv, self.hidden),
                "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, q),
                "mlp.gate_proj": (self.inter, self.hidden), "mlp.up_proj": (self.inter, self.hidden),
                "mlp.down_proj": (self.hidden, self.inter)}


def vllm_quant_config(ckpt: Path) -> BitbybitConfig:
    """The config vLLM builds from config.json, with Llama's fused-module mapping (as SupportsQuant adds it)."""
    qc = BitbybitConfig.from_config(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    qc.packed_modules_mapping.update(LlamaForCausalLM.packed_modules_mapping)
    return qc


class LlamaLinears(nn.Module):
    """The quantizable linears of vLLM's LlamaModel, loaded by vLLM's own ``LlamaModel.load_weights``.

    (0.28 maps q/k/v -> qkv_proj and gate/up -> gate_up_proj with ``hf_to_vllm_mapper`` and
    AutoWeightsLoader; 0.24 with its stacked_params_mapping.)
    """

    hf_to_vllm_mapper = getattr(LlamaModel, "hf_to_vllm_mapper", None)
    load_weights = LlamaModel.load_weights

    def __init__(self, qc: BitbybitConfig, s: Shape) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(s.layers):
            p = f"model.layers.{i}"
            attn, mlp, block = nn.Module(), nn.Module(), nn.Module()
            attn.qkv_proj = QKVParallelLinear(s.hidden, s.head_dim, s.heads, s.kv_heads, bias=False,
                                              quant_config=qc, prefix=f"{p}.self_attn.qkv_proj",
                                              params_dtype=torch.float32)
            attn.o_proj = RowParallelLinear(s.heads * s.head_dim, s.hidden, bias=False, quant_config=qc,
                                            prefix=f"{p}.self_attn.o_proj", params_dtype=torch.float32)
            mlp.gate_up_proj = MergedColumnParallelLinear(s.hidden, [s.inter] * 2, bias=False, quant_config=qc,
                                                          prefix=f"{p}.mlp.gate_up_proj", params_dtype=torch.float32)
            mlp.down_proj = RowParallelLinear(s.inter, s.hidden, bias=False, quant_config=qc,
                                              prefix=f"{p}.mlp.down_proj", params_dtype=torch.float32)
            block.self_attn, block.mlp = attn, mlp
            self.layers.append(block)


def llama_linears(qc: BitbybitConfig, s: Shape) -> nn.Module:
    """``model.layers.{i}.self_attn.{qkv,o}_proj`` and ``.mlp.{gate_up,down}_proj`` as vLLM's Llama builds them."""
    root = nn.Module()
    root.model = LlamaLinears(qc, s)
    return root


def reference(ckpt: Path, s: Shape) -> dict[str, QuantizedWeight]:
    """Every quantized layer of the checkpoint as kernels.checkpoint reads it (HF module name -> weight)."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    qc = QuantConfig.from_dict(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    return {f"model.layers.{i}.{m}": layer_from_tensors(f"model.layers.{i}.{m}", tensors, k, qc)
            for i in range(s.layers) for m, (_, k) in s.module_shapes().items()}


def ref_out(x: torch.Tensor, qw: QuantizedWeight, bits: int, act_bits: int) -> torch.Tensor:
    return linear_wa16(x, qw, bits) if act_bits >= 16 else linear_wa(x, qw, bits, act_bits)


def write_split_checkpoint(out: Path, s: Shape, segments: int, act_bits: int = 16, stored_bits: int = 8) -> Path:
    """A one-block Llama checkpoint with split channels in every linear, written with kernels.checkpoint.

    q/k/v share one split set and gate/up another (they read one input); o_proj and down_proj
    have their own, laid out in ``segments`` segments for row-parallel sharding. ``stored_bits``
    below 8: the compact export of the same weights (only their ``stored_bits``-bit codes, packed).
    """
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    shapes = s.module_shapes()
    sets = {}
    for group, k in (("attn_in", s.hidden), ("mlp_in", s.hidden), ("o", s.heads * s.head_dim), ("down", s.inter)):
        chans = torch.randperm(k)[: max(2, k // 16)]
        sets[group] = split_region_index(chans, k, 32, segments)
    which = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down"}
    tensors, splits = {}, {}
    for m, (n, k) in shapes.items():
        name = f"model.layers.0.{m}"
        idx = sets[which[m.split(".")[1]]]
        qw = quantize_split_weight(torch.randn(n, k), idx.clone())
        tensors.update(layer_tensors(name, qw, stored_bits))
        splits[name] = {"index": idx.tolist(), "segments": segments}
    save_file(tensors, str(out / "model.safetensors"))
    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.inter, num_hidden_layers=1,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                      vocab_size=128).to_dict()
    bits = {} if stored_bits == 8 else {"trained_bits": [stored_bits], "default_bits": stored_bits}
    cfg["quantization_config"] = QuantConfig(splits=splits, act_bits=act_bits, stored_bits=stored_bits, **bits).to_dict()
    (out / "config.json").write_text(json.dumps(cfg))
    return out


SPLIT_SHAPE = Shape(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, layers=1)


@pytest.fixture(scope="module")
def split_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_split_checkpoint(tmp_path_factory.mktemp("split-ckpt"), SPLIT_SHAPE, segments=4)


def reference_name(vllm_name: str) -> str:
    """The first checkpoint module behind a vLLM layer (q_proj for qkv_proj, gate_proj for gate_up_proj)."""
    return vllm_name.replace("qkv_proj", "q_proj").replace("gate_up_proj", "gate_proj")


def expected_params(ref: dict[str, QuantizedWeight], s: Shape) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint tensors each vLLM layer must hold at TP = 1 (fused layers: shards stacked on rows)."""
    fused = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
             "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}
    out = {}
    for i in range(s.layers):
        for vname, parts in fused.items():
            group = vname.split(".")[0]
            qws = [ref[f"model.layers.{i}.{group}.{p}"] for p in parts]
            out[f"model.layers.{i}.{vname}"] = {
                "codes": torch.cat([q.codes for q in qws]),
                "scales": torch.cat([q.scales.view(torch.uint8) for q in qws]),
                "zeros": torch.cat([q.zeros for q in qws]),
                "row_scale": torch.cat([q.row_scale for q in qws]),
            }
    return out


def load(root: nn.Module, ckpt: Path) -> tuple[set[str], dict[str, dict[str, torch.Tensor]]]:
    """vLLM's loading path for the checkpoint's linear tensors, then its process_weights_after_loading.

    Returns the loaded parameter names and each quantized layer's checkpoint tensors as loaded
    (before packing replaces them; ``codes``, or ``packed`` for a compact checkpoint).
    """
    weights = ((n.removeprefix("model."), t)
               for n, t in safetensors_weights_iterator([str(ckpt / "model.safetensors")], False) if "_proj." in n)
    loaded = {f"model.{n}" for n in root.model.load_weights(weights)}
    captured = {}
    for name, m in root.named_modules():
        if isinstance(getattr(m, "quant_method", None), BitbybitLinearMethod):
            codes = m.quant_method.config.quant.codes_suffix
            captured[name] = {codes: getattr(m, codes).data.clone(), "scales": m.scales.data.view(torch.uint8).clone(),
                              "zeros": m.zeros.data.clone(), "row_scale": m.row_scale.data.clone()}
    model_config = ModelConfig(model=str(ckpt), dtype="float32", skip_tokenizer_init=True)
    process_weights_after_loading(root, model_config, torch.device("cpu"))
    return loaded, captured


def check_outputs(root: nn.Module, ref: dict[str, QuantizedWeight], s: Shape, bits: int, act_bits: int) -> None:
    """apply() of every vLLM layer equals the reference op on the checkpoint's modules (float64 inputs)."""
    torch.manual_seed(1)
    for i in range(s.layers):
        p = f"model.layers.{i}"
        block = root.model.layers[i]
        x_h = torch.randn(3, s.hidden, dtype=torch.float64)
        x_o = torch.randn(3, s.heads * s.head_dim, dtype=torch.float64)
        x_d = torch.randn(3, s.inter, dtype=torch.float64)
        cases = [(block.self_attn.qkv_proj, x_h, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                 (block.self_attn.o_proj, x_o, ["self_attn.o_proj"]),
                 (block.mlp.gate_up_proj, x_h, ["mlp.gate_proj", "mlp.up_proj"]),
                 (block.mlp.down_proj, x_d, ["mlp.down_proj"])]
        for layer, x, parts in cases:
            got = layer.quant_method.apply(layer, x)
            want = torch.cat([ref_out(x, ref[f"{p}.{m}"], bits, act_bits) for m in parts], dim=-1)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- create_weights ---

def test_create_weights_shapes_for_every_llama_linear(split_ckpt):
    s = SPLIT_SHAPE
    root = llama_linears(vllm_quant_config(split_ckpt), s)
    block = root.model.layers[0]
    slots = {m: len(v["index"]) for m, v in
             json.loads((split_ckpt / "config.json").read_text())["quantization_config"]["splits"].items()}
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    cases = {"self_attn.qkv_proj": (q + 2 * kv, s.hidden, "self_attn.q_proj"),
             "self_attn.o_proj": (s.hidden, q, "self_attn.o_proj"),
             "mlp.gate_up_proj": (2 * s.inter, s.hidden, "mlp.gate_proj"),
             "mlp.down_proj": (s.hidden, s.inter, "mlp.down_proj")}
    for vname, (n, k, hf) in cases.items():
        layer = block.get_submodule(vname)
        assert isinstance(layer.quant_method, BitbybitLinearMethod)
        r = slots[f"model.layers.0.{hf}"]
        kq = k + r
        got = {name: (p.dtype, tuple(p.shape)) for name, p in layer.named_parameters()}
        assert got == {"codes": (torch.uint8, (n, kq)), "scales": (torch.float8_e4m3fn, (n, kq // 32)),
                       "zeros": (torch.uint8, (n, kq // 32)), "row_scale": (torch.float32, (n,)),
                       "split_index": (torch.int32, (r,))}, vname


def test_create_weights_pads_k_to_whole_groups(stories_rtn_ckpt):
    """stories260K's down_proj has K = 172: padded to 192, then its split slots."""
    s = Shape.of(stories_rtn_ckpt)
    qc = vllm_quant_config(stories_rtn_ckpt)
    down = llama_linears(qc, s).model.layers[0].mlp.down_proj
    index = qc.quant.split_index("model.layers.0.mlp.down_proj")
    slots = 0 if index is None else index.numel()
    assert s.inter == 172 and tuple(down.codes.shape) == (s.hidden, 192 + slots)
    assert tuple(down.scales.shape) == (s.hidden, (192 + slots) // 32)
    assert ("split_index" in dict(down.named_parameters())) == (slots > 0)


def test_unquantized_modules_keep_vllm_methods(split_ckpt):
    qc = vllm_quant_config(split_ckpt)
    head = ParallelLMHead(128, SPLIT_SHAPE.hidden, quant_config=qc, prefix="lm_head")
    assert qc.get_quant_method(head, "lm_head") is None
    assert type(head.quant_method).__name__ == "UnquantizedEmbeddingMethod"
    qc.quant.modules_to_not_convert.append("model.layers.0.mlp.down_proj")
    down = RowParallelLinear(SPLIT_SHAPE.inter, SPLIT_SHAPE.hidden, bias=False, quant_config=qc,
                             prefix="model.layers.0.mlp.down_proj", params_dtype=torch.float32)
    assert isinstance(down.quant_method, UnquantizedLinearMethod) and down.weight.shape == (128, 256)


def test_fused_modules_must_agree(split_ckpt):
    qc = vllm_quant_config(split_ckpt)
    qc.quant.modules_to_not_convert.append("model.layers.0.self_attn.k_proj")
    with pytest.raises(ValueError, match="quantizes only some of them"):
        qc.get_quant_method(QKVParallelLinear(128, 32, 4, 2, bias=False), "model.layers.0.self_attn.qkv_proj")
    qc = vllm_quant_config(split_ckpt)
    qc.quant.splits["model.layers.0.self_attn.v_proj"] = {"index": list(range(32)), "segments": 4}
    with pytest.raises(ValueError, match="share one split set"):
        qc.get_quant_method(QKVParallelLinear(128, 32, 4, 2, bias=False), "model.layers.0.self_attn.qkv_proj")


# --- loading a checkpoint, packing, apply ---

def test_loaders_on_the_exported_stories_checkpoint(stories_rtn_ckpt, monkeypatch):
    """``python -m qat.run --method rtn --split`` output: fused shards land at vLLM's offsets, the split
    indices check out, apply equals the reference."""
    monkeypatch.setenv(BITS_ENV, "")
    ckpt, s = stories_rtn_ckpt, Shape.of(stories_rtn_ckpt)
    ref = reference(ckpt, s)
    root = llama_linears(vllm_quant_config(ckpt), s)
    loaded, captured = load(root, ckpt)
    with_splits = {p for p in captured if ref[reference_name(p)].split_index is not None}
    assert with_splits, "the exported checkpoint was expected to have split channels"
    assert loaded == ({f"{p}.{t}" for p in captured for t in ("codes", "scales", "zeros", "row_scale")}
                      | {f"{p}.split_index" for p in with_splits})
    want = expected_params(ref, s)
    assert captured.keys() == want.keys()
    for name, tensors in want.items():
        for t, value in tensors.items():
            assert torch.equal(captured[name][t], value), f"{name}.{t}"
    check_outputs(root, ref, s, bits=2, act_bits=16)


def test_loaders_with_split_channels(split_ckpt, monkeypatch):
    monkeypatch.setenv(BITS_ENV, "4")
    s = SPLIT_SHAPE
    ref = reference(split_ckpt, s)
    root = llama_linears(vllm_quant_config(split_ckpt), s)
    loaded, captured = load(root, split_ckpt)
    assert {n for n in loaded if n.endswith(".split_index")} == {f"{p}.split_index" for p in captured}
    for name, tensors in expected_params(ref, s).items():
        for t, value in tensors.items():
            assert torch.equal(captured[name][t], value), f"{name}.{t}"
    down = root.model.layers[0].mlp.down_proj
    assert torch.equal(down.split_index, ref["model.layers.0.mlp.down_proj"].split_index)
    check_outputs(root, ref, s, bits=4, act_bits=16)


def test_split_index_that_disagrees_with_config_is_rejected(split_ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((split_ckpt / "config.json").read_text())
    tensors = load_file(str(split_ckpt / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.split_index"] = torch.flip(
        tensors["model.layers.0.self_attn.k_proj.split_index"], [0]).contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    root = llama_linears(vllm_quant_config(bad), SPLIT_SHAPE)
    with pytest.raises(ValueError, match="disagrees with config.json"):
        load(root, bad)


def test_apply_with_quantized_activations(tmp_path, monkeypatch):
    """A W{b}A{a} checkpoint (act_bits=4 in its config) and ``--act-bits 2`` override, against linear_wa."""
    ckpt = write_split_checkpoint(tmp_path / "a4", SPLIT_SHAPE, segments=4, act_bits=4)
    ref = reference(ckpt, SPLIT_SHAPE)
    for env, act_bits in (("", 4), ("2", 2)):
        monkeypatch.setenv(BITS_ENV, "3")
        monkeypatch.setenv(ACT_BITS_ENV, env)
        root = llama_linears(vllm_quant_config(ckpt), SPLIT_SHAPE)
        load(root, ckpt)
        check_outputs(root, ref, SPLIT_SHAPE, bits=3, act_bits=act_bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_master_codes_are_freed_and_memory_scales_with_bits(split_ckpt, monkeypatch, bits):
    monkeypatch.setenv(BITS_ENV, str(bits))
    root = llama_linears(vllm_quant_config(split_ckpt), SPLIT_SHAPE)
    load(root, split_ckpt)
    for layer in (root.model.layers[0].self_attn.qkv_proj, root.model.layers[0].mlp.down_proj):
        names = dict(layer.named_parameters())
        assert "codes" not in names
        n, g = layer.scales.shape
        assert names["packed"].dtype == torch.int32 and names["packed"].numel() * 4 == n * g * 32 * bits // 8
        assert all(type(p) is nn.Parameter for p in names.values())


# --- torch.compile: vLLM compiles the model with fullgraph=True ---

@pytest.mark.parametrize("act_bits", [16, 4])
def test_apply_traces_without_graph_breaks(tmp_path, monkeypatch, act_bits):
    monkeypatch.setenv(BITS_ENV, "2")
    ckpt = write_split_checkpoint(tmp_path / "c", SPLIT_SHAPE, segments=4, act_bits=act_bits)
    root = llama_linears(vllm_quant_config(ckpt), SPLIT_SHAPE)
    load(root, ckpt)
    layer = root.model.layers[0].mlp.down_proj
    compiled = torch.compile(lambda x: layer.quant_method.apply(layer, x), backend="aot_eager", fullgraph=True)
    x = torch.randn(3, SPLIT_SHAPE.inter)
    torch.testing.assert_close(compiled(x), layer.quant_method.apply(layer, x), rtol=0, atol=0)


# --- tensor parallelism, simulated rank by rank ---

def column_rows(n_heads: int, head_dim: int, rank: int, tp: int) -> slice:
    """Rows of a head-sharded projection that rank ``rank`` holds (kv heads replicate when tp > heads)."""
    per = max(1, n_heads // tp)
    owner = rank // max(1, tp // n_heads)
    return slice(owner * per * head_dim, (owner + 1) * per * head_dim)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_ranks_hold_exact_slices_and_recombine(split_ckpt, vllm_tp, monkeypatch, tp):
    monkeypatch.setenv(BITS_ENV, "2")
    s = SPLIT_SHAPE
    ref = reference(split_ckpt, s)
    p = "model.layers.0"
    q, k, v = (ref[f"{p}.self_attn.{m}"] for m in ("q_proj", "k_proj", "v_proj"))
    gate, up = ref[f"{p}.mlp.gate_proj"], ref[f"{p}.mlp.up_proj"]
    o, down = ref[f"{p}.self_attn.o_proj"], ref[f"{p}.mlp.down_proj"]
    torch.manual_seed(2)
    x_h = torch.randn(4, s.hidden, dtype=torch.float64)
    x_o = torch.randn(4, s.heads * s.head_dim, dtype=torch.float64)
    x_d = torch.randn(4, s.inter, dtype=torch.float64)
    o_sum = down_sum = 0
    for rank in range(tp):
        vllm_tp(rank, tp)
        root = llama_linears(vllm_quant_config(split_ckpt), s)
        _, captured = load(root, split_ckpt)
        block = root.model.layers[0]

        qr, kvr = column_rows(s.heads, s.head_dim, rank, tp), column_rows(s.kv_heads, s.head_dim, rank, tp)
        irows = slice(rank * s.inter // tp, (rank + 1) * s.inter // tp)
        qkv = captured[f"{p}.self_attn.qkv_proj"]
        assert torch.equal(qkv["codes"], torch.cat([q.codes[qr], k.codes[kvr], v.codes[kvr]]))
        assert torch.equal(qkv["row_scale"], torch.cat([q.row_scale[qr], k.row_scale[kvr], v.row_scale[kvr]]))
        gu = captured[f"{p}.mlp.gate_up_proj"]
        assert torch.equal(gu["codes"], torch.cat([gate.codes[irows], up.codes[irows]]))
        assert torch.equal(gu["scales"], torch.cat([gate.scales[irows], up.scales[irows]]).view(torch.uint8))

        for vname, full in (("self_attn.o_proj", o), ("mlp.down_proj", down)):
            local = shard_row_parallel(full, 4, rank, tp)
            got = captured[f"{p}.{vname}"]
            assert torch.equal(got["codes"], local.codes) and torch.equal(got["zeros"], local.zeros)
            assert torch.equal(got["scales"], local.scales.view(torch.uint8))
            layer = block.get_submodule(vname)
            assert torch.equal(layer.split_index, local.split_index)

        out = block.self_attn.qkv_proj.quant_method.apply(block.self_attn.qkv_proj, x_h)
        want = torch.cat([linear_wa16(x_h, q, 2)[:, qr], linear_wa16(x_h, k, 2)[:, kvr],
                          linear_wa16(x_h, v, 2)[:, kvr]], 1)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        out = block.mlp.gate_up_proj.quant_method.apply(block.mlp.gate_up_proj, x_h)
        want = torch.cat([linear_wa16(x_h, gate, 2)[:, irows], linear_wa16(x_h, up, 2)[:, irows]], 1)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        ocols = slice(rank * x_o.shape[1] // tp, (rank + 1) * x_o.shape[1] // tp)
        o_sum = o_sum + block.self_attn.o_proj.quant_method.apply(block.self_attn.o_proj, x_o[:, ocols])
        down_sum = down_sum + block.mlp.down_proj.quant_method.apply(block.mlp.down_proj, x_d[:, irows])
    torch.testing.assert_close(o_sum, linear_wa16(x_o, o, 2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(down_sum, linear_wa16(x_d, down, 2), rtol=1e-10, atol=1e-10)


def test_unsupported_tensor_parallel_size_names_the_supported_ones(stories_rtn_ckpt, tmp_path, vllm_tp):
    vllm_tp(0, 2)
    qc = vllm_quant_config(stories_rtn_ckpt)
    with pytest.raises(ValueError, match=r"tensor-parallel size 2.*supported sizes for this layer: \[1\]"):
        RowParallelLinear(172, 64, bias=False, quant_config=qc, prefix="model.layers.0.mlp.down_proj")
    qc = vllm_quant_config(write_split_checkpoint(tmp_path / "seg2", SPLIT_SHAPE, segments=2))
    vllm_tp(0, 4)
    with pytest.raises(ValueError, match=r"2 segment\(s\).*supported sizes for this layer: \[1, 2\]"):
        RowParallelLinear(256, 128, bias=False, quant_config=qc, prefix="model.layers.0.mlp.down_proj")


def test_model_level_supported_sizes(stories_rtn_ckpt, split_ckpt, tmp_path):
    assert supported_tp_sizes(split_ckpt) == [1, 2, 4]
    assert supported_tp_sizes(stories_rtn_ckpt) == [1]
    assert tp_problem(stories_rtn_ckpt, 2).startswith("model.layers.0.")
    two = write_split_checkpoint(tmp_path / "seg2", SPLIT_SHAPE, segments=2)
    assert supported_tp_sizes(two) == [1, 2] and "2 segment(s)" in tp_problem(two, 4)


def test_plain_layer_without_fusing(split_ckpt):
    """A layer vLLM does not fuse keeps its checkpoint name (no packed_modules_mapping entry)."""
    qc = vllm_quant_config(split_ckpt)
    assert qc.checkpoint_modules("model.layers.0.self_attn.o_proj") == ["model.layers.0.self_attn.o_proj"]
    assert qc.checkpoint_modules("model.layers.0.self_attn.qkv_proj") == [
        f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]


# --- a compact single-precision checkpoint (--export-bits B: only the B-bit codes, packed) ---

def served(root: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Every quantized vLLM layer's serving tensors after process_weights_after_loading (FP8 as bytes)."""
    return {name: {n: (p.data.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p.data)
                   for n, p in m.named_parameters()}
            for name, m in root.named_modules() if isinstance(getattr(m, "quant_method", None), BitbybitLinearMethod)}


def assert_same_serving(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for t in a[name]:
            assert torch.equal(a[name][t], b[name][t]), f"{name}.{t}"


@pytest.mark.parametrize("bits", [2, 3])
def test_compact_create_weights_shapes(tmp_path, bits):
    s = SPLIT_SHAPE
    ckpt = write_split_checkpoint(tmp_path / "c", s, segments=4, stored_bits=bits)
    block = llama_linears(vllm_quant_config(ckpt), s).model.layers[0]
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for vname, n, k in (("self_attn.qkv_proj", q + 2 * kv, s.hidden), ("mlp.down_proj", s.hidden, s.inter)):
        params = dict(block.get_submodule(vname).named_parameters())
        kq = k + params["split_index"].numel()
        assert "codes" not in params
        assert (params["packed"].dtype, tuple(params["packed"].shape)) == (torch.int32, (n, kq * bits // 32)), vname
        assert tuple(params["scales"].shape) == (n, kq // 32)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_compact_checkpoint_serves_the_full_checkpoints_weights(tmp_path, vllm_tp, monkeypatch, tp):
    """Per rank, the compact checkpoint's loaded packed codes are the rank's slice of the full one's,
    packed (fused q/k/v and gate/up included), and the serving tensors after loading are identical."""
    s, bits = SPLIT_SHAPE, 2
    ckpts = {"full": write_split_checkpoint(tmp_path / "full", s, segments=4),
             "w2": write_split_checkpoint(tmp_path / "w2", s, segments=4, stored_bits=bits)}
    for rank in range(tp):
        vllm_tp(rank, tp)
        loaded, serving = {}, {}
        for name, ckpt in ckpts.items():
            monkeypatch.setenv(BITS_ENV, str(bits) if name == "full" else "")  # compact: its own precision
            root = llama_linears(vllm_quant_config(ckpt), s)
            _, loaded[name] = load(root, ckpt)
            serving[name] = served(root)
        for vname, got in loaded["w2"].items():
            want = loaded["full"][vname]
            assert torch.equal(got["packed"], pack_codes(slice_codes(want["codes"], bits), bits)), vname
            assert all(torch.equal(got[t], want[t]) for t in ("scales", "zeros", "row_scale")), vname
        assert_same_serving(serving["w2"], serving["full"])


def test_compact_checkpoint_refuses_other_precisions_at_startup(tmp_path, monkeypatch):
    ckpt = write_split_checkpoint(tmp_path / "w2", SPLIT_SHAPE, segments=4, stored_bits=2)
    monkeypatch.setenv(BITS_ENV, "4")
    with pytest.raises(ValueError, match=r"compact 2-bit export.*serves at 2 bits only \(asked for 4\)"):
        vllm_quant_config(ckpt)


def test_compact_stories_export_serves_like_the_full_one(stories_rtn_ckpt, stories_rtn_w2_ckpt, monkeypatch):
    """``qat.run --export-bits 2`` of the same run: vLLM's loaders give the full checkpoint's W2 layers exactly."""
    s = Shape.of(stories_rtn_ckpt)
    layers = {}
    for name, ckpt, bits in (("full", stories_rtn_ckpt, "2"), ("w2", stories_rtn_w2_ckpt, "")):
        monkeypatch.setenv(BITS_ENV, bits)
        root = llama_linears(vllm_quant_config(ckpt), s)
        load(root, ckpt)
        layers[name] = served(root)
    assert_same_serving(layers["w2"], layers["full"])
