"""W{b}A16 GEMV for one token whose codes stream through a TMA ring (Gluon): ``Config("gemv_tma", ...)``.

Why: at one token the half2 GEMV (:mod:`kernels.triton_gemv_h2`) reads 44 % of copy bandwidth on 8192 x 8192 W2
(docs/BENCHMARKS.md): its few warps per SM load their codes into registers a step ahead, so the bytes in flight are
what the registers hold and every step waits on a global-memory latency. Here each program owns whole output
columns (no split-K) and keeps ``STAGES`` steps of codes, scale and zero bytes in flight in shared memory, copied by
TMA (a loader warp issues a step's three copies; the mbarrier of its slot counts the bytes), so the consumer warps
only wait for data that is late, not for every load's latency.

Per program: ``BN`` output columns, steps of ``BK`` codes along K (``BK / 32`` groups, ``[BK P / 32, BN]``
K-major words per step). The arithmetic is the half2 GEMV's (same exactness argument, :mod:`kernels.triton_pairs`):

* the consumer warps prepare the activations once per program before their loop (while the loader fills the
  ring): per group of 32, the power of two ``2^e`` that puts ``max |x 2^e|`` in ``[2^(7-P), 2^(8-P))``, the 16
  fp16 pairs ``x 2^(e - P j)`` in the order of a word's code pairs, ``sum x 2^e`` and ``2^-e``, stored in shared
  memory for every step;
* a word's code pair ``t`` (codes ``t`` and ``t + 16 / P``, 16 bits apart) is one LOP3 to the half2 ``1024 + 2^(P j)
  q`` and one ``add.f16x2`` to ``2^(P j) (q - C)``, exact; one ``fma.rn.f16x2`` per pair accumulates
  ``(q - C) x 2^e`` over a word row (at most 2048 in magnitude: exact enough in fp16), the rows of a group are added
  and converted to fp32, and the group's zero point and scale are applied in fp32:
  ``c 2^-e (d - (zero_b - C) sum x 2^e)``.

Thread mapping: a thread owns 4 consecutive columns (one 16-byte shared load per word row) and ``BK / 32 /
rows`` groups of a step, where ``rows = 32 num_warps / (BN / 4)`` threads share a column; their sums are added once
after the loop. A slot is refilled (the copies for step ``i + STAGES``) as soon as every consumer has read step
``i`` into registers (a barrier of the consumer warps, then one arrive on the slot's ``empty`` mbarrier).

Scope: 2- and 4-bit K-major codes (``kernels.ops.k_major``), one token of bf16/fp16 activations (or the fp16
``xq`` of quantized activations with its token scale), no split channels, ``N % 16 == 0`` (TMA rows of 16 bytes),
Hopper (TMA). A last step past ``Kq`` reads zeros (TMA fills them), which add nothing. Gluon has no interpreter:
tested on the GPU only.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from .gluon_gemm import SMEM_BYTES, cta_barrier, tma_descriptor, tma_load
from .grid import GROUP_SIZE
from .triton_common import e4m3_scaled, store_scaled
from .triton_pairs import F16_ONE, hadd2_asm, half2_sum, join, minus_centre, pair_add, pair_fma

STREAM_BITS = (2, 4)
GROUP = gl.constexpr(GROUP_SIZE)
PAIR_BYTES = 64  # per group: 16 fp16 activation pairs
GROUP_BYTES = 8  # per group: sum x 2^e and 2^-e (fp32)
LOADER_REGS = gl.constexpr(48)  # per thread of the loader warp
# per thread (the launch's maxnreg, counted for every warp of a program: its consumers, the loader and the idle warps
# that pad it to whole warp groups): no spills offline for W2/W4 up to K = 28672. Fewer for 8 consumers (80, so that
# two such programs share an SM) gave wrong sums on the H200 (docs/KERNELS.md)
MAX_REGS = 96


@gluon.constexpr_function
def _axis_layout(layout, rank, dim):
    """The layout of an ``arange`` along axis ``dim`` of a rank-``rank`` tensor in ``layout``."""
    for d in reversed(range(rank)):
        if d != dim:
            layout = gl.SliceLayout(d, layout)
    return layout


@gluon.jit
def _along(n: gl.constexpr, dim: gl.constexpr, rank: gl.constexpr, layout: gl.constexpr):
    """``arange(n)`` along axis ``dim`` of a rank-``rank`` tensor in ``layout`` (size 1 on the other axes)."""
    v = gl.arange(0, n, layout=_axis_layout(layout, rank, dim))
    for d in gl.static_range(rank):
        if d != dim:
            v = gl.expand_dims(v, d)
    return v


@gluon.jit
def _prepare_x(x_ptr, Kq, xp_smem, xs_smem, xd_smem, P: gl.constexpr, GS: gl.constexpr, NCH: gl.constexpr):
    """The activation pairs ``[chunks, steps * 16 / P, GS, P]`` (chunk, step and pair slot, group, word row),
    ``sum x 2^e`` and ``2^-e`` (``[chunks, steps, GS]``) of every step into shared memory: one group per thread and
    chunk of ``32 num_warps`` groups, every chunk's loads issued before any is used (groups past ``Kq`` read zeros)."""
    HALF: gl.constexpr = 16 // P
    PER_BYTE: gl.constexpr = 8 // P
    PJ: gl.constexpr = 8 - P  # P j of a byte's highest slot
    W: gl.constexpr = gl.num_warps()
    NSUB: gl.constexpr = 32 * W // GS  # steps per chunk
    LP: gl.constexpr = gl.BlockedLayout([1, 1, P, 2, HALF], [32 // GS, GS, 1, 1, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    group = _along(NSUB, 0, 5, LP) * GS + _along(GS, 1, 5, LP)
    slot = _along(HALF, 4, 5, LP)
    # word row r holds the pairs (r 2 HALF + t, r 2 HALF + t + HALF): the two halves of a pair are axis 3
    within = _along(P, 2, 5, LP) * (2 * HALF) + _along(2, 3, 5, LP) * HALF + slot
    loaded = ()
    for c in gl.static_range(NCH):
        g = c * NSUB * GS + group
        loaded = loaded + (gl.load(x_ptr + g * GROUP + within, mask=g * GROUP < Kq, other=0.0), )
    for c in gl.static_range(NCH):
        x = loaded[c].to(gl.float32)
        amax = gl.max(gl.max(gl.max(gl.abs(x), axis=4), axis=3), axis=2)
        xsum = gl.sum(gl.sum(gl.sum(x, axis=4), axis=3), axis=2)
        expo = gl.maximum(gl.minimum(amax.to(gl.int32, bitcast=True) >> 23, 252), PJ)
        e5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(expo, 2), 3), 4)
        scale = (((253 + PJ) - e5 - P * (slot % PER_BYTE)) << 23).to(gl.float32, bitcast=True)
        lo, hi = gl.split(gl.permute(x * scale, [0, 1, 2, 4, 3]))
        pairs = gl.permute(join(lo, hi, False), [0, 3, 1, 2])  # [step, pair slot, group, word row]
        xp_smem.index(c).store(gl.reshape(pairs, [NSUB * HALF, GS, P]))
        xs_smem.index(c).store(xsum * ((253 + PJ - expo) << 23).to(gl.float32, bitcast=True))
        xd_smem.index(c).store(((expo + 1 - PJ) << 23).to(gl.float32, bitcast=True))


