"""The whole loop on the demo policy, end to end with real vLLM and real Axolotl:
eval before, traces, stage-2 rows, training, eval after and forced, and the report,
whose figures are recomputed here from the sample files."""

from __future__ import annotations

from pathlib import Path

import pytest

from length_control import pipeline, report
from length_control.evaluate import summarize
from length_control.recipe import load_recipe

from conftest import REPO

pytestmark = pytest.mark.engine


def test_the_demo_loop(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}"])
    lines: list[str] = []
    pipeline.run(recipe, echo=lines.append)
    assert [line for line in lines if line.startswith("[")] == [f"[{name}]" for name in pipeline.STAGE_NAMES]

    built = report.build(recipe)
    for arm in ("before", "after", "forced"):
        samples = report.load_samples(tmp_path / "eval" / arm)
        recomputed = summarize(samples, recipe.context_limit)["benchmarks"]["demo-eval"]
        assert built["arms"][arm]["demo-eval"] == recomputed
        assert len(samples) == 60 * 4
    row = built["benchmarks"]["demo-eval"]
    assert 0.2 <= row["overlong_before"] <= 0.6  # the stage-1 policy runs past its limit
    assert row["overlong_after"] < row["overlong_before"]  # stage 2 taught it to stop
    assert row["overlong_forced"] == 0.0  # forcing closes every sample by construction
    assert (tmp_path / "report" / "report.md").read_text().count("| demo-eval |") == 1

    # A rerun skips every finished stage; --from redoes that stage and the ones after it.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")}
    pipeline.run(recipe, echo=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")} == stamps
    pipeline.run(recipe, start="eval-after", echo=lambda _: None)
    redone = {p for p in tmp_path.rglob("manifest.json") if p.stat().st_mtime_ns != stamps[p]}
    assert redone == {tmp_path / "eval" / "after" / "manifest.json"}
