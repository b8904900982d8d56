"""Registration, quantization_config parsing, ``--bits`` / ``--act-bits`` and start-up errors (vLLM 0.28 on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (`make install` adds its CPU build)")

from vllm.config import DeviceConfig, ModelConfig, VllmConfig  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402
from vllm.entrypoints.cli.serve import ServeSubcommand  # noqa: E402
from vllm.model_executor.layers import linear as vllm_linear  # noqa: E402
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

import bitbybit_vllm  # noqa: E402
from bitbybit_vllm.cli import vllm_version_supported  # noqa: E402
from bitbybit_vllm.config import ACT_BITS_ENV, BITS_ENV, BitbybitConfig  # noqa: E402
from kernels.checkpoint import QuantConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("vllm_cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_precision_env(monkeypatch):
    """Start every test with BITBYBIT_BITS / BITBYBIT_ACT_BITS unset; restore them afterwards (argparse sets them)."""
    monkeypatch.setenv(BITS_ENV, "")
    monkeypatch.setenv(ACT_BITS_ENV, "")


def serve_args(*argv: str):
    """``vllm serve ARGV`` parsed by vLLM's own serve subcommand parser, as ``ServeSubcommand.cmd`` sees it."""
    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    args.model = args.model_tag
    return args


def engine_config(*argv: str) -> VllmConfig:
    return AsyncEngineArgs.from_cli_args(serve_args(*argv, "--dtype", "float32")).create_engine_config()


# --- registration ---

def test_entry_point_is_declared():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["vllm.general_plugins"] == {"bitbybit": "bitbybit_vllm:register"}
    assert "vllm>=0.24,<0.29" in meta["project"]["optional-dependencies"]["vllm"]


def test_a_fresh_vllm_process_loads_the_plugin_through_its_entry_point():
    """What every vLLM process (API server, engine core, workers) does at start: load_general_plugins()."""
    from importlib.metadata import entry_points

    if not any(e.name == "bitbybit" for e in entry_points(group="vllm.general_plugins")):
        pytest.skip("bitbybit is not pip-installed here (`make install` installs it), so vLLM cannot discover it")
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.model_executor.layers.quantization import get_quantization_config as g; "
            "from vllm.engine.arg_utils import EngineArgs; "
            "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
            "assert g('bitbybit').__name__ == 'BitbybitConfig'; "
            "assert EngineArgs.add_cli_args(P()).parse_args(['--bits', '3']).bits == 3")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)


def test_register_is_idempotent():
    bitbybit_vllm.register()
    bitbybit_vllm.register()
    assert QUANTIZATION_METHODS.count("bitbybit") == 1
    assert get_quantization_config("bitbybit") is BitbybitConfig
    assert vllm_linear.WEIGHT_LOADER_V2_SUPPORTED.count("BitbybitLinearMethod") == 1
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert [a.option_strings for a in parser._actions].count(["--bits"]) == 1


@pytest.mark.parametrize("version, ok", [("0.24.0", True), ("0.28.0", True), ("0.28.2.dev7+gabc", True),
                                         ("0.23.1", False), ("0.29.0", False), ("1.0.0", False)])
def test_version_guard(version, ok):
    assert vllm_version_supported(version) is ok


# --- quantization_config parsing ---

def test_from_config_uses_the_checkpoint_defaults():
    qc = BitbybitConfig.from_config(QuantConfig(trained_bits=[8, 4, 2], default_bits=4, act_bits=2).to_dict())
    assert (qc.bits, qc.act_bits, qc.get_name()) == (4, 2, "bitbybit")
    assert qc.quant.trained_bits == [8, 4, 2]


def test_precision_from_the_environment(monkeypatch):
    monkeypatch.setenv(BITS_ENV, "8")
    monkeypatch.setenv(ACT_BITS_ENV, "16")
    qc = BitbybitConfig.from_config(QuantConfig(act_bits=2).to_dict())
    assert (qc.bits, qc.act_bits) == (8, 16)


def test_untrained_precision_warns_naming_the_trained_set(monkeypatch):
    monkeypatch.setenv(BITS_ENV, "5")
    with pytest.warns(UserWarning, match=r"trained: \[2, 3, 4, 8\]"):
        assert BitbybitConfig.from_config(QuantConfig().to_dict()).bits == 5


@pytest.mark.parametrize("env, value, match", [
    (BITS_ENV, "9", "1..8"), (BITS_ENV, "0", "1..8"), (BITS_ENV, "two", "must be an integer"),
    (ACT_BITS_ENV, "12", "16 .* or an integer in 1..8"), (ACT_BITS_ENV, "x", "must be an integer"),
])
def test_bad_precision_fails(monkeypatch, env, value, match):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=match):
        BitbybitConfig.from_config(QuantConfig().to_dict())


