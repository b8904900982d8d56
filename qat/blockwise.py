"""Progressive block-wise QAT (after EfficientQAT's Block-AP, with nested grids and outlier splitting).

For each decoder block in order:

1. the teacher block's outputs on the full-precision stream are the targets (and the calibration
   statistics for outlier channel splitting are collected on the way);
2. the student block is the teacher block with every linear a FakeQuantLinear in its split
   layout; the split is checked to leave the full-precision output unchanged;
3. the student is trained stage by stage (e.g. {8} -> {8,4} -> {8,4,3} -> {8,4,3,2}, then W2A2),
   minimising the weighted sum of the per-target MSEs to the targets, AdamW, straight-through
   gradients, a cosine learning rate per stage; with ``lock_bits`` (e.g. 4: {4,3,2} -> {4,3,2,W2A2}
   -> {8}) the low precisions train first and the last stage trains the higher ones with the
   lock_bits codes held (:class:`CellLock`);
4. the block is saved (resume point), its master-code weights kept for export, and the input
   streams advanced: the teacher's output becomes the next full-precision input and, with
   ``block_input = "quantized"``, each target's stream goes through the quantized student at that
   target, so later blocks learn to correct the quantized prefix at their own precision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from kernels.grid import GROUP_SIZE, MASTER_BITS, QuantizedWeight

from .blocks import (capture_layer0_inputs, fake_quant_linears, make_student, run_block, run_block_batched,
                     set_target)
from .models import K_SHARDED, decoder_layers
from .ocs import InputNorms, check_split_identity, choose_splits, no_splits
from .recipe import Recipe, Target
from .rundir import RunDir, log


@dataclass
class BlockwiseResult:
    layers: dict[str, QuantizedWeight]  # HF module name -> master-code weight
    segments: dict[str, int]  # HF module name -> split-region segments
    metrics: list[dict]  # one entry per block
    train_seconds: float  # time spent in this process on blocks (resumed blocks not included)


def _block_prefixes(model: PreTrainedModel) -> list[str]:
    ids = {id(m): n for n, m in model.named_modules()}
    return [ids[id(layer)] for layer in decoder_layers(model)]


def _export_block(student: nn.Module, prefix: str, segments: int) -> tuple[dict, dict]:
    layers, segs = {}, {}
    for name, lin in fake_quant_linears(student).items():
        qw = lin.quantized()
        layers[f"{prefix}.{name}"] = QuantizedWeight(
            qw.codes.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.row_scale.cpu(), qw.in_features,
            qw.group_size, qw.master_bits, qw.split_index.cpu())
        segs[f"{prefix}.{name}"] = segments if name in K_SHARDED else 1
    return layers, segs


def validation_mse(student: nn.Module, inputs: Mapping[Target, torch.Tensor], targets_out: torch.Tensor,
                   rows: slice, targets: list[Target], kwargs: Mapping, batch_size: int, autocast: bool
                   ) -> dict[str, float]:
    """Mean squared error of the student's output per target on the validation rows."""
    out = {}
    for t in targets:
        set_target(student, t)
        got = run_block_batched(student, inputs[t][rows], kwargs, batch_size, autocast)
        out[t.name] = F.mse_loss(got.float(), targets_out[rows].float()).item()
    set_target(student, None)
    return out


