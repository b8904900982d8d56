"""W{b}A16 linear for 16..256 tokens on Hopper: the dequantized weights are wgmma's register operand (Gluon),
``Config("gemm_ra")``.

Why: at these sizes the weights are read once but multiplied by many tokens, so the tensor cores must do the
multiply, and the dequantized tile should go from the codes straight into wgmma without a trip through shared memory.
The Triton ``W @ x^T`` tiles (:mod:`kernels.triton_gemm`, ``gemm_t``) stage their register operand through shared
memory into its layout; ``x @ W^T`` (``gemm``) stores the dequantized weights to shared memory and pads the tokens to
wgmma's 64 rows. Here each lane dequantizes exactly the elements it holds of wgmma's register A operand
(``DotOperandLayout``), and the K-major codes, scale and zero bytes and the activations arrive by TMA.

``y [M, N] = x [M, Kq] @ W_b^T``, computed as ``acc [64, T] += W_tile [64, BK] @ x_tile^T [BK, T]`` per program: 64
weight rows (one warpgroup, wgmma's m64) of ``T`` tokens (wgmma's N: 16..128; token tiles past the first in more
programs), along the program's share of K in steps of ``BK = 64`` (split-K programs reduce in-kernel, as
:func:`kernels.triton_common.finish`: a workspace and a self-resetting counter per output tile). Two programs per SM
(128 registers per thread).

* A loader warp (a ``warp_specialize`` worker) copies each step's activation tile ``[T, BK]`` (swizzled for wgmma),
  packed words ``[BK P / 32, 64]``, scale and zero bytes ``[BK / 32, 64]`` into a ring of ``STAGES`` slots; the
  slot's ``ready`` mbarrier counts the bytes.
* The consumer warps (the default partition) build the A operand from the words, scale and zero bytes of the slot,
  read into registers one step ahead: per lane and 16-K chunk of a row, wgmma's A holds K ``2c, 2c + 1, 2c + 8,
  2c + 9`` (``c`` = lane % 4). In a W2 word those four codes are the nibble ``c`` of each half, in a W4 chunk's two
  words byte ``c`` of each: one shift (W2) or byte permute (W4) puts them in the low bits of both halves, one LOP3
  each makes the 16-bit pairs ``(M + q_k, M + q_k+8)`` and ``(M + q_k+1, M + q_k+9)`` (``M`` = 128 in bf16, 1024 in
  fp16), one pair add leaves ``q - C`` exactly (``C = 2^(P-1)``), one pair FMA ``(q - C) c + (C - zero_b) c = (q -
  zero_b) c`` (rounded once; ``(C - zero_b) c`` is rounded to 16 bits first, as in the ``gemm_t`` tiles) and two
  PRMTs the A registers ``(k, k + 1)`` and ``(k + 8, k + 9)``: ten instructions per four codes, as one
  ``inline_asm_elementwise`` over the lane's four elements (:func:`operand_layout` orders its registers so). Then
  ``warpgroup_mma`` on the registers and the slot's activation tile. wgmma reads its register operand while it runs,
  so each step's wgmma finishes before the next step's dequantization may reuse the registers (the other program on
  the SM keeps the tensor cores and the issue slots busy meanwhile); the slot then goes back to the loader (a barrier
  of the consumer warps, one arrive on its ``empty`` mbarrier).
* Epilogue: ``row_scale * COL_MULT`` per output column, the token scale of quantized activations, bias.

Cost: about 180 instructions per consumer thread and step (32 codes), so the loop is bound by instruction issue at
few tokens: a third is the per-group scale and zero-point work that the four lanes sharing a row repeat
(docs/KERNELS.md). Launched with programmatic dependent launch (:mod:`kernels.pdl`).

Scope: 2- and 4-bit K-major codes (``kernels.ops.k_major``) with ``N % 16 == 0``, bf16/fp16 activations with
16-byte aligned rows, no split channels, Hopper (:func:`ra_supported`). A last step past ``Kq`` reads zeros for the
activations (TMA fills them), which add nothing. Gluon has no interpreter: tested on the GPU only.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .gluon_gemm import SMEM_BYTES, cta_barrier, tma_descriptor, tma_load, tma_rows
from .gluon_stream import along
from .grid import GROUP_SIZE
from .pdl import launch_dependents, pdl_for, wait_prior_grid
from .triton_common import e4m3_scaled, store_scaled
from .triton_pairs import BF16_ONE, F16_ONE, minus_centre, splat

RA_BITS = (2, 4)
RA_TOKENS = (16, 32, 64, 128)  # wgmma's N per program (Config.block_m)
RA_STEP_K = 64  # K per step: one 128-byte swizzled row of 16-bit activations
LOADER_REGS = gl.constexpr(48)
# the operands of :func:`_dequant_asm`: two A registers out; six inputs of four elements each
DEQUANT_CONSTRAINTS = gl.constexpr("=r,=r," + ",".join(["r"] * 24))
RA_ROWS = 64  # weight rows per program: one warpgroup (wgmma's m64); two warpgroups of 128 rows measured slower
# registers per thread (the launch's maxnreg): the 4 consumer warps and the loader, padded to 8 warps, two programs per
# SM; no spills offline up to 128 tokens
MAX_REGS = 128


@gluon.constexpr_function
def operand_layout(rows, BK, P, warps):
    """The ``[rows, BK / 32, P, 32 / P]`` (row, group, word of the group, code of the word) layout whose reshape to
    ``[rows, BK]`` is wgmma's register A operand (``DotOperandLayout(0, NVMMA v3, k_width=2)`` of ``warps`` warps,
    16 rows each) up to the order of a lane's registers: here K ``k, k + 1, k + 8, k + 9`` of one row come first, so a
    four-element ``inline_asm_elementwise`` gets one lane's codes of a 16-K chunk (the conversion to the operand's
    own order is a register rename)."""
    cpw = 32 // P

    def kvec(k):
        return [0, k // 32, (k // cpw) % P, k % cpw]

    reg = [kvec(1), kvec(8), [8, 0, 0, 0]] + [kvec(1 << j) for j in range(4, BK.bit_length() - 1)]
    lane = [kvec(2), kvec(4), [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    warp = [[16 << j, 0, 0, 0] for j in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [rows, BK // 32, P, cpw])


@gluon.constexpr_function
def group_layout(rows, BK, P, warps):
    """The ``[BK / 32, rows]`` layout (group, row) of a step's scale or zero bytes as the slot holds them, whose
    transpose is :func:`operand_layout` sliced to ``[rows, BK / 32]`` (so loading the slot in it and permuting the
    registers gives the operand's per-group values; a permuted view of the slot is not read as its bytes lie)."""
    full = operand_layout(rows, BK, P, warps)

    def flip(bases):
        return [[b[1], b[0]] for b in bases]

    return gl.DistributedLinearLayout(flip(full.reg_bases), flip(full.lane_bases), flip(full.warp_bases), [],
                                      [BK // 32, rows])


@gluon.constexpr_function
def _dequant_asm(P, BF16):
    """PTX of a lane's four codes of one row and 16-K chunk (module docstring): ``$0, $1`` the A registers of K
    ``(k, k + 1)`` and ``(k + 8, k + 9)``; inputs four each of: the words of the elements (``$2..$5``), the lane's
    selector (``$6``: the shift ``4 c`` of a W2 word, the byte permute of two W4 words), ``(c, c)`` (``$10``),
    ``((C - zero_b) c, ..)`` (``$14``), ``(M, M)`` (``$18``), ``-(M + C, M + C)`` (``$22``)."""
    t = "bf16" if BF16 else "f16"
    if P == 2:
        first = "shr.b32 u, $2, $6;\nshr.b32 v, u, 2;\n"
        mask = 0x00030003
    else:
        first = "prmt.b32 u, $2, $4, $6;\nshr.b32 v, u, 4;\n"
        mask = 0x000F000F
    return ("{ .reg .b32 u, v;\n" + first +
            f"lop3.b32 u, u, {mask:#x}, $18, 0xEA;\nlop3.b32 v, v, {mask:#x}, $18, 0xEA;\n"
            f"add.rn.{t}x2 u, u, $22;\nadd.rn.{t}x2 v, v, $22;\n"
            f"fma.rn.{t}x2 u, u, $10, $14;\nfma.rn.{t}x2 v, v, $10, $14;\n"
            "prmt.b32 $0, u, v, 0x5410;\nprmt.b32 $1, u, v, 0x7632; }")


@gluon.jit
def _lane_selector(i, P: gl.constexpr):
    """Per element of code index ``i`` (its lane's first element holds ``i = 2 c``): the shift ``P i`` that moves a
    W2 word's codes ``2c, 2c + 1`` (and ``2c + 8, 2c + 9``) to the low bits of its halves, or for W4 the byte
    permute that puts byte ``c`` of the chunk's first word in the low half and byte ``c`` of its second word in the
    high half."""
    if P == 2:
        return P * i
    c = i // 2
    return c | (c << 4) | ((c + 4) << 8) | ((c + 4) << 12)


@gluon.jit
def _dequant(words, sbytes, zbytes, sel, one, centre, ZOFF: gl.constexpr, ZMUL: gl.constexpr, P: gl.constexpr,
             BF16: gl.constexpr, dot: gl.constexpr):
    """A step's A operand ``[rows, BK]`` (activation dtype, layout ``dot``): ``(q - zero_b) c`` from the words
    ``[rows, G, P]``, scale and zero bytes ``[rows, G]`` (slices of :func:`operand_layout`)."""
    C: gl.constexpr = 1 << (P - 1)
    c = e4m3_scaled(sbytes)
    cc = gl.expand_dims(gl.expand_dims(splat(c, BF16, True), 2), 3)
    add = gl.expand_dims(gl.expand_dims(splat((C + ZOFF * ZMUL - zbytes.to(gl.float32) * ZMUL) * c, BF16, True), 2), 3)
    w = gl.expand_dims(words.to(gl.uint32, bitcast=True), 3)
    a = gl.inline_asm_elementwise(_dequant_asm(P, BF16), DEQUANT_CONSTRAINTS, [w, sel, cc, add, one, centre],
                                  dtype=gl.bfloat16 if BF16 else gl.float16, is_pure=True, pack=4)
    return gl.convert_layout(gl.reshape(a, [a.shape[0], a.shape[1] * a.shape[2] * a.shape[3]]), dot,
                             assert_trivial=True)


@gluon.jit
def _consume(x_bufs, code_bufs, scale_bufs, zero_bufs, ready, empty, n_local, one_v, ZOFF: gl.constexpr,
             ZMUL: gl.constexpr, P: gl.constexpr, BF16: gl.constexpr):
    """The consumer warps: per step build the A operand from the slot read ahead, read the next slot, run the step's
    wgmma and hand its slot back; returns the accumulator ``[rows, T]``."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    T: gl.constexpr = x_bufs.type.shape[1]
    BK: gl.constexpr = x_bufs.type.shape[2]
    ROWS: gl.constexpr = code_bufs.type.shape[2]
    GS: gl.constexpr = BK // 32
    W: gl.constexpr = gl.num_warps()
    L4: gl.constexpr = operand_layout(ROWS, BK, P, W)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, T, 16])
    dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    sel = _lane_selector(along(32 // P, 3, 4, L4), P).to(gl.uint32)
    one = gl.full([ROWS, GS, P, 32 // P], one_v, gl.uint32, L4)
    centre = gl.full([ROWS, GS, P, 32 // P], minus_centre(0, P, BF16), gl.uint32, L4)
    acc = gl.zeros([ROWS, T], gl.float32, mma)
    # the slot of step i + 1 is read into registers while step i is dequantized (its loads' latency hidden)
    words, sbytes, zbytes = _read_slot(code_bufs, scale_bufs, zero_bufs, ready, 0, L4)
    for i in range(n_local):
        cur_words = words
        cur_s = sbytes
        cur_z = zbytes
        words, sbytes, zbytes = _read_slot(code_bufs, scale_bufs, zero_bufs, ready, gl.minimum(i + 1, n_local - 1),
                                           L4)
        a = _dequant(cur_words, cur_s, cur_z, sel, one, centre, ZOFF, ZMUL, P, BF16, dot)
        s = i % STAGES
        acc = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
        # wgmma reads its register operand while it runs, and the next step's dequantization may reuse the registers
        # (``deps`` keeps the 16-bit halves alive, not the packed registers: with one wgmma left in flight the H200
        # returned wrong sums), so each step's wgmma finishes first; the other program on the SM fills the gap
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        # the step's wgmma has read its activations and its codes reached the registers before they were dequantized:
        # after a barrier of these warps its slot goes back to the loader (no proxy fence, whose MEMBAR would wait for
        # step i + 1's shared loads in flight: no load of the slot can be pending)
        cta_barrier()
        mbarrier.arrive(empty.index(s))
    return (acc, )


@gluon.jit
def _read_slot(code_bufs, scale_bufs, zero_bufs, ready, i, L4: gl.constexpr):
    """Wait for step ``i``'s slot and read its words ``[rows, G, P]``, scale and zero bytes ``[rows, G]`` (slices of
    ``L4``, :func:`operand_layout`)."""
    STAGES: gl.constexpr = code_bufs.type.shape[0]
    ROWS: gl.constexpr = code_bufs.type.shape[2]
    GS: gl.constexpr = scale_bufs.type.shape[1]
    P: gl.constexpr = code_bufs.type.shape[1] // GS
    s = i % STAGES
    mbarrier.wait(ready.index(s), (i // STAGES) & 1)
    words = code_bufs.index(s).reshape([GS, P, ROWS]).permute((2, 0, 1)).load(gl.SliceLayout(3, L4))
    LT: gl.constexpr = group_layout(ROWS, GS * 32, P, gl.num_warps())
    LG: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))
    sbytes = gl.convert_layout(gl.permute(scale_bufs.index(s).load(LT), (1, 0)), LG, assert_trivial=True)
    zbytes = gl.convert_layout(gl.permute(zero_bufs.index(s).load(LT), (1, 0)), LG, assert_trivial=True)
    return words, sbytes, zbytes


@gluon.jit
def _load(x_desc, w_desc, s_desc, z_desc, x_bufs, code_bufs, scale_bufs, zero_bufs, ready, empty, first, n_local,
          off_m, off_n):
    """The loader warp: the TMA copies of the program's steps into the ring, each once its slot is free."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    nbytes: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes + s_desc.block_type.nbytes
                            + z_desc.block_type.nbytes)
    for i in range(n_local):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, nbytes)
        step = first + i
        tma_load(x_desc, [off_m, step * BK], bar, x_bufs.index(s))
        tma_load(w_desc, [step * w_desc.block_type.shape[0], off_n], bar, code_bufs.index(s))
        tma_load(s_desc, [step * s_desc.block_type.shape[0], off_n], bar, scale_bufs.index(s))
        tma_load(z_desc, [step * z_desc.block_type.shape[0], off_n], bar, zero_bufs.index(s))


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
    """``y = x @ W_b^T``; grid ``(N / rows, cdiv(M, T), splits)``, each split ``per_split`` steps of ``BK``."""
    wait_prior_grid()  # PDL: nothing is read or written before the previous kernel has finished
    T: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    ROWS: gl.constexpr = w_desc.block_type.shape[1]
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    off_n = pid_n * ROWS
    off_m = pid_m * T
    first = pid_k * per_split
    n_local = gl.minimum(per_split, n_steps - first)

    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, T, BK], x_desc.layout)
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
            and torch.cuda.get_device_capability(x.device)[0] == 9)


