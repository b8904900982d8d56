"""W{b}A16 GEMV for one to four tokens whose codes stream through a TMA ring (Gluon): ``Config("gemv_tma", ...)``.

Why: at one token the half2 GEMV (:mod:`kernels.triton_gemv_h2`) reads 44 % of copy bandwidth on 8192 x 8192 W2
(docs/BENCHMARKS.md): its few warps per SM load their codes into registers a step ahead, so the bytes in flight are
what the registers hold and every step waits on a global-memory latency. Here each program owns whole output
columns (no split-K) and keeps ``STAGES`` steps of codes, scale and zero bytes in flight in shared memory, copied by
TMA (a loader warp issues a step's three copies; the mbarrier of its slot counts the bytes), so the consumer warps
only wait for data that is late, not for every load's latency.

Per program: ``BN`` output columns of ``T`` tokens (1, 2 or 4: ``Config.block_m``; rows past the call's ``M`` are
zeros, not stored), steps of ``BK`` codes along K (``BK / 32`` groups, ``[BK P / 32, BN]`` K-major words per step).
The codes are read once per step for all tokens. The arithmetic is on integers:

* the consumer warps prepare the activations in shared memory: per token and group of 32 the power of two ``2^e``
  that puts ``max |x 2^e|`` in ``[2^14, 2^15)``, the 16-bit integers ``rint(x 2^e)`` two per uint32 in the order of a
  word's code bytes, ``sum x 2^e`` and ``2^-e``. Rows up to K = 8192 are prepared at once (token by token) while the
  loader fills the ring; longer ones in chunks of 8192 / T, each just before its steps (the next chunk's loads in
  flight meanwhile);
* a word shifted by ``P j`` and masked to one code per byte gives four codes as bytes; ``dp2a`` (``IDP.2A`` in SASS)
  adds the two low ones times a pair of 16-bit activations and another ``dp2a`` the two high ones, exact in int32
  (``|sum| < 32 (2^P - 1) 2^15 < 2^24``); per token, group and column the sum goes to fp32 and the zero point and
  scale apply there: ``c 2^-e (d - zero_b sum x 2^e)``. Per code pair: two ``IDP.2A`` per token, a LOP3 and at most a
  shift (1.4-1.5 instructions per code with the per-group work at one token, against 2.1-2.3 for the half2
  arithmetic it replaced; 2.1 at two tokens, 3.5 at four).
  The only rounding before fp32 is the activations' to 16 bits relative to their group's largest (an integer for
  every bf16 within 2^7 of it), finer than the half2 GEMV's fp16 accumulation.

Thread mapping: a thread owns 4 consecutive columns (one 16-byte shared load per word row), every token and ``BK /
32 / rows`` groups of a step, where ``rows = 32 num_warps / (BN / 4)`` threads share a column; their sums are added
once after the loop. A slot is refilled (the copies for step ``i + STAGES``) as soon as every consumer has read step
``i`` into registers: a ``fence.proxy.async`` (the TMA copy is the async proxy writing what these warps' shared loads
read: without it the H200 returned wrong sums when the ring wrapped with several programs per SM), a barrier of the
consumer warps, then one arrive on the slot's ``empty`` mbarrier.

Launched with programmatic dependent launch (:mod:`kernels.pdl`) unless its programs would crowd some SMs
(:func:`pdl_keeps_balance`).

Scope: 2- and 4-bit K-major codes (``kernels.ops.k_major``), up to 4 tokens of bf16/fp16 activations with unit
stride along K (or the fp16 ``xq`` of quantized activations with its token scales), no split channels, ``N % 16 ==
0`` (TMA rows of 16 bytes), Hopper (TMA). A last step past ``Kq`` reads zeros (TMA fills them), which add nothing.
Gluon has no interpreter: tested on the GPU only.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from .device import compute_capability, sm_count
from .gluon_gemm import SMEM_BYTES, cta_barrier, reinterpret, tma_descriptor, tma_load
from .grid import GROUP_SIZE
from .pdl import launch_dependents, pdl_for, wait_prior_grid
from .triton_common import e4m3_scaled, store_scaled

STREAM_BITS = (2, 4)
GROUP = gl.constexpr(GROUP_SIZE)
PAIR_BYTES = 64  # per group: 16 pairs of 16-bit integer activations
GROUP_BYTES = 8  # per group: sum x 2^e and 2^-e (fp32)
LOADER_REGS = gl.constexpr(48)  # per thread of the loader warp
# registers per thread by tokens per program (``Config.block_m``; the launch's maxnreg, counted for every warp of a
# program: its consumers, the loader and the idle warps that pad it to whole warp groups): no spills offline for W2/W4
# up to K = 28672. At one token 80 (two programs of 8 consumers per SM) measured no faster than the best 96-register
# tiles (docs/BENCHMARKS.md, session 18)
MAX_REGS = {1: 96, 2: 128, 4: 128}
STREAM_TOKENS = tuple(MAX_REGS)


@gluon.constexpr_function
def _axis_layout(layout, rank, dim):
    """The layout of an ``arange`` along axis ``dim`` of a rank-``rank`` tensor in ``layout``."""
    for d in reversed(range(rank)):
        if d != dim:
            layout = gl.SliceLayout(d, layout)
    return layout


@gluon.jit
def along(n: gl.constexpr, dim: gl.constexpr, rank: gl.constexpr, layout: gl.constexpr):
    """``arange(n)`` along axis ``dim`` of a rank-``rank`` tensor in ``layout`` (size 1 on the other axes)."""
    v = gl.arange(0, n, layout=_axis_layout(layout, rank, dim))
    for d in gl.static_range(rank):
        if d != dim:
            v = gl.expand_dims(v, d)
    return v


@gluon.jit
def _round_int(v):
    """float32 -> int32, rounded to nearest (``cvt.rni``)."""
    return gl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=gl.int32, is_pure=True, pack=1)


@gluon.constexpr_function
def _prep_layout(P, GS, W):
    """Registers of a chunk of activations ``[tokens * steps, GS, P, 2, 16 / P]`` (token and step of the chunk,
    group, word row, half of a pair, pair slot): one group per thread and ``32 W`` groups."""
    return gl.BlockedLayout([1, 1, P, 2, 16 // P], [32 // GS, GS, 1, 1, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0])


@gluon.jit
def _load_x(x_ptr, stride_xm, M, Kq, chunk, T: gl.constexpr, NSUB: gl.constexpr, P: gl.constexpr,
            GS: gl.constexpr):
    """The activations of ``T`` tokens' chunk ``chunk`` (``NSUB`` steps of ``GS`` groups each) in
    :func:`_prep_layout`, token-major; zeros past ``Kq`` and for tokens from ``M`` on.

    Word row r, pair slot s = part PB + j (PB codes per byte), half h hold the code r 32 / P + part 2 PB + h PB + j,
    so that a byte mask of the word shifted by P j holds the codes of slot j's halves (bytes 0, 1) and of slot
    PB + j's (bytes 2, 3)."""
    HALF: gl.constexpr = 16 // P
    PB: gl.constexpr = 8 // P
    LP: gl.constexpr = _prep_layout(P, GS, gl.num_warps())
    row = along(T * NSUB, 0, 5, LP)
    g = chunk * NSUB * GS + (row % NSUB) * GS + along(GS, 1, 5, LP)
    slot = along(HALF, 4, 5, LP)
    within = along(P, 2, 5, LP) * (2 * HALF) + (slot // PB) * (2 * PB) + along(2, 3, 5, LP) * PB + slot % PB
    token = row // NSUB
    return gl.load(x_ptr + token * stride_xm + g * GROUP + within, mask=(g * GROUP < Kq) & (token < M), other=0.0)


@gluon.jit
def _prepare_x(x, xp_buf, xs_buf, xd_buf, P: gl.constexpr):
    """One chunk of ``T`` tokens' activations ``x`` (:func:`_load_x`) into shared memory: per group the power of two
    ``2^e`` that puts ``max |x 2^e|`` in ``[2^14, 2^15)``, the 16-bit integers ``rint(x 2^e)`` two per uint32
    (``xp_buf [steps * 16 / P, T, GS, P]``: step and pair slot, token, group, word row), ``sum x 2^e`` and ``2^-e``
    (``xs_buf``, ``xd_buf``: ``[steps, T, GS]``)."""
    T: gl.constexpr = xs_buf.type.shape[1]
    NSUB: gl.constexpr = x.shape[0] // T
    GS: gl.constexpr = x.shape[1]
    HALF: gl.constexpr = 16 // P
    x = x.to(gl.float32)
    amax = gl.max(gl.max(gl.max(gl.abs(x), axis=4), axis=3), axis=2)
    # the biased exponent E of the group's largest |x|: x 2^(141 - E) lies in (-2^15, 2^15), an integer for every x
    # within 2^7 of it (bf16 holds 8 significant bits, fp16 11); E >= 15 keeps 2^(E - 141) a normal float
    expo = gl.minimum(gl.maximum(amax.to(gl.int32, bitcast=True) >> 23, 15), 254)
    e5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(expo, 2), 3), 4)
    xi = _round_int(x * ((268 - e5) << 23).to(gl.float32, bitcast=True))
    lo, hi = gl.split(gl.permute(xi, [0, 1, 2, 4, 3]))
    pairs = (lo & 0xFFFF) | (hi << 16)
    pairs = gl.permute(pairs.to(gl.uint32, bitcast=True), [0, 3, 1, 2])  # [token step, pair slot, group, word row]
    pairs = gl.permute(gl.reshape(pairs, [T, NSUB * HALF, GS, P]), [1, 0, 2, 3])
    xp_buf.store(pairs)
    xs_buf.store(_steps_first(gl.sum(gl.sum(gl.sum(xi, axis=4), axis=3), axis=2).to(gl.float32), T))
    xd_buf.store(_steps_first(((expo - 14) << 23).to(gl.float32, bitcast=True), T))


