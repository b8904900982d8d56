"""W{b}A16 linear for 1..16 tokens on tensor cores: 16-bit ``q c`` pairs built in registers, ``mma.sync`` (Gluon).

Why: at decode sizes the CUDA-core GEMV (``triton_gemv_h2``) spends about three instructions per code (a LOP3, an
``add.x2`` and an ``fma.x2`` per pair of codes, plus the per-group scale and zero point of every column and token),
and the ``W @ x^T`` tensor-core tiles about five: both are bound by instruction issue, not by the bytes they read.
Here a warp's tensor cores do the multiply-accumulate for 8 tokens at once (two token tiles of 8 for 9..16 tokens,
sharing the dequantized pairs), so per pair of codes only two instructions are left, whatever the token count:

* one LOP3 of a packed word with the pair ``(2^(E-p), 2^(E-p))`` turns codes ``i`` and ``i + 16/P`` (which sit
  16 bits apart) into the 16-bit pair ``(2^(E-p) + q, 2^(E-p) + q')`` (``E`` = 10 in fp16, 7 in bf16; the code
  at mantissa bit ``p``, so one shift of the word serves several pairs);
* one ``fma.rn.{f16,bf16}x2`` by ``(c, c)`` plus ``(-2^(E-p) c, -2^(E-p) c)`` leaves ``(q c, q' c)`` exactly
  (``c`` = E4M3 / 256; ``q c`` has at most 8 significant bits);
* the pairs are the A operand of ``mma.sync.m16n8k16`` (16 output channels x 16 K) as they are: the order of K
  inside an A register does not matter as long as the activations (B, 8 tokens) follow it, so the activation pairs
  are permuted instead, once per step for all channels (one PRMT per pair).

The zero points stay out of the weights: ``sum_k x_k (q_k - z_g) c_g = sum_k x_k q_k c_g - z_g c_g X_g`` with
``X_g`` the activations' group sum, which one more ``mma.sync`` per 16 K computes exactly (a 0/1 selector times the
activations; fp32). The ``z c X`` terms are themselves an MMA (channels x groups times groups x tokens): every two
steps, one shuffle per token tile brings each lane the sums of its own group for its token, and two bf16
``mma.sync`` per tile and token tile add ``-z c`` (split into a hi and a lo bf16 part, exact: at most 13 significant
bits) times the sums (hi, then lo part: 16 significant bits) into the accumulators: the zero terms need no fp32
accumulators or arithmetic per token of their own. (One token runs too, but the half2 GEMV is faster there:
docs/BENCHMARKS.md, session 13.)

Thread mapping (``g`` = lane / 4, ``c`` = lane % 4): a warp owns 32 output channels, a lane four consecutive ones
(``4 g .. 4 g + 3``: one 16-byte load of K-major words), two MMA tiles (rows ``g``, ``g + 8`` are channels
``4 g + 2 t`` and ``4 g + 2 t + 1`` of tile ``t``); per step of 128 K the lanes of a quad own one group each
(group ``4 step + c``), so every lane reads and dequantizes only its own group's words, scale and zero bytes, and
lane ``(g, c)`` loads token ``g``'s (and ``g + 8``'s) activations of that group, which are exactly its B fragments.
A program owns 32 channels per warp of a row; its rows of warps (1 to 8) walk consecutive ranges of the program's
K steps and add their sums through shared memory at the end, so one program can put up to 16 warps on a column
block without a cross-program reduction (session 15: up to 1.23x the speed of split-K alone). Split-K programs
reduce in-kernel (a workspace and a self-resetting counter per tile, as :func:`kernels.triton_common.finish`).

Scope: 2- and 4-bit K-major codes, bf16/fp16 activations, ``M <= 16``, ``Kq % 256 == 0``, ``N % 32 == 0``, no split
channels (:func:`mma_gemv_supported`); sm_80 or newer. Gluon has no interpreter: tested on the GPU only.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .device import compute_capability
from .gluon_gemm import cta_barrier
from .pdl import launch_dependents, pdl_for, wait_prior_grid
from .triton_common import e4m3_scaled
from .triton_pairs import high_halves, low_halves, pair_fma, splat

MAX_TOKENS = 16  # two token tiles of mma.sync's N = 8
STEP_K = 128  # K per step: four groups, one per lane of a quad
WARP_CHANNELS = 32


@gluon.constexpr_function
def pair_windows(bits: int, bf16: bool) -> list[tuple[int, int]]:
    """``(shift, p)`` of each of a packed word's ``16 / bits`` code pairs: pair ``i`` (bits ``bits i`` and
    ``bits i + 16``) is read from the word shifted right by ``shift``, at mantissa bit ``p = bits i - shift``.

    ``p`` may reach ``mantissa - bits`` (the code must stay below the implicit bit). More windows per shift mean
    fewer shifts per word but one more addend pair per group: the count with the fewest instructions per group
    (``bits`` words) is chosen."""
    pmax = (7 if bf16 else 10) - bits
    pairs = 16 // bits
    best = min(range(1, pmax // bits + 2), key=lambda w: w + bits * (-(-pairs // w) - 1))
    return [(bits * best * (i // best), bits * (i % best)) for i in range(pairs)]


@gluon.constexpr_function
def _chunk_asm(P, BF16, p0, p1, NT):
    """PTX of one 16-K chunk of one tile: four LOP3s, four pair FMAs, one ``mma.sync`` per token tile (the A pairs
    shared). Operands: ``$0 .. 4 NT - 1`` the accumulators out (four per token tile); then words (A row ``g`` and
    ``g + 8``) of pairs ``2 j`` and ``2 j + 1`` (4); ``(c, c)`` (2); addends (4); B of each token tile (2 NT); the
    ``2^(E-p)`` pairs (2); the accumulators in (4 NT)."""
    t = "bf16" if BF16 else "f16"
    m0 = ((1 << P) - 1 << p0) * 0x10001
    m1 = ((1 << P) - 1 << p1) * 0x10001
    i = 4 * NT  # first input operand
    b = i + 10
    one = b + 2 * NT
    acc = one + 2
    mmas = "".join(
        f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{${4 * u}, ${4 * u + 1}, ${4 * u + 2}, ${4 * u + 3}}}, "
        f"{{a0, a1, a2, a3}}, {{${b + 2 * u}, ${b + 2 * u + 1}}}, "
        f"{{${acc + 4 * u}, ${acc + 4 * u + 1}, ${acc + 4 * u + 2}, ${acc + 4 * u + 3}}};\n" for u in range(NT))
    return (
        "{ .reg .b32 q0, q1, q2, q3, a0, a1, a2, a3;\n"
        f"lop3.b32 q0, ${i}, {m0:#x}, ${one}, 0xEA;\n"
        f"lop3.b32 q1, ${i + 1}, {m0:#x}, ${one}, 0xEA;\n"
        f"lop3.b32 q2, ${i + 2}, {m1:#x}, ${one + 1}, 0xEA;\n"
        f"lop3.b32 q3, ${i + 3}, {m1:#x}, ${one + 1}, 0xEA;\n"
        f"fma.rn.{t}x2 a0, q0, ${i + 4}, ${i + 6};\n"
        f"fma.rn.{t}x2 a1, q1, ${i + 5}, ${i + 7};\n"
        f"fma.rn.{t}x2 a2, q2, ${i + 4}, ${i + 8};\n"
        f"fma.rn.{t}x2 a3, q3, ${i + 5}, ${i + 9};\n" + mmas + "}")


@gluon.constexpr_function
def _chunk_constraints(NT):
    """Constraints of :func:`_chunk_asm`'s operands."""
    return ",".join(["=f"] * (4 * NT) + ["r"] * (12 + 2 * NT) + ["f"] * (4 * NT))


