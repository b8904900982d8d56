"""bitbybit's vLLM plugin: the ``bitbybit`` quantization method and ``vllm serve --bits``.

vLLM calls :func:`register` in every process through the ``vllm.general_plugins`` entry point
(``bitbybit = "bitbybit_vllm:register"``). Without the CLI, choose the precision with the
``BITBYBIT_BITS`` environment variable before creating ``vllm.LLM`` (docs/VLLM.md).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register the ``bitbybit`` quantization method and ``--bits``; idempotent, safe in every vLLM process."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from vllm.model_executor.layers.quantization import register_quantization_config

    from kernels.checkpoint import QUANT_METHOD

    from .cli import patch_engine_args
    from .config import BitbybitConfig
    from .linear import BitbybitLinearMethod

    register_quantization_config(QUANT_METHOD)(BitbybitConfig)
    if BitbybitLinearMethod.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
        WEIGHT_LOADER_V2_SUPPORTED.append(BitbybitLinearMethod.__name__)
    patch_engine_args()
    _registered = True