@gluon.jit
def _steps_first(v, T: gl.constexpr):
    """``[T * steps, GS]`` (token-major) as ``[steps, T, GS]``."""
    return gl.permute(gl.reshape(v, [T, v.shape[0] // T, v.shape[1]]), [1, 0, 2])


@gluon.jit
def _issue(w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, step, slot, off_n):
    """The TMA copies of step ``step`` into ``slot``, counted by the slot's ``ready`` barrier."""
    bar = ready.index(slot)
    mbarrier.expect(bar, w_desc.block_type.nbytes + s_desc.block_type.nbytes + z_desc.block_type.nbytes)
    tma_load(w_desc, [step * w_desc.block_type.shape[0], off_n], bar, code_bufs.index(slot))
    tma_load(s_desc, [step * s_desc.block_type.shape[0], off_n], bar, scale_bufs.index(slot))
    tma_load(z_desc, [step * z_desc.block_type.shape[0], off_n], bar, zero_bufs.index(slot))


@gluon.jit
def _dot2(x2, codes, acc, HIGH: gl.constexpr):
    """``acc + x.lo * codes.byte(k) + x.hi * codes.byte(k + 1)`` per element, ``k`` = 2 with ``HIGH`` else 0: the
    signed 16-bit pair ``x2`` times two unsigned code bytes, exact in int32 (``dp2a``)."""
    op: gl.constexpr = "dp2a.hi.s32.u32" if HIGH else "dp2a.lo.s32.u32"
    return gl.inline_asm_elementwise(op + " $0, $1, $2, $3;", "=r,r,r,r", [x2, codes, acc], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _step_terms(words, sb, zb, xp_smem, xp_first, xs, xd, ZOFF: gl.constexpr, ZMUL: gl.constexpr, P: gl.constexpr,
                L4: gl.constexpr):
    """``[T, GS, BN]`` fp32: per token, group and column of one step, ``c 2^-e (sum_k q_k x_k 2^e - zero_b sum_k x_k
    2^e)`` (the words ``[GS, P, BN]``, scale and zero bytes ``[GS, BN]``, the step's 16-bit activation pairs: entries
    ``xp_first ..`` of ``xp_smem``, one ``[T, GS, P]`` per pair slot; ``sum x 2^e`` and ``2^-e`` per token and
    group, ``[T, GS]``). ``L4``: the layout of ``[T, GS, P, BN]``, whose token axis a thread holds whole."""
    PB: gl.constexpr = 8 // P
    w = gl.expand_dims(words.to(gl.uint32, bitcast=True), 0)
    acc = gl.zeros([xs.shape[0], words.shape[0], words.shape[1], words.shape[2]], gl.int32, L4)
    for j in gl.static_range(PB):
        codes = (w >> (P * j)) & (((1 << P) - 1) * 0x01010101)  # the codes j, PB + j, 2 PB + j, 3 PB + j: one a byte
        x_low = gl.expand_dims(xp_smem.index(xp_first + j).load(gl.SliceLayout(3, L4)), 3)
        x_high = gl.expand_dims(xp_smem.index(xp_first + PB + j).load(gl.SliceLayout(3, L4)), 3)
        acc = _dot2(x_high, codes, _dot2(x_low, codes, acc, False), True)
    d = gl.sum(acc, axis=2).to(gl.float32)  # |d| <= 32 (2^P - 1) 2^15 < 2^24: exact
    zc = gl.expand_dims(zb.to(gl.float32) * ZMUL - ZOFF * ZMUL, 0)  # zero_b
    return (gl.expand_dims(e4m3_scaled(sb), 0) * gl.expand_dims(xd, 2)) * (d - zc * gl.expand_dims(xs, 2))


@gluon.jit
def _steps(code_bufs, scale_bufs, zero_bufs, ready, empty, xp_smem, xs_smem, xd_smem, first, last, acc,
           P: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr, L4: gl.constexpr):
    """Steps ``first .. last - 1`` (of the chunk of activations prepared from step ``first`` on): per step wait for
    its slot, read it into registers, hand the slot back (after a proxy fence and a barrier of these warps) and add
    the step's terms to ``acc``."""
    STAGES: gl.constexpr = code_bufs.type.shape[0]
    GS: gl.constexpr = scale_bufs.type.shape[1]
    BN: gl.constexpr = scale_bufs.type.shape[2]
    HALF: gl.constexpr = 16 // P
    NSUB: gl.constexpr = xs_smem.type.shape[0]
    T: gl.constexpr = xs_smem.type.shape[1]
    LW: gl.constexpr = gl.SliceLayout(0, L4)  # [GS, P, BN]
    LG: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, L4))  # [GS, BN]
    LX: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(2, L4))  # [T, GS]
    # the chunk's buffers, read per step and pair slot (in a layout of the rank an entry has)
    xp_steps = reinterpret(xp_smem, gl.uint32, [NSUB * HALF, T, GS, P], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    xs_steps = reinterpret(xs_smem, gl.float32, [NSUB, T, GS], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    xd_steps = reinterpret(xd_smem, gl.float32, [NSUB, T, GS], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    words_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    for i in range(first, last):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        words = reinterpret(code_bufs.index(s), code_bufs.dtype, [GS, P, BN], words_layout).load(LW)
        sb = scale_bufs.index(s).load(LG)
        zb = zero_bufs.index(s).load(LG)
        # the slot's next bytes come by TMA (the async proxy): without this fence the copy can land before these
        # warps' shared loads have read the slot (wrong sums on the H200, docs/KERNELS.md)
        fence_async_shared()
        cta_barrier()  # every warp holds step i: the slot may take step i + STAGES
        mbarrier.arrive(empty.index(s))
        j = i - first
        acc += _step_terms(words, sb, zb, xp_steps, j * HALF, xs_steps.index(j).load(LX), xd_steps.index(j).load(LX),
                           ZOFF, ZMUL, P, L4)
    return acc


@gluon.jit
def _consume(x_ptr, stride_xm, M, Kq, code_bufs, scale_bufs, zero_bufs, ready, empty, xp_smem, xs_smem, xd_smem,
             n_steps, P: gl.constexpr, ONE_CHUNK: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr,
             L4: gl.constexpr):
    """The default partition: per chunk of activations (``xs_smem``'s steps, all tokens), prepare the chunk, then its
    :func:`_steps`; returns ``[T, GS, BN]`` fp32 sums. With ``ONE_CHUNK`` (K up to 8192) the whole rows are prepared,
    one token after another, while the loader fills the ring; longer rows in chunks, the next chunk's loads issued
    before a chunk's steps."""
    GS: gl.constexpr = scale_bufs.type.shape[1]
    BN: gl.constexpr = scale_bufs.type.shape[2]
    NSUB: gl.constexpr = xs_smem.type.shape[0]
    T: gl.constexpr = xs_smem.type.shape[1]
    acc = gl.zeros([T, GS, BN], gl.float32, gl.SliceLayout(2, L4))
    if ONE_CHUNK:
        for t in gl.static_range(T):
            _prepare_x(_load_x(x_ptr + t * stride_xm, 0, M - t, Kq, 0, 1, NSUB, P, GS), xp_smem.slice(t, 1, dim=1),
                       xs_smem.slice(t, 1, dim=1), xd_smem.slice(t, 1, dim=1), P)
        cta_barrier()
        acc = _steps(code_bufs, scale_bufs, zero_bufs, ready, empty, xp_smem, xs_smem, xd_smem, 0, n_steps, acc,
                     P, ZOFF, ZMUL, L4)
    else:
        x_next = _load_x(x_ptr, stride_xm, M, Kq, 0, T, NSUB, P, GS)
        for c in range(gl.cdiv(n_steps, NSUB)):
            x = x_next
            x_next = _load_x(x_ptr, stride_xm, M, Kq, c + 1, T, NSUB, P, GS)  # all masked off past the last chunk
            cta_barrier()  # every warp has left the previous chunk's steps, which read the buffers
            _prepare_x(x, xp_smem, xs_smem, xd_smem, P)
            cta_barrier()
            acc = _steps(code_bufs, scale_bufs, zero_bufs, ready, empty, xp_smem, xs_smem, xd_smem, c * NSUB,
                         gl.minimum(c * NSUB + NSUB, n_steps), acc, P, ZOFF, ZMUL, L4)
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
def gemv_tma_kernel(x_ptr, w_desc, s_desc, z_desc, rs_ptr, ts_ptr, bias_ptr, y_ptr, M, N, Kq, stride_xm, stride_ym,
                    T: gl.constexpr, P: gl.constexpr, CHUNK: gl.constexpr, ONE_CHUNK: gl.constexpr,
                    STAGES: gl.constexpr, ZOFF: gl.constexpr, ZMUL: gl.constexpr, COL_MULT: gl.constexpr,
                    HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y [M, N] = x [M, Kq] @ W_b^T`` for ``M <= T`` tokens, one program per ``BN`` columns (grid ``cdiv(N,
    BN)``); see the module docstring. ``w_desc``, ``s_desc``, ``z_desc``: TMA descriptors of the K-major words ``[Kq
    P / 32, N]`` and scale and zero bytes ``[G, N]`` in step boxes. The launch's warps prepare the activations (in
    chunks of ``CHUNK`` groups per token; ``ONE_CHUNK``: one covers ``Kq``) and consume; one more warp issues the
    copies."""
    RW: gl.constexpr = w_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    GS: gl.constexpr = RW // P  # groups per step
    HALF: gl.constexpr = 16 // P
    W: gl.constexpr = gl.num_warps()
    TC: gl.constexpr = BN // 4  # threads along a row of columns
    TR: gl.constexpr = 32 * W // TC  # threads sharing a column
    gl.static_assert(GS % TR == 0, "a step's groups must spread evenly over the threads of a column")
    # [token, group, word row, column]: a thread holds every token of its groups and 4 consecutive columns
    L4: gl.constexpr = gl.BlockedLayout([T, GS // TR, P, 4], [1, 32 // TC, 1, TC], [1, W, 1, 1], [3, 2, 1, 0])
    wait_prior_grid()  # PDL (:mod:`kernels.pdl`): the activations and the output may be the previous kernel's
    off_n = gl.program_id(0) * BN
    n_steps = gl.cdiv(Kq, GS * 32)

    code_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, RW, BN], w_desc.layout)
    scale_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES, GS, BN], s_desc.layout)
    zero_bufs = gl.allocate_shared_memory(z_desc.dtype, [STAGES, GS, BN], z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    NSUB: gl.constexpr = CHUNK // GS
    # a chunk of prepared activations (the preparation's stores; the steps read them per step and pair slot)
    pairs_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
    xp_smem = gl.allocate_shared_memory(gl.uint32, [NSUB * HALF, T, GS, P], pairs_layout)
    sums_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    xs_smem = gl.allocate_shared_memory(gl.float32, [NSUB, T, GS], sums_layout)
    xd_smem = gl.allocate_shared_memory(gl.float32, [NSUB, T, GS], sums_layout)
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    fence_async_shared()

    acc, = gl.warp_specialize([
        (_consume, (x_ptr, stride_xm, M, Kq, code_bufs, scale_bufs, zero_bufs, ready, empty, xp_smem, xs_smem,
                    xd_smem, n_steps, P, ONE_CHUNK, ZOFF, ZMUL, L4)),
        (_load, (w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, empty, off_n, n_steps)),
    ], [1], [LOADER_REGS])
    launch_dependents()  # only the epilogue is left

    total = gl.sum(acc, axis=1)
    LT: gl.constexpr = total.type.layout
    rows = gl.arange(0, T, layout=gl.SliceLayout(1, LT))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, LT))
    store_scaled(total, rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)


# Groups of activations prepared at once: all of K up to 8192 before the first step (hidden behind the first copies);
# longer rows in chunks of this many (over all tokens), each prepared just before its steps (K = 28672: 6 % faster
# on the H200 at one token)
CHUNK_GROUPS = 256


def stream_tokens(m: int) -> int:
    """The tokens per program (``Config.block_m``) that ``m`` tokens (at most 4) run on: the fewest of
    :data:`STREAM_TOKENS` that hold them."""
    return min(t for t in STREAM_TOKENS if t >= m)


@lru_cache(maxsize=1024)
def prep_chunk(kq: int, warps: int, tokens: int) -> int:
    """Groups per token and chunk of the activation preparation: a whole row up to :data:`CHUNK_GROUPS` groups (then
    one chunk, prepared token by token), else :data:`CHUNK_GROUPS` over all tokens; at least one group per consumer
    thread (a power of two)."""
    whole = triton.next_power_of_2(kq // GROUP_SIZE)
    return max(32 * warps, whole) if whole <= CHUNK_GROUPS else max(32 * warps, CHUNK_GROUPS) // tokens


def pdl_keeps_balance(programs: int, tokens: int, warps: int, sms: int) -> bool:
    """Whether a launch of ``programs`` programs may use PDL (:mod:`kernels.pdl`): not when they are at most one per SM
    while two fit on an SM (by registers: the consumers, the loader and three idle warps at :data:`MAX_REGS` each).
    The next launch's programs, resident before this one finishes, then land two to an SM on some SMs and none on
    others: back to back on the H200 such launches (128 programs of 4 consumer warps) took 5-21 % longer with PDL, the
    other ring launches up to 15 % less (docs/BENCHMARKS.md, session 20)."""
    return programs > sms or 2 * MAX_REGS[tokens] * 32 * (warps + 4) > 65536


def stream_smem_bytes(bits: int, kq: int, block_n: int, block_k: int, stages: int, warps: int, tokens: int) -> int:
    """Shared memory of a :func:`gemv_tma_kernel` launch: the ring's slots and the prepared activations."""
    return (stages * block_n * (block_k * bits // 8 + 2 * (block_k // GROUP_SIZE))
            + tokens * prep_chunk(kq, warps, tokens) * (PAIR_BYTES + GROUP_BYTES) + 16 * stages)


def stream_gemv_supported(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, kq: int,
                          has_split: bool, tokens: int) -> bool:
    """Whether :func:`launch_gemv_tma` takes this call on ``tokens``-token programs (else the caller runs another
    kernel)."""
    return (bits in STREAM_BITS and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and not has_split
            and tokens in STREAM_TOKENS and x.shape[0] <= tokens and x.shape[1] == kq and x.stride(1) == 1
            and packed.stride(0) == 1 and scales.stride(0) == 1 and scales.shape[0] % 16 == 0
            and compute_capability(x.device)[0] == 9)


def ring_descriptors(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, block_n: int,
                     block_k: int) -> tuple:
    """The ring's TMA descriptors of a K-major layer: its words ``[Kq P / 32, N]`` and scale and zero bytes ``[G, N]``
    in step boxes of ``block_n`` columns and ``block_k`` codes."""
    groups = block_k // GROUP_SIZE
    return (tma_descriptor(packed.t(), [block_k * bits // 32, block_n], False),
            tma_descriptor(scales.view(torch.uint8).t(), [groups, block_n], False),
            tma_descriptor(zeros.t(), [groups, block_n], False))


def launch_gemv_tma(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                    col_mult: float, zoff: float, zmul: float, tokens: int, block_n: int, block_k: int, stages: int,
                    warps: int, y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` for up to ``tokens`` tokens (:func:`stream_gemv_supported`) with :func:`gemv_tma_kernel`:
    programs of ``block_n`` columns (16, 32, 64 or 128) and ``warps`` consuming warps, steps of ``block_k`` codes,
    ``stages`` steps in flight."""
    m, kq = x.shape
    n = scales.shape[0]
    groups = block_k // GROUP_SIZE
    rows = 32 * warps // (block_n // 4) if block_n in (16, 32, 64, 128) else 0
    smem = stream_smem_bytes(bits, kq, block_n, block_k, stages, warps, tokens)
    if (tokens not in STREAM_TOKENS or m > tokens or not rows or warps % 4 or block_k % GROUP_SIZE
            or groups & (groups - 1) or groups % rows or groups > 32 or stages < 1 or smem > SMEM_BYTES):
        raise ValueError(f"gemv_tma takes block_m 1, 2 or 4 tokens (at least the call's), block_n 16, 32, 64 or 128, "
                         f"a multiple of 4 warps (warp specialization), block_k a power-of-two number of groups (at "
                         f"most 32) that the {rows} threads sharing a column divide, at least one stage and at most "
                         f"{SMEM_BYTES} bytes of shared memory (fewer stages use less); got {m} tokens on block_m "
                         f"{tokens}, {block_n}, {block_k}, {stages} stages, {warps} warps ({smem} bytes)")
    chunk = prep_chunk(kq, warps, tokens)
    grid = triton.cdiv(n, block_n)
    gemv_tma_kernel[(grid, )](
        x, *ring_descriptors(packed, scales, zeros, bits, block_n, block_k), row_scale,
        token_scale if token_scale is not None else row_scale, bias if bias is not None else row_scale, y,
        m, n, kq, x.stride(0), y.stride(0), T=tokens, P=bits, CHUNK=chunk, ONE_CHUNK=chunk * GROUP_SIZE >= kq,
        STAGES=stages, ZOFF=zoff, ZMUL=zmul, COL_MULT=col_mult, HAS_TS=token_scale is not None,
        HAS_BIAS=bias is not None, num_warps=warps, maxnreg=MAX_REGS[tokens],
        launch_pdl=pdl_for(x) and pdl_keeps_balance(grid, tokens, warps, sm_count(x.device)))
    return y
