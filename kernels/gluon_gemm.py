"""W{b}A16 linear for many tokens on Hopper: a warp-specialized kernel (Gluon) whose dequantization overlaps wgmma.

``y [M, N] = x [M, Kq] @ W_b^T`` per ``128 x BN`` output tile, three groups of warps sharing a ring of
``STAGES`` shared-memory slots (an activation tile and a weight tile each):

* the MMA warps (the default partition, two warpgroups) run ``acc += x_slot @ w_slot^T`` as asynchronous
  wgmma, both operands from shared memory, keep one step in flight and hand each slot back once its wgmma is
  done; ``row_scale`` (and a per-token scale and bias) is applied once per output in the epilogue;
* two producer warpgroups each dequantize half of the weight tile's rows into the slot, exactly as
  :func:`kernels.triton_gemm.dequant_tile`'s single-plane path does (one LOP3 and one FFMA per code, no
  integer-to-float conversion), from packed codes, E4M3 scales and zero points loaded two steps ahead;
* the first producer also copies the activation tiles in with TMA, ahead of its dequantization.

The dense path (dequantize the whole weight, then cuBLAS) pays the dequantized copy's ``2 bytes x N x K`` write
and read on top of the GEMM; here only the codes are read. Experimental: correct, but on the H200 the producers
are its bottleneck (0.50-0.61x bf16 against the dense path's 0.53-0.92x, docs/BENCHMARKS.md session 11), so
only an explicit ``Config("gemm_ws", ...)`` runs it. Single-plane widths (2, 4, 8 bits) and 16-bit activations
on a Hopper GPU; :func:`kernels.triton_ops.launch_linear` sends other calls to the dense path. Gluon has no
interpreter: the kernel is tested on the GPU only.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .packing import plane_widths
from .triton_common import e4m3_scaled, store_scaled
from .triton_gemv import MAGIC_BITS

PRODUCER_WARPS = gl.constexpr(4)
PRODUCER_REGS = gl.constexpr(112)  # per producer thread (the MMA warps get the rest, 144); no spills on the tiles tried
# the TMA tile load: ``async_copy_global_to_shared`` in Triton 3.6 (the H200's), renamed ``async_load`` by 3.9
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.constexpr_function
def _codes_layout(P0, ROWS, BK, num_warps):
    """``[rows, words, slot]`` layout of a ``ROWS x BK`` weight tile's codes: each thread owns up to 4 consecutive
    words of a row (one load of up to 16 bytes; ``32 / P0`` codes per word), as many as leave no thread idle."""
    bkw = BK * P0 // 32
    wpt = max(1, min(bkw, 4, ROWS * bkw // (32 * num_warps)))
    return gl.BlockedLayout([1, wpt, 32 // P0], [32 * wpt // bkw, bkw // wpt, 1], [num_warps, 1, 1], [2, 1, 0])


@gluon.jit
def _load_codes(w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, k0, off_n, N, Kq,
                P0: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """The packed words ``[BN, BK / SL]`` of weight rows ``off_n..`` at K columns ``k0..k0+BK`` and the E4M3 scale
    and zero-point bytes of each word's group (0 past ``N`` and ``Kq``: there the activations are TMA's zero fill)."""
    SL: gl.constexpr = 32 // P0
    LW: gl.constexpr = gl.SliceLayout(2, _codes_layout(P0, BN, BK, gl.num_warps()))
    n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, LW))[:, None]
    w = gl.arange(0, BK // SL, layout=gl.SliceLayout(0, LW))[None, :]
    mask = (n < N) & (k0 + SL * w < Kq)
    words = gl.load(w_ptr + (k0 // SL + w) * stride_ww + n * stride_wn, mask=mask, other=0)
    poffs = (k0 // 32 + w // P0) * stride_sg + n * stride_sn
    return words, gl.load(s_ptr + poffs, mask=mask, other=0), gl.load(z_ptr + poffs, mask=mask, other=0)


@gluon.jit
def _dequant_codes(words, sbytes, zbytes, magic, P0: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr,
                   OP_DTYPE: gl.constexpr):
    """``[BN, BK]`` ``(code - zero_b) * e4m3 / 256`` in ``OP_DTYPE`` from :func:`_load_codes`' words and bytes.

    As :func:`kernels.triton_gemm.dequant_tile`'s single-plane path: a shifted copy of the word, shared by ``8 / P0``
    slots, puts each code at mantissa bit ``p`` with the exponent of ``2^(23 - p)`` ORed in (``v = 2^(23-p) + q``),
    and one FFMA ``v c - (2^(23-p) + zero_b) c = (q - zero_b) c`` is exact in fp32.
    """
    SL: gl.constexpr = 32 // P0
    L3: gl.constexpr = _codes_layout(P0, words.shape[0], words.shape[1] * SL, gl.num_warps())
    c = e4m3_scaled(sbytes)
    zc = (zbytes.to(gl.float32) - ZOFF) * ZMUL * c
    i = gl.arange(0, SL, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
    p = 15 + P0 * (i % (8 // P0))  # mantissa bit of slot i's code; shift p - P0 * i puts it there
    words3 = gl.expand_dims(words.to(gl.uint32, bitcast=True), 2)
    shifted = (words3 << gl.maximum(p - P0 * i, 0).to(gl.uint32)) >> gl.maximum(P0 * i - p, 0).to(gl.uint32)
    e = (magic - (p << 23)).to(gl.uint32, bitcast=True)  # exponent field of 2^(23 - p)
    v = ((shifted & (((1 << P0) - 1) << p).to(gl.uint32)) | e).to(gl.float32, bitcast=True)
    off = ((150 - p) << 23).to(gl.float32, bitcast=True)  # 2^(23 - p)
    b = v * gl.expand_dims(c, 2) - (off * gl.expand_dims(c, 2) + gl.expand_dims(zc, 2))
    return gl.reshape(b.to(OP_DTYPE), [words.shape[0], words.shape[1] * SL])


@gluon.jit
def _mma_partition(x_bufs, w_bufs, x_ready, w_ready, empty, n_steps, BM: gl.constexpr, BN: gl.constexpr):
    """The default partition: one async wgmma per K step, one in flight; a slot is handed back once read."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BN, 16])
    acc = gl.zeros([BM, BN], gl.float32, layout)
    for i in range(n_steps):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(x_ready.index(s), phase)
        mbarrier.wait(w_ready.index(s), phase)
        acc = warpgroup_mma(x_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
    return (warpgroup_mma_wait(num_outstanding=0, deps=(acc, )), )


@gluon.jit
def _load_x(x_desc, x_bufs, x_ready, empty, off_m, step, n_steps):
    """The activation tile of K step ``step`` (if there is one) into its slot by TMA, once the slot is free."""
    if step < n_steps:
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        s = step % STAGES
        mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
        mbarrier.expect(x_ready.index(s), x_desc.block_type.nbytes)
        tma_load(x_desc, [off_m, step * x_desc.block_type.shape[1]], x_ready.index(s), x_bufs.index(s))


@gluon.jit
def _produce_partition(x_desc, w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, N, Kq, magic, x_bufs,
                       w_bufs, x_ready, w_ready, empty, off_m, off_n, n_steps, P0: gl.constexpr, ZOFF: gl.constexpr,
                       ZMUL: gl.constexpr, ROW0: gl.constexpr, ROWS: gl.constexpr):
    """A producer warpgroup: per K step, weight rows ``ROW0..ROW0+ROWS`` of the tile dequantized into its slot.

    The first producer also copies the activation tiles in by TMA, ``STAGES - 2`` steps ahead of its dequantization
    (a copy issued with the step's own dequantization arrived late: the MMA warps waited for the activations). The
    codes are loaded two steps ahead, after the step's fence: ``fence_async_shared`` compiles to ``MEMBAR.ALL.CTA``
    before the proxy fence, which orders (and so waits for) the thread's earlier loads, so codes loaded one step
    ahead, before it, would be waited for there.
    """
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    BK: gl.constexpr = w_bufs.type.shape[2]
    AHEAD: gl.constexpr = STAGES - 2
    if ROW0 == 0:
        for j in gl.static_range(AHEAD):
            _load_x(x_desc, x_bufs, x_ready, empty, off_m, j, n_steps)
    row0 = off_n + ROW0
    words, sbytes, zbytes = _load_codes(w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, 0, row0, N,
                                        Kq, P0, ROWS, BK)
    words1, sbytes1, zbytes1 = _load_codes(w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, BK, row0,
                                           N, Kq, P0, ROWS, BK)
    for i in range(n_steps):
        s = i % STAGES
        if ROW0 != 0:  # (the first producer waited for this slot when it copied the step's activations in)
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        w_bufs.index(s).slice(ROW0, ROWS, 0).store(_dequant_codes(words, sbytes, zbytes, magic, P0, ZOFF, ZMUL,
                                                                  w_bufs.dtype))
        fence_async_shared()
        mbarrier.arrive(w_ready.index(s))
        if ROW0 == 0:
            _load_x(x_desc, x_bufs, x_ready, empty, off_m, i + AHEAD, n_steps)
        words, sbytes, zbytes = words1, sbytes1, zbytes1
        words1, sbytes1, zbytes1 = _load_codes(w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn,
                                               (i + 2) * BK, row0, N, Kq, P0, ROWS, BK)


@gluon.jit
def gemm_ws_kernel(x_desc, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, y_ptr, M, N, Kq, stride_ym, stride_ww,
                   stride_wn, stride_sg, stride_sn, magic, P0: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr,
                   COL_MULT: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, HAS_TS: gl.constexpr,
                   HAS_BIAS: gl.constexpr):
    """``y = x @ W^T`` over a grid of ``cdiv(M, BM) * cdiv(N, BN)`` tiles, the N tiles of one M tile adjacent (the
    programs in flight share a few activation tiles; all weight codes of a layer fit in L2)."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    dtype: gl.constexpr = x_desc.dtype
    num_n = gl.cdiv(N, BN)
    pid = gl.program_id(0)
    off_m = (pid // num_n) * BM
    off_n = (pid % num_n) * BN
    n_steps = gl.cdiv(Kq, BK)

    x_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], x_desc.layout)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], dtype)
    w_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], w_layout)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(s), count=1)
        mbarrier.init(w_ready.index(s), count=2)  # one arrival per producer
        mbarrier.init(empty.index(s), count=1)

    acc, = gl.warp_specialize([
        (_mma_partition, (x_bufs, w_bufs, x_ready, w_ready, empty, n_steps, BM, BN)),
        (_produce_partition, (x_desc, w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, N, Kq, magic,
                              x_bufs, w_bufs, x_ready, w_ready, empty, off_m, off_n, n_steps, P0, ZOFF, ZMUL, 0,
                              BN // 2)),
        (_produce_partition, (x_desc, w_ptr, s_ptr, z_ptr, stride_ww, stride_wn, stride_sg, stride_sn, N, Kq, magic,
                              x_bufs, w_bufs, x_ready, w_ready, empty, off_m, off_n, n_steps, P0, ZOFF, ZMUL, BN // 2,
                              BN // 2)),
    ], [PRODUCER_WARPS, PRODUCER_WARPS], [PRODUCER_REGS, PRODUCER_REGS])

    layout: gl.constexpr = acc.type.layout
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    store_scaled(acc, rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)


MMA_WARPS = 8
MAX_REGS = 128  # 16 warps (8 MMA, 2 x 4 producer) x 32 threads x 128 registers fill the register file (64 K)


def ws_supported(bits: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`launch_gemm_ws` runs this call: single-plane codes (2, 4, 8 bits), 16-bit activations, a
    Hopper GPU (wgmma, TMA, register reallocation)."""
    return (plane_widths(bits) == [bits] and dtype in (torch.bfloat16, torch.float16) and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] == 9)


