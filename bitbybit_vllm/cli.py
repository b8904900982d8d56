"""``--bits`` / ``--act-bits`` for ``vllm serve`` and the start-up checks of the chosen precision.

vLLM has no hook for a plugin's own flags, but it loads general plugins inside
``AsyncEngineArgs.add_cli_args`` before it calls ``EngineArgs.add_cli_args`` (0.24 through 0.28),
so :func:`patch_engine_args` wraps the latter to add the flags. Parsing ``--bits B`` sets
``BITBYBIT_BITS=B`` (``--act-bits A``: ``BITBYBIT_ACT_BITS=A``) in the launching process; every
engine process inherits it and also receives the resolved
:class:`~bitbybit_vllm.config.BitbybitConfig` inside the pickled VllmConfig.

``EngineArgs.create_engine_config`` is wrapped too: a precision asked for with a model that is
not a bitbybit checkpoint fails there, at start-up; for a bitbybit model the serving precisions
are written into ``additional_config``, which is part of vLLM's torch.compile cache key (that
would otherwise reuse graphs compiled for another precision).
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any

from packaging.version import Version
from vllm.logger import init_logger

from kernels.checkpoint import QUANT_METHOD

from .config import ACT_BITS_ENV, BITS_ENV

logger = init_logger("vllm.bitbybit")

SUPPORTED_MINORS = ((0, 24), (0, 28))
ADDITIONAL_CONFIG_KEY = "bitbybit"


def vllm_version_supported(version: str) -> bool:
    """Whether the flags may patch this vLLM (releases 0.24 through 0.28)."""
    minor = Version(version).release[:2]
    return SUPPORTED_MINORS[0] <= minor <= SUPPORTED_MINORS[1]


def _parse_int(text: str, allowed: str, ok: Any) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {value}")
    return value


def parse_bits(text: str) -> int:
    """argparse type of ``--bits``: an integer in 1..8."""
    return _parse_int(text, "an integer in 1..8", lambda b: 1 <= b <= 8)


def parse_act_bits(text: str) -> int:
    """argparse type of ``--act-bits``: 16 or an integer in 1..8."""
    return _parse_int(text, "16 or an integer in 1..8", lambda b: b == 16 or 1 <= b <= 8)


class EnvAction(argparse.Action):
    """Stores the flag and exports it (``env``) for the engine processes."""

    def __init__(self, *args: Any, env: str, **kwargs: Any) -> None:
        self.env = env
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        os.environ[self.env] = str(values)
        setattr(namespace, self.dest, values)


def add_bits_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--bits`` and ``--act-bits`` to a vLLM engine parser (once)."""
    if "--bits" in parser._option_string_actions:
        return
    group = parser.add_argument_group("bitbybit", "Serving precision of a bitbybit nested-grid checkpoint.")
    group.add_argument("--bits", type=parse_bits, action=EnvAction, env=BITS_ENV, default=None,
                       help="Weight precision (1..8) to serve a bitbybit checkpoint at; default: the checkpoint's "
                            f"default. Same as setting {BITS_ENV}.")
    group.add_argument("--act-bits", type=parse_act_bits, action=EnvAction, env=ACT_BITS_ENV, default=None,
                       help="Activation precision: 16 (not quantized) or 1..8 (per-token W{b}A{a}); default: the "
                            f"checkpoint's. Same as setting {ACT_BITS_ENV}.")


def requested_precisions() -> dict[str, str]:
    """The precision environment variables that are set (and not empty)."""
    return {name: os.environ[name] for name in (BITS_ENV, ACT_BITS_ENV) if os.environ.get(name, "").strip()}


def check_engine_config(config: Any) -> None:
    """Start-up checks of a built VllmConfig; records the serving precisions for the compile cache."""
    model_config = config.model_config
    if model_config.quantization != QUANT_METHOD:
        requested = requested_precisions()
        if requested:
            raise ValueError(f"--bits / --act-bits ({requested}) apply to bitbybit checkpoints only, but "
                             f"{model_config.model} has quantization {model_config.quantization!r}; drop the flags "
                             f"or unset {' and '.join(requested)}")
        return
    quant_config = config.quant_config
    if isinstance(config.additional_config, dict):
        config.additional_config[ADDITIONAL_CONFIG_KEY] = {"bits": quant_config.bits, "act_bits": quant_config.act_bits}
    logger.info("bitbybit: serving %s at W%dA%d (trained weight precisions: %s)", model_config.model,
                quant_config.bits, quant_config.act_bits, sorted(quant_config.quant.trained_bits))


def patch_engine_args() -> bool:
    """Wrap ``EngineArgs.add_cli_args`` and ``create_engine_config``; False (and a warning) on an untested vLLM."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    if not vllm_version_supported(vllm.__version__):
        logger.warning("bitbybit: vLLM %s is outside the tested range 0.24-0.28; --bits/--act-bits are not added, "
                       "set %s / %s instead", vllm.__version__, BITS_ENV, ACT_BITS_ENV)
        return False
    if getattr(EngineArgs.add_cli_args, "_bitbybit", False):
        return True
    add_cli_args = EngineArgs.add_cli_args
    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(add_cli_args)
    def add_cli_args_with_bits(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = add_cli_args(parser, *args, **kwargs)
        add_bits_arguments(parser)
        return parser

    @functools.wraps(create_engine_config)
    def create_checked_engine_config(self: EngineArgs, *args: Any, **kwargs: Any) -> Any:
        config = create_engine_config(self, *args, **kwargs)
        check_engine_config(config)
        return config

    add_cli_args_with_bits._bitbybit = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_bits)
    EngineArgs.create_engine_config = create_checked_engine_config
    return True
