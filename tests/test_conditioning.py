"""Budget-conditioned stopping: the recipe's checks, the system line, the plans of a conditioned run and the
calibration metric. The scripted engine runs generate and splice of a conditioned run in test_stages_fake."""

from __future__ import annotations

import pytest

from length_control import conditioning, demo, pipeline, sweep
from length_control._schema import ConfigError
from length_control.prompts import with_system_line
from length_control.recipe import load_recipe

from conftest import REPO
from test_report import _samples as write_samples

RECIPE = REPO / "recipes" / "demo-conditioned.yaml"


def stage(name: str) -> pipeline.PipelineStage:
    return next(s for s in pipeline.STAGES if s.name == name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["conditioning.budgets=[126]"], "at least 2"),
        (["conditioning.budgets=[84,126,84]"], "repeat a budget"),
        (["conditioning.instruction=Be brief."], "put {budget} where it goes"),
        (["budget=105"], "set budget=126"),
        (["instruction=Think for at most {budget} tokens."], "remove instruction"),
        (["loop.until_overlong=0.01"], "set loop.until_overlong=null"),
        (["eval.arms=[before,forced]"], "add after"),
        (["model.demo.stated_budgets=null"], "has never read the line"),
        (["conditioning.instruction=Stop after {budget} tokens."], "has never read the line 'Stop after {budget}"),
    ],
)
def test_a_conditioned_recipe_that_cannot_run_is_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_recipe(RECIPE, overrides)
    assert len(caught.value.problems) == 1 and message in caught.value.problems[0], caught.value.problems


def test_budgets_are_sorted_and_a_sweep_refuses_a_conditioned_recipe() -> None:
    recipe = load_recipe(RECIPE, ["conditioning.budgets=[126,84,105]"])
    assert recipe.conditioning.budgets == [84, 105, 126]
    with pytest.raises(ConfigError, match="already covers its budgets"):
        sweep.settings(RECIPE, ["splice.termination_span=[think_close,think_close_eos]"])


def test_the_system_line_joins_the_sources_own_or_opens_the_conversation() -> None:
    user = {"role": "user", "content": "Count."}
    bare = {"prompt_id": "p", "messages": [user]}
    assert with_system_line(bare, None) is bare
    assert with_system_line(bare, "Think for at most 84 tokens.")["messages"] == [
        {"role": "system", "content": "Think for at most 84 tokens."},
        user,
    ]
    system = {"prompt_id": "p", "messages": [{"role": "system", "content": "You count."}, user]}
    assert with_system_line(system, "Think for at most 84 tokens.")["messages"] == [
        {"role": "system", "content": "You count.\nThink for at most 84 tokens."},
        user,
    ]
    assert system["messages"][0]["content"] == "You count."  # the source's prompt is not edited in place


def test_the_demo_policy_reads_budget_lines_it_was_never_taught_to_keep() -> None:
    import random

    from length_control.demo.model import _with_stated_budget
    from length_control.recipe import StatedBudgets

    conversation = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "<think>..."}]
    stated = StatedBudgets(share=1.0, low=28, high=30)
    lines = {_with_stated_budget(conversation, stated, random.Random(i))[0]["content"] for i in range(50)}
    assert lines == {f"Think for at most {b} tokens." for b in (28, 29, 30)}  # budgets at random, the response as is
    assert _with_stated_budget(conversation, None, random.Random(0)) is conversation
    half = [_with_stated_budget(conversation, StatedBudgets(), random.Random(i)) for i in range(400)]
    assert 150 < sum(len(c) == 3 for c in half) < 250 and all(c[-2:] == conversation for c in half)


def test_each_budget_is_a_run_of_its_own_and_one_model_is_trained_on_all_their_traces() -> None:
    recipe = demo.resolve(load_recipe(RECIPE), build=False)  # plans need no weights
    plans = pipeline.plans_of(recipe)
    folders = {b: recipe.output_dir / "budgets" / str(b) for b in (56, 91, 126)}
    generate = plans(stage("generate"))
    assert [p.folder for p in generate] == [folders[b] / "generate" for b in folders]
    assert [p.recipe.stated_budget() for p in generate] == [f"Think for at most {b} tokens." for b in folders]
    assert [p.recipe.budget for p in generate] == [56, 91, 126]
    [splice] = plans(stage("splice"))
    assert splice.folder == recipe.output_dir / "stage2"
    assert splice.reads.budgets == {b: folders[b] / "generate" for b in folders} and splice.reads.traces is None
    assert splice.reads.policy_traces == [folders[b] / "generate" for b in folders]
    assert list(splice.inputs) == ["budget 56", "budget 91", "budget 126"]  # the names its manifest records
    assert [p.folder.parent for p in plans(stage("train"))] == [recipe.output_dir / "train"] * 3
    after = plans(stage("eval-after"))
    assert len(after) == 3 * 3  # every budget's after arm, once per stage-2 seed
    assert {p.reads.train for p in after} == {recipe.output_dir / "train" / f"seed-{s}" for s in (0, 1, 2)}
    assert {p.folder.parents[2] for p in after} == set(folders.values())
    forced = plans(stage("eval-forced"))
    assert [p.reads.first_passes for p in forced] == [folders[b] / "eval" / "before" for b in folders]


