"""The pipeline's closed loop, as logic: when it goes on, when it stops, and what a new
round's recipe is (the loop's real rounds run in the end-to-end test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from length_control import demo, generate, pipeline
from length_control.artifacts import MANIFEST, write_json_atomic
from length_control.recipe import LoopSpec, load_recipe

from conftest import REPO

# ---------------------------------------------------------------- the closed loop (logic only)


def _row(overlong: float, score_change: float) -> dict:
    return {"overlong_after": overlong, "score_relative_change": score_change}


def test_the_loop_goes_on_above_the_target_and_stops_at_it_or_at_the_guard() -> None:
    loop = LoopSpec(until_overlong=0.01, max_rounds=3)
    assert pipeline.loop_verdict({"a": _row(0.0, 0.0), "b": _row(0.05, -0.01)}, loop) is None
    assert "target met" in pipeline.loop_verdict({"a": _row(0.0, 0.0), "b": _row(0.01, 0.2)}, loop)
    stopped = pipeline.loop_verdict({"a": _row(0.05, -0.05), "b": _row(0.0, 0.0)}, loop)
    assert "a's score changed by -5.0 %" in stopped and "score guard (-3.9 %)" in stopped


def test_a_round_takes_the_previous_model_as_its_policy(tmp_path: Path) -> None:
    recipe = demo.resolve(
        load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}", "loop.until_overlong=0.01"]),
        build=False,
    )
    model = tmp_path / "train" / "seed-0" / "model"
    model.mkdir(parents=True)
    write_json_atomic(model.parent / MANIFEST, {"output": "x", "summary": {"model": str(model)}})
    this = pipeline.round_recipe(recipe, recipe, 2)
    assert this.output_dir == tmp_path / "rounds" / "2"
    assert this.model.path == model and this.model.demo is None and this.model.think == recipe.model.think
    assert this.eval.arms == ["after"] and this.train.seeds == recipe.train.seeds
    assert this.splice.sft_mix.dataset.path.name == "stage1_sft.parquet"  # the demo's own SFT set, by path


def test_the_demo_resolves_to_a_plain_model_folder(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}"])
    resolved = demo.resolve(recipe, build=False)
    assert resolved.model.demo is None and resolved.model.path.name == "model"
    assert resolved.splice.sft_mix.dataset.path == resolved.model.path.parent / "stage1_sft.parquet"
    assert not resolved.model.path.parent.exists() or (resolved.model.path.parent / "build.json").is_file()
    with pytest.raises(ValueError, match=r"demo.resolve"):
        generate.plan(recipe)  # a core stage never builds the demo itself
