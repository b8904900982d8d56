"""W{b}A16 linear for 16..256 tokens on Hopper: the dequantized weights are wgmma's register operand (Gluon),
``Config("gemm_ra")``.

Why: at these sizes the weights are read once but multiplied by many tokens, so the tensor cores must do the
multiply, and the dequantized tile should go from the codes straight into wgmma without a trip through shared memory.
The Triton ``W @ x^T`` tiles (:mod:`kernels.triton_gemm`, ``gemm_t``) stage their register operand through shared
memory into its layout; ``x @ W^T`` (``gemm``) stores the dequantized weights to shared memory and pads the tokens to
wgmma's 64 rows. Here each lane dequantizes exactly the elements it holds of wgmma's register A operand
(``DotOperandLayout``), and the K-major codes, scale and zero bytes and the activations arrive by TMA.

``y [M, N] = x [M, Kq] @ W_b^T``, computed as ``acc [64, T] += W_tile [64, 128] @ x_tile^T [128, T]`` per program
and step: 64 weight rows (one warpgroup, wgmma's m64) of ``T`` tokens (wgmma's N: 16..128; token tiles past the first
in more programs), along the program's share of K in steps of ``BK = 128`` (split-K programs reduce in-kernel, as
:func:`kernels.triton_common.finish`: a workspace and a self-resetting counter per output tile). Three programs per SM
where their rings fit and the grid then needs fewer waves (80 registers per thread at launch, up to 64 tokens), else
two (128): :func:`ra_programs`.

**The activations in lane order** (:func:`ra_order`, one pass per call): wgmma's A gives lane ``c = lane % 4`` of a
row the K positions ``2c, 2c + 1, 2c + 8, 2c + 9`` of every 16, so in weight order each lane would need the scale and
zero point of every group of a step, computed four times per row (once per lane of the quad). The dot product does
not care about the order of K as long as both operands share it: each 128-column block of ``x`` is permuted so that
the positions of lane ``c`` hold group ``c`` of the block. A lane then owns one group per row and step, and its
register ``r = 8 W + i`` (``W`` the 64-K half, ``i = 2 t + u`` with ``t`` the 16-K chunk of the half and ``u`` the
lane's first or second register of it) holds the weights ``16 W + i`` and ``16 W + i + 8`` of the group, which are
the two halves of one code word after a shift: the pair wgmma wants in one register, with no byte permutes.

* A loader warp (a ``warp_specialize`` worker) copies each step's two activation halves ``[T, 64]`` (swizzled for
  wgmma), the step's code words as ``[P, 4, 64]`` (word ``j`` of group ``c`` of each row: a strided view of the
  K-major codes, so one lane's words of a group are planes, not neighbours) and scale and zero bytes ``[4, 64]`` into
  a ring of ``STAGES`` slots; the slot's ``ready`` mbarrier counts the bytes.
* The consumer warps (the default partition) read a slot one step ahead into registers (per lane and row: its group's
  ``P`` words, scale and zero byte) and build both halves of the A operand: per register pair of a 16-K chunk, a W2
  word shifted by ``4 t`` gives codes at bits 0 and 2 of both halves (a W4 chunk, byte ``t`` of its two words by one
  byte permute, then codes at bits 0 and 4); a LOP3 each makes the 16-bit pairs ``M + 4^e q`` (``M`` = 128 in bf16,
  1024 in fp16), one pair add leaves ``4^e (q - C)`` exactly (``C = 2^(P-1)``), one pair FMA with ``(c / 4^e)`` and
  ``(C - zero_b) c`` gives ``(q - zero_b) c`` rounded once (``(C - zero_b) c`` is rounded to 16 bits first, as in the
  ``gemm_t`` tiles): 6.75 (W2) to 8 (W4) instructions per four codes, one ``inline_asm_elementwise``
  over a lane's four elements of a chunk (:func:`operand_layout` orders its registers so). Then two ``warpgroup_mma``
  on the registers and the slot's activation halves. wgmma reads its register operand while it runs, so each step's
  wgmmas finish before the next step's dequantization may reuse the registers (the other programs on the SM keep the
  tensor cores and the issue slots busy meanwhile); the slot then goes back to the loader (a barrier of the consumer
  warps, one arrive on its ``empty`` mbarrier).
* Epilogue: ``row_scale * COL_MULT`` per output column, the token scale of quantized activations, bias.

Launched with programmatic dependent launch (:mod:`kernels.pdl`), as is the order pass before it.

Scope: 2- and 4-bit K-major codes (``kernels.ops.k_major``) with ``N % 16 == 0``, bf16/fp16 activations, no split
channels, Hopper (:func:`ra_supported`). A last block past ``Kq`` reads zero activations (the order pass pads them)
and zero scale bytes (TMA fills them), which add nothing. Gluon has no interpreter: the kernel is tested on the GPU
only; the order pass (Triton) also under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .device import compute_capability, sm_count
from .gluon_gemm import SMEM_BYTES, cta_barrier, tma_descriptor, tma_load
from .gluon_stream import along
from .grid import GROUP_SIZE
from .pdl import launch_dependents, pdl_for, release_next_grid, wait_prior_grid, wait_prior_grid_if
from .triton_common import e4m3_scaled, store_scaled
from .triton_pairs import BF16_ONE, F16_ONE, minus_centre, splat

RA_BITS = (2, 4)
RA_TOKENS = (16, 32, 64, 128)  # wgmma's N per program (Config.block_m)
RA_STEP_K = 128  # K per step: four groups, one per lane of a quad
HALF_K = 64  # K per wgmma: one 128-byte swizzled row of 16-bit activations
QUAD = RA_STEP_K // GROUP_SIZE  # groups per step, lanes of a quad
LOADER_REGS = gl.constexpr(48)
# the operands of :func:`_dequant_asm`: two A registers out; five inputs of four elements each
DEQUANT_CONSTRAINTS = gl.constexpr("=r,=r," + ",".join(["r"] * 20))
RA_ROWS = 64  # weight rows per program: one warpgroup (wgmma's m64); two warpgroups of 128 rows measured slower
# registers per thread (the launch's maxnreg, counted for the 4 consumer warps, the loader and the 3 idle warps that pad
# the program to 8) by programs per SM: after the loader's and idle warps' setmaxnreg the consumers get 136 of 80 (no
# spills offline up to 64 tokens) or 232 of 128
PROGRAM_REGS = {3: 80, 2: 128}
SM_SHARED = 228 * 1024  # shared memory of a Hopper SM
PROGRAM_SHARED = 3 * 1024  # per program beside its ring: 1 KB reserved, 1 KB static, barriers (with room to spare)
ORDER_BLOCK = 1024  # columns per program of the order pass
RA_THREE_MIN_STEPS = 24  # ra_plan: steps per split below which 64-token programs run two per SM (H200 A/B)


def ra_order(x: torch.Tensor) -> torch.Tensor:
    """The activations ``x [M, Kq]`` in the kernel's K order (the reference of :func:`launch_ra_order`): ``[M, Kp]``
    with ``Kp`` = ``Kq`` rounded up to 128 (zeros past ``Kq``), each 128-column block's column ``32 c + 16 W + 8 h +
    2 t + u`` moved to ``64 W + 16 t + 8 u + 2 c + h`` (group ``c`` to the K positions that wgmma gives lane ``c``)."""
    m, kq = x.shape
    kp = triton.cdiv(kq, RA_STEP_K) * RA_STEP_K
    blocks = torch.nn.functional.pad(x, (0, kp - kq)).reshape(m, kp // RA_STEP_K, QUAD, 2, 2, 4, 2)
    return blocks.permute(0, 1, 3, 5, 6, 2, 4).reshape(m, kp)


@triton.jit
def ra_order_kernel(x_ptr, y_ptr, Kq, Kp, stride_xm, stride_xk, stride_ym, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    """One token's ``BLOCK`` columns of :func:`ra_order`: each output column gathers its input column."""
    release_next_grid(PDL)  # the linear after this pass may launch now (it waits for the pass to finish)
    wait_prior_grid_if(PDL)
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j = col % 128
    src = (col - j + 32 * ((j >> 1) & 3) + 16 * (j >> 6) + 8 * (j & 1) + 2 * ((j >> 4) & 3) + ((j >> 3) & 1))
    v = tl.load(x_ptr + row * stride_xm + src * stride_xk, mask=src < Kq, other=0.0)
    tl.store(y_ptr + row * stride_ym + col, v, mask=col < Kp)