class CellLock:
    """Keeps a layer's ``bits``-bit codes fixed while its weight trains: after each step the weight is
    projected into its ``bits``-bit cell of the master grid, and each group's min and max elements are
    held, so the grid (scales, zeros) and the ``bits``-bit codes cannot change; the finer bits can."""

    MARGIN = 0.49  # master steps inside a cell's edge (round-to-nearest keeps the code)

    def __init__(self, lin: nn.Module, bits: int) -> None:
        qw = lin.quantized()
        w = lin.weight.detach()
        n, kq = w.shape
        gs, shift = qw.group_size, qw.master_bits - bits
        self.lin, self.bits = lin, bits
        self.cells = qw.codes >> shift
        step = qw.step().repeat_interleave(gs, 1).to(w.device)
        zero = qw.zeros.float().repeat_interleave(gs, 1).to(w.device)
        first = (self.cells.to(w.device).float() * 2**shift)
        lo = (first - self.MARGIN - zero) * step
        hi = (first + 2**shift - 1 + self.MARGIN - zero) * step
        g = w.reshape(n, -1, gs)
        gmin = g.amin(-1, keepdim=True).expand_as(g).reshape(n, kq)
        gmax = g.amax(-1, keepdim=True).expand_as(g).reshape(n, kq)
        self.lo, self.hi = torch.maximum(lo, gmin), torch.minimum(hi, gmax)
        self.held = (w == gmin) | (w == gmax)
        self.value = w.clone()

    @torch.no_grad()
    def project(self) -> None:
        w = self.lin.weight
        w.copy_(torch.where(self.held, self.value, torch.minimum(torch.maximum(w, self.lo), self.hi)))

    def check(self) -> None:
        """Raise if the locked codes changed (the projection is meant to make that impossible)."""
        qw = self.lin.quantized()
        if not torch.equal(qw.codes >> (qw.master_bits - self.bits), self.cells):
            raise RuntimeError(f"the locked {self.bits}-bit codes changed while training the higher precisions")


LOG_EVERY = 25  # steps between reading the losses back from the device (each read waits for it)


def _flush_losses(pending: dict[str, list[torch.Tensor]], log: dict[str, list], step: int) -> dict[str, str]:
    """Move the pending per-step losses (steps ending at ``step``) into ``log`` as ``[step, loss]`` pairs.

    Returns the latest loss of each target, formatted for the progress bar.
    """
    latest = {}
    for name, losses in pending.items():
        if not losses:
            continue
        values = torch.stack(losses).tolist()
        first = step - len(values)
        log[name].extend([first + i, v] for i, v in enumerate(values))
        latest[name] = f"{values[-1]:.3g}"
        losses.clear()
    return latest


def target_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: Mapping, autocast: bool
                ) -> torch.Tensor:
    """MSE of the student block's output for ``x`` (at the target :func:`set_target` put it at) to ``y``."""
    with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = run_block(student, x, kwargs)
    return F.mse_loss(out.float(), y.float())


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping, bool], torch.Tensor]
# Graphs one compiled target_loss may hold: one per target (bits are Python ints the graph specialises on), the
# split widths symbolic (:func:`dynamic_split_widths`); a layer with no split channels takes another branch,
# so a block with unsplit layers adds a graph per target. The limit leaves room for that and the unforeseen.
RECOMPILE_LIMIT = 64
# Dynamo settings of the compiled training step: parameter shapes may be symbolic (the split weights' Kq).
COMPILE_CONFIG = {"recompile_limit": RECOMPILE_LIMIT, "force_parameter_static_shapes": False}


def compiled(fn: LossFn, backend: str = "inductor", mode: str | None = None) -> LossFn:
    """``fn`` under torch.compile: the per-target forward and its backward become a few fused kernels
    instead of hundreds of small eager ops (the eager step is launch-bound on a GPU)."""
    return torch.compile(fn, backend=backend, mode=mode)


def dynamic_split_widths(student: nn.Module) -> None:
    """Mark every linear's split width symbolic before the compiled step first sees ``student``: each block
    splits a different number of channels, and with static widths every target's graph recompiled at each block
    whose widths changed (19 recompiles in a paper-sized run, doubling those blocks' time)."""
    for lin in fake_quant_linears(student).values():
        lin.mark_split_dynamic()


def backward_targets(loss_fn: LossFn, student: nn.Module, stage: list[Target], weights: Mapping[Target, float],
                     inputs: Mapping[Target, torch.Tensor], targets_out: torch.Tensor, idx: torch.Tensor,
                     kwargs: Mapping, autocast: bool) -> list[torch.Tensor]:
    """Accumulate the gradient of the stage's weighted loss on rows ``idx``, one target at a time (only one
    target's activations live at once); returns each target's loss, on the device (reading it would sync)."""
    losses, y = [], targets_out[idx]
    for t in stage:
        set_target(student, t)
        loss = loss_fn(student, inputs[t][idx], y, kwargs, autocast)
        (weights[t] * loss).backward()
        losses.append(loss.detach())
    return losses