@gluon.constexpr_function
def _sum_asm(BF16):
    """PTX of the group-sum ``mma.sync``: A = the 0/1 selector (row ``r`` sums the K of lane ``r % 4``), B = the
    activation pairs, so ``D[r, token]`` is the sum of group ``r % 4`` of the step for that token."""
    t = "bf16" if BF16 else "f16"
    return (f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, "
            "{$10, $11, $12, $13};")


SPLIT_ASM = gl.constexpr("{ .reg .f32 a, b;\ncvt.rn.bf16x2.f32 $0, $3, $2;\n"
                         "shl.b32 a, $0, 16;\nand.b32 b, $0, 0xFFFF0000;\n"
                         "sub.f32 a, $2, a;\nsub.f32 b, $3, b;\ncvt.rn.bf16x2.f32 $1, b, a; }")
# two mma.sync of one tile's zero terms (bf16 whatever the activations: no fp16 overflow of the group sums): A =
# -z c ($4..7), B = the group sums' hi pair, then their lo pair ($8, $9); accumulators $0..3 out, $10..13 in
_ZERO_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
ZERO_ASM = gl.constexpr(_ZERO_MMA + "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $8}, {$10, $11, $12, $13};\n" +
                        _ZERO_MMA + "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$9, $9}, {$0, $1, $2, $3};")