def launch_ra_order(x: torch.Tensor) -> torch.Tensor:
    """:func:`ra_order` of ``x [M, Kq]`` (any strides) into a new contiguous tensor, by :func:`ra_order_kernel` (PDL
    on Hopper)."""
    m, kq = x.shape
    kp = triton.cdiv(kq, RA_STEP_K) * RA_STEP_K
    y = torch.empty(m, kp, dtype=x.dtype, device=x.device)
    if m:
        pdl = pdl_for(x)
        ra_order_kernel[(m, triton.cdiv(kp, ORDER_BLOCK))](x, y, kq, kp, x.stride(0), x.stride(1), y.stride(0),
                                                          BLOCK=ORDER_BLOCK, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y


@gluon.constexpr_function
def operand_layout(rows, warps):
    """The ``[rows, 4 (t), 2 (u), 4 (c), 2 (h)]`` layout whose reshape to ``[rows, 64]`` (K ``16 t + 8 u + 2 c + h``)
    is wgmma's register A operand of one 64-K half (``DotOperandLayout(0, NVMMA v3, k_width=2)`` of ``warps`` warps,
    16 rows each) up to the order of a lane's registers: here ``h`` and ``u`` come first, so a four-element
    ``inline_asm_elementwise`` gets a lane's two registers of one row and 16-K chunk (the conversion to the operand's
    own order is a register rename)."""
    reg = [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0], [8, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0]]
    lane = [[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [1, 0, 0, 0, 0], [2, 0, 0, 0, 0], [4, 0, 0, 0, 0]]
    warp = [[16 << j, 0, 0, 0, 0] for j in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [rows, 4, 2, 4, 2])


@gluon.constexpr_function
def group_layout(rows, warps):
    """The ``[4 (c), rows]`` layout of a step's per-group planes (a word of each group, the scale or zero bytes) as
    the slot holds them, whose transpose is :func:`operand_layout` sliced to ``[rows, c]`` (so loading the slot in it
    and permuting the registers gives each lane its group's values; a permuted view of the slot is not read as its
    bytes lie)."""
    full = operand_layout(rows, warps)

    def project(bases):
        return [[b[3], b[0]] for b in bases]

    return gl.DistributedLinearLayout(project(full.reg_bases), project(full.lane_bases), project(full.warp_bases),
                                      [], [4, rows])


@gluon.constexpr_function
def _dequant_asm(P, BF16):
    """PTX of a lane's two A registers of one row and 16-K chunk (module docstring): ``$0`` of the weights ``(i, i +
    8)``, ``$1`` of ``(i + 1, i + 9)`` (``i = 2 t``); inputs four each of: the chunk's word (``$2``: a W2 word shifted
    by ``4 t``, a W4 byte pair), ``(M, M)`` (``$6``), ``-(M + 4^e C, ..)`` (``$10``, ``$12``), ``(c / 4^e, ..)``
    (``$14``, ``$16``), ``((C - zero_b) c, ..)`` (``$18``)."""
    t = "bf16" if BF16 else "f16"
    if P == 2:
        first = "lop3.b32 a, $2, 0x00030003, $6, 0xEA;\nlop3.b32 b, $2, 0x000C000C, $6, 0xEA;\n"
    else:
        first = ("shr.b32 b, $2, 4;\nlop3.b32 a, $2, 0x000F000F, $6, 0xEA;\n"
                 "lop3.b32 b, b, 0x000F000F, $6, 0xEA;\n")
    return ("{ .reg .b32 a, b;\n" + first +
            f"add.rn.{t}x2 a, a, $10;\nadd.rn.{t}x2 b, b, $12;\n"
            f"fma.rn.{t}x2 $0, a, $14, $18;\nfma.rn.{t}x2 $1, b, $16, $18; }}")


@gluon.jit
def _chunk_words(lo, hi, t, P: gl.constexpr):
    """Per 16-K chunk ``t`` of a half: the word the dequantization masks, from the half's plane(s) of words ``[rows,
    1, 1, c, 1]``: a W2 word shifted by ``4 t``, or for W4 byte ``t`` of the low-weight word in the low half and of
    the high-weight word in the high half (one ``prmt``)."""
    lo = lo.to(gl.uint32, bitcast=True)
    if P == 2:
        return lo >> (4 * t)
    hi = hi.to(gl.uint32, bitcast=True)
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, t | ((t + 4) << 8)],
                                     dtype=gl.uint32, is_pure=True, pack=1)


