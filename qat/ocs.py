"""Rounding-aware outlier channel splitting: which input channels to split, and a check that it is exact.

Channel metric (per input the layers share): ``||X_i||_2 * max_j |W_ij|`` over the calibration
activations X and every layer reading that input, so q/k/v share one split set and gate/up
another. The split itself (weight columns, step, layout) is :mod:`kernels.split`'s.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from kernels.split import split_region_index

from .blocks import run_block
from .models import K_SHARDED, SHARED_INPUT_GROUPS


class InputNorms:
    """Accumulates ``sum x_i^2`` per input channel of each shared-input group of a block, via forward hooks."""

    def __init__(self, block: nn.Module) -> None:
        self.sq: dict[str, torch.Tensor] = {}
        self._handles = [block.get_submodule(group[0]).register_forward_pre_hook(self._hook(group[0]))
                         for group in SHARED_INPUT_GROUPS]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().float()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            self.sq[name] = self.sq[name] + s if name in self.sq else s
        return hook

    def remove(self) -> dict[str, torch.Tensor]:
        """Stop collecting; returns ``||X_i||_2`` per group (keyed by the group's first layer)."""
        for h in self._handles:
            h.remove()
        return {k: v.sqrt() for k, v in self.sq.items()}


def channel_metric(block: nn.Module, group: tuple[str, ...], norms: torch.Tensor) -> torch.Tensor:
    """``||X_i||_2 * max_j |W_ij|`` for each input channel i, the max over every layer of the group."""
    wmax = torch.stack([block.get_submodule(n).weight.detach().abs().amax(0).float() for n in group]).amax(0)
    return norms.to(wmax.device) * wmax


def choose_splits(block: nn.Module, norms: Mapping[str, torch.Tensor], ratio: float, group_size: int,
                  segments: int) -> dict[str, torch.Tensor]:
    """Split index per linear: the top ``round(ratio * K)`` channels of each shared input by the metric."""
    out: dict[str, torch.Tensor] = {}
    for group in SHARED_INPUT_GROUPS:
        k = block.get_submodule(group[0]).in_features
        n = int(round(ratio * k))
        chans = torch.empty(0, dtype=torch.long)
        if n:
            chans = channel_metric(block, group, norms[group[0]]).topk(n).indices.cpu()
        segs = segments if group[0] in K_SHARDED else 1
        try:
            index = split_region_index(chans, k, group_size, segs)
        except ValueError as e:
            raise ValueError(f"{group[0]}: {e}; lower --split-segments") from None
        out.update({name: index for name in group})
    return out


def no_splits() -> dict[str, torch.Tensor]:
    return {name: torch.empty(0, dtype=torch.int32) for group in SHARED_INPUT_GROUPS for name in group}


def check_split_identity(teacher: nn.Module, student: nn.Module, x: torch.Tensor, kwargs: Mapping,
                         autocast: bool) -> float:
    """The split student at full precision must reproduce the teacher block; returns the relative error.

    Raises RuntimeError when the error exceeds float tolerance (1e-4 in fp32, 3e-2 under bf16),
    which would mean the split layout is wrong.
    """
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        ref = run_block(teacher, x, kwargs).float()
        got = run_block(student, x, kwargs).float()
    err = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
    tol = 3e-2 if autocast else 1e-4
    if not err <= tol:
        raise RuntimeError(f"outlier channel splitting changed the block's full-precision output by {err:.3g} "
                           f"(relative; tolerance {tol}): the split layout is inconsistent")
    return err
