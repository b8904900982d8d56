"""Packing b-bit codes into int32 words, the layout the kernels read.

A b-bit code is split into bit planes whose widths are powers of two, widest and highest
first (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1; 1, 2, 4 and 8 are a single plane). The
top plane of a 3-bit code is therefore its 2-bit nested slice. Each plane of width p packs
32 / p consecutive codes of a row (along K) into one int32 word, code i of the word in bits
[i*p, (i+1)*p). The planes are concatenated along the last dim, highest bits first, so a row
of K codes takes exactly K * b / 32 words. Rows are output channels: ``packed[N, K*b/32]``.
"""

from __future__ import annotations

import torch

from .grid import MASTER_BITS, check_bits


def plane_widths(bits: int) -> list[int]:
    """Widths of the bit planes of a b-bit code, highest bits first (e.g. 3 -> [2, 1])."""
    check_bits(bits)
    return [p for p in (8, 4, 2, 1) if bits & p]


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    per_word = 32 // width
    n, k = codes.shape
    c = codes.to(torch.int64).reshape(n, k // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * width
    words = (c << shifts).sum(-1)  # disjoint bit ranges: sum == bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def _unpack_plane(words: torch.Tensor, width: int) -> torch.Tensor:
    per_word = 32 // width
    n, w = words.shape
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * width
    c = (words.to(torch.int64).unsqueeze(-1) >> shifts) & (2**width - 1)
    return c.reshape(n, w * per_word)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit codes ``uint8 [N, K]`` (K a multiple of 32) into ``int32 [N, K*bits/32]``."""
    check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack_codes expects uint8 [N, K] codes, got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] % 32:
        raise ValueError(f"pack_codes needs K to be a multiple of 32 (pad to whole groups first), got K={codes.shape[1]}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"pack_codes: a code exceeds {bits} bits (max {int(codes.max())}); slice the master codes first")
    planes, high = [], bits
    for width in plane_widths(bits):
        high -= width
        planes.append(_pack_plane((codes >> high) & (2**width - 1), width))
    return torch.cat(planes, dim=1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``int32 [N, K*bits/32]`` -> ``uint8 [N, K]``."""
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] % bits:
        raise ValueError(f"unpack_codes expects int32 [N, K*{bits}/32], got {packed.dtype} {tuple(packed.shape)}")
    words_per_bit = packed.shape[1] // bits  # K / 32
    out = torch.zeros(packed.shape[0], words_per_bit * 32, dtype=torch.int64, device=packed.device)
    high, start = bits, 0
    for width in plane_widths(bits):
        high -= width
        stop = start + words_per_bit * width
        out |= _unpack_plane(packed[:, start:stop], width) << high
        start = stop
    return out.to(torch.uint8)


def unpack_to_master(packed: torch.Tensor, bits: int, master_bits: int = MASTER_BITS) -> torch.Tensor:
    """Packed b-bit codes -> uint8 codes at master positions (``code_b << (master_bits - b)``).

    Slicing the result back to b bits gives the packed codes exactly, so every master-code path
    (dequantize, pack_linear, the reference ops) serves a compact layer as it serves the full one.
    """
    check_bits(bits, master_bits)
    return unpack_codes(packed, bits) << (master_bits - bits)