@gluon.jit
def _to5(v):
    """``[rows, c]`` (the slice of :func:`operand_layout`) -> ``[rows, 1, 1, c, 1]``."""
    return gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 1), 2), 4)


@gluon.jit
def _half(lo, hi, t, one, centre, scale, addend, P: gl.constexpr, BF16: gl.constexpr, dot: gl.constexpr):
    """One 64-K half of the step's A operand ``[rows, 64]`` (activation dtype, layout ``dot``): ``(q - zero_b) c``
    from the half's word planes ``lo``, ``hi`` ``[rows, c]`` and the group's pairs (:func:`_dequant_asm`)."""
    w = _chunk_words(_to5(lo), _to5(hi), t, P)
    a = gl.inline_asm_elementwise(_dequant_asm(P, BF16), DEQUANT_CONSTRAINTS, [w, one, centre, scale, addend],
                                  dtype=gl.bfloat16 if BF16 else gl.float16, is_pure=True, pack=4)
    return gl.convert_layout(gl.reshape(a, [a.shape[0], a.shape[1] * a.shape[2] * a.shape[3] * a.shape[4]]), dot,
                             assert_trivial=True)


@gluon.jit
def _consume(x_bufs, code_bufs, scale_bufs, zero_bufs, ready, empty, n_local, one_v, ZOFF: gl.constexpr,
             ZMUL: gl.constexpr, P: gl.constexpr, BF16: gl.constexpr):
    """The consumer warps: per step build both halves of the A operand from the slot read ahead, read the next slot,
    run the step's wgmmas and hand its slot back; returns the accumulator ``[rows, T]``."""
    STAGES: gl.constexpr = code_bufs.type.shape[0]
    T: gl.constexpr = x_bufs.type.shape[1]
    ROWS: gl.constexpr = code_bufs.type.shape[3]
    W: gl.constexpr = gl.num_warps()
    C: gl.constexpr = 1 << (P - 1)
    L5: gl.constexpr = operand_layout(ROWS, W)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, T, 16])
    dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    t = along(4, 1, 5, L5).to(gl.uint32)
    second = along(2, 2, 5, L5) == 1  # u: the lane's second register of a chunk (codes at bit 2 of a W2 word)
    one = gl.full([ROWS, 4, 2, 4, 2], one_v, gl.uint32, L5)
    E2: gl.constexpr = 2 if P == 2 else 0  # the second register's code bit
    centre = gl.where(second, minus_centre(E2, P, BF16), minus_centre(0, P, BF16)).to(gl.uint32)
    acc = gl.zeros([ROWS, T], gl.float32, mma)
    # the slot of step i + 1 is read into registers while step i is dequantized (its loads' latency hidden)
    w0, w1, w2, w3, sb, zb = _read_slot(code_bufs, scale_bufs, zero_bufs, ready, 0, P, L5)
    for i in range(n_local):
        c = e4m3_scaled(sb)
        scale = gl.where(second, _to5(splat(c * (1.0 / (1 << E2)), BF16, True)), _to5(splat(c, BF16, True)))
        addend = _to5(splat((C + ZOFF * ZMUL - zb.to(gl.float32) * ZMUL) * c, BF16, True))
        if P == 2:
            a0 = _half(w0, w0, t, one, centre, scale, addend, P, BF16, dot)
            a1 = _half(w1, w1, t, one, centre, scale, addend, P, BF16, dot)
        else:
            a0 = _half(w0, w1, t, one, centre, scale, addend, P, BF16, dot)
            a1 = _half(w2, w3, t, one, centre, scale, addend, P, BF16, dot)
        w0, w1, w2, w3, sb, zb = _read_slot(code_bufs, scale_bufs, zero_bufs, ready, gl.minimum(i + 1, n_local - 1),
                                            P, L5)
        s = i % STAGES
        acc = warpgroup_mma(a0, x_bufs.index(2 * s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a1, x_bufs.index(2 * s + 1).permute((1, 0)), acc, is_async=True)
        # wgmma reads its register operand while it runs, and the next step's dequantization may reuse the registers
        # (``deps`` keeps the 16-bit halves alive, not the packed registers: with a wgmma left in flight the H200
        # returned wrong sums), so each step's wgmmas finish first; the other programs on the SM fill the gap
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        # the step's wgmmas have read its activations and its codes reached the registers before they were
        # dequantized: after a barrier of these warps its slot goes back to the loader (no proxy fence, whose MEMBAR
        # would wait for step i + 1's shared loads in flight: no load of the slot can be pending)
        cta_barrier()
        mbarrier.arrive(empty.index(s))
    return (acc, )


@gluon.jit
def _plane(buf, L5: gl.constexpr):
    """A ``[4 (c), rows]`` plane of the slot as ``[rows, c]`` in the slice of ``L5`` that holds one group per lane."""
    ROWS: gl.constexpr = buf.type.shape[1]
    LG: gl.constexpr = group_layout(ROWS, gl.num_warps())
    LRC: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, L5)))
    return gl.convert_layout(gl.permute(buf.load(LG), (1, 0)), LRC, assert_trivial=True)