def ra_split(n: int, kq: int, token_tiles: int, sms: int) -> int:
    """Split-K of a launch: the fewest splits (a power of two) that give every SM two programs (:data:`MAX_REGS`),
    each split at least eight steps."""
    split = 1
    while triton.cdiv(n, RA_ROWS) * token_tiles * split < 2 * sms and kq // (RA_STEP_K * 2 * split) >= 8:
        split *= 2
    return split


def launch_gemm_ra(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   col_mult: float, zoff: float, zmul: float, block_m: int, stages: int, split_k: int,
                   ws: torch.Tensor, counters: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` with :func:`gemm_ra_kernel`: ``block_m`` tokens (wgmma's N) by :data:`RA_ROWS` weight rows per
    program, ``stages`` slots in the ring (at least 2), up to ``split_k`` programs along K (``ws``: ``tiles * split_k * block_m * RA_ROWS`` floats; ``counters``: one zeroed
    int32 per output tile)."""
    m, kq = x.shape
    n = scales.shape[0]
    block_n = RA_ROWS
    smem = stages * (block_m * RA_STEP_K * x.element_size() + block_n * RA_STEP_K * bits // 8
                     + 2 * block_n * RA_STEP_K // GROUP_SIZE)
    if block_m not in RA_TOKENS or stages < 2 or smem > SMEM_BYTES:
        raise ValueError(f"gemm_ra takes block_m in {RA_TOKENS}, at least 2 stages and at most {SMEM_BYTES} bytes of "
                         f"slots; got {block_m}, {stages} ({smem} bytes)")
    x = tma_rows(x)
    n_steps = triton.cdiv(kq, RA_STEP_K)
    per_split = triton.cdiv(n_steps, split_k)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), triton.cdiv(n_steps, per_split))
    bf16 = x.dtype == torch.bfloat16
    su8 = scales.view(torch.uint8)
    gemm_ra_kernel[grid](tma_descriptor(x, [block_m, RA_STEP_K], True),
                         tma_descriptor(packed.t(), [RA_STEP_K * bits // 32, block_n], False),
                         tma_descriptor(su8.t(), [RA_STEP_K // GROUP_SIZE, block_n], False),
                         tma_descriptor(zeros.t(), [RA_STEP_K // GROUP_SIZE, block_n], False),
                         row_scale, token_scale if token_scale is not None else row_scale,
                         bias if bias is not None else row_scale, y, ws, counters, m, n, n_steps, per_split,
                         y.stride(0), BF16_ONE if bf16 else F16_ONE, grid[2], P=bits, BF16=bf16,
                         ZOFF=zoff, ZMUL=zmul, COL_MULT=col_mult, STAGES=stages, HAS_TS=token_scale is not None,
                         HAS_BIAS=bias is not None, num_warps=block_n // 16, maxnreg=MAX_REGS,
                         launch_pdl=pdl_for(x))
    return y

