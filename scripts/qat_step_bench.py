"""Speed of one block-training step, eager against torch.compile, in the same process.

Builds the student of one decoder block of an HF model (outlier channels split as ``qat.run`` does),
feeds it ``--batch`` x ``--seq`` tokens (random ids, or the first tokens of ``--text``), and runs
``--warmup`` then ``--steps`` optimizer steps of :func:`qat.blockwise.backward_targets` over
``--targets`` (default: the last stage of the default W2A2 recipe), first eager, then compiled, from
the same initial student. A target-step is the forward and backward of the block at one target, so
a step of T targets counts T. The timed steps are bracketed by device synchronisation; the compiled
side's warm-up (its compile time) is reported apart.

    python3 scripts/qat_step_bench.py --model /root/d/teacher-56m --out qat-step-bench.json
    python3 scripts/qat_step_bench.py --model TINY_DIR --device cpu --batch 2 --seq 32 --backend aot_eager

Records per side: target-steps/s, seconds, peak memory (CUDA: max allocated; CPU: not measured), the
losses of every step; then the speedup and the largest absolute and relative difference of the losses
over the first ``--compare-steps`` steps (both sides start from the same weights; bf16 autocast on
CUDA makes them differ by rounding, which the straight-through training then carries on).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.grid import GROUP_SIZE, MASTER_BITS  # noqa: E402
from qat.blocks import capture_layer0_inputs, fake_quant_linears, make_student, run_block_batched  # noqa: E402
from qat.blockwise import backward_targets, compiled, target_loss  # noqa: E402
from qat.models import decoder_layers, load_teacher  # noqa: E402
from qat.ocs import InputNorms, choose_splits  # noqa: E402
from qat.recipe import TARGET_NAME, Recipe, Target  # noqa: E402

DEFAULT_TARGETS = "w8a16,w4a16,w3a16,w2a16,w2a2"


def parse_targets(text: str) -> list[Target]:
    """``w8a16,w2a2`` -> targets."""
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if not TARGET_NAME.fullmatch(n)]
    if bad:
        raise argparse.ArgumentTypeError(f"targets {bad} are not names like w2a16 or w2a2")
    return [Target(int(n[1]), int(n[3:])) for n in names]


def token_ids(tokenizer, text: Path | None, batch: int, seq: int, seed: int) -> torch.Tensor:
    """``[batch, seq]`` ids: the first ``batch * seq`` tokens of ``text``, else seeded uniform random ids."""
    if text is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, len(tokenizer), (batch, seq), generator=gen)
    with text.open() as f:
        head = f.read(batch * seq * 16)  # enough characters for the tokens wanted, without tokenizing a whole corpus
    ids = tokenizer(head, return_tensors="pt").input_ids.flatten()
    if ids.numel() < batch * seq:
        raise SystemExit(f"{text} has {ids.numel()} tokens, fewer than --batch x --seq = {batch * seq}")
    return ids[: batch * seq].reshape(batch, seq)


def block_data(args: argparse.Namespace, device: torch.device, autocast: bool):
    """``(block, its input, its output, layer kwargs, split indices)`` for block ``--layer``."""
    teacher, tokenizer = load_teacher(args.model, device, torch.bfloat16 if autocast else torch.float32)
    ids = token_ids(tokenizer, args.text, args.batch, args.seq, args.seed)
    store = torch.bfloat16 if autocast else torch.float32
    x, kwargs = capture_layer0_inputs(teacher, ids, args.batch, store)
    layers = decoder_layers(teacher)
    for layer in layers[: args.layer]:
        x = run_block_batched(layer, x, kwargs, args.batch, autocast)
    block = layers[args.layer]
    norms = InputNorms(block)
    y = run_block_batched(block, x, kwargs, args.batch, autocast)
    splits = choose_splits(block, norms.remove(), args.split_ratio, GROUP_SIZE, 1)
    return block, x, y, kwargs, splits


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_side(loss_fn, block, x, y, kwargs, splits, targets: list[Target], args: argparse.Namespace,
             device: torch.device, autocast: bool) -> dict:
    """Warm-up and timed steps of one side (eager or compiled) from a fresh student."""
    torch.manual_seed(args.seed)
    student = make_student(block, splits, min(t.w for t in targets), GROUP_SIZE, MASTER_BITS)
    params = [lin.weight for lin in fake_quant_linears(student).values()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr)
    recipe = Recipe()
    weights = {t: recipe.loss_weight(t) for t in targets}
    inputs = {t: x for t in targets}
    idx = torch.arange(x.shape[0], device=device)
    losses = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses.append(torch.stack(backward_targets(loss_fn, student, targets, weights, inputs, y, idx, kwargs,
                                                   autocast)))
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return {"warmup_s": warmup_s, "seconds": seconds, "target_steps_per_s": args.steps * len(targets) / seconds,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "losses": torch.stack(losses).float().cpu().tolist()}


def loss_differences(a: list[list[float]], b: list[list[float]], steps: int) -> dict:
    """Largest absolute and relative difference of the per-target losses over the first ``steps`` steps."""
    x, y = torch.tensor(a[:steps]), torch.tensor(b[:steps])
    diff = (x - y).abs()
    rel = diff / x.abs().clamp(min=1e-30)
    return {"steps": x.shape[0], "max_abs": diff.max().item(), "max_rel": rel.max().item()}


def dynamo_stats() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (e.g. /root/d/teacher-56m)")
    ap.add_argument("--text", type=Path, help="text file for real tokens (default: random token ids)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layer", type=int, default=0, help="which decoder block")
    ap.add_argument("--split-ratio", type=float, default=0.05, help="fraction of input channels split")
    ap.add_argument("--targets", type=parse_targets, default=parse_targets(DEFAULT_TARGETS))
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side (the compiled side compiles here)")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per side")
    ap.add_argument("--compare-steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager for a quick CPU check)")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: none)")
    ap.add_argument("--out", type=Path, default=Path("qat-step-bench.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    block, x, y, kwargs, splits = block_data(args, device, autocast)
    report = {"model": args.model, "device": torch.cuda.get_device_name(device) if autocast else "cpu",
              "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "layer": args.layer,
              "targets": [t.name for t in args.targets],
              "split_channels": {n: int((i >= 0).sum()) for n, i in splits.items()},
              "warmup": args.warmup, "steps": args.steps, "backend": args.backend, "mode": args.mode}
    report["eager"] = run_side(target_loss, block, x, y, kwargs, splits, args.targets, args, device, autocast)
    print(f"eager:    {report['eager']['target_steps_per_s']:.1f} target-steps/s", flush=True)
    try:
        report["compiled"] = run_side(compiled(target_loss, args.backend, args.mode), block, x, y, kwargs, splits,
                                      args.targets, args, device, autocast)
        report["compiled"].update(dynamo_stats())
        report["speedup"] = report["compiled"]["target_steps_per_s"] / report["eager"]["target_steps_per_s"]
        report["loss_difference"] = loss_differences(report["eager"]["losses"], report["compiled"]["losses"],
                                                     args.compare_steps)
        c = report["compiled"]
        print(f"compiled: {c['target_steps_per_s']:.1f} target-steps/s (warm-up incl. compile {c['warmup_s']:.1f}s, "
              f"{c['graphs']} graphs, {c['graph_breaks']} graph breaks); speedup {report['speedup']:.2f}x")
        print(f"losses, first {report['loss_difference']['steps']} steps: max abs diff "
              f"{report['loss_difference']['max_abs']:.3g}, max rel diff {report['loss_difference']['max_rel']:.3g}")
    except Exception as e:  # noqa: BLE001 - the eager numbers are still worth writing
        report["compiled_error"] = "".join(traceback.format_exception(e))
        print(f"compiled side failed:\n{report['compiled_error']}", file=sys.stderr)
    if autocast:
        for side in ("eager", "compiled"):
            if side in report:
                print(f"peak memory {side}: {report[side]['peak_memory_bytes'] / 2**30:.2f} GiB")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
