"""--compile: the block-training step under torch.compile gives the eager step's losses and weights, and the
compiled fake weight is the exported one up to near-tie roundings (``assert_same_grid_values``, shared with
tests/gpu/test_qat_compile_gpu.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.codegen.cpp import CppOverrides
from transformers import LlamaConfig, LlamaForCausalLM

from kernels.fakequant import FakeQuantLinear
from kernels.grid import MASTER_BITS
from kernels.split import split_region_index
from qat.blocks import capture_layer0_inputs, fake_quant_linears, make_student, run_block_batched
from qat.blockwise import COMPILE_CONFIG, backward_targets, compiled, dynamic_split_widths, target_loss
from qat.models import SHARED_INPUT_GROUPS
from qat.recipe import Target
from qat.run import main, parse_args, resolve_compile

REPO = Path(__file__).resolve().parents[1]
STAGE = [Target(4), Target(2, 2)]  # a weight-only target and one with activation quantization
FLOAT_TOL = 1e-3  # of a master step: inductor reorders the dequantization arithmetic, so the last bits differ
MOVED_MAX = 1e-4  # fraction of elements that a near-tie rounding (a master code, a group's zero point) may move


def compiled_and_eager_fake_weight(bits: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 512 x 1408 layer with 71 split channels: its fake weight at ``bits`` compiled (inductor) and eager (the
    exported weight), and the exported master step of each element, all ``[N, Kq]``."""
    torch.manual_seed(0)
    lin = FakeQuantLinear(nn.Linear(1408, 512, bias=False).to(device),
                          split_region_index(range(0, 1408, 20), 1408, 32), 1e-3)
    got = torch.compile(lin.fake_weight)(bits)
    want = lin.fake_weight(bits)
    return got.detach(), want.detach(), lin.quantized().step().repeat_interleave(lin.group_size, dim=1)


def assert_same_grid_values(got: torch.Tensor, want: torch.Tensor, step: torch.Tensor, bits: int) -> int:
    """``got`` is ``want`` (b-bit weights on the master grid of step ``step``) but where a rounding went the other
    way at a near-tie: the compiled grid may divide differently from eager (Triton's fp32 ``x / y`` is approximate).

    A b-bit value is ``step * (2^(8-b) * code_b + offset - zero)``. A master code moved by one moves it by a whole
    b-bit step where it crosses a cell boundary (else not at all); below 8 bits, a group's zero point moved by one
    moves all its values by one master step, b-bit codes unchanged (1/16 of a 4-bit step; at 8 bits the codes
    move with the zero and the values stay). So ``got - want`` is a whole number of master steps (to
    ``FLOAT_TOL``) everywhere, at most one b-bit step (plus one master step below 8 bits), and nonzero for at
    most ``MOVED_MAX`` of the elements. Returns how many moved.
    """
    off = (got - want) / step
    moves = off.round()
    assert (off - moves).abs().max().item() <= FLOAT_TOL
    assert moves.abs().max().item() <= 2 ** (MASTER_BITS - bits) + (bits < MASTER_BITS)
    moved = int(moves.count_nonzero())
    assert moved <= MOVED_MAX * off.numel()
    return moved


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


# Split channels of each shared-input group (q/k/v, o_proj, gate/up, down_proj: K = 64, 64, 64, 96) in three
# blocks: split regions of 1 to 3 groups, every layer's width changing from block to block.
BLOCK_SPLIT_CHANNELS = ((2, 40, 20, 70), (40, 20, 64, 2), (20, 64, 2, 40))


def test_compiled_step_traces_each_target_once_for_every_split_width() -> None:
    """Blocks split different numbers of channels; with the widths symbolic (set up as train_block does), each
    target's graph is traced once for all blocks (static widths retraced it at every block), and the losses and
    gradients are eager's. The "eager" backend (dynamo's graphs only) keeps it fast: symbolic shapes trace slower
    (aot_eager and CPU inductor give the same count)."""
    torch._dynamo.reset()
    block, _, x, y, kwargs = _block_and_data()
    counter = CompileCounterWithBackend("eager")
    loss_fn, weights, idx = compiled(target_loss, backend=counter), {STAGE[0]: 3.0, STAGE[1]: 1.0}, torch.tensor([2, 0])
    for channels in BLOCK_SPLIT_CHANNELS:
        splits = {name: split_region_index(range(n), block.get_submodule(group[0]).in_features, 32)
                  for group, n in zip(SHARED_INPUT_GROUPS, channels) for name in group}
        results = []
        for fn in (target_loss, loss_fn):
            student = make_student(block, splits, 2, 32, 8)
            params = [lin.weight.requires_grad_(True) for lin in fake_quant_linears(student).values()]
            if fn is loss_fn:
                dynamic_split_widths(student)
            with torch._dynamo.config.patch(**COMPILE_CONFIG):
                losses = backward_targets(fn, student, STAGE, weights, {t: x for t in STAGE}, y, idx, kwargs, False)
            results.append((torch.stack(losses), [p.grad for p in params]))
        (eager_losses, eager_grads), (losses, grads) = results
        assert torch.allclose(losses, eager_losses, rtol=1e-5, atol=1e-9)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, eager_grads))
    assert counter.frame_count == len(STAGE)


def test_compiled_fake_weight_moves_only_at_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/gpu's check on CPU inductor with Triton's approximate fp32 division emulated as ``x * (1 / y)``: there
    group (87, 40) has ``-min / step`` = 132.500015 in eager and just under 132.5 compiled (its row factor, the
    row's largest scale / 448, came out one ulp larger), so its zero point is 132, not 133, and its 4-bit
    values are one master step off, b-bit codes unchanged: 0.0625014 of a 4-bit step, as the H200 found."""
    monkeypatch.setattr(CppOverrides, "truediv", staticmethod(lambda a, b: f"({a} * (decltype({b})(1) / {b}))"))
    torch._dynamo.reset()
    try:  # no cached kernels (they divide exactly); scalar C++ kernels (the vectorized ones divide elsewhere)
        with torch.compiler.config.patch(force_disable_caches=True), torch._inductor.config.patch({"cpp.simdlen": 1}):
            moved = [assert_same_grid_values(*compiled_and_eager_fake_weight(b, "cpu"), b) for b in (8, 4, 3, 2)]
    finally:
        torch._dynamo.reset()  # no code compiled with the emulated division outlives the test
    assert all(moved)  # the emulation is in effect: 6 codes move at 8 bits, group (87, 40)'s 32 values below


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