@gluon.jit
def _read_slot(code_bufs, scale_bufs, zero_bufs, ready, i, P: gl.constexpr, L5: gl.constexpr):
    """Wait for step ``i``'s slot and read each lane's words (``P`` planes ``[rows, c]``: ``w0, w1`` the first half's,
    ``w2, w3`` the second's for W4; W2 has one word per half, ``w0, w1``, repeated), scale and zero bytes."""
    STAGES: gl.constexpr = code_bufs.type.shape[0]
    s = i % STAGES
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    G: gl.constexpr = code_bufs.type.shape[2]
    words = code_bufs.index(s).reshape([P * G, code_bufs.type.shape[3]])
    w0 = _plane(words.slice(0, G), L5)
    w1 = _plane(words.slice(G, G), L5)
    if P == 2:
        w2 = w0
        w3 = w1
    else:
        w2 = _plane(words.slice(2 * G, G), L5)
        w3 = _plane(words.slice(3 * G, G), L5)
    return w0, w1, w2, w3, _plane(scale_bufs.index(s), L5), _plane(zero_bufs.index(s), L5)


@gluon.jit
def _load(x_desc, w_desc, s_desc, z_desc, x_bufs, code_bufs, scale_bufs, zero_bufs, ready, empty, first, n_local,
          off_m, off_n):
    """The loader warp: the TMA copies of the program's steps into the ring, each once its slot is free."""
    STAGES: gl.constexpr = code_bufs.type.shape[0]
    HK: gl.constexpr = x_desc.block_type.shape[1]
    G: gl.constexpr = s_desc.block_type.shape[0]
    nbytes: gl.constexpr = (2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes + s_desc.block_type.nbytes
                            + z_desc.block_type.nbytes)
    for i in range(n_local):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, nbytes)
        step = first + i
        tma_load(x_desc, [off_m, 2 * step * HK], bar, x_bufs.index(2 * s))
        tma_load(x_desc, [off_m, (2 * step + 1) * HK], bar, x_bufs.index(2 * s + 1))
        tma_load(w_desc, [0, step * G, off_n], bar, code_bufs.index(s))
        tma_load(s_desc, [step * G, off_n], bar, scale_bufs.index(s))
        tma_load(z_desc, [step * G, off_n], bar, zero_bufs.index(s))