def sample(problem: str, thinking: int, closed: bool = True, index: int = 0) -> dict:
    return {"problem_id": problem, "sample": index, "thinking_tokens": thinking, "closed_think": closed}


def test_the_calibration_counts_each_sample_against_its_own_target() -> None:
    natural = {("a", 0): 200, ("b", 0): 200, ("c", 0): 200, ("d", 0): 200, ("e", 0): 40}
    samples = [sample("a", 84), sample("b", 91), sample("c", 92), sample("d", 250, closed=False), sample("e", 20)]
    got = conditioning.calibration(samples, budget=84, tolerance=7, natural=natural)
    # a and b close within a line of 84; c one token later; d never closes; e (natural 40) closes at half of it.
    assert got["samples"] == 5 and got["bound"] == 4 / 5
    assert got["within"] == 3 / 5  # a, b and e closed by 84 + 7
    assert got["past"] == 3 / 5  # b and c closed past 84, d never closed
    assert got["on_target"] == 2 / 5 and got["early"] == 1 / 5
    assert (got["reached_median"], got["reached_p95"], got["reached_max"]) == (91.5, 250, 250)  # a, b, c, d
    # Without natural lengths the budget is every sample's target.
    plain = conditioning.calibration(samples, budget=84, tolerance=7)
    assert "on_target" not in plain and plain["reached_max"] == 250 and plain["reached_median"] == 91
    with pytest.raises(ValueError, match="no samples"):
        conditioning.calibration([], budget=84)


def test_the_quantile_is_the_nearest_rank() -> None:
    ordered = list(range(1, 21))
    assert conditioning._quantile(ordered, 0.95) == 19 and conditioning._quantile(ordered, 1.0) == 20
    assert conditioning._quantile([5], 0.95) == 5


def test_the_conditioning_report_reads_every_budgets_arms(tmp_path) -> None:
    """Two budgets, two seeds, written sample files: each budget's row, the after arm as mean and range over
    seeds, in conditioning.md, .json and .png."""
    import json

    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "train.seeds=[0,1]", "conditioning.budgets=[84,126]"])
    arms = {  # a thinks 120 tokens unasked, b 40
        84: {
            "before": [("a", 120, False), ("b", 40, True)],
            "after/seed-0": [("a", 86, True), ("b", 40, True)],  # a closes within a line of 84
            "after/seed-1": [("a", 110, True), ("b", 40, True)],
        },  # a closes 26 past it
        126: {
            "before": [("a", 120, True), ("b", 40, True)],
            "after/seed-0": [("a", 120, True), ("b", 40, True)],
            "after/seed-1": [("a", 106, True), ("b", 40, True)],
        },  # a closes 14 early, at another budget
    }
    for budget, written in arms.items():
        for arm, rows in written.items():
            write_samples(
                tmp_path / "budgets" / str(budget) / "eval" / arm,
                [("demo-count", problem, thinking, True, correct) for problem, thinking, correct in rows],
            )
    text = conditioning.write_report(recipe)
    built = json.loads((tmp_path / "report" / "conditioning.json").read_text())
    first, second = built["rows"]
    assert (first["budget"], first["bound_before"], first["on_target_before"]) == (84, 0.5, 0.5)
    assert first["on_target_after"] == 0.75 and first["on_target_after_range"] == [0.5, 1.0]
    assert first["past_after"] == 0.5 and first["reached_median_after"] == 98  # 86 and 110, one per seed
    assert first["score_before"] == 0.5 and first["score_after"] == 1.0
    assert (second["budget"], second["bound_before"], second["on_target_before"]) == (126, 0.0, 1.0)
    assert second["on_target_after_range"] == [0.5, 1.0] and second["early_after"] == 0.25
    assert "| 84 | demo-count | 50.0% | 50.0% | 75.0% [50.0%, 100.0%] | 0.0% [0.0%, 0.0%] | 50.0% |" in text
    assert (tmp_path / "report" / "conditioning.png").stat().st_size > 10_000
