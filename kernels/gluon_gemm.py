"""W{b}A16 linear for many tokens on Hopper: a warp-specialized kernel (Gluon) whose dequantization overlaps wgmma.

``y [M, N] = x [M, Kq] @ W_b^T`` per ``BM x BN`` output tile (``BM`` 128 or 256 tokens), two groups of warps
sharing a ring of ``STAGES`` shared-memory slots (an activation tile and a weight tile each):

* the MMA warps (the default partition, two warpgroups) run ``acc += x_slot @ w_slot^T`` as asynchronous
  wgmma, both operands from shared memory, keep one step in flight and hand each slot back once its wgmma is
  done; ``row_scale`` (and a per-token scale and bias) is applied once per output in the epilogue;
* one producer warpgroup copies each step's activations, packed codes and scale bytes into its slot with TMA,
  ahead of its work, and writes the step's weight tile as ``q * c`` (code times the group's E4M3 scale / 256)
  in 16-bit pairs: one LOP3 puts two codes of a word into a pair ``(M + q, M + q')`` (``M`` = 128 in bf16,
  1024 in fp16), one ``fma.{bf16,f16}x2`` by ``(c, c)`` minus ``(M c, M c)`` leaves ``(q c, q' c)`` exactly,
  and one PRMT per pair restores the order of K.

The zero points are not in the weight tile: ``sum_k x_k (q_k - zero_g) c_g = sum_k x_k q_k c_g - sum_g
(x-mean_g) (32 c_g zero_g)``, so the kernel walks ``G / BK`` more steps after the ``Kq / BK`` of the codes, whose
activations are the per-token group means of ``x`` (:func:`group_means`, one pass over ``x``) and whose weights
are ``-32 c zero_b`` (:func:`zero_terms`, one pass over the scale and zero bytes), both copied in by TMA with no
producer work: the zero points cost ``1/32`` more MMA instead of a subtraction per code. ``q c`` is exact in
16 bits for 2- and 4-bit codes; the means and ``32 c zero_b`` are rounded once to the activation dtype.

The dense path (dequantize the whole weight, then cuBLAS) pays the dequantized copy's ``2 bytes x N x K`` write
and read on top of the GEMM; here only the codes are read. The tuned table picks it at 129..256 tokens on
the shapes where it measured fastest (docs/BENCHMARKS.md, session 12). 2- and 4-bit K-major codes and 16-bit
activations on a Hopper GPU; :func:`kernels.triton_ops.launch_linear` sends other calls to the dense path. Gluon has
no interpreter: the kernel is tested on the GPU only (its two operand kernels, :func:`group_means` and
:func:`zero_terms`, are plain Triton and also run under the interpreter).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .device import compute_capability
from .grid import GROUP_SIZE
from .triton_common import e4m3_scaled, store_scaled
from .triton_pairs import BF16_ONE, F16_ONE, high_halves, low_halves, pair_fma, splat


GROUP = tl.constexpr(GROUP_SIZE)
PRODUCER_WARPS = gl.constexpr(4)
PRODUCER_REGS = gl.constexpr(152)  # per producer thread; the MMA warps keep the launch's 168
# the TMA tile load: ``async_copy_global_to_shared`` in Triton 3.6 (the H200's), renamed ``async_load`` by 3.9
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# a shared-memory view as another dtype, shape or layout: ``_reinterpret`` in Triton 3.6, ``reinterpret`` by 3.9
reinterpret = getattr(gl.shared_memory_descriptor, "reinterpret", None) or gl.shared_memory_descriptor._reinterpret
# a barrier of the calling warps (the CTA or a warp-specialized partition): ``thread_barrier`` (3.6), ``barrier`` (3.9)
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.constexpr_function
def _word_layout(P0, BK, num_warps):
    """``[rows, groups, words, pairs]`` layout of a producer's weight tile at one K step: a thread owns one row's
    ``BK / 32`` groups of ``P0`` words of ``16 / P0`` code pairs, so it writes whole 16-byte runs of one row and a
    warp's 32 rows cover every bank phase of the swizzled slot."""
    return gl.BlockedLayout([1, BK // 32, P0, 16 // P0], [32, 1, 1, 1], [num_warps, 1, 1, 1], [3, 2, 1, 0])


@gluon.jit
def _read_codes(code_slot, scale_slot):
    """The packed words ``[BN, BK / 32, P0]`` and scale bytes ``[BN, BK / 32]`` of a K step from the slot TMA filled
    (``[words, rows]`` and ``[groups, rows]``, K-major as in global memory): a thread reads one row's, the lanes of
    a warp consecutive rows (no bank conflicts); the transposes are register renames."""
    BKW: gl.constexpr = code_slot.type.shape[0]
    GS: gl.constexpr = scale_slot.type.shape[0]
    BN: gl.constexpr = scale_slot.type.shape[1]
    LW: gl.constexpr = gl.SliceLayout(3, _word_layout(BKW // GS, GS * 32, gl.num_warps()))
    words = code_slot.load(gl.BlockedLayout([BKW, 1], [1, 32], [1, gl.num_warps()], [0, 1]))
    words = gl.convert_layout(gl.reshape(gl.permute(words, (1, 0)), [BN, GS, BKW // GS]), LW)
    sbytes = scale_slot.load(gl.BlockedLayout([GS, 1], [1, 32], [1, gl.num_warps()], [0, 1]))
    return words, gl.convert_layout(gl.permute(sbytes, (1, 0)), gl.SliceLayout(2, LW))


@gluon.jit
def _scaled_codes(words, sbytes, pair_one, BF16: gl.constexpr):
    """``[ROWS, BK / 2]`` 16-bit pairs (uint32 containers, K order) of ``q * e4m3 / 256`` from :func:`_read_codes`;
    ``pair_one`` is the pair ``(M, M)``, a run-time argument so that the mask and the OR are one LOP3.

    Pair ``j`` of a word (``P0``-bit codes) holds codes ``j`` and ``j + 16 / P0``, which sit 16 bits apart: one LOP3
    of the shifted word with the pair ``(M, M)`` makes ``(M + q_j, M + q_j')`` and one pair FMA
    ``(c, c) x - (M c, M c)`` leaves ``(q_j c, q_j' c)`` exactly; PRMTs of pairs ``2i`` and ``2i + 1`` then give
    codes ``(2i, 2i + 1)``."""
    ROWS: gl.constexpr = words.shape[0]
    GS: gl.constexpr = words.shape[1]
    P0: gl.constexpr = words.shape[2]
    NP: gl.constexpr = 16 // P0
    L4: gl.constexpr = _word_layout(P0, GS * 32, gl.num_warps())
    j = gl.arange(0, NP, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))[None, None, None, :]
    u = gl.expand_dims(words.to(gl.uint32, bitcast=True), 3)
    raw = ((u >> (P0 * j).to(gl.uint32)) & (((1 << P0) - 1) * 0x10001)) | pair_one
    c = e4m3_scaled(sbytes)
    scale = gl.expand_dims(gl.expand_dims(splat(c, BF16, True), 2), 3)
    shift = gl.expand_dims(gl.expand_dims(splat(c * (-128.0 if BF16 else -1024.0), BF16, True), 2), 3)
    even, odd = gl.split(gl.reshape(pair_fma(raw, scale, shift, BF16, True), [ROWS, GS, P0, NP // 2, 2]))
    pairs = gl.join(low_halves(even, odd, True), high_halves(even, odd, True))  # [.., i, 0]: codes 2i, 2i + 1
    return gl.reshape(gl.permute(pairs, [0, 1, 2, 4, 3]), [ROWS, GS * P0 * NP])


@gluon.jit
def _mma_partition(x_bufs, w_bufs, ready, w_ready, empty, n_codes, n_steps, BM: gl.constexpr, BN: gl.constexpr):
    """The default partition: one async wgmma per K step, one in flight; a slot is handed back once read. A code
    step waits for the producer's weight tile, a group-mean step only for its TMA copies."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BN, 16])
    acc = gl.zeros([BM, BN], gl.float32, layout)
    for i in range(n_steps):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(ready.index(s), phase)
        mbarrier.wait(w_ready.index(s), phase, pred=i < n_codes)
        acc = warpgroup_mma(x_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
    return (warpgroup_mma_wait(num_outstanding=0, deps=(acc, )), )


@gluon.jit
def _load_step(x_desc, xg_desc, w_desc, s_desc, zt_desc, x_bufs, code_bufs, scale_bufs, w_bufs, ready, empty, off_m,
               off_n, step, n_codes, n_steps):
    """The TMA copies of K step ``step`` (if there is one) into its slot, once the slot is free: activations, codes and
    scale bytes at a code step; after them the group means and the zero-point terms (the weight tile itself)."""
    if step < n_steps:
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        s = step % STAGES
        mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
        if step < n_codes:
            mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + w_desc.block_type.nbytes
                            + s_desc.block_type.nbytes)
            tma_load(x_desc, [off_m, step * BK], ready.index(s), x_bufs.index(s))
            tma_load(w_desc, [step * w_desc.block_type.shape[0], off_n], ready.index(s), code_bufs.index(s))
            tma_load(s_desc, [step * s_desc.block_type.shape[0], off_n], ready.index(s), scale_bufs.index(s))
        else:
            mbarrier.expect(ready.index(s), xg_desc.block_type.nbytes + zt_desc.block_type.nbytes)
            tma_load(xg_desc, [off_m, (step - n_codes) * BK], ready.index(s), x_bufs.index(s))
            tma_load(zt_desc, [off_n, (step - n_codes) * BK], ready.index(s), w_bufs.index(s))


@gluon.jit
def _produce_partition(x_desc, xg_desc, w_desc, s_desc, zt_desc, pair_one, x_bufs, code_bufs, scale_bufs, w_bufs,
                       ready, w_ready, empty, off_m, off_n, n_codes, n_steps):
    """The producer warpgroup: the TMA copies of every step, ``STAGES - 2`` steps ahead, and the weight tile of every
    code step.

    Everything it reads from global memory comes by TMA into the slot: ``fence_async_shared`` compiles to
    ``MEMBAR.ALL.CTA`` before the proxy fence, which waits for the thread's loads in flight, so codes prefetched into
    registers would put a global-memory latency into every step.
    """
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    BN: gl.constexpr = w_bufs.type.shape[1]
    BK: gl.constexpr = w_bufs.type.shape[2]
    BF16: gl.constexpr = w_bufs.dtype == gl.bfloat16
    pair_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=w_bufs.type.layout.swizzle_byte_width,
                                                     element_bitwidth=32, rank=2)
    for j in gl.static_range(STAGES - 2):
        _load_step(x_desc, xg_desc, w_desc, s_desc, zt_desc, x_bufs, code_bufs, scale_bufs, w_bufs, ready, empty,
                   off_m, off_n, j, n_codes, n_steps)
    for i in range(n_codes):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        words, sbytes = _read_codes(code_bufs.index(s), scale_bufs.index(s))
        pairs = reinterpret(w_bufs.index(s), gl.uint32, [BN, BK // 2], pair_layout)
        pairs.store(_scaled_codes(words, sbytes, pair_one, BF16))
        fence_async_shared()
        mbarrier.arrive(w_ready.index(s))
        _load_step(x_desc, xg_desc, w_desc, s_desc, zt_desc, x_bufs, code_bufs, scale_bufs, w_bufs, ready, empty,
                   off_m, off_n, i + STAGES - 2, n_codes, n_steps)
    for j in range(n_codes + STAGES - 2, n_steps):
        _load_step(x_desc, xg_desc, w_desc, s_desc, zt_desc, x_bufs, code_bufs, scale_bufs, w_bufs, ready, empty,
                   off_m, off_n, j, n_codes, n_steps)


@gluon.jit
def gemm_ws_kernel(x_desc, xg_desc, w_desc, s_desc, zt_desc, rs_ptr, ts_ptr, bias_ptr, y_ptr, M, N, Kq, stride_ym,
                   pair_one, COL_MULT: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                   HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y = x @ W^T`` over a grid of ``cdiv(M, BM) * cdiv(N, BN)`` tiles, the N tiles of one M tile adjacent (the
    programs in flight share a few activation tiles; all weight codes of a layer fit in L2)."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    dtype: gl.constexpr = x_desc.dtype
    num_n = gl.cdiv(N, BN)
    pid = gl.program_id(0)
    off_m = (pid // num_n) * BM
    off_n = (pid % num_n) * BN
    n_codes = gl.cdiv(Kq, BK)
    n_steps = n_codes + gl.cdiv(Kq // 32, BK)

    x_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], x_desc.layout)
    w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], dtype)
    w_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], w_layout)
    code_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    scale_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(w_ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)

    acc, = gl.warp_specialize([
        (_mma_partition, (x_bufs, w_bufs, ready, w_ready, empty, n_codes, n_steps, BM, BN)),
        (_produce_partition, (x_desc, xg_desc, w_desc, s_desc, zt_desc, pair_one, x_bufs, code_bufs, scale_bufs, w_bufs,
                              ready, w_ready, empty, off_m, off_n, n_codes, n_steps)),
    ], [PRODUCER_WARPS], [PRODUCER_REGS])

    layout: gl.constexpr = acc.type.layout
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    store_scaled(acc, rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)


MMA_WARPS = 8
WARPS = MMA_WARPS + PRODUCER_WARPS.value  # what a Config("gemm_ws") gives as num_warps
MAX_REGS = 168  # 12 warps x 32 threads x 168 registers fill the register file (64 K)
SMEM_BYTES = 227 * 1024  # per CTA on the H100 / H200


def ws_supported(bits: int, dtype: torch.dtype, packed: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether :func:`launch_gemm_ws` runs this call: 2- or 4-bit codes (whose ``q * c`` is exact in 16 bits),
    16-bit activations, K-major codes and scales (``kernels.ops.k_major``, which TMA copies as ``[K, N]`` tiles) with
    N a multiple of 16 (16-byte rows), on a Hopper GPU (wgmma, TMA, register reallocation)."""
    return (bits in (2, 4) and dtype in (torch.bfloat16, torch.float16) and packed.is_cuda
            and compute_capability(packed.device)[0] == 9 and packed.stride(0) == 1
            and scales.stride(0) == 1 and packed.shape[0] % 16 == 0)


@triton.jit
def group_means_kernel(x_ptr, out_ptr, M, G, stride_xm, stride_om, BM: tl.constexpr, BG: tl.constexpr):
    """``out[m, g]`` = the mean of ``x[m, 32 g : 32 g + 32]`` (fp32 sum, one rounding to ``out``'s dtype)."""
    m = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]
    g = tl.program_id(1) * BG + tl.arange(0, BG)[None, :]
    mask = (m < M) & (g < G)
    x = tl.load(x_ptr + (m * stride_xm + g * GROUP)[:, :, None] + tl.arange(0, GROUP)[None, None, :],
                mask=mask[:, :, None], other=0.0)
    mean = tl.sum(x.to(tl.float32), axis=2) / GROUP
    tl.store(out_ptr + m * stride_om + g, mean.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def zero_terms_kernel(s_ptr, z_ptr, out_ptr, N, G, stride_sn, stride_sg, stride_on, ZOFF: tl.constexpr,
                      ZMUL: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr):
    """``out[n, g] = -32 (e4m3 / 256) zero_b`` of weight row ``n``, group ``g`` (one rounding to ``out``'s dtype)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    g = tl.program_id(1) * BG + tl.arange(0, BG)[None, :]
    mask = (n < N) & (g < G)
    sb = tl.load(s_ptr + n * stride_sn + g * stride_sg, mask=mask, other=0)
    zb = tl.load(z_ptr + n * stride_sn + g * stride_sg, mask=mask, other=0)
    v = e4m3_scaled(sb) * ((zb.to(tl.float32) - ZOFF) * (-GROUP * ZMUL))
    tl.store(out_ptr + n * stride_on + g, v.to(out_ptr.dtype.element_ty), mask=mask)


def _padded(rows: int, g: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[rows, G]`` (16-bit ``dtype``) whose rows start 16-byte aligned (TMA), from a ``[rows, G rounded up to 8]``
    buffer."""
    return torch.empty(rows, triton.cdiv(g, 8) * 8, dtype=dtype, device=device)[:, :g]


def group_means(x: torch.Tensor) -> torch.Tensor:
    """``[M, G]`` means of ``x [M, Kq]``'s groups of 32 columns, in ``x``'s dtype: the activations of the kernel's
    zero-point steps."""
    m, kq = x.shape
    g = kq // GROUP_SIZE
    out = _padded(m, g, x.dtype, x.device)
    group_means_kernel[(triton.cdiv(m, 16), triton.cdiv(g, 16))](x, out, m, g, x.stride(0), out.stride(0), BM=16,
                                                                 BG=16, num_warps=4)
    return out


def zero_terms(scales: torch.Tensor, zeros: torch.Tensor, zoff: float, zmul: float, dtype: torch.dtype) -> torch.Tensor:
    """``[N, G]`` ``-32 c zero_b`` in ``dtype``: the weights of the kernel's zero-point steps (``zero_b = (zeros -
    zoff) * zmul``, ``c`` = E4M3 scale / 256)."""
    n, g = scales.shape
    su8 = scales.view(torch.uint8)
    out = _padded(n, g, dtype, scales.device)
    zero_terms_kernel[(triton.cdiv(n, 64), triton.cdiv(g, 64))](su8, zeros, out, n, g, su8.stride(0), su8.stride(1),
                                                               out.stride(0), ZOFF=zoff, ZMUL=zmul, BN=64, BG=64,
                                                               num_warps=4)
    return out


@lru_cache(maxsize=None)
def _tma_layout(block: tuple[int, ...], dtype: torch.dtype, swizzled: bool) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a TMA block (cached: building one costs several µs of host time per call)."""
    if swizzled:
        gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int32: gl.int32,
                    torch.uint8: gl.uint8}[dtype]
        return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * dtype.itemsize, rank=len(block))


def tma_descriptor(t: torch.Tensor, block: list[int], swizzled: bool) -> TensorDescriptor:
    """A TMA descriptor of the tensor ``t`` (unit stride along its last axis, the others' strides 16-byte aligned)
    in ``block`` tiles: swizzled for wgmma operands (2-D), plain for the codes and scale bytes that the consumers
    read."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, _tma_layout(tuple(block), t.dtype, swizzled))


def tma_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if TMA can read its rows (unit stride along them, rows and start 16-byte aligned), else a
    contiguous copy."""
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
        return x.clone(memory_format=torch.contiguous_format)
    return x


def launch_gemm_ws(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   col_mult: float, zoff: float, zmul: float, block_m: int, block_n: int, block_k: int, stages: int,
                   y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` (times ``row_scale * col_mult`` per column, ``token_scale`` per row, plus ``bias``) with
    :func:`gemm_ws_kernel` on ``block_m x block_n`` tiles; ``x [M, Kq]`` holds the expanded input (16-bit), the
    weight is K-major (:func:`ws_supported`)."""
    # a slot: activation and weight tiles, the step's packed codes and its scale bytes
    smem = stages * ((block_m + block_n) * block_k * x.element_size() + block_n * block_k * bits // 8
                     + block_n * block_k // GROUP_SIZE)
    if (block_m not in (128, 256) or block_n % 64 or not 64 <= block_n <= 256 or block_m * block_n > 32768
            or block_k % 64 or stages < 3 or smem > SMEM_BYTES):
        raise ValueError(f"gemm_ws takes block_m 128 or 256, block_n 64..256 (a multiple of 64, at most 32768 outputs "
                         f"per tile), block_k a multiple of 64, at least 3 stages and {SMEM_BYTES} bytes of slots; got "
                         f"{block_m}, {block_n}, {block_k}, {stages} ({smem} bytes)")
    m, kq = x.shape
    n = scales.shape[0]
    x = tma_rows(x)
    su8 = scales.view(torch.uint8)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), )
    gemm_ws_kernel[grid](tma_descriptor(x, [block_m, block_k], True),
                         tma_descriptor(group_means(x), [block_m, block_k], True),
                         tma_descriptor(packed.t(), [block_k * bits // 32, block_n], False),
                         tma_descriptor(su8.t(), [block_k // GROUP_SIZE, block_n], False),
                         tma_descriptor(zero_terms(scales, zeros, zoff, zmul, x.dtype), [block_n, block_k], True),
                         row_scale, token_scale if token_scale is not None else row_scale,
                         bias if bias is not None else row_scale, y, m, n, kq, y.stride(0),
                         BF16_ONE if x.dtype == torch.bfloat16 else F16_ONE, COL_MULT=col_mult, BN=block_n,
                         STAGES=stages, HAS_TS=token_scale is not None,
                         HAS_BIAS=bias is not None, num_warps=MMA_WARPS, maxnreg=MAX_REGS)
    return y
