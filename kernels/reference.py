"""Reference linear ops in plain torch (any device): the numerics every other path must match.

``linear_wa16``: W{b}A16, dequantize the b-bit slice and matmul.
``linear_wa``: W{b}A{a}, quantize the activations per token, integer products per group, then
the group scales and zero points applied:

    y[m, n] = sum_g sx[m,g] * sw[n,g] * ( sum_i qx*qw - zw * sum_i qx - zx * sum_i qw + G * zx * zw )

with ``sx, zx`` the activation step/zero and ``sw, zw`` the weight's b-bit step/zero
(:func:`kernels.grid.affine_params`). Both accept float64 inputs to compute exactly.
"""

from __future__ import annotations

import torch

from .actquant import quantize_activations
from .grid import QuantizedWeight, affine_params, dequantize, slice_codes
from .split import expand_input


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_input(x: torch.Tensor, qw: QuantizedWeight) -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"input must be floating point, got {x.dtype}")
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {qw.in_features}")


def linear_wa16(x: torch.Tensor, qw: QuantizedWeight, bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W_b^T (+ bias)`` with W_b the b-bit nested weight; output in ``x.dtype``."""
    _check_input(x, qw)
    dt = _compute_dtype(x)
    xe = expand_input(x.to(dt), qw.split_index, qw.group_size)
    y = xe @ dequantize(qw, bits, dtype=dt).T
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)


def linear_wa(x: torch.Tensor, qw: QuantizedWeight, bits: int, act_bits: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """W{bits}A{act_bits}: per-token activation quantization and per-group integer products."""
    _check_input(x, qw)
    dt = _compute_dtype(x)
    gs = qw.group_size
    qa = quantize_activations(x, act_bits, qw.split_index, gs)
    lead = x.shape[:-1]
    qx = qa.codes.reshape(-1, qa.codes.shape[-1])  # [M, Kq]
    sx = qa.step().reshape(qx.shape[0], -1).to(dt)  # [M, G]
    zx = qa.zeros.reshape(qx.shape[0], -1).to(dt)
    sw, zw = (t.to(dt) for t in affine_params(qw, bits))  # [N, G]
    qwb = slice_codes(qw.codes, bits, qw.master_bits)
    # Integer products are exact in float32 while gs * (2^a - 1) * (2^b - 1) < 2^24.
    exact = torch.float32 if gs * (2**act_bits - 1) * (2**bits - 1) < 2**24 else torch.float64
    y = torch.zeros(qx.shape[0], qwb.shape[0], dtype=dt, device=x.device)
    for g in range(qwb.shape[1] // gs):
        cx = qx[:, g * gs:(g + 1) * gs].to(exact)
        cw = qwb[:, g * gs:(g + 1) * gs].to(exact)
        dot = (cx @ cw.T).to(dt)
        sum_x = cx.sum(1, dtype=torch.float64).to(dt).unsqueeze(1)
        sum_w = cw.sum(1, dtype=torch.float64).to(dt).unsqueeze(0)
        zxg, zwg = zx[:, g:g + 1], zw[:, g].unsqueeze(0)
        y += sx[:, g:g + 1] * sw[:, g].unsqueeze(0) * (dot - zwg * sum_x - zxg * sum_w + gs * zxg * zwg)
    if bias is not None:
        y = y + bias.to(dt)
    return y.reshape(*lead, -1).to(x.dtype)
