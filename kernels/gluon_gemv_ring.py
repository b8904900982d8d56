"""W{b}A16 linear for 2..16 tokens on tensor cores, its codes fed by a TMA ring (Gluon): ``Config("gemv_ring")``.

Why: the tensor-core decode kernel (:mod:`kernels.gluon_gemv`) spends two instructions per code pair whatever the
token count, but it loads its codes into registers one step ahead, so its few warps per SM wait on global-memory
latency (docs/BENCHMARKS.md, session 15: 0.4 instructions per cycle and scheduler): at 2..8 tokens it takes 13-14 µs
on W2 8192 x 8192, where the one-token GEMV fed by a TMA ring (:mod:`kernels.gluon_stream`) takes 8.2. Here the
decode kernel's arithmetic (:func:`kernels.gluon_gemv._step`, unchanged) reads its codes, scale and zero bytes from
the slots of that ring, kept ``STAGES`` steps ahead by TMA: one thread issues a slot's next copies once every
warp has read it (no loader warp, so no idle warps padding the launch hold registers: twice the warps per SM of a
warp-specialized ring at 128 registers).

Per program: 32 output channels (one warp's width: two ``m16n8k16`` tiles) over all of K, ``num_warps`` warps
along K. A ring step holds ``256 num_warps`` codes (``[8 num_warps P, 32]`` K-major words, ``[8 num_warps,
32]`` scale and zero bytes); warp ``w`` takes the step's 128-code blocks ``2 w`` and ``2 w + 1`` (the decode
kernel's two steps per iteration, after which it adds the zero terms), lane ``(g, c)`` the words of group ``c`` of
each block for channels ``4 g .. 4 g + 3``, as the decode kernel's lanes load them from global memory. The
activations still come from global memory (L2), one ring step ahead in registers. The warps' sums are added through
shared memory at the end; no split-K.

Scope: as :func:`kernels.gluon_gemv.mma_gemv_supported`, and ``N % 32 == 0``, Hopper (TMA). Gluon has no
interpreter: tested on the GPU only.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from .device import compute_capability
from .gluon_gemm import SMEM_BYTES, cta_barrier, reinterpret
from .gluon_gemv import STEP_K, WARP_CHANNELS, _step, _store, _tile_pair, _zero_terms, lane_constants, token_rows
from .gluon_stream import _issue, ring_descriptors
from .pdl import launch_dependents, pdl_for, wait_prior_grid

# registers per thread by token tiles (the launch's maxnreg)
RING_REGS = {1: 128, 2: 168}
CHANNELS = gl.constexpr(WARP_CHANNELS)  # per program


@gluon.jit
def _split_last(t):
    a, b = gl.split(t)
    return a, b


@gluon.jit
def _slot_words(code_buf, P: gl.constexpr, W: gl.constexpr, L4: gl.constexpr):
    """A slot's words as ``(block 2 w, block 2 w + 1)`` of ``P`` ``[32 W, 4]`` int32 tensors in ``L4``: lane ``(g,
    c)`` of warp ``w`` holds word row ``r`` of group ``c`` of its block for channels ``4 g .. 4 g + 3``."""
    L6: gl.constexpr = gl.BlockedLayout([1, 2, 1, P, 1, 4], [1, 1, 4, 1, 8, 1], [W, 1, 1, 1, 1, 1], [5, 3, 1, 2, 4, 0])
    v = reinterpret(code_buf, code_buf.dtype, [W, 2, 4, P, 8, 4],
                    gl.SwizzledSharedLayout(1, 1, 1, [5, 4, 3, 2, 1, 0])).load(L6)
    v = gl.reshape(gl.permute(v, [0, 4, 2, 5, 3, 1]), [32 * W, 4, P, 2])  # [lane of the program, channel, row, block]
    b0, b1 = _split_last(v)
    return _rows(b0, P, L4), _rows(b1, P, L4)


@gluon.jit
def _rows(v, P: gl.constexpr, L4: gl.constexpr):
    """``[R, 4, P]`` as ``P`` ``[R, 4]`` tensors in ``L4`` (register renames)."""
    if P == 2:
        r0, r1 = _split_last(v)
        return (gl.convert_layout(r0, L4, assert_trivial=True), gl.convert_layout(r1, L4, assert_trivial=True))
    else:
        lo, hi = _split_last(gl.reshape(v, [v.shape[0], 4, 2, 2]))  # row 2 a + b: b = 0, then b = 1
        r0, r2 = _split_last(lo)
        r1, r3 = _split_last(hi)
        return (gl.convert_layout(r0, L4, assert_trivial=True), gl.convert_layout(r1, L4, assert_trivial=True),
                gl.convert_layout(r2, L4, assert_trivial=True), gl.convert_layout(r3, L4, assert_trivial=True))


@gluon.jit
def _slot_bytes(byte_buf, W: gl.constexpr, LT: gl.constexpr):
    """A slot's scale (or zero) bytes as ``(block 2 w, block 2 w + 1)`` ``[32 W]`` int32 tensors in ``LT``: lane ``(g,
    c)`` holds the bytes of channels ``4 g .. 4 g + 3`` of group ``c`` of its block."""
    L4: gl.constexpr = gl.BlockedLayout([1, 2, 1, 1], [1, 1, 4, 8], [W, 1, 1, 1], [1, 2, 3, 0])
    v = reinterpret(byte_buf, gl.int32, [W, 2, 4, 8], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])).load(L4)
    b0, b1 = _split_last(gl.reshape(gl.permute(v, [0, 3, 2, 1]), [32 * W, 2]))
    return gl.convert_layout(b0, LT, assert_trivial=True), gl.convert_layout(b1, LT, assert_trivial=True)


@gluon.jit
def _load_acts(x_ptr, i, tok_x, sx, G, W: gl.constexpr, NT: gl.constexpr, L16: gl.constexpr):
    """Ring step ``i``'s activations of every lane, for both of its warp's blocks: per block a tuple of ``NT`` ``[32
    W, 16]`` int32 (32 16-bit values of the lane's group for token ``g`` of each token tile; 0 past the last
    group)."""
    R: gl.constexpr = 32 * W
    tid = gl.arange(0, R, layout=gl.SliceLayout(1, L16))
    kx = gl.arange(0, 16, layout=gl.SliceLayout(0, L16))[None, :]
    out = ()
    for jl in gl.static_range(2):
        grp = 4 * (i * 2 * W + 2 * (tid // 32) + jl) + tid % 4
        ok = (grp < G)[:, None] & (kx < 16)
        xas = ()
        for u in gl.static_range(NT):
            xas = xas + (gl.load(x_ptr + (tok_x[u] * sx + grp * 16)[:, None] + kx, mask=ok, other=0), )
        out = out + (xas, )
    return out


@gluon.jit
def gemv_ring_kernel(x_ptr, w_desc, s_desc, z_desc, rs_ptr, ts_ptr, bias_ptr, y_ptr, M, N, G, sx, sy, one,
                     P: gl.constexpr, BF16: gl.constexpr, NT: gl.constexpr, STAGES: gl.constexpr, ZOFF: gl.constexpr,
                     ZMUL: gl.constexpr, COL_MULT: gl.constexpr, HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y [M, N] = x [M, Kq] @ W_b^T`` for ``M <= 8 NT``, one program per 32 channels (grid ``N / 32``); see the
    module docstring. ``x_ptr``: an int32 view of the activations (row stride ``sx`` words); ``w_desc``, ``s_desc``,
    ``z_desc``: TMA descriptors of the K-major words and scale and zero bytes in steps of ``256 num_warps`` codes and
    32 channels; ``G`` groups of 32 along K."""
    W: gl.constexpr = gl.num_warps()
    R: gl.constexpr = 32 * W
    RW: gl.constexpr = w_desc.block_type.shape[0]
    GS: gl.constexpr = s_desc.block_type.shape[0]
    gl.static_assert(GS == 8 * W, "a ring step is two 128-code blocks per warp")
    NV: gl.constexpr = 8 * NT
    LT: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
    L4: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [W, 1], [1, 0])
    L16: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [W, 1], [1, 0])
    code_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, RW, CHANNELS], w_desc.layout)
    scale_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES, GS, CHANNELS], s_desc.layout)
    zero_bufs = gl.allocate_shared_memory(z_desc.dtype, [STAGES, GS, CHANNELS], z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
    fence_async_shared()
    off_n = gl.program_id(0) * CHANNELS
    n_steps = gl.cdiv(G, GS)
    for b in gl.static_range(STAGES):  # the weights are not the previous kernel's: their copies start before the wait
        if b < n_steps:
            _issue(w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, b, b, off_n)
    wait_prior_grid()  # PDL (:mod:`kernels.pdl`): the activations and the output may be the previous kernel's

    tid_x = gl.arange(0, R, layout=gl.SliceLayout(1, L16))
    tok_x = ()
    for u in gl.static_range(NT):
        tok_x = tok_x + (gl.minimum(8 * u + (tid_x % 32) // 4, M - 1), )
    one_p, neg_p, zero_u, sel, g_t, c_t = lane_constants(one, R, P, BF16, LT)
    zero_f = gl.zeros([R], gl.float32, LT)
    acc0e = (zero_f, ) * (4 * NT)
    acc0o = acc0e
    acc1e = acc0e
    acc1o = acc0e
    xs = _load_acts(x_ptr, 0, tok_x, sx, G, W, NT, L16)
    for i in range(n_steps):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        w0, w1 = _slot_words(code_bufs.index(s), P, W, L4)
        s0, s1 = _slot_bytes(scale_bufs.index(s), W, LT)
        z0, z1 = _slot_bytes(zero_bufs.index(s), W, LT)
        # the slot's next bytes come by TMA (the async proxy): fenced after every warp has read it (as in
        # kernels.gluon_stream), then one thread issues them
        fence_async_shared()
        cta_barrier()
        if i + STAGES < n_steps:
            _issue(w_desc, s_desc, z_desc, code_bufs, scale_bufs, zero_bufs, ready, i + STAGES, s, off_n)
        xs_next = _load_acts(x_ptr, i + 1, tok_x, sx, G, W, NT, L16)  # masked off past the last step
        acc0e, acc0o, acc1e, acc1o, zc0, xg0 = _step((w0, xs[0], s0, z0), acc0e, acc0o, acc1e, acc1o, one_p, neg_p,
                                                     sel, zero_u, g_t, c_t, ZOFF, ZMUL, P, BF16, NT, LT)
        acc0e, acc0o, acc1e, acc1o, zc1, xg1 = _step((w1, xs[1], s1, z1), acc0e, acc0o, acc1e, acc1o, one_p, neg_p,
                                                     sel, zero_u, g_t, c_t, ZOFF, ZMUL, P, BF16, NT, LT)
        acc0o, acc1o = _zero_terms(acc0o, acc1o, zc0, zc1, xg0, xg1, NT)
        xs = xs_next
    launch_dependents()  # only the epilogue is left

    # per lane: channels 4 g + ch, tokens 8 u + 2 c (+ 1) (as gemv_mma_kernel's vals); the warps' sums added through
    # shared memory
    L2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [W, 1], [1, 0])
    sums = ()
    for u in gl.static_range(NT):
        for ch in gl.static_range(4):
            if ch < 2:
                pair = _tile_pair(acc0e, acc0o, 4 * u + 2 * (ch % 2))
            else:
                pair = _tile_pair(acc1e, acc1o, 4 * u + 2 * (ch % 2))
            for v in gl.static_range(2):
                sums = sums + (gl.sum(gl.convert_layout(gl.reshape(pair[v], [W, 32]), L2), axis=0), )
    gl.static_assert(len(sums) == NV)
    tid_o = gl.arange(0, 32, layout=gl.SliceLayout(0, L2))
    _store(sums, off_n + tid_o // 4 * 4, tid_o % 4, M, N, y_ptr, sy, rs_ptr, ts_ptr, bias_ptr, NT, COL_MULT, HAS_TS,
           HAS_BIAS)


def ring_gemv_supported(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, kq: int,
                        has_split: bool) -> bool:
    """Whether :func:`launch_gemv_ring` takes this call (else the caller runs another kernel)."""
    n = scales.shape[0]
    return (bits in (2, 4) and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and not has_split
            and x.shape[0] <= 16 and x.shape[1] == kq and kq % STEP_K == 0 and n % WARP_CHANNELS == 0
            and packed.stride(0) == 1 and scales.stride(0) == 1 and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0 and compute_capability(x.device)[0] == 9)


def ring_smem_bytes(bits: int, warps: int, stages: int) -> int:
    """Shared memory of a :func:`gemv_ring_kernel` launch: the ring's slots and barriers."""
    codes = 256 * warps
    return stages * WARP_CHANNELS * (codes * bits // 8 + 2 * codes // 32) + 16 * stages


def launch_gemv_ring(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                     col_mult: float, zoff: float, zmul: float, warps: int, stages: int,
                     y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` (``x`` ``[M <= 16, Kq]``, 16-bit, rows 16-byte aligned; :func:`ring_gemv_supported`) with
    :func:`gemv_ring_kernel`: programs of 32 channels, ``warps`` (4 or 8) consumer warps along K, ``stages`` ring
    steps of ``256 warps`` codes in flight."""
    m, kq = x.shape
    n = scales.shape[0]
    smem = ring_smem_bytes(bits, warps, stages)
    if warps not in (4, 8) or stages < 1 or smem > SMEM_BYTES:
        raise ValueError(f"gemv_ring takes 4 or 8 consumer warps and at least one stage in {SMEM_BYTES} bytes of "
                         f"shared memory; got {warps} warps, {stages} stages ({smem} bytes)")
    nt = token_rows(m) // 8
    bf16 = x.dtype == torch.bfloat16
    ring_gemv_kernel = gemv_ring_kernel[(n // WARP_CHANNELS, )]
    ring_gemv_kernel(
        x.view(torch.int32), *ring_descriptors(packed, scales, zeros, bits, WARP_CHANNELS, 256 * warps), row_scale,
        token_scale if token_scale is not None else row_scale, bias if bias is not None else row_scale, y, m, n,
        kq // 32, x.stride(0) // 2, y.stride(0), 0x43004300 if bf16 else 0x64006400, P=bits, BF16=bf16, NT=nt,
        STAGES=stages, ZOFF=zoff, ZMUL=zmul, COL_MULT=col_mult, HAS_TS=token_scale is not None,
        HAS_BIAS=bias is not None, num_warps=warps, maxnreg=RING_REGS[nt], launch_pdl=pdl_for(x))
    return y
