"""Loading the full-precision teacher: a local HF directory or a hub id, Llama-family only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kernels.qmodel import SUPPORTED_MODEL_TYPES

# Per decoder layer: the quantized linears, grouped by the input they read (one split set per group).
SHARED_INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES = tuple(n for group in SHARED_INPUT_GROUPS for n in group)
K_SHARDED = ("self_attn.o_proj", "mlp.down_proj")  # row-parallel under tensor parallelism


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def check_model_source(name: str) -> None:
    """Fail early, naming the fix, when ``name`` is neither a model directory nor a plausible hub id."""
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    if not path.exists() and not _looks_like_hub_id(name):
        raise FileNotFoundError(f"model {name!r} not found: give a Hugging Face model directory or a hub id "
                                "like 'meta-llama/Llama-3.2-1B' (llama2.c .bin files: convert with python -m qat.convert)")


def load_teacher(name: str, device: torch.device, dtype: torch.dtype
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The full-precision model and its tokenizer, checked to be a supported architecture."""
    check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {name!r}: {e}") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{name}: architecture {config.model_type!r} is not supported; "
                         f"bitbybit supports {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoder models)")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's decoder layers, each holding the linears of :data:`LINEAR_NAMES`."""
    layers = model.model.layers
    for name in LINEAR_NAMES:
        if not isinstance(layers[0].get_submodule(name), nn.Linear):
            raise ValueError(f"decoder layer has no linear {name}; unsupported architecture")
    return layers
