"""--compile: the block-training step under torch.compile gives the eager step's losses and weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LlamaConfig, LlamaForCausalLM

from kernels.split import split_region_index
from qat.blocks import capture_layer0_inputs, fake_quant_linears, make_student, run_block_batched
from qat.blockwise import backward_targets, compiled, target_loss
from qat.models import SHARED_INPUT_GROUPS
from qat.recipe import Target
from qat.run import main, parse_args, resolve_compile

REPO = Path(__file__).resolve().parents[1]
STAGE = [Target(4), Target(2, 2)]  # a weight-only target and one with activation quantization


def _block_and_data():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    x, kwargs = capture_layer0_inputs(model, torch.randint(0, 100, (4, 16)), 4, torch.float32)
    block = model.model.layers[0]
    y = run_block_batched(block, x, kwargs, 4, False)
    splits = {name: split_region_index([1, 7, 30], block.get_submodule(group[0]).in_features, 32)
              for group in SHARED_INPUT_GROUPS for name in group}
    return block, splits, x, y, kwargs


def _train(loss_fn, block, splits, x, y, kwargs, steps: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    student = make_student(block, splits, 2, 32, 8)
    params = [lin.weight for lin in fake_quant_linears(student).values()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    weights = {STAGE[0]: 3.0, STAGE[1]: 1.0}
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        idx = torch.tensor([2, 0, 3])
        losses.append(torch.stack(backward_targets(loss_fn, student, STAGE, weights, {t: x for t in STAGE}, y, idx,
                                                   kwargs, False)))
        opt.step()
    return torch.stack(losses), [p.detach() for p in params]


def test_compiled_training_steps_match_eager_in_one_graph_per_target() -> None:
    """Same losses and weights after 3 AdamW steps; the compiled forward+backward has no graph breaks."""
    torch._dynamo.reset()  # graphs other tests compiled for target_loss count against its recompile limit
    data = _block_and_data()
    eager_losses, eager_weights = _train(target_loss, *data)
    counter = CompileCounterWithBackend("aot_eager")
    losses, weights = _train(compiled(target_loss, backend=counter), *data)
    assert counter.frame_count == len(STAGE)  # one graph per target, reused on later steps
    assert torch.allclose(losses, eager_losses, rtol=1e-5, atol=1e-9)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(weights, eager_weights))
    assert not torch.equal(losses[0], losses[-1])  # the weights did move


def test_compile_flag_defaults_to_the_device() -> None:
    assert resolve_compile(None, torch.device("cuda")) and not resolve_compile(None, torch.device("cpu"))
    assert not resolve_compile(False, torch.device("cuda")) and resolve_compile(True, torch.device("cpu"))
    for argv, want in (([], None), (["--compile"], True), (["--no-compile"], False)):
        assert parse_args(argv)[1]["compile"] is want


def test_step_bench_runs_on_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("qat_step_bench", REPO / "scripts" / "qat_step_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--model", str(tiny_llama_dir), "--device", "cpu", "--batch", "2", "--seq", "16", "--layer", "1",
                "--warmup", "1", "--steps", "1", "--targets", "w2a16", "--backend", "aot_eager", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["targets"] == ["w2a16"] and "compiled_error" not in report
    assert report["loss_difference"]["max_abs"] == 0 and report["compiled"]["graph_breaks"] == 0
    assert report["eager"]["target_steps_per_s"] > 0 and report["speedup"] > 0


def test_a_finished_run_resumes_with_the_other_compile_setting(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """compile changes how, not what, a run trains: recorded in recipe.json, not a reason to refuse resuming."""
    run_dir = tmp_path / "run"
    args = ["--model", str(tiny_llama_dir), "--calib-data", str(tiny_llama_dir.parent / "corpus.txt"), "--run-dir",
            str(run_dir), "--n-train", "4", "--n-val", "2", "--seq-len", "16", "--batch-size", "4", "--stage-epochs",
            "1,0,0,1", "--threads", "1", "--no-eval"]
    main([*args, "--no-compile"])
    assert json.loads((run_dir / "recipe.json").read_text())["compile"] is False
    main([*args, "--compile"])  # every block is finished: nothing to train, so nothing compiles
    assert "resuming: blocks 1..3 of 3" in (run_dir / "log.txt").read_text()
    assert json.loads((run_dir / "recipe.json").read_text())["compile"] is True
