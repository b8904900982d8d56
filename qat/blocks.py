"""Decoder blocks as standalone functions of their input: capture inputs, run a block, build its student.

Block-wise training needs each decoder layer's input hidden states and the extra arguments the
model passes to every layer (rotary position embeddings, mask, position ids). They are captured
once by stopping the model's forward at layer 0; the extra arguments are the same for every
layer and, computed for one sequence, broadcast over a batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from kernels.fakequant import FakeQuantLinear
from kernels.split import split_step

from .models import LINEAR_NAMES, decoder_layers
from .recipe import A16, Target


class _StopForward(Exception):
    pass


def capture_layer0_inputs(model: PreTrainedModel, ids: torch.Tensor, batch_size: int,
                          store_dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """``(hidden [n, T, d], layer kwargs)``: what the model feeds its first decoder layer for ``ids``."""
    layer0 = decoder_layers(model)[0]
    device = next(model.parameters()).device
    hidden, captured = [], {}

    def hook(_module, args, kwargs):
        hidden.append(args[0].detach().to(store_dtype))
        if not captured:
            captured.update(kwargs)
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                try:
                    model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured.items() if k not in ("past_key_values", "use_cache")}
    return torch.cat(hidden), kwargs


def run_block(block: nn.Module, x: torch.Tensor, kwargs: Mapping) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_block_batched(block: nn.Module, x: torch.Tensor, kwargs: Mapping, batch_size: int,
                      autocast: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """The block applied to every row of ``x`` (no gradient), in ``x``'s dtype.

    Written into ``out`` when given (no second copy of the rows in memory): ``out`` may be ``x`` itself,
    since each batch of rows is read before it is overwritten and no row depends on another.
    """
    out = torch.empty_like(x) if out is None else out
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, x.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            out[rows] = run_block(block, x[rows], kwargs).to(out.dtype)
    return out


def make_student(teacher_block: nn.Module, split_indices: Mapping[str, torch.Tensor], split_bits: int,
                 group_size: int, master_bits: int) -> nn.Module:
    """A copy of the block with each linear a :class:`FakeQuantLinear` in its split layout.

    Split columns use the ``split_bits`` step of the unsplit layer's grid
    (:func:`kernels.split.split_step`), so the split is exact for that precision's rounding.
    Only the linear weights are trainable.
    """
    student = copy.deepcopy(teacher_block).float()
    for p in student.parameters():
        p.requires_grad_(False)
    for name in LINEAR_NAMES:
        lin = teacher_block.get_submodule(name)
        w = lin.weight.detach().float()
        step = split_step(w, split_bits, group_size, master_bits)
        fq = FakeQuantLinear(lin, split_indices[name], step, group_size, master_bits)
        if fq.bias is not None:
            fq.bias.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent), child, fq)
    return student


def fake_quant_linears(block: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: block.get_submodule(name) for name in LINEAR_NAMES}


def set_target(block: nn.Module, target: Target | None) -> None:
    """Put every linear of a student block at ``target`` (None: full precision)."""
    for lin in fake_quant_linears(block).values():
        lin.bits = None if target is None else target.w
        lin.act_bits = None if target is None or target.a == A16 else target.a
