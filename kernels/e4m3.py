"""FP8 E4M3 codec for group scales (the NVFP4 scale format).

E4M3 (``torch.float8_e4m3fn``) covers 2^-9 .. 448 with 3 mantissa bits. Group scales of real
weights span more than that, so every row carries one FP32 factor (``row_scale``) chosen so
that the row's largest group scale maps to 448; the E4M3 value is ``scale / row_scale``.

Scales are rounded *up* to the next E4M3 value (never down): a group quantized with its
rounded scale then always fits its min..max range into the integer grid, so no value is
clipped. The cost is a grid at most 2^-3 (12.5 %) coarser than exact; FORMAT.md measures it.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
_E4M3_MAX_BITS = 0x7E  # 448; 0x7F is NaN in the fn variant
ALL_ZERO_ROW_SCALE = 2.0**-100  # an all-zero row's factor: its grid reconstructs ~1e-32, i.e. zero


def value_checks() -> bool:
    """Whether data-dependent input checks (NaN, ranges) run: always, except while torch.compile traces
    (QAT's compiled training step), where each check would be a host sync and a graph break."""
    return not torch.compiler.is_compiling()


def exact_divisor(value: float, like: torch.Tensor) -> torch.Tensor:
    """A Python number as a 0-d tensor on ``like``'s device, so that dividing by it is IEEE division.

    PyTorch's CUDA kernels turn ``tensor / python_number`` into a multiplication by the
    reciprocal, which rounds differently from the CPU; the format must give the same codes on
    every device.
    """
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def encode_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round positive values up to the nearest E4M3 value; returns ``torch.float8_e4m3fn``.

    Values must be finite, > 0 and <= 448 (callers divide by a row factor first).
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"encode_e4m3 expects a floating tensor, got {x.dtype}")
    x = x.float()
    if value_checks():
        _check_e4m3_range(x)
    near = x.to(torch.float8_e4m3fn)
    bits = near.view(torch.uint8).to(torch.int16)
    # Positive E4M3 bit patterns are ordered like their values, so +1 is the next value up.
    bits = torch.where(near.float() < x, bits + 1, bits).clamp(1, _E4M3_MAX_BITS)
    return bits.to(torch.uint8).view(torch.float8_e4m3fn)


def _check_e4m3_range(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError("encode_e4m3: scales contain NaN or Inf; check the weights for NaN/Inf")
    if (x <= 0).any() or (x > E4M3_MAX).any():
        raise ValueError(
            f"encode_e4m3: scales must lie in (0, {E4M3_MAX}]; divide by a row factor first "
            f"(got min {x.min().item():.3g}, max {x.max().item():.3g})"
        )


def decode_e4m3(x: torch.Tensor) -> torch.Tensor:
    """E4M3 (``float8_e4m3fn``, or its raw ``uint8`` bits) to float32."""
    if x.dtype == torch.uint8:
        x = x.view(torch.float8_e4m3fn)
    if x.dtype != torch.float8_e4m3fn:
        raise ValueError(f"decode_e4m3 expects float8_e4m3fn or uint8, got {x.dtype}")
    return x.float()


def split_row_scale(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split non-negative FP32 group scales ``[..., G]`` into (E4M3 group scales, FP32 row factor).

    ``row_scale = max_g(scale) / 448`` so the largest group of each row uses the top of E4M3's
    range. The representable span is 448 / 2^-9 (about 2^17.8): a group more than that below
    its row's largest gets E4M3's smallest subnormal, a step too coarse for it (its values
    round towards its zero point; never clipped). Real weights are far inside the span
    (teacher-56m: at most 5x between a row's groups); FORMAT.md measures both cases. An
    all-zero group (scale 0) gets that smallest step too. Returns ``(e4m3 [..., G],
    row_scale [...])`` with ``decode_e4m3(e4m3) * row_scale[..., None] >= scales`` up to FP32
    rounding.
    """
    if value_checks() and (scales < 0).any():
        raise ValueError("split_row_scale: group scales must not be negative")
    row_scale = scales.amax(dim=-1) / exact_divisor(E4M3_MAX, scales)
    row_scale = torch.where(row_scale > 0, row_scale, torch.full_like(row_scale, ALL_ZERO_ROW_SCALE))
    ratio = (scales / row_scale.unsqueeze(-1)).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX)
    return encode_e4m3(ratio), row_scale.float()