@torch._dynamo.config.patch(**COMPILE_CONFIG)
def train_block(student: nn.Module, inputs: Mapping[Target, torch.Tensor], targets_out: torch.Tensor,
                n_train: int, kwargs: Mapping, recipe: Recipe, block: int, n_blocks: int, autocast: bool
                ) -> dict:
    """Progressive multi-precision training of one student block; returns its loss log.

    With ``recipe.compile`` the per-target loss and its backward run under torch.compile (same math).
    """
    loss_fn = target_loss
    if recipe.compile:
        loss_fn = compiled(target_loss)
        dynamic_split_widths(student)
    weights = {t: recipe.loss_weight(t) for t in recipe.targets()}
    params = [lin.weight for lin in fake_quant_linears(student).values()]
    for p in params:
        p.requires_grad_(True)
    stages = recipe.stages()
    final = recipe.targets()
    val_rows = slice(n_train, targets_out.shape[0])
    has_val = targets_out.shape[0] > n_train
    gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + block)
    bs = recipe.batch_size
    steps_per_epoch = math.ceil(n_train / bs)
    metrics: dict = {"train": {t.name: [] for t in final}, "stage_starts": [], "val": []}
    if has_val:
        metrics["val"].append({"stage": "start", **validation_mse(student, inputs, targets_out, val_rows, final,
                                                                   kwargs, bs, autocast)})
    step = 0
    for s, (stage, epochs) in enumerate(zip(stages, recipe.epochs_of_stages())):
        total = epochs * steps_per_epoch
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1), eta_min=recipe.lr / 20)
        metrics["stage_starts"].append(step)
        lock_bits = recipe.locked_bits(s)
        locks = [CellLock(lin, lock_bits) for lin in fake_quant_linears(student).values()] if lock_bits else []
        names = ",".join(t.name for t in stage)
        pending: dict[str, list[torch.Tensor]] = {t.name: [] for t in stage}
        bar = tqdm(total=total, desc=f"block {block + 1}/{n_blocks} stage {s + 1}/{len(stages)} [{names}]",
                   leave=False, dynamic_ncols=True)
        for _ in range(epochs):
            perm = torch.randperm(n_train, generator=gen).to(targets_out.device)  # one copy (a host sync) per epoch
            for b in range(steps_per_epoch):
                idx = perm[b * bs:(b + 1) * bs]
                opt.zero_grad(set_to_none=True)
                losses = backward_targets(loss_fn, student, stage, weights, inputs, targets_out, idx, kwargs, autocast)
                for t, loss in zip(stage, losses):
                    pending[t.name].append(loss)
                opt.step()
                for lock in locks:
                    lock.project()
                sched.step()
                step += 1
                bar.update()
                if step % LOG_EVERY == 0 or b + 1 == steps_per_epoch:
                    bar.set_postfix(_flush_losses(pending, metrics["train"], step))
        bar.close()
        for lock in locks:
            lock.check()
        if has_val:
            metrics["val"].append({"stage": names, **validation_mse(student, inputs, targets_out, val_rows, final,
                                                                      kwargs, bs, autocast)})
    for p in params:
        p.requires_grad_(False)
    set_target(student, None)
    return metrics


def quantize_without_data(teacher: PreTrainedModel, recipe: Recipe) -> BlockwiseResult:
    """Round-to-nearest of every block, no splitting: needs no calibration data."""
    layers, segs = {}, {}
    split_bits = recipe.split_bits or recipe.lowest_bits
    for prefix, block in zip(_block_prefixes(teacher), decoder_layers(teacher)):
        student = make_student(block, no_splits(), split_bits, GROUP_SIZE, MASTER_BITS)
        ls, ss = _export_block(student, prefix, recipe.split_segments)
        layers.update(ls)
        segs.update(ss)
    return BlockwiseResult(layers, segs, [], 0.0)