@gluon.jit
def _finish(acc, off_m, off_n, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr, tile, pid_k, SPLIT_K,
            COL_MULT: gl.constexpr, HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Write ``acc [rows, T]`` as ``y[off_m + t, off_n + r]`` (scaled); split-K programs add their partial tiles
    first: each stores its own and bumps the tile's counter, the last one sums them, resets the counter and writes."""
    ROWS: gl.constexpr = acc.shape[0]
    T: gl.constexpr = acc.shape[1]
    if SPLIT_K > 1:
        layout: gl.constexpr = acc.type.layout
        offs = (gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))[:, None] * T
                + gl.arange(0, T, layout=gl.SliceLayout(0, layout))[None, :])
        base = ws_ptr + tile * (SPLIT_K * ROWS * T)
        gl.store(base + pid_k * (ROWS * T) + offs, acc)
        cta_barrier()
        arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = gl.zeros_like(acc)
            for s in range(SPLIT_K):
                total += gl.load(base + s * (ROWS * T) + offs, cache_modifier=".cg")
            gl.atomic_xchg(cnt_ptr + tile, 0)
            _store(total, off_m, off_n, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)
    else:
        _store(acc, off_m, off_n, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)


@gluon.jit
def _store(acc, off_m, off_n, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT: gl.constexpr,
           HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """:func:`kernels.triton_common.store_scaled` of the transposed tile (tokens as rows)."""
    out = gl.permute(acc, (1, 0))
    layout: gl.constexpr = out.type.layout
    toks = off_m + gl.arange(0, out.shape[0], layout=gl.SliceLayout(1, layout))
    cols = off_n + gl.arange(0, out.shape[1], layout=gl.SliceLayout(0, layout))
    store_scaled(out, toks, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)


@gluon.jit
def gemm_ra_kernel(x_desc, w_desc, s_desc, z_desc, rs_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, n_steps,
                   per_split, stride_ym, one, SPLIT_K, P: gl.constexpr, BF16: gl.constexpr,
                   ZOFF: gl.constexpr, ZMUL: gl.constexpr, COL_MULT: gl.constexpr, STAGES: gl.constexpr,
                   HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y = x @ W_b^T`` on ``x`` in :func:`ra_order`; grid ``(N / rows, cdiv(M, T), splits)``, each split
    ``per_split`` steps of 128 K."""
    wait_prior_grid()  # PDL: nothing is read or written before the previous kernel has finished
    T: gl.constexpr = x_desc.block_type.shape[0]
    HK: gl.constexpr = x_desc.block_type.shape[1]
    ROWS: gl.constexpr = w_desc.block_type.shape[2]
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    off_n = pid_n * ROWS
    off_m = pid_m * T
    first = pid_k * per_split
    n_local = gl.minimum(per_split, n_steps - first)

    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, T, HK], x_desc.layout)
    code_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    scale_bufs = gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    zero_bufs = gl.allocate_shared_memory(z_desc.dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)

    acc, = gl.warp_specialize([
        (_consume, (x_bufs, code_bufs, scale_bufs, zero_bufs, ready, empty, n_local, one, ZOFF, ZMUL, P, BF16)),
        (_load, (x_desc, w_desc, s_desc, z_desc, x_bufs, code_bufs, scale_bufs, zero_bufs, ready, empty, first,
                 n_local, off_m, off_n)),
    ], [1], [LOADER_REGS])
    launch_dependents()  # only the epilogue is left
    _finish(acc, off_m, off_n, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr,
            pid_m * gl.num_programs(0) + pid_n, pid_k, SPLIT_K, COL_MULT, HAS_TS, HAS_BIAS)


def ra_supported(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, kq: int,
                 has_split: bool) -> bool:
    """Whether :func:`launch_gemm_ra` takes this call: 2- or 4-bit K-major codes (TMA copies ``[K, N]`` tiles) with
    16-byte rows (``N % 16 == 0``), 16-bit activations of the expanded width, on a Hopper GPU (wgmma, TMA)."""
    return (bits in RA_BITS and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and not has_split
            and x.shape[1] == kq and packed.stride(0) == 1 and scales.stride(0) == 1 and scales.shape[0] % 16 == 0
            and compute_capability(x.device)[0] == 9)


def ra_split(n: int, kq: int, token_tiles: int, sms: int, per_sm: int = 2) -> int:
    """Split-K of a launch: the most splits (a power of two) that keep the grid within ``per_sm`` programs per SM, each
    split at least 512 columns (four steps)."""
    split = 1
    while (triton.cdiv(n, RA_ROWS) * token_tiles * 2 * split <= per_sm * sms
           and kq // (RA_STEP_K * 2 * split) >= 4):
        split *= 2
    return split


def ra_ring_depths(block_m: int, bits: int, act_bytes: int = 2) -> list[int]:
    """The ring depths (of 2, 3 and 5 slots) at which two programs' rings fit on an SM, shallowest first."""
    return [stages for stages in (2, 3, 5) if ra_rings_fit(2, block_m, stages, bits, act_bytes)]


def ra_plan(m: int, n: int, kq: int, bits: int, sms: int) -> tuple[int, int, int]:
    """``(block_m, split_k, stages)`` of a launch the table does not tune: ``m`` rounded up to a power of two tokens
    (16..128); as many splits as keep the grid within three programs per SM where three can run (at most 64 tokens,
    three rings fit at some depth: :func:`ra_programs`), else two (:func:`ra_split`); the deepest ring at which the
    grid runs in the fewest waves. At 64 tokens three programs share an SM only on the 3-slot ring, which pays where
    each split keeps :data:`RA_THREE_MIN_STEPS` steps; shorter splits take the two-per-SM split. (Fitted on the H200,
    docs/BENCHMARKS.md session 23: the split and depth of 68 of the 73 tuned entries; on 80 cells of eight other
    shapes timed with a grid of splits and depths, within 0.2 % of the grid's best on geometric mean, at worst 1.05x
    its time.)"""
    tokens = min(max(RA_TOKENS[0], triton.next_power_of_2(m)), RA_TOKENS[-1])
    token_tiles = triton.cdiv(m, tokens)
    depths = ra_ring_depths(tokens, bits)
    three = any(three_fit(tokens, d, bits) for d in depths)
    split = ra_split(n, kq, token_tiles, sms, 3 if three else 2)
    if three and tokens == 64 and triton.cdiv(kq, RA_STEP_K * split) < RA_THREE_MIN_STEPS:
        split = ra_split(n, kq, token_tiles, sms, 2)
    programs = triton.cdiv(n, RA_ROWS) * token_tiles * split

    def waves(depth: int) -> int:
        return triton.cdiv(programs, ra_programs(programs, sms, tokens, depth, bits) * sms)

    return tokens, split, min(depths, key=lambda d: (waves(d), -d))


def ra_slot_bytes(block_m: int, bits: int, act_bytes: int = 2) -> int:
    """Shared memory of one slot of the ring: a step's activations, code words, scale and zero bytes."""
    return block_m * RA_STEP_K * act_bytes + RA_ROWS * RA_STEP_K * bits // 8 + 2 * RA_ROWS * QUAD


def ra_rings_fit(programs: int, block_m: int, stages: int, bits: int, act_bytes: int = 2) -> bool:
    """Whether ``programs`` programs' rings of ``stages`` slots fit in one SM's shared memory."""
    return programs * (stages * ra_slot_bytes(block_m, bits, act_bytes) + PROGRAM_SHARED) <= SM_SHARED


def ra_programs(programs: int, sms: int, block_m: int, stages: int, bits: int, act_bytes: int = 2) -> int:
    """Programs per SM a launch of ``programs`` is sized for (its registers, :data:`PROGRAM_REGS`): three where their
    rings fit in shared memory, the accumulator leaves room (at most 64 tokens) and the grid then runs in fewer
    waves, else two. (The H200 A/B, docs/BENCHMARKS.md session 22: a grid that fits one wave of two per SM took up
    to 1.33x as long at three, the GPU packing three programs on some SMs and leaving others idle; one that needs
    fewer waves of three ran up to 1.48x faster.)"""
    fewer_waves = triton.cdiv(programs, 3 * sms) < triton.cdiv(programs, 2 * sms)
    return 3 if three_fit(block_m, stages, bits, act_bytes) and fewer_waves else 2


def three_fit(block_m: int, stages: int, bits: int, act_bytes: int = 2) -> bool:
    """Whether three programs can share an SM: their accumulators leave room (at most 64 tokens) and their rings of
    ``stages`` slots fit in shared memory."""
    return block_m <= 64 and ra_rings_fit(3, block_m, stages, bits, act_bytes)


def launch_gemm_ra(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   col_mult: float, zoff: float, zmul: float, block_m: int, stages: int, split_k: int,
                   ws: torch.Tensor, counters: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` with :func:`gemm_ra_kernel` after :func:`launch_ra_order`: ``block_m`` tokens (wgmma's N) by
    :data:`RA_ROWS` weight rows per program, ``stages`` slots in the ring (at least 2), up to ``split_k`` programs
    along K (``ws``: ``tiles * split_k * block_m * RA_ROWS`` floats; ``counters``: one zeroed int32 per output
    tile)."""
    m, kq = x.shape
    n = scales.shape[0]
    smem = stages * ra_slot_bytes(block_m, bits, x.element_size())
    if block_m not in RA_TOKENS or stages < 2 or smem > SMEM_BYTES:
        raise ValueError(f"gemm_ra takes block_m in {RA_TOKENS}, at least 2 stages and at most {SMEM_BYTES} bytes of "
                         f"slots; got {block_m}, {stages} ({smem} bytes)")
    xo = launch_ra_order(x)
    n_steps = triton.cdiv(kq, RA_STEP_K)
    per_split = triton.cdiv(n_steps, split_k)
    grid = (triton.cdiv(n, RA_ROWS), triton.cdiv(m, block_m), triton.cdiv(n_steps, per_split))
    bf16 = x.dtype == torch.bfloat16
    groups = kq // GROUP_SIZE
    # word j of group g of row r at [j, g, r]: a lane's words of its group are planes of the slot
    words = packed.t().view(groups, bits, n).permute(1, 0, 2)
    gemm_ra_kernel[grid](tma_descriptor(xo, [block_m, HALF_K], True),
                         tma_descriptor(words, [bits, QUAD, RA_ROWS], False),
                         tma_descriptor(scales.view(torch.uint8).t(), [QUAD, RA_ROWS], False),
                         tma_descriptor(zeros.t(), [QUAD, RA_ROWS], False),
                         row_scale, token_scale if token_scale is not None else row_scale,
                         bias if bias is not None else row_scale, y, ws, counters, m, n, n_steps, per_split,
                         y.stride(0), BF16_ONE if bf16 else F16_ONE, grid[2], P=bits, BF16=bf16,
                         ZOFF=zoff, ZMUL=zmul, COL_MULT=col_mult, STAGES=stages, HAS_TS=token_scale is not None,
                         HAS_BIAS=bias is not None, num_warps=RA_ROWS // 16,
                         maxnreg=PROGRAM_REGS[ra_programs(grid[0] * grid[1] * grid[2], sm_count(x.device), block_m,
                                                          stages, bits, x.element_size())],
                         launch_pdl=pdl_for(x))
    return y