@gluon.jit
def _split(v0, v1):
    """``(hi, lo)`` bf16 pair containers of fp32 ``v0`` (low halves) and ``v1``: ``hi`` their roundings, ``lo`` the
    roundings of what is left, so ``hi + lo`` carries 16 significant bits."""
    return gl.inline_asm_elementwise(SPLIT_ASM, "=r,=r,f,f", [v0, v1], dtype=(gl.uint32, gl.uint32), is_pure=True,
                                     pack=1)


@gluon.jit
def _shfl(v, lane):
    return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=f,f,r", [v, lane],
                                     dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _cols2(t, LT: gl.constexpr):
    a, b = gl.split(t)
    return gl.convert_layout(a, LT), gl.convert_layout(b, LT)


@gluon.jit
def _cols4(t, LT: gl.constexpr):
    """The columns of a ``[R, 4]`` per-thread tensor as four ``[R]`` tensors in layout ``LT`` (register renames)."""
    ev, od = gl.split(gl.reshape(t, [t.shape[0], 2, 2]))
    c0, c2 = _cols2(ev, LT)
    c1, c3 = _cols2(od, LT)
    return c0, c1, c2, c3


@gluon.jit
def _cols8(t, LT: gl.constexpr):
    ev, od = gl.split(gl.reshape(t, [t.shape[0], 4, 2]))
    e = _cols4(ev, LT)
    o = _cols4(od, LT)
    return e[0], o[0], e[1], o[1], e[2], o[2], e[3], o[3]


@gluon.jit
def _cols16(t, LT: gl.constexpr):
    ev, od = gl.split(gl.reshape(t, [t.shape[0], 8, 2]))
    e = _cols8(ev, LT)
    o = _cols8(od, LT)
    return e[0], o[0], e[1], o[1], e[2], o[2], e[3], o[3], e[4], o[4], e[5], o[5], e[6], o[6], e[7], o[7]


