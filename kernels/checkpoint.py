"""The checkpoint's ``quantization_config`` and per-layer tensor names.

A bitbybit checkpoint is a Hugging Face model directory whose config.json carries
``"quantization_config": {"quant_method": "bitbybit", ...}`` (:class:`QuantConfig`), and whose
safetensors hold, for every quantized linear layer ``P`` (its HF module name):

    P.codes        uint8          [N, Kq]       master codes (8 bits)
    P.scales       float8_e4m3fn  [N, Kq/32]    group scales
    P.zeros        uint8          [N, Kq/32]    group zero points (master grid)
    P.row_scale    float32        [N]           per-output-channel scale factor
    P.split_index  int32          [R]           split slots' source channels (only if R > 0)

The split indices are also in config.json (``splits``) so a loader knows every shape before
reading any weight.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .grid import GROUP_SIZE, MASTER_BITS, SLICING, QuantizedWeight, check_bits, check_group_size
from .split import check_split_index, quantized_width

QUANT_METHOD = "bitbybit"
FORMAT_VERSION = 1
TENSOR_SUFFIXES = ("codes", "scales", "zeros", "row_scale", "split_index")


@dataclass
class QuantConfig:
    """What config.json's ``quantization_config`` holds; validated on construction."""

    trained_bits: list[int] = field(default_factory=lambda: [8, 4, 3, 2])
    default_bits: int = 2
    master_bits: int = MASTER_BITS
    group_size: int = GROUP_SIZE
    scale_format: str = "e4m3"
    row_scale_format: str = "fp32"
    slicing: str = SLICING
    act_bits: int = 16
    act_group_size: int = GROUP_SIZE
    act_symmetric: bool = False
    split_bits: int = 2
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["model.embed_tokens", "lm_head"])
    splits: dict[str, dict] = field(default_factory=dict)
    quant_method: str = QUANT_METHOD
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method is {self.quant_method!r}, expected {QUANT_METHOD!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"checkpoint format_version {self.format_version} is not supported by this bitbybit "
                             f"(supports {FORMAT_VERSION}); upgrade bitbybit or re-export the checkpoint")
        check_bits(self.master_bits, 8)
        check_group_size(self.group_size)
        check_group_size(self.act_group_size)
        if not self.trained_bits:
            raise ValueError("trained_bits must list at least one precision")
        for b in self.trained_bits:
            check_bits(b, self.master_bits)
        if self.default_bits not in self.trained_bits:
            raise ValueError(f"default_bits {self.default_bits} is not in trained_bits {self.trained_bits}")
        if self.act_bits != 16:
            check_bits(self.act_bits)
        if self.scale_format != "e4m3":
            raise ValueError(f"scale_format {self.scale_format!r} is not supported (only 'e4m3')")

    @classmethod
    def from_dict(cls, d: Mapping) -> QuantConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            warnings.warn(f"ignoring unknown quantization_config keys: {sorted(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve_bits(self, bits: int | None) -> int:
        """The serving precision: ``bits`` or the default; errors outside 1..8, warns outside the trained set."""
        if bits is None:
            return self.default_bits
        check_bits(bits, self.master_bits)
        if bits not in self.trained_bits:
            warnings.warn(f"serving at {bits} bits, which this checkpoint was not trained for "
                          f"(trained: {sorted(self.trained_bits)}); expect lower quality", stacklevel=2)
        return bits

    def is_quantized(self, module_name: str) -> bool:
        """Whether a linear module is stored quantized (not listed in ``modules_to_not_convert``)."""
        return not any(module_name == m or module_name.endswith("." + m) or module_name.startswith(m + ".")
                       for m in self.modules_to_not_convert)

    def split_index(self, module_name: str) -> torch.Tensor | None:
        """The module's split index (int32 [R]) from the config, or None if it has no split channels."""
        entry = self.splits.get(module_name)
        if not entry or not entry["index"]:
            return None
        return torch.tensor(entry["index"], dtype=torch.int32)

    def split_segments(self, module_name: str) -> int:
        entry = self.splits.get(module_name)
        return int(entry.get("segments", 1)) if entry else 1

    def quantized_width(self, module_name: str, in_features: int) -> int:
        """Kq of a module: padded K plus its split slots, known from the config alone."""
        idx = self.split_index(module_name)
        return quantized_width(in_features, 0 if idx is None else idx.numel(), self.group_size)


def read_quant_config(ckpt_dir: str | Path) -> QuantConfig:
    """Read ``quantization_config`` from a checkpoint directory's config.json."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {ckpt_dir} a bitbybit checkpoint directory?")
    cfg = json.loads(path.read_text())
    qc = cfg.get("quantization_config")
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} has no bitbybit quantization_config; export one with `python -m qat.run`")
    return QuantConfig.from_dict(qc)


def layer_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized linear layer."""
    out = {
        f"{prefix}.codes": qw.codes.contiguous(),
        f"{prefix}.scales": qw.scales.contiguous(),
        f"{prefix}.zeros": qw.zeros.contiguous(),
        f"{prefix}.row_scale": qw.row_scale.float().contiguous(),
    }
    if qw.split_index is not None and qw.split_index.numel():
        # q/k/v (and gate/up) share one split set; safetensors refuses tensors that share storage.
        out[f"{prefix}.split_index"] = qw.split_index.to(torch.int32).clone()
    return out


def layer_from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], in_features: int,
                       config: QuantConfig) -> QuantizedWeight:
    """Rebuild a layer's :class:`QuantizedWeight` from checkpoint tensors, checking dtypes and shapes."""
    try:
        codes, scales = tensors[f"{prefix}.codes"], tensors[f"{prefix}.scales"]
        zeros, row_scale = tensors[f"{prefix}.zeros"], tensors[f"{prefix}.row_scale"]
    except KeyError as e:
        raise ValueError(f"checkpoint is missing tensor {e.args[0]}") from None
    split_index = config.split_index(prefix)
    stored = tensors.get(f"{prefix}.split_index")
    if (stored is None) != (split_index is None) or (stored is not None and not torch.equal(stored.to(torch.int32), split_index)):
        raise ValueError(f"{prefix}: split_index in the safetensors disagrees with config.json's splits")
    gs = config.group_size
    kq = config.quantized_width(prefix, in_features)
    n = codes.shape[0]
    expect = {"codes": (codes, torch.uint8, (n, kq)), "scales": (scales, torch.float8_e4m3fn, (n, kq // gs)),
              "zeros": (zeros, torch.uint8, (n, kq // gs)), "row_scale": (row_scale, torch.float32, (n,))}
    for name, (t, dtype, shape) in expect.items():
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{prefix}.{name}: expected {dtype} {shape}, found {t.dtype} {tuple(t.shape)}")
    if split_index is not None:
        check_split_index(split_index, in_features, gs)
    return QuantizedWeight(codes, scales, zeros, row_scale, in_features, gs, config.master_bits, split_index)