def test_bad_quantization_config_fails():
    with pytest.raises(ValueError, match="default_bits"):
        BitbybitConfig.from_config({**QuantConfig().to_dict(), "default_bits": 5})
    with pytest.raises(ValueError, match="act_group_size"):
        BitbybitConfig.from_config({**QuantConfig().to_dict(), "act_bits": 2, "act_group_size": 64})
    with pytest.raises(ValueError, match="needs a bitbybit checkpoint"):
        BitbybitConfig()


def test_vllm_mapper_renames_config_modules():
    from vllm.model_executor.models.utils import WeightsMapper

    qc = BitbybitConfig.from_config(QuantConfig(splits={"model.layers.0.mlp.down_proj": {"index": [1] + [-1] * 31,
                                                                                          "segments": 1}}).to_dict())
    qc.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))
    assert list(qc.quant.splits) == ["language_model.model.layers.0.mlp.down_proj"]
    assert qc.quant.modules_to_not_convert == ["language_model.model.embed_tokens", "lm_head"]


# --- the checkpoint is picked up with or without --quantization ---

def test_checkpoint_is_detected_with_or_without_quantization_flag(stories_rtn_ckpt):
    for quantization in (None, "bitbybit"):
        mc = ModelConfig(model=str(stories_rtn_ckpt), quantization=quantization, skip_tokenizer_init=True)
        assert mc.quantization == "bitbybit"
        qc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu")).quant_config
        assert isinstance(qc, BitbybitConfig) and qc.bits == 2


def test_other_quantization_flag_conflicts(stories_rtn_ckpt):
    with pytest.raises(ValueError, match="does not match"):
        ModelConfig(model=str(stories_rtn_ckpt), quantization="fp8", skip_tokenizer_init=True)


def test_quantization_flag_on_a_plain_model_fails(stories_rtn_ckpt, tmp_path):
    cfg = json.loads((stories_rtn_ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mc = ModelConfig(model=str(tmp_path), quantization="bitbybit", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="needs a bitbybit checkpoint"):
        VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"))


# --- vllm serve CKPT --quantization bitbybit --bits B ---

def test_serve_accepts_bits_and_carries_them_to_the_engine(stories_rtn_ckpt):
    config = engine_config(str(stories_rtn_ckpt), "--quantization", "bitbybit", "--bits", "4", "--act-bits", "8")
    assert os.environ[BITS_ENV] == "4" and os.environ[ACT_BITS_ENV] == "8"
    assert (config.quant_config.bits, config.quant_config.act_bits) == (4, 8)
    assert config.additional_config["bitbybit"] == {"bits": 4, "act_bits": 8}


def test_serve_without_bits_uses_the_checkpoint_default(stories_rtn_ckpt):
    config = engine_config(str(stories_rtn_ckpt))
    assert config.model_config.quantization == "bitbybit" and config.quant_config.bits == 2
    assert config.additional_config["bitbybit"] == {"bits": 2, "act_bits": 16}


def test_compile_cache_key_depends_on_bits(stories_rtn_ckpt):
    hashes = {engine_config(str(stories_rtn_ckpt), "--bits", str(b)).compute_hash() for b in (2, 4)}
    assert len(hashes) == 2


@pytest.mark.parametrize("argv, match", [
    (["--bits", "9"], "--bits: expected an integer in 1..8, got 9"),
    (["--bits", "two"], "--bits: expected an integer in 1..8, got 'two'"),
    (["--act-bits", "12"], "--act-bits: expected 16 or an integer in 1..8, got 12"),
])
def test_serve_rejects_bad_bits(stories_rtn_ckpt, capsys, argv, match):
    with pytest.raises(SystemExit):
        serve_args(str(stories_rtn_ckpt), *argv)
    assert match in capsys.readouterr().err


def test_serve_bits_without_a_bitbybit_checkpoint_fails(stories_rtn_ckpt, tmp_path):
    cfg = json.loads((stories_rtn_ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="apply to bitbybit checkpoints only"):
        engine_config(str(tmp_path), "--bits", "2")


def test_untrained_bits_warn_at_startup(stories_rtn_ckpt):
    with pytest.warns(UserWarning, match=r"trained: \[2, 3, 4, 8\]"):
        assert engine_config(str(stories_rtn_ckpt), "--bits", "6").quant_config.bits == 6


def test_compact_checkpoint_serves_only_its_precision(stories_rtn_w2_ckpt):
    """A ``--export-bits 2`` checkpoint starts at W2 by default; another ``--bits`` fails at start-up."""
    assert engine_config(str(stories_rtn_w2_ckpt)).quant_config.bits == 2
    with pytest.raises(ValueError, match=r"compact 2-bit export.*serves at 2 bits only \(asked for 4\)"):
        engine_config(str(stories_rtn_w2_ckpt), "--bits", "4")


def test_serve_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        serve_args("--help=bitbybit")
    out = capsys.readouterr().out
    assert "--bits" in out and "--act-bits" in out and BITS_ENV in out
