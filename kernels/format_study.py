"""Measurements behind the format's choices (docs/FORMAT.md): ``python -m kernels.format_study``.

1. Slicing rule for nested b-bit codes: truncation vs centre-of-cell vs rounded shift, against
   plain round-to-nearest directly at b bits, on Gaussian and Student-t(3) weights.
2. The E4M3 scale policy (round up, per-row FP32 factor) against exact FP32 group scales, and
   on rows whose group scales span far more than E4M3's range.
3. Outlier channel splitting at 2 bits: identity on a fixed grid, then the error once the
   group scales are re-derived, at every nested precision.
4. Symmetric vs asymmetric activation grids.

Prints markdown tables and writes them as JSON (``--out``). Deterministic (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .actquant import dequantize_activations, quantize_activations
from .grid import SLICING_RULES, dequantize, pad_columns, padded_width, quantize_weight
from .reference import linear_wa16
from .split import quantize_split_weight, split_region_index, split_step, split_weight

BITS = (8, 4, 3, 2)


def rel_mse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative mean squared error ||approx - exact||^2 / ||exact||^2."""
    return float(((approx.double() - exact.double()) ** 2).sum() / (exact.double() ** 2).sum())


def sample_weights(kind: str, n: int = 1024, k: int = 1024, seed: int = 0) -> torch.Tensor:
    """Synthetic weights: ``gaussian`` or ``student-t`` (3 degrees of freedom, heavy tails)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, k, generator=g)
    z = torch.randn(n, k, generator=g)
    chi2 = (torch.randn(n, k, 3, generator=g) ** 2).sum(-1)
    return z / torch.sqrt(chi2 / 3)


def slicing_table() -> list[dict]:
    """Relative MSE of every slicing rule and of direct b-bit RTN, per distribution and b."""
    rows = []
    for kind in ("gaussian", "student-t"):
        w = sample_weights(kind)
        qw = quantize_weight(w)
        for b in BITS:
            row = {"weights": kind, "bits": b}
            for rule in SLICING_RULES:
                row[rule] = rel_mse(dequantize(qw, b, rule)[:, : w.shape[1]], w)
            row["rtn"] = rel_mse(dequantize(quantize_weight(w, master_bits=b))[:, : w.shape[1]], w)
            rows.append(row)
    return rows


def worst_group_rel_mse(approx: torch.Tensor, exact: torch.Tensor, group_size: int = 32) -> float:
    """The largest relative MSE of any single group (catches groups a global average hides)."""
    a = pad_columns(approx.double(), group_size).reshape(exact.shape[0], -1, group_size)
    e = pad_columns(exact.double(), group_size).reshape(exact.shape[0], -1, group_size)
    return float((((a - e) ** 2).sum(-1) / (e**2).sum(-1).clamp(min=1e-300)).max())


def fp32_scale_dequant(w: torch.Tensor, bits: int, group_size: int = 32) -> torch.Tensor:
    """b-bit min/max quantization with exact FP32 group scales (no E4M3), dequantized."""
    g = pad_columns(w, group_size).reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    step = ((hi - lo) / (2**bits - 1)).clamp(min=1e-30)
    zero = torch.round(-lo / step)
    q = (torch.round(g / step) + zero).clamp(0, 2**bits - 1)
    return ((q - zero) * step).reshape(w.shape[0], -1)[:, : w.shape[1]]


def scale_policy_table() -> list[dict]:
    """E4M3 (rounded up, per-row factor) vs FP32 scales, including rows whose group scales span 1e4 and 1e9."""
    rows = []
    base = sample_weights("gaussian", 256, 1024)
    cases = [("gaussian", sample_weights("gaussian")), ("student-t", sample_weights("student-t"))]
    for decades in (4, 9):
        cases.append((f"groups spanning 1e{decades}", base * torch.logspace(-decades, 0, 32).repeat_interleave(32)))
    for kind, w in cases:
        for b in (8, 2):
            e4m3 = dequantize(quantize_weight(w, master_bits=b))[:, : w.shape[1]]
            fp32 = fp32_scale_dequant(w, b)
            rows.append({"weights": kind, "bits": b, "fp32 scales": rel_mse(fp32, w), "e4m3 scales": rel_mse(e4m3, w),
                         "fp32 worst group": worst_group_rel_mse(fp32, w),
                         "e4m3 worst group": worst_group_rel_mse(e4m3, w)})
    return rows


def outlier_problem(seed: int = 0, n: int = 512, k: int = 1024, tokens: int = 256):
    """A weight with a few heavy input channels and activations with matching outlier channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    heavy = torch.randperm(k, generator=g)[: k // 64]
    w[:, heavy] *= 8
    x = torch.randn(tokens, k, generator=g)
    x[:, heavy[: len(heavy) // 2]] *= 4
    return w, x


def split_table(split_fraction: float = 0.03) -> list[dict]:
    """Output error at each precision, unsplit vs split with re-derived scales; and where the fixed-grid identity holds."""
    w, x = outlier_problem()
    k = w.shape[1]
    metric = x.norm(dim=0) * w.abs().amax(dim=0)
    idx = split_region_index(metric.topk(int(k * split_fraction)).indices, k, 32)
    y = x.double() @ w.double().T
    plain, split = quantize_weight(w), quantize_split_weight(w, idx, split_bits=2)
    rows = [{"bits": b, "unsplit": rel_mse(linear_wa16(x.double(), plain, b), y),
             "split_rederived": rel_mse(linear_wa16(x.double(), split, b), y)} for b in BITS]
    # Split with the 2-bit step s; then, on each precision's fixed grid (no re-derived scales),
    # the share of split weights where Q(w1) + Q(w2) != Q(w): zero for the 2-bit grid only.
    ws = split_weight(w, idx, split_step(w, 2), 32)
    used = idx >= 0
    src, slots = idx[used].long(), padded_width(k, 32) + torch.nonzero(used).flatten()
    for row in rows:
        s = split_step(w, row["bits"])[:, src]
        code = lambda v: torch.round(v / s)  # noqa: E731
        broken = code(ws[:, src]) + code(ws[:, slots]) != code(w[:, src])
        row["fixed-grid identity broken"] = float(broken.double().mean())
    return rows


def activation_table() -> list[dict]:
    """Relative MSE of symmetric vs asymmetric per-token activation grids."""
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(512, 1024, generator=g)
    t = sample_weights("student-t", 512, 1024, seed=2)
    a, b_ = torch.randn(512, 1024, generator=g), torch.randn(512, 1024, generator=g)
    swiglu = torch.nn.functional.silu(a) * b_
    post_silu = torch.nn.functional.silu(a)
    rows = []
    for kind, x in (("gaussian", gauss), ("student-t", t), ("silu(a)", post_silu), ("silu(a)*b", swiglu)):
        for bits in (8, 4, 3, 2):
            row = {"activations": kind, "bits": bits}
            for name, sym in (("asymmetric", False), ("symmetric", True)):
                qa = quantize_activations(x, bits, symmetric=sym)
                row[name] = rel_mse(dequantize_activations(qa)[:, : x.shape[1]], x)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """A list of flat dicts as a markdown table (floats in 3 significant digits)."""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.format_study", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measurements behind the format's choices (docs/FORMAT.md): code slicing rule, E4M3 scale\n"
                    "policy, outlier channel splitting, activation grids. Prints markdown tables and writes them\n"
                    "as JSON; deterministic (fixed seeds), CPU.",
        epilog="example:\n  python -m kernels.format_study --out /tmp/format-study.json\n")
    parser.add_argument("--out", type=Path, default=Path("docs/results/format-study.json"), metavar="FILE",
                        help="where to write the tables as JSON (default %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    tables = {
        "slicing (relative MSE of weights)": slicing_table(),
        "scale policy (relative MSE of weights)": scale_policy_table(),
        "outlier channel splitting (relative MSE of layer output, W{b}A16)": split_table(),
        "activation grid (relative MSE)": activation_table(),
    }
    for title, rows in tables.items():
        print(f"\n### {title}\n\n{markdown(rows)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(tables, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
