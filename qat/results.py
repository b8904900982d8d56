"""Collect finished runs into one results table (docs/results/qat-<model>.json and a markdown table).

    python -m qat.results --model stories260K --out docs/results/qat-stories260K.json RUN_DIR [RUN_DIR ...]

Each run directory contributes its perplexity rows (``eval/*.json``, written by ``qat.run``), the
command that produced it, its training time and peak memory (``summary.json``). Every run must
have been evaluated on the same text, part, context and stride, so the rows compare side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [(8, 16), (4, 16), (3, 16), (2, 16), (2, 2)]
METHOD_ORDER = ["fp", "rtn", "direct-qat", "bitbybit", "no-split", "no-progressive"]


def read_run(run_dir: Path) -> dict:
    tables = sorted((run_dir / "eval").glob("*.json"))
    if not tables:
        raise FileNotFoundError(f"{run_dir} has no eval/*.json: run it with evaluation enabled")
    table = json.loads(tables[0].read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    recipe = json.loads((run_dir / "recipe.json").read_text())
    return {"table": table, "summary": summary, "recipe": recipe}


def collect(model: str, run_dirs: list[Path]) -> dict:
    """The results document: setting, one row per (method, precision), one entry per run."""
    runs = [read_run(d) for d in run_dirs]
    setting_keys = ("data", "data_part", "heldout_fraction", "ctx", "stride", "tokens_scored")
    setting = {k: runs[0]["table"][k] for k in setting_keys}
    rows, entries = [], []
    for d, r in zip(run_dirs, runs):
        other = {k: r["table"][k] for k in setting_keys}
        if other != setting:
            raise ValueError(f"{d} was evaluated differently ({other}) from {run_dirs[0]} ({setting})")
        method = r["table"]["method"]
        entries.append({"method": method, "run_dir": str(d), "command": r["table"]["command"],
                        "train_seconds": round(r["summary"]["train_seconds"], 1),
                        "peak_memory_mib": round(r["summary"]["peak_memory_bytes"] / 2**20),
                        "bits": r["recipe"]["bits"], "act_bits": r["recipe"]["act_bits"]})
        for row in r["table"]["rows"]:
            if row["method"] == "fp" and any(x["method"] == "fp" for x in rows):
                continue
            rows.append({**row, "ppl": round(row["ppl"], 4), "run_dir": str(d)})
    rows.sort(key=lambda x: (METHOD_ORDER.index(x["method"]) if x["method"] in METHOD_ORDER else 99,
                             -x["w_bits"], -x["a_bits"]))
    return {"model": model, **setting, "rows": rows, "runs": entries}


def markdown(doc: dict) -> str:
    """Methods down, W8A16 .. W2A2 across; blank where a method has no such row."""
    header = "| method | " + " | ".join(f"W{w}A{a}" for w, a in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in doc["rows"])]
    for m in methods:
        if m == "fp":
            fp = next(r["ppl"] for r in doc["rows"] if r["method"] == "fp")
            lines.append("| fp | " + " | ".join(f"{fp:.3f}" for _ in COLUMNS) + " |")
            continue
        cells = []
        for w, a in COLUMNS:
            hit = [r["ppl"] for r in doc["rows"] if r["method"] == m and r["w_bits"] == w and r["a_bits"] == a]
            cells.append(f"{hit[0]:.3f}" if hit else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_run_markdown(doc: dict) -> str:
    """One line per run (named by its directory), for sweeps of one method's settings."""
    header = "| run | " + " | ".join(f"W{w}A{a}" for w, a in COLUMNS) + " | train s |"
    lines = [header, "|---" * (len(COLUMNS) + 2) + "|"]
    for e in doc["runs"]:
        cells = []
        for w, a in COLUMNS:
            hit = [r["ppl"] for r in doc["rows"] if r["run_dir"] == e["run_dir"] and r["method"] != "fp"
                   and r["w_bits"] == w and r["a_bits"] == a]
            cells.append(f"{hit[0]:.3f}" if hit else "")
        lines.append(f"| {Path(e['run_dir']).name} | " + " | ".join(cells) + f" | {e['train_seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m qat.results", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Collect finished qat.run runs into one results document (JSON) and print it as a\n"
                    "markdown PPL table (methods down, W8A16 .. W2A2 across) with each run's command,\n"
                    "training time and peak memory. Every run must have been evaluated on the same text,\n"
                    "part, context and stride.",
        epilog="example:\n"
               "  python -m qat.results --model stories260K --out docs/results/qat-stories260K.json \\\n"
               "      runs/stories260K/rtn runs/stories260K/bitbybit runs/stories260K/no-split\n")
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                    help="qat.run run directory with eval/*.json, summary.json and recipe.json")
    ap.add_argument("--model", required=True, help="model name for the document, e.g. stories260K (required)")
    ap.add_argument("--out", type=Path, required=True, metavar="FILE", help="JSON file to write (required)")
    ap.add_argument("--per-run", action="store_true",
                    help="print one table line per run (named by its directory) instead of one per method")
    args = ap.parse_args(argv)
    doc = collect(args.model, args.run_dirs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(per_run_markdown(doc) if args.per_run else markdown(doc))
    for e in doc["runs"]:
        print(f"- {e['method']} ({e['train_seconds']} s, peak {e['peak_memory_mib']} MiB): `{e['command']}`")


if __name__ == "__main__":
    main()
