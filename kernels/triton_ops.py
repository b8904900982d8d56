"""bitbybit's Triton kernels as torch custom ops, and the shape -> kernel configuration choice.

Ops (``torch.ops.bitbybit.*``, each with a fake implementation for torch.compile / CUDA graphs):

* ``linear(x, packed, scales, zeros, row_scale, split_index, token_scale, bias, bits, master_bits,
  in_features, out_dtype)``: ``x [..., K] @ W_b^T``; with ``token_scale`` the input is already
  quantized (``xq`` of ``quantize_act``) and each row is scaled by it.
* ``quantize_act(x, split_index, act_bits) -> (xq fp16 [..., Kq], token_scale fp32 [...])``.
* ``linear_wa(x, packed, scales, zeros, row_scale, split_index, bias, bits, master_bits, act_bits, out_dtype,
  kernel)``: W{b}A{a} in one op; ``kernel="mma8"`` runs the int8 tensor-core kernel (tiles by shape,
  :func:`mma8_config`), ``"auto"`` the two ops above.

Eager callers run the same functions without the dispatcher (:func:`ops_for`).

Which kernel runs is a pure function of the shape (:func:`choose_config`): a table tuned offline
on the H200 (``kernels/triton_table.json``, written by ``python -m kernels.bench --tune``) and a
rule for shapes it does not list (the Hopper kernels by :func:`hopper_config`, the others by
:func:`default_config`). Nothing is autotuned at call time, so graph capture is safe.
Split-K launches reduce in-kernel through a per-device counter buffer that is allocated on the
first call (before any capture) and left zeroed by every launch; calls on one device must not
run concurrently on several streams.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .gluon_actquant import launch_actquant_rows, staged_chunks, staged_rows_supported
from .gluon_gemm import launch_gemm_ws, ws_supported
from .gluon_gemm_ra import RA_BITS, RA_ROWS, RA_STEP_K, launch_gemm_ra, ra_plan, ra_supported
from .gluon_gemv import STEP_K, WARP_CHANNELS, launch_gemv_mma, mma_gemv_supported, token_rows
from .gluon_stream import STREAM_BITS, launch_gemv_tma, stream_gemv_supported, stream_tokens
from .grid import GROUP_SIZE, padded_width
from .packing import plane_widths
from .pdl import pdl_for
from .triton_actquant import actquant_kernel
from .split import expand_input
from .triton_gemm import dequant_kernel, gemm_kernel
from .triton_gemv import MAGIC_BITS, gemv_kernel
from .triton_gemv_h2 import WHOLE_COLUMN_BG, check_h2, gemv_h2_kernel
from .triton_pairs import ASM, BF16_ONE, F16_ONE
from .triton_mma import mma_kernel

TABLE_PATH = Path(__file__).with_name("triton_table.json")
COUNTERS = 1 << 16  # split-K output tiles one launch may use
# activation quantization (:func:`actquant_tile`): from ACTQUANT_MANY_ROWS rows on, one row on 16 warps, or rows
# staged in shared memory where they are longer than ACTQUANT_ONE_CHUNK_GROUPS groups; from ACTQUANT_STAGED_ROWS on,
# rows staged in shared memory
ACTQUANT_MANY_ROWS = 256
ACTQUANT_STAGED_ROWS = 1024
ACTQUANT_ONE_CHUNK_GROUPS = 512
MMA_RULE_TOKENS = range(3, 17)  # token counts the rule gives the tensor-core decode kernel (2- and 4-bit weights)
# the decode kernel's rule: about this many warps per SM, from rows of warps along K (at most MMA_MAX_ROWS) before
# split-K programs; fitted to the A/B of session 15 (docs/results/gemv-mma-rows-ab-h200.json: on its 30 cells at 4..16
# tokens within 1.2 % of the best configuration timed on geometric mean, at worst 4.9 %)
MMA_WARPS_PER_SM = 16
MMA_MAX_ROWS = 8
RA_RULE_TOKENS = range(9, 257)  # token counts the Hopper rule gives the register-operand kernel (the table's 16..256)
STREAM_RULE_PROGRAMS = 160  # the Hopper rule's ring GEMV: the widest column tile that still makes this many programs


@dataclass(frozen=True)
class Config:
    """A launch configuration.

    ``kernel``: ``"gemv"`` (CUDA cores, M <= block_m <= 2; block_k = groups per step), ``"gemv_h2"`` (the
    same on packed half2 arithmetic: 2/4/8-bit weights, 16-bit inputs; the rule's choice at M <= 4),
    ``"gemm"`` (fused dequantization + tensor cores, ``x @ W^T``), ``"gemm_t"`` (the same as ``W @ x^T``:
    the two orientations of :mod:`kernels.triton_gemm`) or ``"dense"`` (dequantize the whole weight to the activation
    dtype with :func:`kernels.triton_gemm.dequant_kernel`, then cuBLAS; for large M, where the
    GEMM is compute-bound and the transient ``N x Kq`` copy is cheap next to it); for quantized
    activations also ``"mma8"`` (:mod:`kernels.triton_mma`, int8 tensor cores on the activation codes,
    experimental; block_k is one group, 32; only through :func:`launch_linear_wa`). ``"gemm_ws"``
    (:mod:`kernels.gluon_gemm`; the table's choice for some shapes at 129..256 tokens, never the rule's): the
    warp-specialized kernel, block_m 128 or 256 tokens, block_k 64, ``num_warps`` 12, ``num_stages`` >= 3 slots;
    off Hopper, or for 3- or 8-bit codes, fp32 inputs or row-major codes, the dense path runs instead. ``"gemv_mma"``
    (:mod:`kernels.gluon_gemv`; the rule's choice at 3..16 tokens for 2- and 4-bit weights, the table's for many
    shapes at 2..16): ``mma.sync`` on ``q c`` pairs built in registers, block_m the tokens computed (8 or 16),
    block_n the channels per program (a multiple of 32), ``num_warps * 32 / block_n`` rows of warps along K, block_k
    128; calls it does not take (:func:`~kernels.gluon_gemv.mma_gemv_supported`) run the rule's other kernels.
    ``"gemv_tma"`` (:mod:`kernels.gluon_stream`; 1..4 tokens, 2- and 4-bit weights, Hopper; the table's choice at one
    and two tokens, and :func:`hopper_config`'s for shapes it does not list): whole output columns per
    program fed by a TMA ring, block_m the tokens per program (1, 2 or 4), block_n 16, 32, 64 or 128 columns, block_k
    codes per step, ``num_warps`` consuming warps (one more issues the copies), ``num_stages`` steps in flight; calls
    it does not take (:func:`~kernels.gluon_stream.stream_gemv_supported`: more tokens than block_m among them) run
    the rule's other kernels. ``"gemm_ra"`` (:mod:`kernels.gluon_gemm_ra`; the table's choice for many shapes at 9..256
    tokens, and :func:`hopper_config`'s for shapes it does not list; 2- and 4-bit weights, 16-bit inputs, Hopper): the
    dequantized weights as wgmma's register operand on activations put in its K order by one pass per call, block_m
    the tokens per program (16, 32, 64 or 128: wgmma's N), block_n 64 weight rows, block_k 128 (K per step),
    ``num_warps`` 4 consumer warps (one more issues the copies), ``num_stages`` slots; calls it does not take
    (:func:`~kernels.gluon_gemm_ra.ra_supported`) run the rule's kernel for the shape.
    """

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8


DENSE = Config("dense", 0, 64, 128, num_warps=4)


def _load_table() -> dict[str, Config]:
    if not TABLE_PATH.exists():
        return {}
    return {key: Config(**cfg) for key, cfg in json.loads(TABLE_PATH.read_text()).items()}


TABLE = _load_table()


def m_bucket(m: int) -> int:
    """The table's M key: M rounded up to a power of two, capped at 4096."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


def table_key(bits: int, kq: int, n: int, m: int) -> str:
    return f"w{bits}:{kq}x{n}:m{m_bucket(m)}"


def gemv_split(n: int, kq: int, block_n: int, block_g: int, sms: int = 132, warps: int = 2) -> int:
    """Split-K for the GEMV: for whole-column tiles (``block_g >= WHOLE_COLUMN_BG``) the fewest splits that give
    every SM a program, each with at least two steps; for the others about three programs per SM (six of one
    warp: the tuned split of the one-warp tiles), each with at least four steps of ``block_g`` groups."""
    whole_column = block_g >= WHOLE_COLUMN_BG.value
    per_sm = 1 if whole_column else 6 if warps == 1 else 3
    min_steps = 2 if whole_column else 4
    split = 1
    while (triton.cdiv(n, block_n) * split < per_sm * sms and kq // 32 >= 2 * min_steps * block_g * split
           and split < 64):
        split *= 2
    return split


def fp32_gemv_tile(bits: int, m: int) -> tuple[int, int, int, int]:
    """``(block_m, block_n, groups per step, warps)`` of the fp32-accumulating GEMV (M <= 2)."""
    return (1, 512, 2 if bits <= 3 else 1, 4) if m == 1 else (2, 512, 1, 4)


def gemv_tile(bits: int, m: int) -> tuple[str, int, int, int, int]:
    """``(kernel, block_m, block_n, groups per step, warps)`` of the GEMV for M <= 4 tokens.

    As measured best on the H200: the half2 GEMV for 2- and 4-bit weights (docs/results/gemv-h2-ab4-h200.json:
    8-18 % faster than the fp32 GEMV at M = 1, 2 and 9-28 % faster than the tensor-core tiles at M = 4),
    with the tiles that won most of the eight tuned shapes: at one token whole-column tiles (32 columns,
    32 groups per step; session 9), one-warp split-K tiles for W2 at 2..4 tokens (session 8); the
    fp32-accumulating GEMV for the other widths (M <= 2). A half2 tile given fp32 inputs runs the fp32
    GEMV, on the same tile or, for a whole-column one, on :func:`fp32_gemv_tile` (:func:`launch_linear`).
    """
    bm = 1 if m == 1 else (2 if m == 2 else 4)
    if bits == 2:
        return ("gemv_h2", bm) + ((32, 32, 4) if m == 1 else (128, 2, 1) if m == 2 else (128, 1, 1))
    if bits == 4:
        return ("gemv_h2", bm) + ((32, 32, 8) if m == 1 else (256, 2, 2) if m == 2 else (256, 1, 2))
    return ("gemv",) + fp32_gemv_tile(bits, m)


def gemv_mma_config(bits: int, m: int, n: int, kq: int, sms: int = 132) -> Config:
    """The tensor-core decode kernel's configuration by shape (:mod:`kernels.gluon_gemv`): programs of 32 output
    channels per token tile (one warp each), doubled into rows of warps along K (each row at least four 128-K steps,
    at most :data:`MMA_MAX_ROWS` rows), then into split-K programs (each warp at least two steps), while the warps
    stay within :data:`MMA_WARPS_PER_SM` per SM."""
    wn = token_rows(m) // 8
    tiles = triton.cdiv(n, WARP_CHANNELS * wn)
    steps = kq // STEP_K
    budget = MMA_WARPS_PER_SM * sms
    rows = 1
    while rows < MMA_MAX_ROWS and tiles * 2 * rows * wn <= budget and steps // (2 * rows) >= 4:
        rows *= 2
    split = 1
    while tiles * 2 * split * rows * wn <= budget and steps // (2 * split * rows) >= 2:
        split *= 2
    return Config("gemv_mma", token_rows(m), WARP_CHANNELS * wn, STEP_K, split_k=split, num_warps=rows * wn)


@lru_cache(maxsize=4096)
def default_config(bits: int, m: int, n: int, kq: int, mma: bool = True) -> Config:
    """The portable rule, for shapes the table does not list where :func:`hopper_config` names no kernel, and for
    calls the Hopper kernels do not take (fitted to the tuned H200 entries).

    A GEMV (:func:`gemv_tile`) for one or two tokens, and for three or four at 2 and 4 bits (split
    along K by :func:`gemv_split`; the fp32 GEMV measured 0.45x of bf16 at M = 4 on the
    H200, its 4-token tiles spill or shuffle, so other widths take the tiles there); split-K
    ``W @ x^T`` tiles up to 32 tokens with enough programs for two per SM; ``x @ W^T`` on 64-row
    tiles at 33..64 tokens (split 4, 8 for K more than twice N) and on 128 x 128 tiles at 65..128
    (split-K while the tiles fill at most half the SMs); dequantize-then-cuBLAS from 129 tokens, where
    the GEMM is compute-bound. With ``mma`` (the default), 2- and 4-bit weights at :data:`MMA_RULE_TOKENS` take
    the tensor-core decode kernel instead (:func:`gemv_mma_config`); :func:`launch_linear` asks again without
    it for the calls that kernel does not take.
    """
    sms = 132
    if mma and bits in (2, 4) and m in MMA_RULE_TOKENS:
        return gemv_mma_config(bits, m, n, kq, sms)
    if m <= 2 or (m <= 4 and bits in (2, 4)):
        kernel, bm, bn, bg, warps = gemv_tile(bits, m)
        return Config(kernel, bm, bn, bg, split_k=gemv_split(n, kq, bn, bg, sms, warps), num_warps=warps)
    if m <= 32:
        bm = 16 if m <= 16 else 32
        split = 1
        while triton.cdiv(n, 64) * split < 2 * sms and kq // (128 * split) >= 4 and split < 32:
            split *= 2
        return Config("gemm_t", bm, 64, 128, split_k=split, num_warps=4, num_stages=3)
    if m <= 64:
        bn = 128 if n * kq >= 8192 * 8192 or kq > n else 64
        return Config("gemm", 64, bn, 128, split_k=8 if kq > 2 * n else 4, num_warps=4, num_stages=3)
    if m <= 128:
        split = 1
        while triton.cdiv(n, 128) * split <= sms // 2 and kq // (128 * split) >= 8:
            split *= 2
        return Config("gemm", 128, 128, 128, split_k=split, num_warps=8, num_stages=3)
    return DENSE


def stream_rule_config(m: int, n: int, kq: int, sms: int = 132) -> Config:
    """The TMA-ring GEMV for one or two tokens on a shape the table does not list (the tile of 26 of its 33 tuned
    entries): programs of 64 whole columns (512 codes per step) where that makes :data:`STREAM_RULE_PROGRAMS`
    programs, else 32 columns (1024 codes), or 16 on rows of at most 8192 codes at one token; 8 consumer warps where
    the programs are fewer than the SMs on longer rows, else 4; a ring of 4 steps at one token on rows past 4096
    codes, else 2."""
    if n // 64 >= STREAM_RULE_PROGRAMS:
        bn = 64
    elif n // 32 >= STREAM_RULE_PROGRAMS or kq > 8192 or m > 1:
        bn = 32
    else:
        bn = 16
    warps = 8 if triton.cdiv(n, bn) < sms and kq > 8192 else 4
    return Config("gemv_tma", stream_tokens(m), bn, 512 if bn == 64 else 1024, num_warps=warps,
                  num_stages=4 if m == 1 and kq > 4096 else 2)


def ra_rule_config(bits: int, m: int, n: int, kq: int, sms: int = 132) -> Config:
    """The register-operand wgmma kernel for 9..256 tokens on a shape the table does not list
    (:func:`~kernels.gluon_gemm_ra.ra_plan`)."""
    tokens, split, stages = ra_plan(m, n, kq, bits, sms)
    return Config("gemm_ra", tokens, RA_ROWS, RA_STEP_K, split_k=split, num_warps=4, num_stages=stages)


@lru_cache(maxsize=4096)
def hopper_config(bits: int, m: int, n: int, kq: int) -> Config | None:
    """The Hopper kernels for a shape the table does not list, 2- and 4-bit weights: the TMA-ring GEMV at one and two
    tokens (:func:`stream_rule_config`), the register-operand wgmma kernel at 9..256 (:func:`ra_rule_config`); None
    for other calls, which take :func:`default_config`. A call these kernels do not take (another GPU, fp32 inputs,
    split channels) runs :func:`default_config` too (:func:`launch_linear`)."""
    if m <= 2 and bits in STREAM_BITS:
        return stream_rule_config(m, n, kq)
    if m in RA_RULE_TOKENS and bits in RA_BITS:
        return ra_rule_config(bits, m, n, kq)
    return None


def choose_config(bits: int, m: int, n: int, kq: int) -> Config:
    """The tuned configuration for this shape (quantized or 16-bit activations alike), else :func:`hopper_config`,
    else :func:`default_config`."""
    return TABLE.get(table_key(bits, kq, n, m)) or hopper_config(bits, m, n, kq) or default_config(bits, m, n, kq)


def mma8_config(m: int, n: int, kq: int, sms: int = 132) -> Config:
    """Tiles of the int8 W{b}A{a} kernel by shape (a rule, not tuned): BM from M, BN 128 from 64 tokens,
    split-K up to about two programs per SM with at least 16 groups each."""
    bm = min(128, max(16, triton.next_power_of_2(m)))
    bn = 128 if bm >= 64 else 64
    split = 1
    while triton.cdiv(m, bm) * triton.cdiv(n, bn) * split < 2 * sms and kq // (32 * split) >= 32 and split < 32:
        split *= 2
    return Config("mma8", bm, bn, GROUP_SIZE, split_k=split, num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def save_table(table: dict[str, Config]) -> None:
    TABLE_PATH.write_text(json.dumps({k: asdict(v) for k, v in sorted(table.items())}, indent=1) + "\n")


def plane_args(bits: int, kq: int) -> dict:
    """Constexprs of the bit planes (width P, weight 2^S) and the word-row offsets R1, R2 of planes 1, 2."""
    widths = plane_widths(bits) + [0, 0]
    shifts = [bits - sum(widths[: j + 1]) for j in range(3)]
    return dict(P0=widths[0], S0=shifts[0], P1=widths[1], S1=max(shifts[1], 0), P2=widths[2],
                S2=max(shifts[2], 0), R1=kq * widths[0] // 32, R2=kq * (widths[0] + widths[1]) // 32)


def weight_args(bits: int, master_bits: int, kq: int) -> tuple[int, int, dict]:
    """``(R1, R2, constexprs)`` of a b-bit weight: :func:`plane_args` and the zero point's ``ZOFF``, ``ZMUL``
    (``zero_b = (zero - ZOFF) * ZMUL``)."""
    mult = 2 ** (master_bits - bits)
    consts = dict(plane_args(bits, kq), ZOFF=(mult - 1) / 2, ZMUL=1.0 / mult)
    return consts.pop("R1"), consts.pop("R2"), consts


@lru_cache(maxsize=256)
def gluon_scale_args(bits: int, master_bits: int, kq: int) -> tuple[float, float, float]:
    """``(col_mult, zoff, zmul)`` that the Gluon kernels take as arguments: the column scale's factor on top of
    ``row_scale`` (``256 * 2^(master_bits - bits)``) and :func:`weight_args`' ``ZOFF``, ``ZMUL``."""
    _, _, consts = weight_args(bits, master_bits, kq)
    return 256.0 * 2 ** (master_bits - bits), consts["ZOFF"], consts["ZMUL"]


_counters: dict[torch.device, torch.Tensor] = {}


def _split_buffers(tiles: int, cfg: Config, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(split_k, workspace, counters)`` of a launch over ``tiles`` output tiles (split-K off past COUNTERS tiles)."""
    if device not in _counters:
        _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    split_k = cfg.split_k if tiles <= COUNTERS else 1
    ws = torch.empty(tiles * split_k * cfg.block_m * cfg.block_n if split_k > 1 else 1, dtype=torch.float32,
                     device=device)
    return split_k, ws, _counters[device]


def launch_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  row_scale: torch.Tensor, split_index: torch.Tensor | None, token_scale: torch.Tensor | None,
                  bias: torch.Tensor | None, bits: int, master_bits: int, in_features: int,
                  out_dtype: torch.dtype, config: Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the W{b} linear on ``x [M, K]`` (contiguous rows) into ``out`` (new if None); ``config`` overrides the table."""
    m = x.shape[0]
    n, g = scales.shape
    kq = g * GROUP_SIZE
    y = torch.empty(m, n, dtype=out_dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    cfg = config or choose_config(bits, m, n, kq)
    has_split = split_index is not None and split_index.numel() > 0
    chosen = config is None  # the dispatch's own choice (else the caller's, run as given)
    if cfg.kernel == "gemm_ra":
        if ra_supported(bits, x, packed, scales, kq, has_split):
            return _ra_linear(x, packed, scales, zeros, row_scale, token_scale, bias, bits, master_bits, cfg, y)
        cfg = default_config(bits, m, n, kq)  # fp32 inputs, 3/8-bit codes, split channels, not Hopper: the rule
        chosen = True
    if cfg.kernel == "gemv_mma":
        if mma_gemv_supported(bits, x, packed, scales, kq, has_split):
            return _mma_gemv_linear(x, packed, scales, zeros, row_scale, token_scale, bias, bits, master_bits, cfg, y)
        cfg = default_config(bits, m, n, kq, mma=False)  # fp32 inputs, 3/8-bit codes, split channels, other shapes
        chosen = True
    if cfg.kernel == "gemv_tma":
        if stream_gemv_supported(bits, x, packed, scales, kq, has_split, cfg.block_m):
            return launch_gemv_tma(x, packed, scales, zeros, row_scale, token_scale, bias, bits,
                                   *gluon_scale_args(bits, master_bits, kq), cfg.block_m, cfg.block_n, cfg.block_k,
                                   cfg.num_stages, cfg.num_warps, y)
        cfg = default_config(bits, m, n, kq, mma=False)  # > block_m tokens, fp32, 3/8-bit codes, split channels
        chosen = True
    if chosen and cfg.kernel == "gemv_h2" and x.dtype == torch.float32:
        # a half2 tile takes 16-bit inputs: fp32 ones run the fp32 GEMV, on the same tile unless it is a whole-column
        # one (M <= 2 only), whose many groups per step the fp32 GEMV would sum across warps: then on its own tile
        if cfg.block_k >= WHOLE_COLUMN_BG.value:
            bm, bn, bg, warps = fp32_gemv_tile(bits, m)
            cfg = Config("gemv", bm, bn, bg, split_k=gemv_split(n, kq, bn, bg, warps=warps), num_warps=warps)
        else:
            cfg = replace(cfg, kernel="gemv")
    if cfg.kernel == "mma8":
        raise ValueError("mma8 runs on activation codes: call launch_linear_wa")
    if cfg.kernel == "gemm_ws":
        if ws_supported(bits, x.dtype, packed, scales):
            return _ws_linear(x, packed, scales, zeros, row_scale, split_index, token_scale, bias, bits, master_bits,
                              cfg, y)
        cfg = DENSE  # fp32 inputs, 3- or 8-bit codes, row-major codes or a GPU other than Hopper
    if cfg.kernel == "dense":
        return _dense_linear(x, packed, scales, zeros, row_scale, split_index, token_scale, bias, bits, master_bits,
                             in_features, cfg, y)
    gemv = cfg.kernel in ("gemv", "gemv_h2")
    if gemv and m > cfg.block_m:
        raise ValueError(f"this GEMV configuration takes at most {cfg.block_m} rows, got {m}")
    mult = 2 ** (master_bits - bits)
    bm = cfg.block_m
    tiles = triton.cdiv(n, cfg.block_n) * (1 if gemv else triton.cdiv(m, bm))
    split_k, ws, cnt = _split_buffers(tiles, cfg, x.device)
    grid = (tiles, split_k)
    su8, zu8 = scales.view(torch.uint8), zeros
    args = (x, packed, su8, zu8, row_scale, token_scale if token_scale is not None else row_scale,
            bias if bias is not None else row_scale, split_index if has_split else packed, y, ws, cnt,
            m, n, in_features, padded_width(in_features, GROUP_SIZE), kq, x.stride(0), y.stride(0),
            packed.stride(1), packed.stride(0), su8.stride(1), su8.stride(0))
    r1, r2, consts = weight_args(bits, master_bits, kq)
    pdl = pdl_for(x)
    consts.update(COL_MULT=256.0 * mult, SPLIT_K=split_k, HAS_SPLIT=has_split, HAS_TS=token_scale is not None,
                  HAS_BIAS=bias is not None, PDL=pdl, launch_pdl=pdl)
    if zu8.stride() != su8.stride():
        raise ValueError("scales and zeros must share one memory layout")
    if cfg.kernel == "gemv":
        win = 8 if x.dtype in (torch.bfloat16, torch.float16) else consts["P0"]  # see triton_gemv
        gemv_kernel[grid](*args, r1, r2, MAGIC_BITS, **consts, BM=bm, BG=cfg.block_k, BN=cfg.block_n, WIN=win,
                          EVEN_K=in_features == kq, num_warps=cfg.num_warps)
    elif cfg.kernel == "gemv_h2":
        check_h2(bits, x.dtype)
        gemv_h2_kernel[grid](*args, F16_ONE, **consts, BM=bm, BG=cfg.block_k, BN=cfg.block_n, EVEN_K=in_features == kq,
                             ASM=ASM, num_warps=cfg.num_warps)
    else:
        pair_one = BF16_ONE if x.dtype == torch.bfloat16 else F16_ONE  # the 16-bit pairs of 2- and 4-bit W @ x^T
        gemm_kernel[grid](*args, r1, r2, MAGIC_BITS, pair_one, **consts, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
                          GROUP_M=cfg.group_m, X_FIRST=cfg.kernel == "gemm", ASM=ASM, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages)
    return y


def dequant_weight(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, row_scale: torch.Tensor,
                   bits: int, master_bits: int, cfg: Config, out: torch.Tensor) -> torch.Tensor:
    """The dense b-bit weight ``out [N, Kq] = W_b`` (row scale included, in ``out``'s dtype) of a packed layer,
    with :func:`kernels.triton_gemm.dequant_kernel`."""
    n, g = scales.shape
    kq = g * GROUP_SIZE
    r1, r2, consts = weight_args(bits, master_bits, kq)
    su8 = scales.view(torch.uint8)
    dequant_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(kq, cfg.block_k))](
        packed, su8, zeros, row_scale, out, n, kq, packed.stride(1), packed.stride(0), su8.stride(1), su8.stride(0),
        r1, r2, MAGIC_BITS, **consts, COL_MULT=256.0 * 2 ** (master_bits - bits), BN=cfg.block_n, BK=cfg.block_k,
        num_warps=cfg.num_warps)
    return out


def _ws_linear(x, packed, scales, zeros, row_scale, split_index, token_scale, bias, bits, master_bits, cfg, y):
    """``y = x_expanded @ W_b^T`` with the warp-specialized kernel (the expanded input is a transient copy)."""
    kq = scales.shape[1] * GROUP_SIZE
    xe = expand_input(x, split_index, GROUP_SIZE) if x.shape[1] != kq else x
    return launch_gemm_ws(xe, packed, scales, zeros, row_scale, token_scale, bias, bits,
                          *gluon_scale_args(bits, master_bits, kq), cfg.block_m, cfg.block_n, cfg.block_k,
                          cfg.num_stages, y)


def _ra_linear(x, packed, scales, zeros, row_scale, token_scale, bias, bits, master_bits, cfg, y):
    """``y = x @ W_b^T`` with the dequantized weights as wgmma's register operand (:mod:`kernels.gluon_gemm_ra`)."""
    if (cfg.block_n, cfg.block_k) != (RA_ROWS, RA_STEP_K):
        raise ValueError(f"gemm_ra runs {RA_ROWS} weight rows per program in steps of {RA_STEP_K} columns (block_n "
                         f"{RA_ROWS}, block_k {RA_STEP_K}), got {cfg.block_n}, {cfg.block_k}")
    n, g = scales.shape
    tiles = triton.cdiv(n, RA_ROWS) * triton.cdiv(x.shape[0], cfg.block_m)
    split_k, ws, cnt = _split_buffers(tiles, cfg, x.device)
    return launch_gemm_ra(x, packed, scales, zeros, row_scale, token_scale, bias, bits,
                          *gluon_scale_args(bits, master_bits, g * GROUP_SIZE), cfg.block_m, cfg.num_stages, split_k,
                          ws, cnt, y)


def _mma_gemv_linear(x, packed, scales, zeros, row_scale, token_scale, bias, bits, master_bits, cfg, y):
    """``y = x @ W_b^T`` for at most 16 tokens with the tensor-core decode kernel (:mod:`kernels.gluon_gemv`)."""
    n = scales.shape[0]
    tiles = triton.cdiv(n, cfg.block_n)
    split_k, ws, cnt = _split_buffers(tiles, replace(cfg, block_m=token_rows(x.shape[0])), x.device)
    return launch_gemv_mma(x, packed, scales, zeros, row_scale, token_scale, bias, bits,
                           *gluon_scale_args(bits, master_bits, scales.shape[1] * GROUP_SIZE), cfg.block_n,
                           cfg.num_warps, split_k, ws, cnt, y)


def _dense_linear(x, packed, scales, zeros, row_scale, split_index, token_scale, bias, bits, master_bits,
                  in_features, cfg, y):
    """``y = x_expanded @ W_b^T`` through a transient dense copy of the weight (in ``y``'s dtype) and cuBLAS."""
    n, g = scales.shape
    w = dequant_weight(packed, scales, zeros, row_scale, bits, master_bits, cfg,
                       torch.empty(n, g * GROUP_SIZE, dtype=y.dtype, device=x.device))
    xe = x if token_scale is None else x.float() * token_scale[:, None]
    xe = (expand_input(xe, split_index, GROUP_SIZE) if xe.shape[1] != w.shape[1] else xe).to(y.dtype)
    if bias is None:
        return torch.mm(xe, w.T, out=y)
    return torch.addmm(bias.to(y.dtype), xe, w.T, out=y)


@dataclass(frozen=True)
class ActQuantTile:
    """A launch of activation quantization: ``groups`` per chunk and ``warps``. The Triton kernel
    (:mod:`kernels.triton_actquant`): one chunk covering the row is one pass over it, fewer are two, with ``stages``
    of software pipelining of the chunk loops. ``staged``: the Gluon kernel that stages each row in shared memory
    (:mod:`kernels.gluon_actquant`), with ``columns`` consecutive columns per thread."""

    groups: int
    warps: int
    stages: int = 1
    staged: bool = False
    columns: int = 8


def actquant_tile(x: torch.Tensor, kq: int) -> ActQuantTile:
    """The activation-quantization launch for the rows of ``x [M, K]`` expanded to ``kq`` columns (measured on the
    H200 by ``scripts/actquant_ab.py``: docs/results/actquant-staged-candidates-h200.json and
    actquant-staged-ab-h200.json).

    * Fewer than ``ACTQUANT_MANY_ROWS`` tokens (decode): the Triton kernel, one chunk per row (one pass, up to 16
      warps).
    * ``ACTQUANT_STAGED_ROWS`` tokens or more, or rows of more than ``ACTQUANT_ONE_CHUNK_GROUPS`` groups from
      ``ACTQUANT_MANY_ROWS`` tokens on, where the Gluon kernel takes them: rows staged in shared memory, 16 columns
      per thread, chunks of 128 groups on 8 warps unless chunks of 64 on 4 warps pad the row less (64-81 % of copy
      bandwidth at M = 1024 on K = 4096 ... 28672 and 79-92 % at M = 4096, against 51-73 % and 59-81 % for the
      best Triton launches; 55 % at M = 256 on K = 28672 against 52 %).
    * Otherwise one chunk per row on 16 warps (at M = 256 and K <= 14336: 33-53 %, against 27-41 % staged), or,
      where the Gluon kernel does not apply, two passes over chunks of 64 groups where they tile the row exactly,
      else 128, with 8 warps.
    """
    m, groups = x.shape[0], kq // GROUP_SIZE
    one = triton.next_power_of_2(groups)
    if m >= ACTQUANT_STAGED_ROWS or (m >= ACTQUANT_MANY_ROWS and one > ACTQUANT_ONE_CHUNK_GROUPS):
        kp = padded_width(x.shape[1], GROUP_SIZE)
        chunk = 128 if staged_chunks(kp, kq - kp, 128) * 2 == staged_chunks(kp, kq - kp, 64) else 64
        if staged_rows_supported(x, kq - kp, chunk):
            return ActQuantTile(chunk, chunk // 16, staged=True, columns=16)
    if m < ACTQUANT_MANY_ROWS:
        return ActQuantTile(one, min(16, max(4, one // 32)))
    if groups == one or one <= ACTQUANT_ONE_CHUNK_GROUPS:
        return ActQuantTile(one, 16)
    return ActQuantTile(64 if groups % 128 and not groups % 64 else 128, 8)


def launch_actquant(x: torch.Tensor, split_index: torch.Tensor | None, act_bits: int, write_codes: bool = False,
                    dequant_dtype: torch.dtype | None = None, tile: ActQuantTile | None = None) -> tuple[torch.Tensor, ...]:
    """Quantize ``x [M, K]`` per token: ``(xq fp16 [M, Kq], token_scale fp32 [M])`` (+ codes, E4M3 bytes, zeros).

    With ``dequant_dtype`` the first output is the dequantized activations ``(code - zero) * step`` in that
    dtype instead of ``xq`` (the token scale is still returned, times ``2^a`` as always). ``tile`` overrides
    :func:`actquant_tile` (benchmarks).
    """
    m, k = x.shape
    kp = padded_width(k, GROUP_SIZE)
    kq = kp + (0 if split_index is None else split_index.numel())
    has_split = split_index is not None and split_index.numel() > 0
    xq = torch.empty(m, kq, dtype=dequant_dtype or torch.float16, device=x.device)
    ts = torch.empty(m, dtype=torch.float32, device=x.device)
    extra = ((torch.empty(m, kq, dtype=torch.uint8, device=x.device),
              torch.empty(m, kq // GROUP_SIZE, dtype=torch.uint8, device=x.device),
              torch.empty(m, kq // GROUP_SIZE, dtype=torch.uint8, device=x.device)) if write_codes else ())
    if m:
        codes, sc, zp = extra or (xq, xq, xq)
        tile = tile or actquant_tile(x, kq)
        pdl = pdl_for(x)
        if tile.staged:
            launch_actquant_rows(x, split_index, xq, ts, codes, sc, zp, act_bits, tile.groups, tile.columns,
                                 tile.warps, write_codes, dequant_dtype is not None, pdl)
            return (xq, ts, *extra)
        actquant_kernel[(m,)](x, split_index if has_split else x, xq, ts, codes, sc, zp, m, k, kp, kq, x.stride(0),
                              xq.stride(0), QMAX=2**act_bits - 1, XQ_MUL=2.0**-act_bits, BG=tile.groups,
                              HAS_SPLIT=has_split, WRITE_CODES=write_codes, ONE_CHUNK=tile.groups * GROUP_SIZE >= kq,
                              DEQUANT=dequant_dtype is not None, STAGES=tile.stages, num_warps=tile.warps,
                              PDL=pdl, launch_pdl=pdl)
    return (xq, ts, *extra)


def launch_linear_wa(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     row_scale: torch.Tensor, split_index: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                     master_bits: int, act_bits: int, out_dtype: torch.dtype, config: Config | None = None,
                     out: torch.Tensor | None = None, rescale: bool = True) -> torch.Tensor:
    """W{b}A{a} on ``x [M, K]`` (contiguous rows): quantize the activations per token, then the linear.

    ``config.kernel == "mma8"`` runs :func:`kernels.triton_mma.mma_kernel` on the activation codes (a <= 7);
    otherwise (``config`` None: the table) :func:`launch_linear` runs on the exact fp16 ``xq``.
    ``rescale=False`` (mma8 only) skips the per-group rescale: wrong numbers, for timing it.
    """
    m = x.shape[0]
    n, g = scales.shape
    kq = g * GROUP_SIZE
    cfg = config or choose_config(bits, m, n, kq)
    if cfg.kernel != "mma8":
        if not rescale:
            raise ValueError("rescale=False is a timing switch of the mma8 kernel only")
        if cfg.kernel == "dense":  # cuBLAS reads the dequantized activations, written by the quantizer itself
            xd, _ = launch_actquant(x, split_index, act_bits, dequant_dtype=out_dtype)
            return launch_linear(xd, packed, scales, zeros, row_scale, None, None, bias, bits, master_bits, kq,
                                 out_dtype, cfg, out)
        xq, ts = launch_actquant(x, split_index, act_bits)
        return launch_linear(xq, packed, scales, zeros, row_scale, None, ts, bias, bits, master_bits, kq, out_dtype,
                             config, out)
    if act_bits > 7 or cfg.block_k != GROUP_SIZE:
        raise ValueError(f"mma8 takes act_bits <= 7 (int8 operands) and block_k = {GROUP_SIZE}, got {act_bits}, "
                         f"{cfg.block_k}")
    _, ts, codes, xs, xz = launch_actquant(x, split_index, act_bits, write_codes=True)
    y = torch.empty(m, n, dtype=out_dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split_k, ws, cnt = _split_buffers(tiles, cfg, x.device)
    r1, r2, consts = weight_args(bits, master_bits, kq)
    su8 = scales.view(torch.uint8)
    if zeros.stride() != su8.stride():
        raise ValueError("scales and zeros must share one memory layout")
    mma_kernel[(tiles, split_k)](
        codes, xs, xz, packed, su8, zeros, row_scale, ts, bias if bias is not None else row_scale, y, ws, cnt, m, n,
        kq, y.stride(0), packed.stride(1), packed.stride(0), su8.stride(1), su8.stride(0), r1, r2, **consts,
        CW=2 ** (bits - 1), COL_MULT=65536.0 * 2 ** (master_bits - bits - act_bits), BM=cfg.block_m, BN=cfg.block_n,
        SPLIT_K=split_k, RESCALE=rescale, HAS_BIAS=bias is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, row_scale: torch.Tensor,
            split_index: torch.Tensor | None, token_scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
            master_bits: int, in_features: int, out_dtype: torch.dtype) -> torch.Tensor:
    ts = None if token_scale is None else token_scale.reshape(-1).contiguous()
    y = launch_linear(_rows(x), packed, scales, zeros, row_scale, split_index, ts, bias, bits, master_bits,
                      in_features, out_dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear_fake(x, packed, scales, zeros, row_scale, split_index, token_scale, bias, bits, master_bits,
                 in_features, out_dtype):
    return x.new_empty(*x.shape[:-1], scales.shape[0], dtype=out_dtype)


def _quantize_act(x: torch.Tensor, split_index: torch.Tensor | None, act_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    xq, ts = launch_actquant(_rows(x), split_index, act_bits)
    return xq.reshape(*x.shape[:-1], -1), ts.reshape(x.shape[:-1])


def _quantize_act_fake(x, split_index, act_bits):
    kq = padded_width(x.shape[-1], GROUP_SIZE) + (0 if split_index is None else split_index.shape[0])
    return (x.new_empty(*x.shape[:-1], kq, dtype=torch.float16),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


def _linear_wa(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               row_scale: torch.Tensor, split_index: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
               master_bits: int, act_bits: int, out_dtype: torch.dtype, kernel: str) -> torch.Tensor:
    if kernel not in ("auto", "mma8"):
        raise ValueError(f"kernel must be 'auto' or 'mma8', got {kernel!r}")
    rows = _rows(x)
    cfg = mma8_config(rows.shape[0], scales.shape[0], scales.shape[1] * GROUP_SIZE) if kernel == "mma8" else None
    y = launch_linear_wa(rows, packed, scales, zeros, row_scale, split_index, bias, bits, master_bits, act_bits,
                         out_dtype, cfg)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear_wa_fake(x, packed, scales, zeros, row_scale, split_index, bias, bits, master_bits, act_bits, out_dtype,
                    kernel):
    return x.new_empty(*x.shape[:-1], scales.shape[0], dtype=out_dtype)


torch.library.custom_op("bitbybit::linear", _linear, mutates_args=()).register_fake(_linear_fake)
torch.library.custom_op("bitbybit::quantize_act", _quantize_act, mutates_args=()).register_fake(_quantize_act_fake)
torch.library.custom_op("bitbybit::linear_wa", _linear_wa, mutates_args=()).register_fake(_linear_wa_fake)

BITBYBIT_OPS = torch.ops.bitbybit
EAGER_OPS = SimpleNamespace(linear=_linear, quantize_act=_quantize_act, linear_wa=_linear_wa)


def ops_for(x: torch.Tensor) -> Any:
    """The ops to run on ``x``: the custom ops (``torch.ops.bitbybit``) while torch.compile traces, for tensor
    subclasses (fake tensors) and under a dispatch mode; otherwise the same functions called directly
    (:data:`EAGER_OPS`). Eager code gains nothing from the dispatcher and paid 40-60 µs of host time per call for
    it on the H200's host (``scripts/host_cost.py``); a CUDA graph replays neither."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or _get_current_dispatch_mode() is not None:
        return BITBYBIT_OPS
    return EAGER_OPS
