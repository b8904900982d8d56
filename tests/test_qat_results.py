"""qat.results: runs evaluated alike become one table; runs evaluated differently are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qat.results import collect, markdown

SETTING = {"data": "text.txt", "data_part": "heldout", "heldout_fraction": 0.1, "ctx": 512, "stride": 512,
           "tokens_scored": 1000}


def _run(root: Path, name: str, method: str, rows: list[tuple[int, int, float]], **setting) -> Path:
    d = root / name
    (d / "eval").mkdir(parents=True)
    table = {**SETTING, **setting, "method": method, "command": f"python -m qat.run --run-dir {d}",
             "rows": [{"method": "fp", "w_bits": 16, "a_bits": 16, "ppl": 5.0}]
             + [{"method": method, "w_bits": w, "a_bits": a, "ppl": p} for w, a, p in rows]}
    (d / "eval" / "ppl.json").write_text(json.dumps(table))
    (d / "summary.json").write_text(json.dumps({"train_seconds": 12.34, "peak_memory_bytes": 2**30}))
    (d / "recipe.json").write_text(json.dumps({"bits": [8, 2], "act_bits": 2}))
    return d


def test_runs_become_one_table(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "a", "rtn", [(8, 16, 5.1), (2, 16, 60.0), (2, 2, 900.0)]),
            _run(tmp_path, "b", "bitbybit", [(8, 16, 5.2), (2, 16, 20.0)])]
    doc = collect("tiny", runs)
    assert [r["method"] for r in doc["rows"]] == ["fp", "rtn", "rtn", "rtn", "bitbybit", "bitbybit"]
    assert doc["runs"][0]["peak_memory_mib"] == 1024 and doc["ctx"] == 512
    table = markdown(doc)
    assert "| bitbybit | 5.200 |  |  | 20.000 |  |" in table
    assert "| rtn | 5.100 |  |  | 60.000 | 900.000 |" in table


def test_differently_evaluated_runs_are_refused(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "a", "rtn", [(8, 16, 5.1)]), _run(tmp_path, "b", "bitbybit", [(8, 16, 5.2)], ctx=256)]
    with pytest.raises(ValueError, match="evaluated differently"):
        collect("tiny", runs)


def test_per_run_table_names_each_run(tmp_path: Path) -> None:
    from qat.results import per_run_markdown

    runs = [_run(tmp_path, "lr1e-3", "bitbybit", [(2, 16, 20.0)]), _run(tmp_path, "lr1e-4", "bitbybit", [(2, 16, 30.0)])]
    table = per_run_markdown(collect("tiny", runs))
    assert "| lr1e-3 |  |  |  | 20.000 |  | 12.3 |" in table and "| lr1e-4 |" in table
