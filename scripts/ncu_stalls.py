"""Warp-stall samples of one kernel by region (before, in and after its main loop) from an Nsight Compute export.

Input: ``ncu --import REPORT.ncu-rep --page source --csv --print-source sass > FILE.csv`` (a report taken with
``--set full``). The main loop is the largest backward branch of the SASS. Prints, per region, the samples and the
stall reasons above 1 % of them, then the instructions with the most samples.

Usage: ``python scripts/ncu_stalls.py FILE.csv [--top 12]``
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def main_loop(rows: list[list[str]]) -> tuple[int, int]:
    """Indices of the first and last instruction of the largest backward-branch loop."""
    addr = [int(r[0], 16) for r in rows]
    best = (0, -1)
    for i, r in enumerate(rows):
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", r[1])
        if not m:
            continue
        target = int(m.group(1), 16)
        target = target if target >= addr[0] else addr[0] + target  # relative or absolute addresses
        if target < addr[i] and target in addr and i - addr.index(target) > best[1] - best[0]:
            best = (addr.index(target), i)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(prog="python scripts/ncu_stalls.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass export")
    ap.add_argument("--top", type=int, default=12, help="instructions with the most samples to list (default 12)")
    args = ap.parse_args()
    table = list(csv.reader(args.csv.open()))
    header, rows = table[1], table[2:]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    first, last = main_loop(rows)
    regions = {"before the loop": rows[:first], "main loop": rows[first:last + 1], "after the loop": rows[last + 1:]}
    total = sum(int(r[col[SAMPLES]] or 0) for r in rows)
    for name, part in regions.items():
        samples = sum(int(r[col[SAMPLES]] or 0) for r in part)
        by_reason = {h[6:]: sum(int(r[col[h]] or 0) for r in part) for h in reasons}
        top = sorted(((v, k) for k, v in by_reason.items() if v > 0.01 * max(samples, 1)), reverse=True)
        print(f"{name}: {samples} samples ({100 * samples / max(total, 1):.0f} %): "
              + ", ".join(f"{k} {v}" for v, k in top))
    print(f"\ninstructions with the most samples (of {total}):")
    for r in sorted(rows, key=lambda r: -int(r[col[SAMPLES]] or 0))[:args.top]:
        by_reason = sorted(((int(r[col[h]] or 0), h[6:]) for h in reasons), reverse=True)[:2]
        print(f"  {r[col[SAMPLES]]:>5}  {r[1].strip()[:60]:60s}  " + ", ".join(f"{k} {v}" for v, k in by_reason))


if __name__ == "__main__":
    main()
