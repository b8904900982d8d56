"""Triton building blocks shared by the bitbybit kernels.

* :func:`e4m3_scaled` decodes E4M3 scale bytes exactly with two integer ops and one conversion.
* :func:`load_act` reads the layer's expanded input ``[x | zero pad | x[split_index]]`` straight
  from ``x``, so no kernel needs the expanded copy in memory (the OCS gather is fused).
* :func:`finish` is the common epilogue: per-column ``row_scale``, optional per-token scale and
  bias, and, for split-K launches, the reduction of the partial tiles by the last program to
  finish (one launch; a self-resetting counter per output tile).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_scaled(byte):
    """E4M3 bytes (uint8) -> float32 value * 2^-8, exact.

    E4M3's 4-bit exponent and 3-bit mantissa, shifted into fp16's fields, give an fp16 whose value
    is the E4M3 value / 256 for normals and subnormals alike (fp16's exponent bias is 8 larger).
    """
    return ((byte.to(tl.int16) & 0x7F) << 7).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_act(x_ptr, stride_xm, m, k, M, K, Kp, Kq, split_ptr, HAS_SPLIT: tl.constexpr):
    """Expanded activations at (token ``m``, column ``k``) (broadcastable index tensors); 0 off the input.

    Columns ``[0, K)`` are ``x``, ``[K, Kp)`` zero padding, ``[Kp, Kq)`` the split slots, which
    read ``x[split_index[k - Kp]]`` (0 for an empty slot, index -1).
    """
    inside = (m + 0 * k < M) & (k < Kq)  # m broadcast to k's shape first (a scalar mask trips the interpreter)
    if HAS_SPLIT:
        in_split = k >= Kp
        src = tl.where(in_split, tl.load(split_ptr + (k - Kp), mask=inside & in_split, other=-1), k)
    else:
        src = k
    return tl.load(x_ptr + m * stride_xm + src, mask=inside & (src >= 0) & (src < K), other=0.0)


@triton.jit
def store_scaled(acc, rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT: tl.constexpr,
                 HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr):
    cmask = cols < N
    out = acc * (tl.load(rs_ptr + cols, mask=cmask, other=0.0) * COL_MULT)[None, :]
    if HAS_TS:
        out = out * tl.load(ts_ptr + rows, mask=rows < M, other=0.0)[:, None]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], out.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & cmask[None, :])


@triton.jit
def finish(acc, rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, ws_ptr, cnt_ptr, tile, pid_k,
           COL_MULT: tl.constexpr, SPLIT_K, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write ``acc [BM, BN]`` (fp32, before scaling) as ``y[rows, cols]``.

    With ``SPLIT_K > 1`` every program stores its partial tile in the workspace and bumps the
    tile's counter; the one that sees ``SPLIT_K - 1`` sums the partials, resets the counter to 0
    for the next launch and writes the output. On GEMV-sized tiles (at most 512 outputs) it loads 16
    partials at once, so the reduction is a few rounds of L2 latency rather than one per split
    (0-9 % less time for the half2 GEMV on the H200, session 8).
    ``SPLIT_K`` is a run-time value (Triton specializes 1), so split-K variants share one compiled
    kernel.
    """
    if SPLIT_K == 1:
        store_scaled(acc, rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS, HAS_BIAS)
    else:
        BM: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        base = ws_ptr + tile * (SPLIT_K * BM * BN)
        tl.store(base + pid_k * (BM * BN) + offs, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        RED: tl.constexpr = 16 if BM * BN <= 512 else 1  # GEMV tiles; 4 on the 16 x 64 tiles cost up to 60 %
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BM, BN], tl.float32)
            ss = tl.arange(0, RED)[:, None, None]
            for s0 in range(0, SPLIT_K, RED):
                part = tl.load(base + (s0 + ss) * (BM * BN) + offs[None, :, :], mask=s0 + ss < SPLIT_K, other=0.0,
                               cache_modifier=".cg")
                total += tl.sum(part, axis=0)
            tl.atomic_xchg(cnt_ptr + tile, 0)
            store_scaled(total, rows, cols, M, N, y_ptr, stride_ym, rs_ptr, ts_ptr, bias_ptr, COL_MULT, HAS_TS,
                         HAS_BIAS)