def launch_gemm_ws(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   col_mult: float, zoff: float, zmul: float, block_m: int, block_n: int, block_k: int, stages: int,
                   y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` (times ``row_scale * col_mult`` per column, ``token_scale`` per row, plus ``bias``) with
    :func:`gemm_ws_kernel` on ``block_m x block_n`` tiles; ``x [M, Kq]`` holds the expanded input (16-bit)."""
    if block_m != 128 or stages < 3 or block_n % 64 or block_k % 64:
        raise ValueError(f"gemm_ws takes block_m 128 (two MMA warpgroups), block_n and block_k multiples of 64 and at "
                         f"least 3 stages, got {block_m}, {block_n}, {block_k}, {stages}")
    m, kq = x.shape
    n = scales.shape[0]
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # TMA reads 16-byte aligned rows
    gl_dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor(x, [m, kq], [x.stride(0), 1], [block_m, block_k],
                              gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl_dtype))
    su8 = scales.view(torch.uint8)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), )
    gemm_ws_kernel[grid](x_desc, packed, su8, zeros, row_scale, token_scale if token_scale is not None else row_scale,
                         bias if bias is not None else row_scale, y, m, n, kq, y.stride(0), packed.stride(1),
                         packed.stride(0), su8.stride(1), su8.stride(0), MAGIC_BITS, P0=bits, ZOFF=zoff, ZMUL=zmul,
                         COL_MULT=col_mult, BN=block_n, STAGES=stages, HAS_TS=token_scale is not None,
                         HAS_BIAS=bias is not None, num_warps=MMA_WARPS, maxnreg=MAX_REGS)
    return y
