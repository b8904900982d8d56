"""Programmatic dependent launch (PDL): a decode kernel's programs launch while the kernel before it finishes.

Why: a decode-sized linear runs for 4-25 µs, and a launch after the previous kernel has drained costs about a
microsecond of each (the grid's launch and its programs' start behind the previous grid's tail). Launched with PDL
(Hopper on; Triton's ``launch_pdl``), a kernel's programs may become resident once every program of the kernel before
it has called :func:`launch_dependents` (or exited); they wait in :func:`wait_prior_grid` until that kernel has
finished and its writes are visible.

The contract of every kernel launched with PDL here: :func:`wait_prior_grid` is its first statement (nothing is
read or written before the previous kernel has finished) and :func:`launch_dependents` comes after its main loop,
before the epilogue, so the next kernel's programs become resident only during this one's last stores (triggered at
the programs' start instead, the next kernel's programs sat beside this one's for all of it: slower on more cells of
the H200 A/B, docs/BENCHMARKS.md session 20). The activation quantizer triggers at once: the linear after it then
launches while it runs. The instructions are no-ops in a launch without PDL, and a kernel launched with PDL after one
that never triggers starts when that one has finished, as without PDL.

``BITBYBIT_PDL=0`` in the environment (or :data:`ENABLED` = False at run time) launches without it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .device import compute_capability

ENABLED = os.environ.get("BITBYBIT_PDL", "1") != "0"


def pdl_for(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device launch with PDL: :data:`ENABLED` and a CUDA GPU of compute capability 9 or
    more (never under Triton's interpreter, which runs on CPU tensors)."""
    return ENABLED and x.is_cuda and compute_capability(x.device)[0] >= 9


@gluon.jit
def wait_prior_grid():
    """Block until the kernel this launch depends on has finished and its writes are visible (``griddepcontrol.wait``)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def launch_dependents():
    """Let the next kernel's programs launch once every program of this one has called this (or exited)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@triton.jit
def wait_prior_grid_if(PDL: tl.constexpr):
    """:func:`wait_prior_grid` in a Triton kernel, with ``PDL`` (a constexpr: the interpreter, which has no inline
    assembly, never meets the instruction)."""
    if PDL:
        gdc_wait()


@triton.jit
def release_next_grid(PDL: tl.constexpr):
    """:func:`launch_dependents` in a Triton kernel, with ``PDL``."""
    if PDL:
        gdc_launch_dependents()