@gluon.jit
def _tile_chunk(j: gl.constexpr, t: gl.constexpr, wc, c2, adds, bs, one_p, acc, P: gl.constexpr, BF16: gl.constexpr,
                NT: gl.constexpr):
    """Chunk ``j`` (pairs ``2 j``, ``2 j + 1`` of the lane's group) of tile ``t`` (channels ``2 t``, ``2 t + 1``) for
    every token tile (``acc``: four accumulators per token tile)."""
    NP: gl.constexpr = 16 // P
    WIN: gl.constexpr = pair_windows(P, BF16)
    SA: gl.constexpr = WIN[(2 * j) % NP][0]
    PA: gl.constexpr = WIN[(2 * j) % NP][1]
    SB: gl.constexpr = WIN[(2 * j + 1) % NP][0]
    PB: gl.constexpr = WIN[(2 * j + 1) % NP][1]
    w = wc[(2 * j) // NP]
    b = ()
    for u in gl.static_range(NT):
        b = b + (bs[u][2 * j], bs[u][2 * j + 1])
    return gl.inline_asm_elementwise(
        _chunk_asm(P, BF16, PA, PB, NT), _chunk_constraints(NT),
        (w[2 * t] >> SA, w[2 * t + 1] >> SA, w[2 * t] >> SB, w[2 * t + 1] >> SB, c2[2 * t], c2[2 * t + 1],
         adds[2 * t][PA // P], adds[2 * t + 1][PA // P], adds[2 * t][PB // P], adds[2 * t + 1][PB // P]) + b
        + (one_p[PA // P], one_p[PB // P]) + acc, dtype=(gl.float32, ) * (4 * NT), is_pure=True, pack=1)


@gluon.jit
def _chunk(j: gl.constexpr, wc, c2, adds, bs, one_p, acc0e, acc0o, acc1e, acc1o, P: gl.constexpr, BF16: gl.constexpr,
           NT: gl.constexpr):
    """Chunk ``j`` of both tiles, into the even- or odd-chunk accumulators (two independent MMA chains per tile)."""
    if j % 2 == 0:
        acc0e = _tile_chunk(j, 0, wc, c2, adds, bs, one_p, acc0e, P, BF16, NT)
        acc1e = _tile_chunk(j, 1, wc, c2, adds, bs, one_p, acc1e, P, BF16, NT)
    else:
        acc0o = _tile_chunk(j, 0, wc, c2, adds, bs, one_p, acc0o, P, BF16, NT)
        acc1o = _tile_chunk(j, 1, wc, c2, adds, bs, one_p, acc1o, P, BF16, NT)
    return acc0e, acc0o, acc1e, acc1o


@gluon.jit
def _load_step(w_ptr, s_ptr, z_ptr, x_ptr, j, first_w, first_x, first_t, end_x, n_steps, N, sx, n_w, c_w, tok_x, c_x,
               n_t, c_t, P: gl.constexpr, NT: gl.constexpr, RAGGED: gl.constexpr, L4: gl.constexpr,
               L16: gl.constexpr):
    """Step ``j`` of every lane's range (``first_*``: its first step, in the layouts of the loads): ``P`` word rows of
    its four channels (``[R, 4]`` each), 32 activations of its token in each token tile (``tok_x``; ``[R, 16]`` pair
    containers each; with ``RAGGED``, zero past the range's end ``end_x``, so such a step adds nothing) and its four
    channels' scale and zero bytes (one word each). Indices are clamped into the tensors."""
    cw = gl.arange(0, 4, layout=gl.SliceLayout(0, L4))[None, :]
    sw = first_w + j
    st = first_t + j
    if RAGGED:  # ranges past the last step read its codes (and no activations)
        sw = gl.minimum(sw, n_steps - 1)
        st = gl.minimum(st, n_steps - 1)
    words = ()
    for r in gl.static_range(P):
        words = words + (gl.load(w_ptr + (((4 * sw + c_w) * P + r) * N + n_w)[:, None] + cw), )
    kx = gl.arange(0, 16, layout=gl.SliceLayout(0, L16))[None, :]
    sx_ = first_x + j
    xas = ()
    for u in gl.static_range(NT):
        if RAGGED:
            ptr = x_ptr + (tok_x[u] * sx + (4 * gl.minimum(sx_, n_steps - 1) + c_x) * 16)[:, None] + kx
            xas = xas + (gl.load(ptr, mask=(sx_ < end_x)[:, None] & (kx < 16), other=0), )
        else:
            xas = xas + (gl.load(x_ptr + (tok_x[u] * sx + (4 * sx_ + c_x) * 16)[:, None] + kx), )
    soff = (4 * st + c_t) * (N // 4) + n_t // 4
    return words, xas, gl.load(s_ptr + soff), gl.load(z_ptr + soff)


@gluon.jit
def _act_pairs(xa, NP: gl.constexpr, LT: gl.constexpr):
    """The 16 B registers of a lane's group for one token tile: pair ``pi`` holds activations ``lo`` and ``lo + NP``
    (same parity: the same half of two containers), matching the code pairs of the A operand."""
    xs = _cols16(xa.to(gl.uint32, bitcast=True), LT)
    b = ()
    for pi in gl.static_range(16):
        if pi % 2 == 0:
            b = b + (low_halves(xs[((pi // NP) * 2 * NP + pi % NP) // 2],
                                xs[((pi // NP) * 2 * NP + pi % NP + NP) // 2], True), )
        else:
            b = b + (high_halves(xs[((pi // NP) * 2 * NP + pi % NP) // 2],
                                 xs[((pi // NP) * 2 * NP + pi % NP + NP) // 2], True), )
    return b


@gluon.jit
def _step(operands, acc0e, acc0o, acc1e, acc1o, one_p, neg_p, sel, zero_u, g_t, c_t, ZOFF: gl.constexpr,
          ZMUL: gl.constexpr, P: gl.constexpr, BF16: gl.constexpr, NT: gl.constexpr, LT: gl.constexpr):
    """One 128-K step of a lane: its group's 16 code pairs of four channels into the two tiles' accumulators (every
    token tile). Also returns, for :func:`_zero_terms`, ``-z c`` of its group's four channels and, per token tile,
    the group sum ``X`` of its group for token ``g``."""
    NP: gl.constexpr = 16 // P
    words, xas, sw, zw = operands
    bs = ()
    for u in gl.static_range(NT):
        bs = bs + (_act_pairs(xas[u], NP, LT), )
    wc = ()
    for r in gl.static_range(P):
        wc = wc + (_cols4(words[r].to(gl.uint32, bitcast=True), LT), )
    c2 = ()
    adds = ()
    zc = ()
    for ch in gl.static_range(4):
        cf = e4m3_scaled((sw >> (8 * ch)) & 0xFF)
        cp = splat(cf, BF16, True)
        c2 = c2 + (cp, )
        ach = ()
        for k in gl.static_range(8 // P):
            ach = ach + (pair_fma(cp, neg_p[k], zero_u, BF16, True), )
        adds = adds + (ach, )
        zc = zc + (cf * ((ZOFF - ((zw >> (8 * ch)) & 0xFF).to(gl.float32)) * ZMUL), )
    xacc = ()
    for u in gl.static_range(NT):
        xacc = xacc + ((gl.zeros_like(c_t).to(gl.float32), ) * 4, )
    for j in gl.static_range(8):
        acc0e, acc0o, acc1e, acc1o = _chunk(j, wc, c2, adds, bs, one_p, acc0e, acc0o, acc1e, acc1o, P, BF16, NT)
        xnew = ()
        for u in gl.static_range(NT):
            xnew = xnew + (gl.inline_asm_elementwise(
                _sum_asm(BF16), "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                [sel, zero_u, sel, zero_u, bs[u][2 * j], bs[u][2 * j + 1], xacc[u][0], xacc[u][1], xacc[u][2],
                 xacc[u][3]], dtype=(gl.float32, ) * 4, is_pure=True, pack=1), )
        xacc = xnew
    # X[group of lane c, token t] sits in lanes (c, t // 2) and (c + 4, t // 2), registers t % 2: lanes g < 4 offer
    # their even token, the others their odd one, so lane (g, c) reads token g from lane (c + 4 (g % 2), g // 2)
    src = 4 * (c_t + 4 * (g_t % 2)) + g_t // 2
    xg = ()
    for u in gl.static_range(NT):
        xg = xg + (_shfl(gl.where(g_t < 4, xacc[u][0], xacc[u][1]), src), )
    return acc0e, acc0o, acc1e, acc1o, zc, xg


@gluon.jit
def _zero_terms(acc0, acc1, zc0, zc1, xg0, xg1, NT: gl.constexpr):
    """``-sum z c X`` of two steps' groups into the tiles' accumulators, as ``mma.sync``: A is ``-z c`` (rows the
    channels, K the lane's two groups, each value split into a hi and a lo 16-bit part, so exact), B the groups'
    sums for token ``g`` (split likewise; hi and lo in turn): K slot ``2 c + s`` (and ``2 c + 8 + s``) of lane
    ``(g, c)`` is its group of step ``s``, matching in A and B as the MMA's K order requires."""
    zh = ()
    zl = ()
    for ch in gl.static_range(4):
        h, l = _split(zc0[ch], zc1[ch])
        zh = zh + (h, )
        zl = zl + (l, )
    out0 = ()
    out1 = ()
    for u in gl.static_range(NT):
        xh, xl = _split(xg0[u], xg1[u])
        out0 = out0 + _tile_zero_terms(zh, zl, 0, xh, xl, acc0, u)
        out1 = out1 + _tile_zero_terms(zh, zl, 1, xh, xl, acc1, u)
    return out0, out1


@gluon.jit
def _tile_zero_terms(zh, zl, t: gl.constexpr, xh, xl, acc, u: gl.constexpr):
    """:data:`ZERO_ASM` on tile ``t`` (channels ``2 t``, ``2 t + 1``) and token tile ``u`` of ``acc``."""
    return gl.inline_asm_elementwise(
        ZERO_ASM, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
        [zh[2 * t], zh[2 * t + 1], zl[2 * t], zl[2 * t + 1], xh, xl, acc[4 * u], acc[4 * u + 1], acc[4 * u + 2],
         acc[4 * u + 3]], dtype=(gl.float32, ) * 4, is_pure=True, pack=1)


@gluon.jit
def gemv_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, n_steps,
                    steps_per_split, steps_per_warp, sx, sy, one, SPLIT_K, P: gl.constexpr, BF16: gl.constexpr,
                    NT: gl.constexpr, WK: gl.constexpr, RAGGED: gl.constexpr, ZOFF: gl.constexpr,
                    ZMUL: gl.constexpr, COL_MULT: gl.constexpr, HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y [M, N] = x [M, Kq] @ W_b^T`` for ``M <= 8 NT`` (``NT`` token tiles of 8, one or two); see the module
    docstring. ``x_ptr``, ``w_ptr``, ``s_ptr``, ``z_ptr``: int32 views of the activations (row stride ``sx`` words),
    the K-major codes (``[Kq P / 32, N]``) and the K-major scale and zero bytes (``[G, N / 4]``). A program's warps
    are ``WK`` rows of ``num_warps / WK`` warps: the rows walk consecutive ranges of ``steps_per_warp`` steps of the
    program's split (their sums are added in shared memory at the end), the warps of a row disjoint channels. Splits
    and ranges have even step counts (two per loop iteration); one row walks its split's steps, several walk
    ``steps_per_warp`` each, and with ``RAGGED`` some of those ranges end early (the last split's, or its last rows):
    their steps past the end read no activations."""
    W: gl.constexpr = gl.num_warps()
    WN: gl.constexpr = W // WK
    R: gl.constexpr = 32 * W  # lanes
    RO: gl.constexpr = 32 * WN  # lanes of one row of warps: the program's channels / 4
    NV: gl.constexpr = 8 * NT  # output values per lane: 4 channels x 2 tokens per token tile
    LT: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
    L4: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [W, 1], [1, 0])
    L16: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [W, 1], [1, 0])
    E: gl.constexpr = 7 if BF16 else 10
    wait_prior_grid()  # PDL: the activations, the split-K workspace and counters, the output: the previous kernel's
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    tid_t = gl.arange(0, R, layout=LT)
    tid_w = gl.arange(0, R, layout=gl.SliceLayout(1, L4))
    tid_x = gl.arange(0, R, layout=gl.SliceLayout(1, L16))
    # lanes past N or M read the last channel or token (clamped, never stored). The channel is written per warp and
    # lane quad: as (tid % RO) // 4 * 4, same values, ptxas scheduled the 16-token W4 loop's loads later (15 % slower)
    n_t = gl.minimum(pid_n * RO + (tid_t % RO) // 32 * 32 + (tid_t % 32) // 4 * 4, N - 4)
    n_w = gl.minimum(pid_n * RO + (tid_w % RO) // 32 * 32 + (tid_w % 32) // 4 * 4, N - 4)
    tok_x = ()
    for u in gl.static_range(NT):
        tok_x = tok_x + (gl.minimum(8 * u + (tid_x % 32) // 4, M - 1), )
    g_t = (tid_t % 32) // 4
    c_t = tid_t % 4
    s0 = pid_k * steps_per_split
    s1 = gl.minimum(s0 + steps_per_split, n_steps)
    # the loop walks j in [lo, hi); a lane's step is first + j (first in each layout the loads use): one row of warps
    # walks its split's steps, several walk ranges of steps_per_warp (RAGGED: the last ones end early)
    if WK == 1:
        lo = s0
        hi = s1
        first_w = 0
        first_x = 0
        first_t = 0
        end_x = s1
    else:
        lo = 0
        hi = steps_per_warp
        first_w = s0 + (tid_w // RO) * steps_per_warp
        first_x = s0 + (tid_x // RO) * steps_per_warp
        first_t = s0 + (tid_t // RO) * steps_per_warp
        end_x = gl.minimum(first_x + steps_per_warp, s1)

    one_p = ()
    neg_p = ()
    for p in gl.static_range(0, 8, P):
        op = gl.full([R], 0, gl.int32, LT) + (one - ((p << E) * 0x10001))
        one_p = one_p + (op, )
        neg_p = neg_p + ((op | -2147450880).to(gl.uint32, bitcast=True), )  # (-2^(E-p), -2^(E-p))
    zero_u = gl.full([R], 0, gl.uint32, LT)
    # A of the group-sum MMA: row g sums the K of lane g % 4 (its group)
    sel = gl.where(g_t % 4 == c_t, gl.full([R], (0x3F80 if BF16 else 0x3C00) * 0x10001, gl.uint32, LT), zero_u)
    zero_f = gl.zeros([R], gl.float32, LT)
    acc0e = (zero_f, ) * (4 * NT)  # tile 0 (channels 0, 1), even chunks; four mma.sync registers per token tile
    acc0o = acc0e
    acc1e = acc0e
    acc1o = acc0e

    # two steps per iteration; the next step's operands load while one is computed (a register double buffer)
    cur = _load_step(w_ptr, s_ptr, z_ptr, x_ptr, lo, first_w, first_x, first_t, end_x, n_steps, N, sx, n_w, tid_w % 4,
                     tok_x, tid_x % 4, n_t, c_t, P, NT, RAGGED, L4, L16)
    for j in range(lo, hi, 2):
        nxt = _load_step(w_ptr, s_ptr, z_ptr, x_ptr, j + 1, first_w, first_x, first_t, end_x, n_steps, N, sx, n_w,
                         tid_w % 4, tok_x, tid_x % 4, n_t, c_t, P, NT, RAGGED, L4, L16)
        acc0e, acc0o, acc1e, acc1o, zc0, xg0 = _step(cur, acc0e, acc0o, acc1e, acc1o, one_p, neg_p, sel, zero_u, g_t,
                                                     c_t, ZOFF, ZMUL, P, BF16, NT, LT)
        cur = _load_step(w_ptr, s_ptr, z_ptr, x_ptr, gl.minimum(j + 2, hi - 1), first_w, first_x, first_t, end_x,
                         n_steps, N, sx, n_w, tid_w % 4, tok_x, tid_x % 4, n_t, c_t, P, NT, RAGGED, L4, L16)
        acc0e, acc0o, acc1e, acc1o, zc1, xg1 = _step(nxt, acc0e, acc0o, acc1e, acc1o, one_p, neg_p, sel, zero_u, g_t,
                                                     c_t, ZOFF, ZMUL, P, BF16, NT, LT)
        acc0o, acc1o = _zero_terms(acc0o, acc1o, zc0, zc1, xg0, xg1, NT)

    # per lane: channels n_out + ch, tokens 8u + 2c (even) and 8u + 2c + 1 (odd) of token tile u; a tile's registers
    # 4u, 4u + 1 are its row g (channel 2t), 4u + 2, 4u + 3 its row g + 8 (channel 2t + 1); vals[(4 u + ch) * 2 + odd]
    vals = ()
    for u in gl.static_range(NT):
        for ch in gl.static_range(4):
            if ch < 2:
                vals = vals + _tile_pair(acc0e, acc0o, 4 * u + 2 * (ch % 2))
            else:
                vals = vals + _tile_pair(acc1e, acc1o, 4 * u + 2 * (ch % 2))
    if WK == 1:
        tid_o = tid_t
    else:  # the rows of warps summed (through shared memory): every warp then holds its row's sums
        L2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [WK, WN], [1, 0])
        rows = ()
        for i in gl.static_range(NV):
            rows = rows + (gl.sum(gl.convert_layout(gl.reshape(vals[i], [WK, RO]), L2), axis=0), )
        vals = rows
        tid_o = gl.arange(0, RO, layout=gl.SliceLayout(0, L2))
    launch_dependents()  # only the epilogue is left
    n_out = pid_n * RO + tid_o // 32 * 32 + (tid_o % 32) // 4 * 4
    c_o = tid_o % 4
    tile = pid_n
    if SPLIT_K > 1:
        base = ws_ptr + tile * (SPLIT_K * NV * RO)
        for i in gl.static_range(NV):
            gl.store(base + (pid_k * NV + i) * RO + tid_o, vals[i])
        cta_barrier()
        arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = (gl.zeros_like(vals[0]), ) * NV
            for s in range(SPLIT_K):
                part = ()
                for i in gl.static_range(NV):
                    part = part + (total[i] + gl.load(base + (s * NV + i) * RO + tid_o, cache_modifier=".cg"), )
                total = part
            gl.atomic_xchg(cnt_ptr + tile, 0)
            _store(total, n_out, c_o, M, N, y_ptr, sy, rs_ptr, ts_ptr, bias_ptr, NT, COL_MULT, HAS_TS, HAS_BIAS)
    else:
        _store(vals, n_out, c_o, M, N, y_ptr, sy, rs_ptr, ts_ptr, bias_ptr, NT, COL_MULT, HAS_TS, HAS_BIAS)


@gluon.jit
def _tile_pair(acc_e, acc_o, r: gl.constexpr):
    """A tile's even- and odd-token outputs: accumulator registers ``r``, ``r + 1`` of both chains."""
    return acc_e[r] + acc_o[r], acc_e[r + 1] + acc_o[r + 1]


@gluon.jit
def _store(vals, n_out, c_t, M, N, y_ptr, sy, rs_ptr, ts_ptr, bias_ptr, NT: gl.constexpr, COL_MULT: gl.constexpr,
           HAS_TS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y[tok, n] = vals * row_scale * COL_MULT (* token scale) (+ bias)`` for the lane's channels and tokens."""
    for ch in gl.static_range(4):
        n = n_out + ch
        nok = n < N
        cs = gl.load(rs_ptr + n, mask=nok, other=0.0) * COL_MULT
        for u in gl.static_range(NT):
            for odd in gl.static_range(2):
                tok = 8 * u + 2 * c_t + odd
                ok = nok & (tok < M)
                v = vals[(4 * u + ch) * 2 + odd] * cs
                if HAS_TS:
                    v = v * gl.load(ts_ptr + tok, mask=ok, other=0.0)
                if HAS_BIAS:
                    v = v + gl.load(bias_ptr + n, mask=ok, other=0.0).to(gl.float32)
                gl.store(y_ptr + tok * sy + n, v.to(y_ptr.dtype.element_ty), mask=ok)


def token_rows(m: int) -> int:
    """Tokens the kernel computes for ``m`` (a multiple of mma.sync's 8): the rows of its split-K workspace."""
    return 8 * triton.cdiv(m, 8)


def mma_gemv_supported(bits: int, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, kq: int,
                       has_split: bool) -> bool:
    """Whether :func:`launch_gemv_mma` takes this call (else the caller runs another kernel)."""
    n = scales.shape[0]
    return (bits in (2, 4) and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and not has_split
            and x.shape[0] <= MAX_TOKENS and x.shape[1] == kq and kq % (2 * STEP_K) == 0 and n % WARP_CHANNELS == 0
            and packed.stride(0) == 1 and scales.stride(0) == 1 and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0 and compute_capability(x.device)[0] >= 8)


def launch_gemv_mma(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    row_scale: torch.Tensor, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                    col_mult: float, zoff: float, zmul: float, channels: int, warps: int, split_k: int,
                    ws: torch.Tensor, counters: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y = x @ W_b^T`` (``x`` ``[M <= 16, Kq]``, 16-bit, rows 16-byte aligned) with :func:`gemv_mma_kernel`:
    programs of ``channels`` output channels (a multiple of 32) and ``warps`` warps, ``warps * 32 / channels`` rows
    of warps splitting the program's steps; up to ``split_k`` programs along K (``ws``: ``tiles * split_k *
    token_rows(M) * channels`` floats, ``tiles = N / channels``; ``counters``: one zeroed int32 per tile). Launched
    with programmatic dependent launch (:mod:`kernels.pdl`) except at 9..16 tokens on programs of one or two warps
    (168 registers, many programs per SM): those measured 1-7 % slower with it back to back on the H200
    (docs/BENCHMARKS.md, session 20), the rest up to 13 % faster."""
    m, kq = x.shape
    n = scales.shape[0]
    wk = warps * WARP_CHANNELS // channels
    if channels % WARP_CHANNELS or wk < 1 or warps % wk:
        raise ValueError(f"gemv_mma: {channels} channels per program on {warps} warps: need a multiple of 32 channels "
                         "and whole rows of warps (warps * 32 / channels rows dividing warps)")
    n_steps = kq // STEP_K
    per_split = 2 * triton.cdiv(n_steps, 2 * split_k)  # the loop takes two steps at a time
    per_warp = 2 * triton.cdiv(per_split, 2 * wk)
    grid = (triton.cdiv(n, channels), triton.cdiv(n_steps, per_split))
    su8 = scales.view(torch.uint8)
    bf16 = x.dtype == torch.bfloat16
    gemv_mma_kernel[grid](
        x.view(torch.int32), packed, su8.T.view(torch.int32), zeros.T.view(torch.int32), row_scale,
        token_scale if token_scale is not None else row_scale, bias if bias is not None else row_scale, y, ws,
        counters, m, n, n_steps, per_split, per_warp, x.stride(0) // 2, y.stride(0),
        0x43004300 if bf16 else 0x64006400, grid[1], P=bits, BF16=bf16, NT=token_rows(m) // 8, WK=wk,
        RAGGED=wk > 1 and per_warp * wk * grid[1] != n_steps, ZOFF=zoff,
        ZMUL=zmul, COL_MULT=col_mult, HAS_TS=token_scale is not None, HAS_BIAS=bias is not None, num_warps=warps,
        launch_pdl=pdl_for(x) and (token_rows(m) == 8 or warps >= 4))
    return y
