"""The quantized Hugging Face model: bitbybit checkpoints as transformers Llama / Mistral / Qwen2 models.

``load_quantized`` builds the model from config.json without allocating float weights for the
quantized linears (the model skeleton is made on the meta device), loads the unquantized tensors
(embeddings, norms, lm_head) and swaps every quantized linear for a :class:`QuantLinear` holding
its serving form at the chosen precision (:func:`kernels.ops.pack_linear`), which runs
:func:`kernels.ops.linear`: the numerics of every serving path. Eval, the CPU server and the
tests all use it.

``load_dequantized`` is an independent check path: a plain float transformers model whose linear
weights are the dequantized b-bit weights with split columns folded back
(:func:`kernels.split.fold_split`), exact for W{b}A16 up to float summation order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from .checkpoint import QuantConfig, layer_from_tensors, read_quant_config
from .grid import dequantize
from .ops import PackedLinear, linear, pack_linear
from .split import fold_split

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class QuantLinear(nn.Module):
    """A quantized linear layer at one serving precision; ``act_bits`` < 16 also quantizes its input (W{b}A{a})."""

    def __init__(self, layer: PackedLinear, act_bits: int | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.act_bits = act_bits
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias)

    @property
    def bits(self) -> int:
        return self.layer.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.layer, self.act_bits, self.bias)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to the format tensors; dtype casts do not (their dtypes are the format)."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.layer.packed.device)).device
        moved = {f.name: getattr(self.layer, f.name).to(device) for f in fields(self.layer)
                 if isinstance(getattr(self.layer, f.name), torch.Tensor)}
        self.layer = replace(self.layer, **moved)
        return self

    def extra_repr(self) -> str:
        split = 0 if self.layer.split_index is None else int((self.layer.split_index >= 0).sum())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"act_bits={self.act_bits}, split_channels={split}")


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """Every QuantLinear of a model with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def set_act_bits(model: nn.Module, act_bits: int | None) -> None:
    """Switch every QuantLinear between W{b}A16 (``None`` or 16) and W{b}A{act_bits} without reloading."""
    for _, module in quant_linears(model):
        module.act_bits = act_bits


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def read_safetensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (one file or an indexed set of shards)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ckpt_dir}; is it a bitbybit checkpoint directory?")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(ckpt_dir / f)))
    return tensors


def model_config(ckpt_dir: str | Path) -> PretrainedConfig:
    """The checkpoint's transformers config, its architecture checked, without the quantization_config."""
    config = AutoConfig.from_pretrained(ckpt_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{ckpt_dir}: model_type {config.model_type!r} is not supported; "
                         f"bitbybit supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _finish(model: PreTrainedModel, float_tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
            ckpt_dir: str | Path) -> PreTrainedModel:
    """Load the float tensors into the skeleton, rebuild computed buffers, tie weights, check nothing is left on meta."""
    casted = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in float_tensors.items()}
    _, unexpected = model.load_state_dict(casted, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{ckpt_dir}: tensors not in the model: {unexpected[:5]}")
    if model.config.tie_word_embeddings and "lm_head.weight" not in float_tensors:
        model.lm_head.weight = model.get_input_embeddings().weight
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            replace_module(model, name, type(module)(config=module.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{ckpt_dir} is missing tensors: {left[:5]}{' ...' if len(left) > 5 else ''}")
    gen = Path(ckpt_dir) / "generation_config.json"
    if gen.is_file():
        model.generation_config = GenerationConfig.from_pretrained(ckpt_dir)
    return model.eval()


def _quantized_names(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                     qc: QuantConfig) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and f"{n}.{qc.codes_suffix}" in tensors]


def _float_tensors(tensors: Mapping[str, torch.Tensor], quantized: list[str]) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"{n}." for n in quantized)
    return {k: v for k, v in tensors.items() if not k.startswith(prefixes) or k.endswith(".bias")}


def load_tokenizer(ckpt_dir: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(ckpt_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"{ckpt_dir}: cannot load its tokenizer ({e}); re-export the checkpoint with qat.run") from e


def load_quantized(ckpt_dir: str | Path, bits: int | None = None, act_bits: int | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, QuantConfig]:
    """A bitbybit checkpoint as a transformers model serving at ``bits`` (default: the checkpoint's).

    ``act_bits`` None/16 gives W{b}A16; 1..8 quantizes activations per token (W{b}A{a}).
    Unquantized tensors are cast to ``dtype``; quantized layers keep their format.
    """
    qc = read_quant_config(ckpt_dir)
    bits = qc.resolve_bits(bits)
    model = _skeleton(model_config(ckpt_dir), dtype)
    tensors = read_safetensors(ckpt_dir)
    targets = _quantized_names(model, tensors, qc)
    if not targets:
        raise ValueError(f"{ckpt_dir}: no quantized layers found (no '<module>.{qc.codes_suffix}' tensors)")
    for name, lin in targets:
        qw = layer_from_tensors(name, tensors, lin.in_features, qc)
        if qw.out_features != lin.out_features:
            raise ValueError(f"{name}: {qw.out_features} output channels in the checkpoint, config says {lin.out_features}")
        bias = tensors.get(f"{name}.bias")
        replace_module(model, name, QuantLinear(pack_linear(qw, bits), act_bits,
                                                None if bias is None else bias.to(dtype)))
    model = _finish(model, _float_tensors(tensors, [n for n, _ in targets]), dtype, ckpt_dir)
    return model.to(device), load_tokenizer(ckpt_dir), qc


def load_dequantized(ckpt_dir: str | Path, bits: int | None = None, dtype: torch.dtype = torch.float32
                     ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A plain float transformers model whose linear weights are the checkpoint's dequantized b-bit weights."""
    qc = read_quant_config(ckpt_dir)
    bits = qc.resolve_bits(bits)
    model = _skeleton(model_config(ckpt_dir), dtype)
    tensors = read_safetensors(ckpt_dir)
    targets = _quantized_names(model, tensors, qc)
    float_tensors = _float_tensors(tensors, [n for n, _ in targets])
    for name, lin in targets:
        qw = layer_from_tensors(name, tensors, lin.in_features, qc)
        index = qw.split_index if qw.split_index is not None else torch.empty(0, dtype=torch.int32)
        w = fold_split(dequantize(qw, bits, dtype=torch.float64), index, lin.in_features, qw.group_size)
        float_tensors[f"{name}.weight"] = w
    return _finish(model, float_tensors, dtype, ckpt_dir), load_tokenizer(ckpt_dir)
