"""Write a bitbybit checkpoint: a Hugging Face model directory with nested-grid quantized linears.

Layout (DESIGN.md "The checkpoint", tensor names from :mod:`kernels.checkpoint`):

- ``config.json``: the model's transformers config plus ``quantization_config``
  (:class:`kernels.checkpoint.QuantConfig`, split channels per layer included, so every shape is
  known before any weight is read);
- ``model.safetensors`` (or indexed shards above ``SHARD_BYTES``): for each quantized linear ``P``
  the tensors of :func:`kernels.checkpoint.layer_tensors` (master codes, E4M3 scales, zero points,
  row scales, split index; a compact export, ``stored_bits`` B in the config, stores the packed
  B-bit codes instead of the master codes) and its float bias if any; every other tensor
  (embeddings, norms, lm_head) as it is in the model. No float copy of a quantized weight is written;
- the source's tokenizer files, copied byte for byte, and generation_config.json;
  ``bitbybit_run.json`` names the source model and the run.

Chat template: when the tokenizer has none, :data:`PLAIN_CHAT_TEMPLATE` is added. It renders each
message as ``"<Role>: <content>"`` followed by a blank line, after one BOS token, and with
``add_generation_prompt`` ends with ``"Assistant:"``; the model's EOS ends a turn. Base models
were not trained on it; it exists so that chat endpoints work out of the box.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kernels.checkpoint import QuantConfig, layer_tensors
from kernels.grid import QuantizedWeight

SHARD_BYTES = 4 * 2**30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
RUN_INFO_FILE = "bitbybit_run.json"
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def quant_config_with_splits(base: QuantConfig, layers: Mapping[str, QuantizedWeight],
                             segments: Mapping[str, int]) -> QuantConfig:
    """``base`` with its ``splits`` table filled from the layers' split indices."""
    splits = {}
    for name, qw in layers.items():
        if qw.split_index is not None and qw.split_index.numel():
            splits[name] = {"index": qw.split_index.tolist(), "segments": int(segments.get(name, 1))}
    return QuantConfig.from_dict({**base.to_dict(), "splits": splits})


def checkpoint_tensors(model: PreTrainedModel, layers: Mapping[str, QuantizedWeight],
                       stored_bits: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: format tensors for quantized layers (codes at ``stored_bits``,
    default the master codes), the model's own for the rest."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"quantized layers not in the model: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for name, qw in layers.items():
        if qw.out_features != modules[name].out_features or qw.in_features != modules[name].in_features:
            raise ValueError(f"{name}: quantized shape [{qw.out_features}, {qw.in_features}] does not match the model")
        out.update({k: v.detach().cpu().clone() for k, v in layer_tensors(name, qw, stored_bits).items()})
    skip = {f"{n}.weight" for n in layers}
    if model.config.tie_word_embeddings:
        skip.add("lm_head.weight")
    for key, t in model.state_dict().items():
        if key not in skip:
            out[key] = t.detach().cpu().contiguous()
    return out


def save_tensors(tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """One model.safetensors, or shards with an index when larger than SHARD_BYTES."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= SHARD_BYTES:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path, source_dir: Path | None = None) -> None:
    """Copy the source's tokenizer files byte for byte (else save ``tokenizer``), adding the plain chat
    template when it has none. Copying keeps the tokenizer class and options the source chose."""
    files = [source_dir / f for f in TOKENIZER_FILES] if source_dir is not None else []
    files = [f for f in files if f.is_file()]
    if any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
        for f in files:
            shutil.copyfile(f, out_dir / f.name)
        if not getattr(tokenizer, "chat_template", None):
            (out_dir / "chat_template.jinja").write_text(PLAIN_CHAT_TEMPLATE)
        return
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)


def export_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      layers: Mapping[str, QuantizedWeight], quant_config: QuantConfig, out_dir: str | Path,
                      segments: Mapping[str, int] | None = None, run_info: Mapping | None = None,
                      tokenizer_source: str | Path | None = None) -> Path:
    """Write the checkpoint of ``model`` with ``layers`` (HF module name -> master-code weight) quantized.

    ``tokenizer_source``: the source model's directory, whose tokenizer files are copied as they are.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise FileExistsError(f"{out} exists and is not a checkpoint directory; choose another output path")
        for old in [*out.glob("*.safetensors"), *out.glob("model.safetensors.index.json")]:
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    qc = quant_config_with_splits(quant_config, layers, segments or {})
    save_tensors(checkpoint_tensors(model, layers, qc.stored_bits), out)
    model.config.architectures = model.config.architectures or [type(model).__name__]
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qc.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    save_tokenizer(tokenizer, out, Path(tokenizer_source) if tokenizer_source else None)
    (out / RUN_INFO_FILE).write_text(json.dumps(dict(run_info or {}), indent=2) + "\n")
    return out