@gluon.jit
def _issue(w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, step, slot, off_n):
    """The TMA copies of step ``step`` into ``slot``, counted by the slot's ``ready`` barrier."""
    bar = ready.index(slot)
    mbarrier.expect(bar, w_desc.block_type.nbytes + s_desc.block_type.nbytes + z_desc.block_type.nbytes)
    tma_load(w_desc, [step * w_desc.block_type.shape[0], off_n], bar, code_bufs.index(slot))
    tma_load(s_desc, [step * s_desc.block_type.shape[0], off_n], bar, scale_bufs.index(slot))
    tma_load(z_desc, [step * z_desc.block_type.shape[0], off_n], bar, zero_bufs.index(slot))


@gluon.jit
def _step_terms(words, sb, zb, xp_smem, xp_first, xs, xd, one, ZOFF: gl.constexpr, ZMUL: gl.constexpr, P: gl.constexpr):
    """``[GS, BN]`` fp32: per group and column of one step, ``c 2^-e (sum_k (q_k - C) x_k 2^e - (zero_b - C) sum_k x_k
    2^e)`` (the words ``[GS, P, BN]``, scale and zero bytes ``[GS, BN]``, the step's activation pairs: entries
    ``xp_first ..`` of ``xp_smem``, one per pair slot; ``sum x 2^e`` and ``2^-e`` per group)."""
    HALF: gl.constexpr = 16 // P
    PER_BYTE: gl.constexpr = 8 // P
    LW: gl.constexpr = words.type.layout
    w = words.to(gl.uint32, bitcast=True)
    acc = gl.zeros(words.shape, gl.uint32, LW)  # half2 (0, 0) per word row and column
    for t in gl.static_range(HALF):
        pj = P * (t % PER_BYTE)  # the code's mantissa bit
        v = ((w >> (8 * (t // PER_BYTE))) & (((1 << P) - 1) << pj) * 0x10001) | one  # half2 1024 + 2^pj q, exact
        q = pair_add(v, gl.full(words.shape, minus_centre(pj, P, False), gl.uint32, LW), False, True)
        xt = gl.expand_dims(xp_smem.index(xp_first + t).load(gl.SliceLayout(2, LW)), 2)
        acc = pair_fma(q, xt, acc, False, True)
    d = half2_sum(gl.reduce(acc, 1, hadd2_asm), True)
    zoff: gl.constexpr = ZOFF + (1 << (P - 1)) / ZMUL  # (zero_b - C) = (zero - zoff) * ZMUL
    zc = zb.to(gl.float32) * ZMUL - zoff * ZMUL
    return (e4m3_scaled(sb) * gl.expand_dims(xd, 1)) * (d - zc * gl.expand_dims(xs, 1))


@gluon.jit
def _consume(x_ptr, Kq, code_bufs, scale_bufs, zero_bufs, ready, empty, xp_smem, xs_smem, xd_smem, n_steps, one,
             P: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr, LW: gl.constexpr):
    """The default partition: prepare the activations (while the loader fills the ring), then per step wait for its
    slot, read it into registers, hand the slot back (after a barrier of these warps) and add the step's terms;
    returns ``[GS, BN]`` fp32 sums."""
    STAGES: gl.constexpr = code_bufs.type.shape[0]
    GS: gl.constexpr = scale_bufs.type.shape[1]
    BN: gl.constexpr = scale_bufs.type.shape[2]
    HALF: gl.constexpr = 16 // P
    NCH: gl.constexpr = xp_smem.type.shape[0]
    LG: gl.constexpr = gl.SliceLayout(1, LW)
    _prepare_x(x_ptr, Kq, xp_smem, xs_smem, xd_smem, P, GS, NCH)
    cta_barrier()
    # the per-chunk buffers of the preparation, read per step and pair slot
    step_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    NSTEPS: gl.constexpr = NCH * xs_smem.type.shape[1]
    xp_steps = xp_smem._reinterpret(gl.uint32, [NSTEPS * HALF, GS, P], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    xs_steps = xs_smem._reinterpret(gl.float32, [NSTEPS, GS], step_layout)
    xd_steps = xd_smem._reinterpret(gl.float32, [NSTEPS, GS], step_layout)
    words_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    acc = gl.zeros([GS, BN], gl.float32, LG)
    for i in range(n_steps):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        words = code_bufs.index(s)._reinterpret(code_bufs.dtype, [GS, P, BN], words_layout).load(LW)
        sb = scale_bufs.index(s).load(LG)
        zb = zero_bufs.index(s).load(LG)
        cta_barrier()  # every warp holds step i: the slot may take step i + STAGES
        mbarrier.arrive(empty.index(s))
        acc += _step_terms(words, sb, zb, xp_steps, i * HALF, xs_steps.index(i).load(gl.SliceLayout(1, LG)),
                           xd_steps.index(i).load(gl.SliceLayout(1, LG)), one, ZOFF, ZMUL, P)
    return (acc, )


@gluon.jit
def _load(w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, empty, off_n, n_steps):
    """The loader warp: the copies of every step, each into its slot once the consumers have handed it back (the
    first round's waits pass at once: they wait for the phase before the barriers' first)."""
    STAGES: gl.constexpr = code_bufs.type.shape[0]
    for i in range(n_steps):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        _issue(w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, i, s, off_n)


@gluon.jit
def gemv_tma_kernel(x_ptr, w_desc, s_desc, z_desc, rs_ptr, ts_ptr, bias_ptr, y_ptr, N, Kq, one, P: gl.constexpr,
                    NCH: gl.constexpr, STAGES: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr,
                    COL_MULT: gl.constexpr, HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y [1, N] = x [1, Kq] @ W_b^T``, one program per ``BN`` columns (grid ``cdiv(N, BN)``); see the module
    docstring. ``w_desc``, ``s_desc``, ``z_desc``: TMA descriptors of the K-major words ``[Kq P / 32, N]`` and scale
    and zero bytes ``[G, N]`` in step boxes; ``NCH`` chunks of ``32 num_warps`` groups cover the activations. The
    launch's warps prepare the activations and consume; one more warp issues the copies."""
    RW: gl.constexpr = w_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    GS: gl.constexpr = RW // P  # groups per step
    HALF: gl.constexpr = 16 // P
    W: gl.constexpr = gl.num_warps()
    TC: gl.constexpr = BN // 4  # threads along a row of columns
    TR: gl.constexpr = 32 * W // TC  # threads sharing a column
    gl.static_assert(GS % TR == 0, "a step's groups must spread evenly over the threads of a column")
    LW: gl.constexpr = gl.BlockedLayout([GS // TR, P, 4], [32 // TC, 1, TC], [W, 1, 1], [2, 1, 0])
    off_n = gl.program_id(0) * BN
    n_steps = gl.cdiv(Kq, GS * 32)

    code_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, RW, BN], w_desc.layout)
    scale_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES, GS, BN], s_desc.layout)
    zero_bufs = gl.allocate_shared_memory(z_desc.dtype, [STAGES, GS, BN], z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    NSUB: gl.constexpr = 32 * W // GS
    # per chunk of 32 W groups (the preparation's stores), read per step and pair slot (the steps')
    pairs_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    xp_smem = gl.allocate_shared_memory(gl.uint32, [NCH, NSUB * HALF, GS, P], pairs_layout)
    sums_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    xs_smem = gl.allocate_shared_memory(gl.float32, [NCH, NSUB, GS], sums_layout)
    xd_smem = gl.allocate_shared_memory(gl.float32, [NCH, NSUB, GS], sums_layout)
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    fence_async_shared()

    acc, = gl.warp_specialize([
        (_consume, (x_ptr, Kq, code_bufs, scale_bufs, zero_bufs, ready, empty, xp_smem, xs_smem, xd_smem, n_steps, one,
                    P, ZOFF, ZMUL, LW)),
        (_load, (w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, empty, off_n, n_steps)),
    ], [1], [LOADER_REGS])

    LG: gl.constexpr = gl.SliceLayout(1, LW)
    total = gl.expand_dims(gl.sum(acc, axis=0), 0)
    rows = gl.arange(0, 1, layout=gl.SliceLayout(1, LG))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, LG))
    store_scaled(total, rows, cols, 1, N, y_ptr, 0, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)


def prep_chunks(kq: int, warps: int) -> int:
    """The activation preparation's chunks of ``32 warps`` groups (one group per consumer thread) covering ``kq``."""
    return triton.cdiv(kq // GROUP_SIZE, 32 * warps)


def stream_smem_bytes(bits: int, kq: int, block_n: int, block_k: int, stages: int, warps: int) -> int:
    """Shared memory of a :func:`gemv_tma_kernel` launch: the ring's slots and the prepared activations."""
    groups_per_step = block_k // GROUP_SIZE
    return (stages * block_n * (block_k * bits // 8 + 2 * groups_per_step)
            + prep_chunks(kq, warps) * 32 * warps * (PAIR_BYTES + GROUP_BYTES) + 16 * stages)


def stream_gemv_supported(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, kq: int,
                          has_split: bool) -> bool:
    """Whether :func:`launch_gemv_tma` takes this call (else the caller runs another kernel)."""
    return (bits in STREAM_BITS and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and not has_split
            and x.shape[0] == 1 and x.shape[1] == kq and x.stride(1) == 1 and packed.stride(0) == 1
            and scales.stride(0) == 1 and scales.shape[0] % 16 == 0
            and torch.cuda.get_device_capability(x.device)[0] == 9)


def launch_gemv_tma(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                    col_mult: float, zoff: float, zmul: float, block_n: int, block_k: int, stages: int, warps: int,
                    y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` for one token (:func:`stream_gemv_supported`) with :func:`gemv_tma_kernel`: programs of
    ``block_n`` columns (16, 32, 64 or 128) and ``warps`` consuming warps, steps of ``block_k`` codes, ``stages``
    steps in flight."""
    kq = x.shape[1]
    n = scales.shape[0]
    groups = block_k // GROUP_SIZE
    rows = 32 * warps // (block_n // 4) if block_n in (16, 32, 64, 128) else 0
    smem = stream_smem_bytes(bits, kq, block_n, block_k, stages, warps)
    if (not rows or warps % 4 or block_k % GROUP_SIZE or groups & (groups - 1) or groups % rows or groups > 32
            or stages < 1 or smem > SMEM_BYTES):
        raise ValueError(f"gemv_tma takes block_n 16, 32, 64 or 128, a multiple of 4 warps (warp specialization), "
                         f"block_k a power-of-two number of groups (at most 32) that the {rows} threads sharing a "
                         f"column divide, at least one stage and at most {SMEM_BYTES} bytes of shared memory (fewer "
                         f"stages use less); got {block_n}, {block_k}, {stages} stages, {warps} warps ({smem} bytes)")
    su8 = scales.view(torch.uint8)
    gemv_tma_kernel[(triton.cdiv(n, block_n), )](
        x, tma_descriptor(packed.t(), [block_k * bits // 32, block_n], False),
        tma_descriptor(su8.t(), [groups, block_n], False), tma_descriptor(zeros.t(), [groups, block_n], False),
        row_scale, token_scale if token_scale is not None else row_scale, bias if bias is not None else row_scale, y,
        n, kq, F16_ONE, P=bits, NCH=prep_chunks(kq, warps), STAGES=stages, ZOFF=zoff, ZMUL=zmul,
        COL_MULT=col_mult, HAS_TS=token_scale is not None, HAS_BIAS=bias is not None, num_warps=warps,
        maxnreg=MAX_REGS)
    return y