def quantize_blocks(teacher: PreTrainedModel, recipe: Recipe, run: RunDir, train_ids: torch.Tensor,
                    val_ids: torch.Tensor, autocast: bool) -> BlockwiseResult:
    """Split and train every block (RTN when the recipe trains nothing); resumes after finished blocks."""
    if not recipe.trained and not recipe.split:
        return quantize_without_data(teacher, recipe)
    store_dtype = torch.bfloat16 if autocast else torch.float32
    bs = recipe.batch_size
    blocks, prefixes = decoder_layers(teacher), _block_prefixes(teacher)
    n_blocks, n_train = len(blocks), train_ids.shape[0]
    split_bits = recipe.split_bits or recipe.lowest_bits
    targets = recipe.targets()
    fp, kwargs = capture_layer0_inputs(teacher, torch.cat([train_ids, val_ids]), bs, store_dtype)
    quantized_inputs = recipe.block_input == "quantized" and recipe.trained  # RTN reads no stream
    streams = {t: fp for t in targets} if quantized_inputs else {}
    done = run.finished_blocks()
    if done:
        log.info(f"resuming: blocks 1..{done} of {n_blocks} are finished in {run.path}, replaying them")
    result = BlockwiseResult({}, {}, [], 0.0)
    for i, (block, prefix) in enumerate(zip(blocks, prefixes)):
        start = time.perf_counter()
        if i < done:
            state = run.load_block(i)
            student = make_student(block, state["splits"], split_bits, GROUP_SIZE, MASTER_BITS)
            student.load_state_dict(state["student"])
            metrics = state["metrics"]
            targets_out = run_block_batched(block, fp, kwargs, bs, autocast)
        else:
            norms = InputNorms(block)  # statistics from the training rows only
            targets_out = torch.empty_like(fp)
            run_block_batched(block, fp[:n_train], kwargs, bs, autocast, out=targets_out[:n_train])
            channel_norms = norms.remove()
            run_block_batched(block, fp[n_train:], kwargs, bs, autocast, out=targets_out[n_train:])
            ratio = recipe.split_ratio(i, n_blocks)
            splits = choose_splits(block, channel_norms, ratio, GROUP_SIZE, recipe.split_segments) \
                if ratio > 0 else no_splits()
            student = make_student(block, splits, split_bits, GROUP_SIZE, MASTER_BITS)
            err = check_split_identity(block, student, fp[:bs], kwargs, autocast)
            n_split = {name: int((idx >= 0).sum()) for name, idx in splits.items()}
            metrics = {"block": i, "split_ratio": ratio, "split_channels": n_split, "split_identity_error": err}
            if quantized_inputs:
                fp = None  # not read again before the next block (the streams feed training): frees its memory
            if recipe.trained:
                inputs = streams if quantized_inputs else {t: fp for t in targets}
                metrics.update(train_block(student, inputs, targets_out, n_train, kwargs, recipe, i, n_blocks,
                                           autocast))
            metrics["seconds"] = time.perf_counter() - start
            run.save_block(i, {"splits": splits, "student": student.state_dict(), "metrics": metrics})
            result.train_seconds += metrics["seconds"]
            val = metrics.get("val")
            log.info(f"block {i + 1}/{n_blocks}: split {sum(n_split.values())} channels (ratio {ratio:.3f}), "
                     f"{metrics['seconds']:.1f}s" + (f", val MSE {val[0]} -> {val[-1]}" if val else ""))
        result.metrics.append(metrics)
        run.write_curves(result.metrics)
        layers, segs = _export_block(student, prefix, recipe.split_segments)
        result.layers.update(layers)
        result.segments.update(segs)
        if i + 1 < n_blocks:
            for t in streams:
                set_target(student, t)
                shared = any(streams[u] is streams[t] for u in streams if u != t)  # block 1: all are the fp rows
                streams[t] = run_block_batched(student, streams[t], kwargs, bs, autocast,
                                               out=None if shared else streams[t])
            fp = targets_out
        del student
    return result
