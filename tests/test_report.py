"""The report recomputes every figure from the sample files, in the Table 2 layout."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from length_control import report
from length_control.recipe import load_recipe

from conftest import REPO


def _samples(path: Path, rows: list[tuple[str, str, int, bool, bool]]) -> None:
    """rows: (benchmark, problem, thinking tokens, closed, correct)"""
    records = [
        {"benchmark": b, "problem_id": p, "sample": i, "thinking_tokens": t, "prompt_tokens": 20, "closed_think": c,
         "overlong": not c, "correct": ok}
        for i, (b, p, t, c, ok) in enumerate(rows)
    ]
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), path / "samples.parquet")


def test_report_layout_and_figures(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}"])
    _samples(tmp_path / "eval" / "before", [("demo", "a", 50, True, True), ("demo", "a", 60, True, False),
                                            ("demo", "b", 300, False, False), ("demo", "b", 300, False, False)])
    _samples(tmp_path / "eval" / "after", [("demo", "a", 50, True, True), ("demo", "a", 60, True, True),
                                           ("demo", "b", 199, True, False), ("demo", "b", 300, False, False)])
    text = report.run(recipe)
    row = report.build(recipe)["benchmarks"]["demo"]
    assert row["score_before"] == 0.25 and row["score_after"] == 0.5  # pass@1 averaged per problem
    assert row["score_relative_change"] == 1.0
    assert row["overlong_before"] == 0.5 and row["overlong_after"] == 0.25
    assert row["overlong_relative_change"] == -0.5 and row["samples_per_problem"] == 2
    assert "| demo | 25.0% ± 25.0% | 50.0% ± 50.0% | +100.0% | 50.0% | 25.0% | -50.0% | 2 |" in text
    assert (tmp_path / "report" / "thinking_lengths.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "report.json").is_file()
