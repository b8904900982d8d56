"""Adopt the winners of an A/B run into the tuned table (``kernels/triton_table.json``).

Reads the JSON records of ``scripts/gemm_ab.py`` (one per configuration timed: ``bits``, ``K``, ``N``, ``M``,
``label``, ``config``, ``us``, ``rel_err``) and, for every (bits, K, N, M) where the fastest correct configuration
of ``--label`` beats the ``current`` one (what the dispatch ran during the A/B) by at least ``--margin``, sets the
table entry of that shape's M bucket to it. Prints each change; ``--dry-run`` writes nothing. Runs anywhere (no GPU).

Example: ``python3 scripts/adopt_ab.py docs/results/gemv-mma-ab-h200.json --label gemv_mma --margin 1.05``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.triton_ops import TABLE, Config, save_table, table_key  # noqa: E402

MAX_ERR = 1e-2


def winners(records: list[dict], label: str, margin: float) -> dict[str, tuple[Config, float]]:
    """``{table key: (configuration, speedup over current)}`` of the shapes where ``label`` wins by ``margin``."""
    out = {}
    for key in dict.fromkeys((r["bits"], r["K"], r["N"], r["M"]) for r in records):
        rows = [r for r in records if (r["bits"], r["K"], r["N"], r["M"]) == key and r["rel_err"] <= MAX_ERR]
        cur = [r for r in rows if r["label"] == "current"]
        cand = [r for r in rows if r["label"] == label]
        if not cur or not cand:
            continue
        best = min(cand, key=lambda r: r["us"])
        gain = cur[0]["us"] / best["us"]
        if gain >= margin:
            bits, k, n, m = key
            out[table_key(bits, k, n, m)] = (Config(**best["config"]), gain)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/adopt_ab.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="JSON records of scripts/gemm_ab.py")
    ap.add_argument("--label", required=True, help="the kernel whose winners to adopt, e.g. gemv_mma")
    ap.add_argument("--margin", type=float, default=1.05, help="least time ratio current / candidate (default 1.05)")
    ap.add_argument("--dry-run", action="store_true", help="print the changes only")
    args = ap.parse_args()
    found = winners(json.loads(args.results.read_text()), args.label, args.margin)
    for key, (cfg, gain) in sorted(found.items()):
        print(f"{key}: {gain:.2f}x the current configuration -> {cfg}")
    if not args.dry_run and found:
        save_table({**TABLE, **{key: cfg for key, (cfg, _) in found.items()}})
    print(f"{len(found)} entries {'would change' if args.dry_run else 'changed'}")


if __name__ == "__main__":
    main()
