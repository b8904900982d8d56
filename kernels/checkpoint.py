"""The checkpoint's ``quantization_config`` and per-layer tensor names.

A bitbybit checkpoint is a Hugging Face model directory whose config.json carries
``"quantization_config": {"quant_method": "bitbybit", ...}`` (:class:`QuantConfig`), and whose
safetensors hold, for every quantized linear layer ``P`` (its HF module name):

    P.codes        uint8          [N, Kq]       master codes (8 bits)
    P.scales       float8_e4m3fn  [N, Kq/32]    group scales
    P.zeros        uint8          [N, Kq/32]    group zero points (master grid)
    P.row_scale    float32        [N]           per-output-channel scale factor
    P.split_index  int32          [R]           split slots' source channels (only if R > 0)

A compact single-precision export (``stored_bits`` B < ``master_bits``) stores, instead of
``P.codes``, ``P.packed`` int32 [N, Kq*B/32]: the B-bit slice packed by
:func:`kernels.packing.pack_codes`. :func:`stored_weight` turns it back into a
:class:`QuantizedWeight` with the B-bit codes at master positions, so it serves at B exactly as
the full checkpoint does; other precisions are refused (:meth:`QuantConfig.resolve_bits`).

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

from .grid import GROUP_SIZE, MASTER_BITS, SLICING, QuantizedWeight, check_bits, check_group_size, slice_codes
from .packing import pack_codes, unpack_to_master
from .split import check_split_index, quantized_width

QUANT_METHOD = "bitbybit"
FORMAT_VERSION = 1
TENSOR_SUFFIXES = ("codes", "packed", "scales", "zeros", "row_scale", "split_index")


@dataclass
class QuantConfig:
    """What config.json's ``quantization_config`` holds; validated on construction."""

    trained_bits: list[int] = field(default_factory=lambda: [8, 4, 3, 2])
    default_bits: int = 2
    master_bits: int = MASTER_BITS
    stored_bits: int = MASTER_BITS  # width of the stored codes; < master_bits: a compact single-precision export
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
        self._check_stored_bits()

    def _check_stored_bits(self) -> None:
        """A compact export (stored_bits < master_bits) holds one precision, packed in whole int32 words."""
        b = self.stored_bits
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.master_bits:
            raise ValueError(f"stored_bits must be an integer in 1..{self.master_bits} (master_bits: the full "
                             f"nested checkpoint; fewer: a compact single-precision export), got {b!r}")
        if not self.compact:
            return
        if self.trained_bits != [b] or self.default_bits != b:
            raise ValueError(f"a compact checkpoint stores only its {b}-bit codes (stored_bits {b}), so trained_bits "
                             f"must be [{b}] and default_bits {b}; got trained_bits {self.trained_bits}, "
                             f"default_bits {self.default_bits}")
        if self.group_size % 32:
            raise ValueError(f"a compact checkpoint packs codes 32 per int32 word per bit, so group_size must be a "
                             f"multiple of 32, got {self.group_size}; export the full checkpoint instead")

    @property
    def compact(self) -> bool:
        """Whether this is a compact single-precision export (packed ``stored_bits``-bit codes, no master codes)."""
        return self.stored_bits < self.master_bits

    @property
    def codes_suffix(self) -> str:
        """Name of a layer's stored-codes tensor: ``codes`` (master codes) or, compact, ``packed``."""
        return "packed" if self.compact else "codes"

    def stored_codes(self, kq: int) -> tuple[torch.dtype, int]:
        """Dtype and width of a layer's stored codes for quantized width ``kq``.

        Full checkpoint: uint8 [N, Kq] master codes; compact: int32 [N, Kq*B/32] packed B-bit codes.
        """
        if self.compact:
            return torch.int32, kq * self.stored_bits // 32
        return torch.uint8, kq

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
        if self.compact and bits != self.stored_bits:
            raise ValueError(f"this checkpoint is a compact {self.stored_bits}-bit export: it stores only the "
                             f"{self.stored_bits}-bit codes, so it serves at {self.stored_bits} bits only (asked for "
                             f"{bits}); serve it at {self.stored_bits} or use the full nested checkpoint "
                             "(qat.run without --export-bits)")
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


def layer_tensors(prefix: str, qw: QuantizedWeight, stored_bits: int | None = None) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized linear layer.

    ``stored_bits`` None (or the master bits): master codes; B below them: only the B-bit slice,
    packed (a compact export's ``P.packed``).
    """
    if stored_bits is None or stored_bits == qw.master_bits:
        codes = {f"{prefix}.codes": qw.codes.contiguous()}
    else:
        codes = {f"{prefix}.packed": pack_codes(slice_codes(qw.codes, stored_bits, qw.master_bits), stored_bits)}
    out = {
        **codes,
        f"{prefix}.scales": qw.scales.contiguous(),
        f"{prefix}.zeros": qw.zeros.contiguous(),
        f"{prefix}.row_scale": qw.row_scale.float().contiguous(),
    }
    if qw.split_index is not None and qw.split_index.numel():
        # q/k/v (and gate/up) share one split set; safetensors refuses tensors that share storage.
        out[f"{prefix}.split_index"] = qw.split_index.to(torch.int32).clone()
    return out


def stored_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, row_scale: torch.Tensor,
                  in_features: int, config: QuantConfig, split_index: torch.Tensor | None = None) -> QuantizedWeight:
    """A layer's :class:`QuantizedWeight` from its stored tensors (``codes``: ``P.codes`` or, compact, ``P.packed``).

    A compact layer's B-bit codes are put at master positions, so slicing at B (every serving
    path does) returns them exactly: it serves bit-identically to the full checkpoint at B.
    """
    if config.compact:
        codes = unpack_to_master(codes, config.stored_bits, config.master_bits)
    return QuantizedWeight(codes, scales, zeros, row_scale, in_features, config.group_size, config.master_bits,
                           split_index)


def layer_from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], in_features: int,
                       config: QuantConfig) -> QuantizedWeight:
    """Rebuild a layer's :class:`QuantizedWeight` from checkpoint tensors, checking dtypes and shapes."""
    gs = config.group_size
    kq = config.quantized_width(prefix, in_features)
    codes_name = config.codes_suffix
    codes_dtype, codes_width = config.stored_codes(kq)
    try:
        codes, scales = tensors[f"{prefix}.{codes_name}"], tensors[f"{prefix}.scales"]
        zeros, row_scale = tensors[f"{prefix}.zeros"], tensors[f"{prefix}.row_scale"]
    except KeyError as e:
        raise ValueError(f"checkpoint is missing tensor {e.args[0]}"
                         f"{' (config.json says it is a compact export)' if config.compact else ''}") from None
    split_index = config.split_index(prefix)
    stored = tensors.get(f"{prefix}.split_index")
    if (stored is None) != (split_index is None) or (stored is not None and not torch.equal(stored.to(torch.int32), split_index)):
        raise ValueError(f"{prefix}: split_index in the safetensors disagrees with config.json's splits")
    n = codes.shape[0]
    expect = {codes_name: (codes, codes_dtype, (n, codes_width)),
              "scales": (scales, torch.float8_e4m3fn, (n, kq // gs)),
              "zeros": (zeros, torch.uint8, (n, kq // gs)), "row_scale": (row_scale, torch.float32, (n,))}
    for name, (t, dtype, shape) in expect.items():
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{prefix}.{name}: expected {dtype} {shape}, found {t.dtype} {tuple(t.shape)}")
    if split_index is not None:
        check_split_index(split_index, in_features, gs)
    return stored_weight(codes, scales, zeros, row_scale, in_features, config, split_index)
