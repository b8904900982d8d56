"""python -m qat.run: recipes, clear errors, the end-to-end run, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kernels.qmodel import load_quantized, quant_linears
from kernels.fakequant import FakeQuantLinear
from kernels.split import split_region_index
from qat.blockwise import CellLock
from qat.recipe import Recipe, Target, build_recipe
from qat.run import main

REPO = Path(__file__).resolve().parents[1]
# A tiny training run: 3 blocks x 4 stages x 2 epochs x 2 steps.
TINY = ["--n-train", "8", "--n-val", "4", "--seq-len", "32", "--batch-size", "4", "--epochs-per-stage", "2",
        "--lr", "1e-3", "--threads", "1", "--eval-max-tokens", "600"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run_args(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--calib-data", str(model_dir.parent / "corpus.txt"),
            "--run-dir", str(run_dir), *TINY, *extra]


def test_stages_progressive_ablation_and_activation_stage() -> None:
    r = Recipe(bits=[8, 4, 2], act_bits=2)
    assert r.stages() == [[Target(8)], [Target(8), Target(4)], [Target(8), Target(4), Target(2)],
                          [Target(8), Target(4), Target(2), Target(2, 2)]]
    assert Recipe(progressive=False).stages() == [[Target(8), Target(4), Target(3), Target(2)]]
    assert Recipe(method="direct", bits=[2]).stages() == [[Target(2)]]
    r = Recipe(split_ratio_first=0.01, split_ratio_last=0.09)
    assert [round(r.split_ratio(i, 5), 4) for i in range(5)] == [0.01, 0.03, 0.05, 0.07, 0.09]
    assert Recipe(split=False).split_ratio(3, 5) == 0


def test_lock_bits_trains_the_low_precisions_then_locks_them() -> None:
    r = Recipe(lock_bits=2, act_bits=2)
    assert r.stages() == [[Target(2)], [Target(2), Target(2, 2)], [Target(8), Target(4), Target(3)]]
    assert r.targets() == [Target(2), Target(2, 2), Target(8), Target(4), Target(3)]
    assert [r.locked_bits(s) for s in range(3)] == [None, None, 2]
    assert Recipe(lock_bits=4).stages() == [[Target(4), Target(3), Target(2)], [Target(8)]]
    assert Recipe(act_bits=2).locked_bits(4) is None
    assert Recipe(act_bits=2).targets() == Recipe(act_bits=2).stages()[-1]
    for bad in (8, 5):
        with pytest.raises(ValueError, match="lock_bits"):
            build_recipe({}, {"lock_bits": bad})


@pytest.mark.parametrize("bits", [2, 3])
def test_cell_lock_keeps_the_locked_codes_and_the_grid(bits: int) -> None:
    torch.manual_seed(0)
    lin = FakeQuantLinear(torch.nn.Linear(80, 24, bias=False), split_region_index([3, 70], 80, 32), 0.01)
    before = lin.quantized()
    lock = CellLock(lin, bits)
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight) * lin.weight.std())
    lock.project()
    lock.check()
    after = lin.quantized()
    assert torch.equal(after.scales.float(), before.scales.float()) and torch.equal(after.zeros, before.zeros)
    assert torch.equal(after.codes >> (8 - bits), before.codes >> (8 - bits))
    assert not torch.equal(after.codes, before.codes)  # the finer bits did move


def test_stage_epochs_give_each_stage_its_own_epochs() -> None:
    assert Recipe(act_bits=2).epochs_of_stages() == [2, 2, 2, 2, 2]
    r = build_recipe({"act_bits": 2}, {"stage_epochs": [0, 1, 2, 3, 4]})
    assert r.epochs_of_stages() == [0, 1, 2, 3, 4] and r.trained
    assert not Recipe(stage_epochs=[0, 0, 0, 0]).trained
    with pytest.raises(ValueError, match="one per stage"):
        build_recipe({}, {"stage_epochs": [1, 2]})


def test_recipe_file_values_are_overridden_by_flags() -> None:
    r = build_recipe({"lr": 1e-3, "bits": [8, 2]}, {"lr": 5e-4, "bits": None})
    assert r.lr == 5e-4 and r.bits == [8, 2]


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "not found"),
    (["--bits", "8,9"], "invalid bits list"),
    (["--method", "direct", "--bits", "8,2"], "single precision"),
    (["--bits", "8,4", "--export-bits", "2"], "export_bits 2 is not among the trained bits [8, 4]"),
    (["--export-bits", "8"], "leave --export-bits out"),
    (["--stage-epochs", "1,1"], "one per stage"),
])
def test_bad_input_is_refused_with_the_fix(args: list[str], message: str, capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main([*args, "--run-dir", str(tmp_path / "run")])
    assert message in str(e.value.code) + capsys.readouterr().err


def test_unsupported_architecture_and_too_little_data(tiny_llama_dir: Path, tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit, match="not supported"):
        main(["--model", str(gpt2), "--method", "rtn", "--run-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="too little data"):
        main(_run_args(tiny_llama_dir, tmp_path / "b", "--n-train", "100000"))


def test_end_to_end_run_exports_a_nested_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    main(_run_args(tiny_llama_dir, run_dir, "--act-bits", "2"))
    ckpt = run_dir / "checkpoint"
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitbybit" and qc["trained_bits"] == [8, 4, 3, 2] and qc["act_bits"] == 2
    assert qc["splits"]["model.layers.2.self_attn.q_proj"]["index"] == qc["splits"]["model.layers.2.self_attn.v_proj"]["index"]
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert not any(k.endswith(("_proj.weight",)) for k in tensors)  # no float copies of quantized weights
    assert tensors["model.layers.0.mlp.down_proj.codes"].dtype == torch.uint8
    for name in ("losses.json", "losses.png", "log.txt", "recipe.json", "summary.json"):
        assert (run_dir / name).is_file()
    losses = json.loads((run_dir / "losses.json").read_text())
    assert len(losses) == 3 and set(losses[0]["train"]) == {"w8a16", "w4a16", "w3a16", "w2a16", "w2a2"}
    table = json.loads(next((run_dir / "eval").glob("*.json")).read_text())
    assert {(r["w_bits"], r["a_bits"]) for r in table["rows"]} >= {(16, 16), (8, 16), (2, 16), (2, 2)}
    model, _, _ = load_quantized(ckpt, bits=3)
    assert model(torch.tensor([[1, 5, 9]])).logits.shape[-1] == model.config.vocab_size


def test_killed_run_resumes_from_the_last_finished_block(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """SIGKILL after the first block; the rerun replays it and ends with the uninterrupted run's checkpoint."""
    args = _run_args(tiny_llama_dir, tmp_path / "killed", "--no-eval", "--epochs-per-stage", "6")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qat.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_block = tmp_path / "killed" / "blocks" / "000.pt"
    deadline = time.monotonic() + 240
    while not first_block.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "blocks" / "002.pt").exists()
    main(args)
    assert "resuming: blocks 1.." in (tmp_path / "killed" / "log.txt").read_text()
    main(_run_args(tiny_llama_dir, tmp_path / "whole", "--no-eval", "--epochs-per-stage", "6"))
    resumed = load_file(str(tmp_path / "killed" / "checkpoint" / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_changed_recipe_does_not_resume(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    main(_run_args(tiny_llama_dir, run_dir, "--no-eval", "--epochs-per-stage", "1"))
    with pytest.raises(SystemExit, match="different recipe"):
        main(_run_args(tiny_llama_dir, run_dir, "--no-eval", "--epochs-per-stage", "1", "--lr", "1e-2"))


def test_export_bits_reexports_the_finished_run_compact(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    """``--export-bits 2`` on a finished run directory: no retraining, the same weights at 2 bits, ~1/4 the codes."""
    run_dir = tmp_path / "run"
    main(_run_args(tiny_llama_dir, run_dir, "--no-eval", "--epochs-per-stage", "1"))
    main(_run_args(tiny_llama_dir, run_dir, "--epochs-per-stage", "1", "--export-bits", "2", "--out",
                   str(tmp_path / "w2")))
    assert "resuming: blocks 1..3 of 3" in (run_dir / "log.txt").read_text()
    qc = json.loads((tmp_path / "w2" / "config.json").read_text())["quantization_config"]
    assert (qc["stored_bits"], qc["trained_bits"], qc["default_bits"]) == (2, [2], 2)
    full, compact = (load_file(str(d / "model.safetensors")) for d in (run_dir / "checkpoint", tmp_path / "w2"))
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.codes" not in compact and compact[f"{name}.packed"].numel() * 4 * 4 == full[f"{name}.codes"].numel()
    a, b = (dict(quant_linears(load_quantized(d, bits=2)[0])) for d in (run_dir / "checkpoint", tmp_path / "w2"))
    assert all(torch.equal(a[n].layer.packed, b[n].layer.packed) for n in a)
    table = json.loads(next((run_dir / "eval").glob("*.json")).read_text())
    assert {r["w_bits"] for r in table["rows"]} == {16, 2}
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--export-bits B" in capsys.readouterr().out
