"""vLLM QuantizationConfig for bitbybit checkpoints (``quant_method: "bitbybit"`` in config.json)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from kernels.checkpoint import QUANT_METHOD, QuantConfig

BITS_ENV = "BITBYBIT_BITS"
ACT_BITS_ENV = "BITBYBIT_ACT_BITS"
MIN_CAPABILITY = 80


def env_int(name: str) -> int | None:
    """An integer environment variable (``BITBYBIT_BITS`` / ``BITBYBIT_ACT_BITS``), None when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def check_act_bits(act_bits: int) -> int:
    """Activation precision: 16 (not quantized) or an integer in 1..8."""
    if act_bits != 16 and (isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 1 <= act_bits <= 8):
        raise ValueError(f"act_bits must be 16 (activations not quantized) or an integer in 1..8, got {act_bits!r}")
    return act_bits


class BitbybitConfig(QuantizationConfig):
    """A nested-grid checkpoint served at weight precision ``bits`` and activation precision ``act_bits``.

    ``bits``: ``--bits`` / ``BITBYBIT_BITS``, else the checkpoint's default (a precision outside the
    trained set warns). ``act_bits``: ``--act-bits`` / ``BITBYBIT_ACT_BITS``, else the checkpoint's
    (16 = activations not quantized).
    """

    def __init__(self, quant: QuantConfig | None = None, bits: int | None = None, act_bits: int | None = None) -> None:
        super().__init__()
        if quant is None:
            raise ValueError("--quantization bitbybit needs a bitbybit checkpoint, but the model's config.json has no "
                             "quantization_config with quant_method 'bitbybit'; export one with `python -m qat.run`")
        self.quant = quant
        self.bits = quant.resolve_bits(bits)
        self.act_bits = check_act_bits(quant.act_bits if act_bits is None else act_bits)
        if self.act_bits < 16 and quant.act_group_size != quant.group_size:
            raise ValueError(f"act_group_size {quant.act_group_size} differs from group_size {quant.group_size}; "
                             "the serving ops quantize activations in the weight's groups")

    def __repr__(self) -> str:
        return (f"BitbybitConfig(bits={self.bits}, act_bits={self.act_bits}, "
                f"trained_bits={sorted(self.quant.trained_bits)}, group_size={self.quant.group_size})")

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return MIN_CAPABILITY

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BitbybitConfig:
        return cls(QuantConfig.from_dict(config), env_int(BITS_ENV), env_int(ACT_BITS_ENV))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename the config's module names (unconverted modules, split tables) from HF to vLLM names."""
        self.quant = replace(self.quant,
                             modules_to_not_convert=hf_to_vllm_mapper.apply_list(self.quant.modules_to_not_convert),
                             splits=hf_to_vllm_mapper.apply_dict(self.quant.splits))

    def checkpoint_modules(self, prefix: str) -> list[str]:
        """The checkpoint modules behind a vLLM layer: q/k/v for ``qkv_proj``, gate/up for ``gate_up_proj``."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf)
        if not shards:
            return [prefix]
        return [f"{parent}.{s}" if parent else s for s in shards]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        from .linear import BitbybitLinearMethod

        modules = self.checkpoint_modules(prefix)
        quantized = {m: self.quant.is_quantized(m) for m in modules}
        if len(set(quantized.values())) > 1:
            raise ValueError(f"vLLM fuses {modules} into {prefix}, but the checkpoint quantizes only some of them "
                             f"({quantized}); quantize all or none of a fused group")
        if not all(quantized.values()):
            return UnquantizedLinearMethod()
        return BitbybitLinearMethod(self, modules)
