"""Activation quantization of many tokens with each row staged in shared memory (Gluon, ``cp.async``).

Why: the Triton quantizer (:mod:`kernels.triton_actquant`) holds a row in registers only when the row is a power
of two of groups. Other rows (K = 11008, 14336, 28672) take two passes over chunks: the first waits one memory
latency per chunk, and the second reads the row again from L2 (or from HBM once the rows of the programs in flight
outgrow L2). That reaches 47-53 % of copy bandwidth at M = 1024 (docs/BENCHMARKS.md). Here a program starts copying
its whole row into shared memory at once (``cp.async``, one commit group per chunk). It takes each chunk's group
ranges as the chunk lands, then the token scale, then quantizes from shared memory. The row is read from HBM once,
and all of it is in flight from the start.

Per program: one token, its row cut into chunks of ``GC`` groups (``[GC, 32]`` columns). The copies put 8
consecutive columns per thread (one 16-byte ``cp.async``, 4 threads per group, a warp's copy 512 contiguous bytes);
the arithmetic takes ``SPT`` consecutive columns per thread (16 in the launches the rule picks: two threads per
group, each computing its group's quotients and E4M3 rounding once for 16 columns). Shared memory swizzles the
16-byte pieces of each 64-byte group row so that both read without bank conflicts. The split slots
(``x[split_index]``, a gather) are plain loads into chunks after the row's. The arithmetic is the Triton kernel's
own helpers (:func:`~kernels.triton_actquant.group_range`, :func:`~kernels.triton_actquant.token_scale`,
:func:`~kernels.triton_actquant.quantize_groups`), so the outputs are bit-identical to it and to the reference.

Scope (:func:`staged_rows_supported`): 16-bit activations whose row stride and base are multiples of 16 elements
and 16 bytes (the 16-byte copies), rows that fit in shared memory, sm_80 or newer. Gluon has no interpreter: tested
on the GPU only.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .device import compute_capability
from .gluon_gemm import SMEM_BYTES
from .grid import GROUP_SIZE, padded_width
from .pdl import launch_dependents, wait_prior_grid
from .triton_actquant import group_range, quantize_groups, token_scale
from .triton_common import load_act

# global -> shared ``cp.async``: ``async_copy_global_to_shared`` in Triton 3.6, ``async_load`` by 3.9
async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
GROUP = gl.constexpr(GROUP_SIZE)


@gluon.jit
def actquant_rows_kernel(x_ptr, split_ptr, xq_ptr, ts_ptr, codes_ptr, scales_ptr, zeros_ptr, M, K, Kp, Kq,
                         stride_xm, stride_qm, QMAX: gl.constexpr, XQ_MUL: gl.constexpr, GC: gl.constexpr,
                         SPT: gl.constexpr, NX: gl.constexpr, NS: gl.constexpr, WRITE_CODES: gl.constexpr,
                         DEQUANT: gl.constexpr, PDL: gl.constexpr):
    """Quantize token ``program_id(0)``: its ``NX`` chunks of ``GC`` groups of ``x`` (copied to shared memory at
    once) and ``NS`` chunks of split slots, as :func:`kernels.triton_actquant.actquant_kernel` does; the arithmetic
    on ``SPT`` consecutive columns per thread."""
    W: gl.constexpr = gl.num_warps()
    LX: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [W, 1], [1, 0])  # the copies: 16 bytes per thread
    LC: gl.constexpr = gl.BlockedLayout([1, SPT], [SPT, GROUP // SPT], [W, 1], [1, 0])  # the arithmetic
    LG: gl.constexpr = gl.SliceLayout(1, LC)
    CH: gl.constexpr = GC * GROUP
    NC: gl.constexpr = NX + NS
    if PDL:
        launch_dependents()  # the linear that reads xq may launch now (it waits for this kernel to finish)
        wait_prior_grid()
    m = gl.program_id(0)
    G = Kq // GROUP
    # 16-byte pieces of a 64-byte group row swizzled by (row // 2) % 4: a warp reading SPT columns per thread is
    # free of bank conflicts. The layouts are those of one chunk (what ``index`` gives)
    rows = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [NC, GC, GROUP],
                                     gl.SwizzledSharedLayout(8, 2, 4, [1, 0]))
    ranges = gl.allocate_shared_memory(gl.float32, [2 * NC, GC], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    col_x = (gl.arange(0, GC, layout=gl.SliceLayout(1, LX))[:, None] * GROUP
             + gl.arange(0, GROUP, layout=gl.SliceLayout(0, LX))[None, :])
    grp = gl.arange(0, GC, layout=LG)
    col = grp[:, None] * GROUP + gl.arange(0, GROUP, layout=gl.SliceLayout(0, LC))[None, :]
    for c in gl.static_range(NX):
        async_load(rows.index(c), x_ptr + m * stride_xm + c * CH + col_x, mask=c * CH + col_x < K)
        async_copy.commit_group()
    rmax = gl.zeros([GC], gl.float32, layout=LG)
    for c in gl.static_range(NC):
        if c < NX:
            async_copy.wait_group(NX - 1 - c)
            x = rows.index(c).load(LC)
        else:
            x = load_act(x_ptr, stride_xm, m, Kp + (c - NX) * CH + col, M, K, Kp, Kq, split_ptr, True)
            rows.index(c).store(x)
        lo, raw = group_range(x, QMAX)
        ranges.index(2 * c).store(lo)
        ranges.index(2 * c + 1).store(raw)
        rmax = gl.maximum(rmax, raw)
    ts = token_scale(rmax, ts_ptr, m, XQ_MUL)
    for c in gl.static_range(NC):
        if c < NX:
            k = c * CH + col
            g = c * GC + grp
            kmask = k < Kp
            gmask = g < Kp // GROUP
        else:
            k = Kp + (c - NX) * CH + col
            g = Kp // GROUP + (c - NX) * GC + grp
            kmask = k < Kq
            gmask = g < G
        quantize_groups(rows.index(c).load(LC).to(gl.float32), k, g, ranges.index(2 * c).load(LG),
                        ranges.index(2 * c + 1).load(LG), ts, m, kmask, gmask, G, xq_ptr, codes_ptr, scales_ptr,
                        zeros_ptr, stride_qm, QMAX, XQ_MUL, WRITE_CODES, DEQUANT)


def staged_chunks(kp: int, splits: int, groups: int) -> int:
    """Chunks of ``groups`` groups that rows of ``kp`` columns and ``splits`` split slots take (the row's, then the
    split slots')."""
    return triton.cdiv(kp, groups * GROUP_SIZE) + triton.cdiv(splits, groups * GROUP_SIZE)


def staged_rows_smem_bytes(kp: int, splits: int, groups: int, itemsize: int) -> int:
    """Shared memory of :func:`actquant_rows_kernel` for rows of ``kp`` columns and ``splits`` split slots in chunks
    of ``groups`` groups: the staged chunks and two fp32 ranges per group."""
    return staged_chunks(kp, splits, groups) * groups * (GROUP_SIZE * itemsize + 8)


def staged_rows_supported(x: torch.Tensor, splits: int, groups: int) -> bool:
    """Whether :func:`launch_actquant_rows` takes ``x [M, K]`` with ``splits`` split slots in chunks of ``groups``."""
    kp = padded_width(x.shape[1], GROUP_SIZE)
    return (x.is_cuda and compute_capability(x.device)[0] >= 8 and x.element_size() == 2 and x.stride(1) == 1
            and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0
            and staged_rows_smem_bytes(kp, splits, groups, 2) <= SMEM_BYTES)


def launch_actquant_rows(x: torch.Tensor, split_index: torch.Tensor | None, xq: torch.Tensor, ts: torch.Tensor,
                         codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, act_bits: int, groups: int,
                         columns: int, warps: int, write_codes: bool, dequant: bool, pdl: bool) -> None:
    """Quantize ``x [M, K]`` into the outputs ``launch_actquant`` allocated (``xq [M, Kq]``, ``ts [M]``, and with
    ``write_codes`` the codes, scale and zero bytes) with :func:`actquant_rows_kernel`: chunks of ``groups`` groups
    (a power of two, at least ``columns * warps``), ``columns`` (8, 16 or 32) consecutive columns per thread,
    ``warps`` warps."""
    m, k = x.shape
    kq = xq.shape[1]
    kp = padded_width(k, GROUP_SIZE)
    splits = kq - kp
    if (groups & (groups - 1) or columns not in (8, 16, 32) or groups < columns * warps
            or not staged_rows_supported(x, splits, groups)):
        raise ValueError(f"staged activation quantization takes 8, 16 or 32 columns per thread, chunks of a power of "
                         f"two of groups, at least the columns per thread times the warps, on a CUDA GPU of sm_80 or "
                         f"newer, 16-bit rows with a stride and base that are multiples of 16 elements and 16 bytes, "
                         f"and rows that fit in {SMEM_BYTES} bytes of shared memory; got {columns} columns, {groups} "
                         f"groups, {warps} warps, {x.dtype} of stride {x.stride()} on {x.device} and "
                         f"{staged_rows_smem_bytes(kp, splits, groups, x.element_size())} bytes")
    chunk = groups * GROUP_SIZE
    actquant_rows_kernel[(m,)](x, split_index if splits else x, xq, ts, codes, scales, zeros, m, k, kp, kq,
                               x.stride(0), xq.stride(0), QMAX=2**act_bits - 1, XQ_MUL=2.0**-act_bits, GC=groups,
                               SPT=columns, NX=triton.cdiv(kp, chunk), NS=triton.cdiv(splits, chunk),
                               WRITE_CODES=write_codes, DEQUANT=dequant, PDL=pdl, num_warps=warps, launch_pdl=pdl)
