"""The GPU path: detect vLLM + CUDA and build the ``vllm serve`` command line with the bitbybit plugin."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence


def vllm_usable() -> tuple[bool, str]:
    """Whether vLLM can serve here, and why (or why not)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, "vLLM is installed but no CUDA GPU is visible"
    return True, f"vLLM and a CUDA GPU ({torch.cuda.get_device_name(0)}) found"


def vllm_command(ckpt: str, bits: int, act_bits: int | None = None, host: str | None = None,
                 port: int | None = None, api_key: str | None = None, served_model_name: str | None = None,
                 extra: Sequence[str] = ()) -> list[str]:
    """``vllm serve CKPT --quantization bitbybit --bits B ...`` as an argv for this Python.

    Runs vLLM's CLI module (the same program as the ``vllm`` console script, which some installs
    lack). ``--act-bits`` is the bitbybit plugin's flag; ``extra`` flags go to vLLM unchanged.
    """
    if any(f == "--quantization" or f.startswith("--quantization=") or f == "-q" for f in extra):
        raise ValueError("do not pass --quantization: `python -m serve` always serves with --quantization bitbybit")
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", ckpt, "--quantization", "bitbybit",
           "--bits", str(bits)]
    if act_bits is not None:
        cmd += ["--act-bits", str(act_bits)]
    for flag, value in (("--host", host), ("--port", port), ("--api-key", api_key),
                        ("--served-model-name", served_model_name)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(extra)
