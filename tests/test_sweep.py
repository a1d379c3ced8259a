"""Sweeps without an engine: the axes, the settings' folders, what their plans share, and the sweep report
from synthetic rows. The sharing itself (cut traces, a shared before arm) is checked on the scripted engine
in test_stages_fake.py and on real vLLM in test_generate.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from length_control import demo, pipeline, sweep
from length_control._schema import ConfigError

from conftest import REPO

RECIPE = REPO / "recipes" / "demo-cpu.yaml"


def stage(name: str) -> pipeline.PipelineStage:
    return next(s for s in pipeline.STAGES if s.name == name)


def test_axes_are_lists_on_keys_that_are_not_lists() -> None:
    settings = sweep.settings(
        RECIPE,
        [
            "budget=[84,126]",
            "splice.termination_span=[think_close,think_close_eos]",
            "train.seeds=[0,1]",
            "generation.samples_per_prompt=1",
        ],
    )
    assert [(s.values["budget"], s.values["splice.termination_span"]) for s in settings] == [
        (84, "think_close"),
        (84, "think_close_eos"),
        (126, "think_close"),
        (126, "think_close_eos"),
    ]
    first = settings[0].recipe
    assert (first.train.seeds, first.generation.samples_per_prompt) == ([0, 1], 1)  # a list on a list: an override
    assert first.name == "demo-cpu.budget-84_termination_span-think_close"
    assert first.output_dir == first.output_dir.parent.parent / "sweep" / settings[0].slug
    assert len({s.recipe.output_dir for s in settings}) == 4


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["budget=100"], "at least one axis"),
        (["context_limit=[176,200]"], "cannot vary context_limit"),
        (["engine.vllm.max_num_seqs=[8,16]"], "cannot vary engine"),
        (["budget=[84,84]"], "distinct values"),
        (["budget=[84,126]", "loop.until_overlong=0.01"], "one round per setting"),
    ],
)
def test_a_sweep_that_cannot_run_is_one_clear_error(arguments: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep.settings(RECIPE, arguments)


def test_the_settings_share_one_before_arm_and_the_largest_budgets_traces() -> None:
    settings = sweep.settings(
        RECIPE,
        ["budget=[84,126]", "splice.termination_span=[think_close,think_close_eos]"],
        resolve=lambda recipe: demo.resolve(recipe, build=False),
    )  # plans need no weights
    plans = sweep.plans_of(settings)
    leader = settings[0].recipe.output_dir  # the first setting samples the before arm
    before = plans(stage("eval-before"))
    assert before[0].reads.shared_samples is None
    assert [p.reads.shared_samples for p in before[1:]] == [leader / "eval" / "before"] * 3
    generate = plans(stage("generate"))
    largest = settings[2].recipe.output_dir  # budget 126, think_close: sampled first, then cut
    assert generate[0].folder == largest / "generate" and generate[0].reads.longer_traces is None
    assert [p.reads.longer_traces for p in generate[1:]] == [largest / "generate"] * 3
    # The forced arm cuts its first passes from each setting's own before arm; train and eval after are per setting.
    forced = plans(stage("eval-forced"))
    assert [p.reads.first_passes for p in forced] == [s.recipe.output_dir / "eval" / "before" for s in settings]
    assert len(plans(stage("train"))) == 4 * len(settings[0].recipe.train.seeds)


def row(span: str, budget: int, overlong_after: float, score_after: float) -> dict:
    return {
        "setting": f"{budget}-{span}",
        "budget": budget,
        "splice.termination_span": span,
        "benchmark": "count",
        "seeds": 2,
        "score_before": 0.5,
        "score_before_stderr": 0.02,
        "overlong_before": 0.4,
        "overlong_after": overlong_after,
        "overlong_after_range": [overlong_after, overlong_after + 0.01],
        "score_after": score_after,
        "score_after_range": [score_after - 0.01, score_after],
        "score_relative_change": score_after / 0.5 - 1,
        "score_relative_change_range": [score_after / 0.5 - 1.02, score_after / 0.5 - 1],
        "overlong_forced": 0.0,
        "score_forced": 0.3,
    }


def test_the_sweep_report_has_a_row_per_setting_and_the_span_ablation_side_by_side(tmp_path: Path) -> None:
    report = {
        "axes": ["budget", "splice.termination_span"],
        "rows": [
            row("think_close", 84, 0.2, 0.4),
            row("think_close_eos", 84, 0.0, 0.45),
            row("think_close", 126, 0.1, 0.5),
            row("think_close_eos", 126, 0.0, 0.5),
        ],
    }
    text = sweep.markdown(report)
    settings_table = text.split("Ablation")[0].splitlines()
    table = [line for line in settings_table if line.startswith(("| 84 ", "| 126 "))]
    assert len(table) == 4
    assert "| 84 | think_close_eos | count | 40.0% | 0.0% [0.0%, 1.0%] | 0.0% | 50.0% | 45.0% [44.0%, 45.0%] |" in text
    ablation = text.split("Ablation of splice.termination_span")[1].splitlines()
    assert ablation[2] == "| budget | benchmark | think_close | think_close_eos |"
    assert ablation[4] == (
        "| 84 | count | 20.0% [20.0%, 21.0%] / -20.0% [-22.0%, -20.0%] | 0.0% [0.0%, 1.0%] / -10.0% [-12.0%, -10.0%] |"
    )
    sweep.plot(report, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_the_plot_draws_seeds_that_agree(tmp_path: Path) -> None:
    """Three seeds at 10 % have a mean that rounds past 0.1 (0.10000000000000002): the bars are still drawn."""
    agreed = row("think_close", 110, 0.1, 0.7)
    agreed.update(overlong_after=(0.1 + 0.1 + 0.1) / 3, overlong_after_range=[0.1, 0.1])
    sweep.plot({"axes": ["budget", "splice.termination_span"], "rows": [agreed]}, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
