"""Budget-conditioned stopping: one model that closes its thinking at the budget its prompt asks for.

    conditioning: {budgets: [84, 105, 126], instruction: "Think for at most {budget} tokens.", tolerance: 7}

A fixed-budget run teaches one B. Here each requested budget is a run of its
own, `<output_dir>/budgets/<B>/`: the recipe at that budget, every prompt
stating it in a system line (`conditioning.instruction`), its traces sampled
from the policy under that prompt and cut at its B (case 1) or finished
(case 2) as in any run. Stage 2 is one dataset in the run folder with the
rows of every budget (`meta.budget` says which), so the same problem is
closed at 84 tokens where the prompt asks for 84 and at 126 where it asks for
126: the only way to fit both is to read the budget. It trains once per seed,
and each budget's eval arms ask for their budget: before (the stage-1 policy,
which has never seen the line), forced (cut at that budget), after (the
trained models).

The report, `report/conditioning.md|json|png`, says per requested budget how
long the thinking ran: the share of samples that closed within the budget
plus `tolerance` (a line of slack: the policy closes at line ends), the share
that went past it, the reached length's median, 95th percentile and maximum,
and the usual overlong rate and score; the plot sets requested against
reached. Each budget's own Table 2 is in `budgets/<B>/report/`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from length_control import evaluate, generate, preflight, report, splice
from length_control.artifacts import write_json_atomic, write_text_atomic
from length_control.contracts import Plan, RunLayout, SampleScore
from length_control.recipe import Recipe


def budget_runs(recipe: Recipe) -> list[Recipe]:
    """The run of each requested budget: the recipe at that budget, its prompts stating it, in `budgets/<B>/`."""
    conditioning = recipe.conditioning
    return [
        recipe.model_copy(
            update={
                "name": f"{recipe.name}.b{budget}",
                "budget": budget,
                "output_dir": budget_folder(recipe, budget),
                "instruction": conditioning.instruction,
                "conditioning": None,
            }
        )
        for budget in conditioning.budgets
    ]


def budget_folder(recipe: Recipe, budget: int) -> Path:
    return recipe.output_dir / "budgets" / str(budget)


def plans_of(recipe: Recipe) -> Callable[[Any], list[Plan]]:
    """Each stage's plans: the budgets' generate and eval arms, one splice over all their traces, the run's
    own training (its models are every budget's after arm)."""
    runs = budget_runs(recipe)
    arms = recipe.eval.arms

    def plans(stage) -> list[Plan]:
        if stage.name in ("eval-before", "eval-forced"):
            arm = stage.name.removeprefix("eval-")
            return [evaluate.plan(run, arm) for run in runs] if arm in arms else []
        if stage.name == "generate":
            return [generate.plan(run) for run in runs]
        if stage.name == "splice":
            return [splice.plan(recipe, budgets={run.budget: RunLayout(run.output_dir).generate for run in runs})]
        if stage.name == "eval-after":
            return [evaluate.plan(run, "after", seed, trained_by=recipe) for run in runs for seed in recipe.train.seeds]
        if stage.name == "report":
            return [report.plan(run) for run in runs]
        return stage.plans(recipe)

    return plans


def check(recipe: Recipe) -> preflight.Preflight:
    """The preflight of every budget's run (their prompts carry the line), before any engine starts."""
    for run in budget_runs(recipe):
        found = preflight.check(run)
    return found


# ---------------------------------------------------------------- the calibration


def calibration(
    samples: list[SampleScore], budget: int, tolerance: int = 0, natural: dict[tuple[str, int], int] | None = None
) -> dict[str, Any]:
    """How long one arm thought against the budget it was asked for, over `samples` (one benchmark's).

    `within`: the share that closed the thinking within `budget + tolerance` tokens; `past`: the share
    whose thinking ran past the budget at all (closed later, or never). With `natural`, the thinking
    length each sample (problem id, sample) has without a budget (the before arm's: the same seeded
    request to the stage-1 policy), the target of a sample is min(natural, budget): `on_target` is the
    share that closed within `tolerance` of it, `early` the share that closed earlier than that, and
    `reached_*` (median, 95th percentile, maximum) are over the samples the budget binds (natural > budget),
    the calibration proper; without `natural`, over every sample. A sample that never closed counts all its
    output as thinking."""
    if not samples:
        raise ValueError("no samples to calibrate")
    n = len(samples)
    out = {
        "samples": n,
        "within": sum(s["closed_think"] and s["thinking_tokens"] <= budget + tolerance for s in samples) / n,
        "past": sum(not s["closed_think"] or s["thinking_tokens"] > budget for s in samples) / n,
    }
    bound = samples
    if natural is not None:
        target = {id(s): min(natural[(s["problem_id"], s["sample"])], budget) for s in samples}
        out["on_target"] = (
            sum(s["closed_think"] and abs(s["thinking_tokens"] - target[id(s)]) <= tolerance for s in samples) / n
        )
        out["early"] = sum(s["closed_think"] and s["thinking_tokens"] < target[id(s)] - tolerance for s in samples) / n
        bound = [s for s in samples if natural[(s["problem_id"], s["sample"])] > budget]
        out["bound"] = len(bound) / n
    lengths = sorted(s["thinking_tokens"] for s in bound) or [0]
    return out | {
        "reached_median": statistics.median(lengths),
        "reached_p95": _quantile(lengths, 0.95),
        "reached_max": lengths[-1],
    }


def _quantile(ordered: list[int], q: float) -> int:
    """The nearest-rank quantile: the smallest length that a share q of the samples do not exceed."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


CALIBRATION_KEYS = ("within", "past", "on_target", "early", "bound", "reached_median", "reached_p95", "reached_max")


def build(recipe: Recipe) -> dict[str, Any]:
    """Per requested budget and benchmark: the calibration of each arm (the after arm's as the mean and
    range over seeds) beside that budget's Table-2 row."""
    tolerance, seeds = recipe.conditioning.tolerance, recipe.train.seeds
    rows, samples = [], {}
    for run in budget_runs(recipe):
        table = report.build(run)
        layout = RunLayout(run.output_dir)
        arms = {"before": layout.eval("before"), "forced": layout.eval("forced")}
        arms |= {f"after/{seed}": layout.eval("after", seed) for seed in seeds}
        loaded = {
            arm: report.load_samples(folder) for arm, folder in arms.items() if (folder / "samples.parquet").is_file()
        }
        samples[run.budget] = loaded
        natural = {(s["problem_id"], s["sample"]): s["thinking_tokens"] for s in loaded["before"]}
        for benchmark, table_row in table["benchmarks"].items():
            row = {"budget": run.budget, "benchmark": benchmark, "seeds": len(seeds)}
            for arm, arm_samples in loaded.items():
                mine = [s for s in arm_samples if s["benchmark"] == benchmark]
                for key, value in calibration(mine, run.budget, tolerance, natural).items():
                    row[f"{key}_{arm}"] = value
            for key in CALIBRATION_KEYS:
                per_seed = [row.pop(f"{key}_after/{seed}") for seed in seeds]
                row[f"{key}_after"] = sum(per_seed) / len(per_seed)
                row[f"{key}_after_range"] = [min(per_seed), max(per_seed)]
            row |= {key: value for key, value in table_row.items() if key != "per_seed"}
            rows.append(row)
    return {
        "natural": "the before arm's thinking length of the same request",
        "budgets": recipe.conditioning.budgets,
        "tolerance": tolerance,
        "seeds": seeds,
        "instruction": recipe.conditioning.instruction,
        "context_limit": recipe.context_limit,
        "rows": rows,
        "_samples": samples,
    }


def markdown(built: dict[str, Any]) -> str:
    pct, spread = report.pct, report.spread
    tolerance = built["tolerance"]
    slack = f" ± {tolerance}" if tolerance else ""
    head = [
        "requested B",
        "benchmark",
        "bound",
        f"on target{slack} before",
        f"on target{slack} after",
        "early after",
        "past B before",
        "past B after",
        "reached after (bound): median / p95 / max",
        "overlong before",
        "overlong after",
        "score before",
        "score after",
        "rel. change",
    ]
    lines = [
        f'Each prompt states its budget ("{built["instruction"]}"). A sample\'s target is its natural '
        f"thinking length (the before arm's, same request) or the requested B if that is shorter; on target: "
        f"closed within {tolerance} tokens of it; early: closed sooner; past B: thought longer than B or never "
        f"closed; bound: the share whose natural length is past B, over which `reached` is taken; overlong: no "
        f"`</think>` within the {built['context_limit']}-token limit. After: mean [min, max] over "
        f"{len(built['seeds'])} stage-2 seed(s).",
        "",
        report.table_row(head),
        "|" + "---|" * len(head),
    ]
    for r in built["rows"]:
        reached = " / ".join(f"{r[f'reached_{key}_after']:.0f}" for key in ("median", "p95", "max"))
        lines.append(
            report.table_row(
                [
                    str(r["budget"]),
                    r["benchmark"],
                    pct(r["bound_before"]),
                    pct(r["on_target_before"]),
                    spread(r, "on_target_after"),
                    spread(r, "early_after"),
                    pct(r["past_before"]),
                    spread(r, "past_after"),
                    reached,
                    pct(r["overlong_before"]),
                    spread(r, "overlong_after"),
                    pct(r["score_before"]),
                    spread(r, "score_after"),
                    spread(r, "score_relative_change", signed=True),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def plot(built: dict[str, Any], path: Path) -> None:
    """Per benchmark: the calibration, the thinking length reached against the budget asked for, over the
    samples the budget binds (before and after, jittered, the requested length and its tolerance marked);
    and the share on target per requested budget."""
    import random

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets, tolerance, samples = built["budgets"], built["tolerance"], built["_samples"]
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in built["rows"]))
    width = (budgets[-1] - budgets[0]) / (len(budgets) - 1) / 8
    jitter = random.Random(0)
    fig, panels = plt.subplots(len(benchmarks), 2, figsize=(12, 4.2 * len(benchmarks)), squeeze=False)
    for (scatter, share), benchmark in zip(panels, benchmarks):
        for arm, offset, colour in (("before", -width, "tab:red"), ("after", width, "tab:blue")):
            xs, ys = [], []
            for budget in budgets:
                natural = {(s["problem_id"], s["sample"]): s["thinking_tokens"] for s in samples[budget]["before"]}
                bound = [
                    s
                    for name, rows in samples[budget].items()
                    if name.split("/")[0] == arm
                    for s in rows
                    if s["benchmark"] == benchmark and natural[(s["problem_id"], s["sample"])] > budget
                ]
                ys += [s["thinking_tokens"] for s in bound]
                xs += [budget + offset + jitter.uniform(-width / 2, width / 2) for _ in bound]
            scatter.scatter(
                xs, ys, s=6, alpha=0.35, color=colour, label=arm + (" (seeds pooled)" if arm == "after" else "")
            )
        line = [budgets[0] - 2 * width, budgets[-1] + 2 * width]
        scatter.plot(line, line, color="black", linewidth=1, label="reached = requested")
        for sign in (1, -1) if tolerance else ():
            scatter.plot(
                line,
                [x + sign * tolerance for x in line],
                color="black",
                linestyle=":",
                linewidth=1,
                label=f"requested ± {tolerance}" if sign == 1 else None,
            )
        scatter.set_xticks(budgets)
        scatter.set_title(
            f"{benchmark}: reached against requested (samples whose natural length is past B)", fontsize=9
        )
        scatter.set_xlabel("requested budget (thinking tokens)")
        scatter.set_ylabel("thinking tokens reached")
        scatter.legend(fontsize=7)
        mine = [r for r in built["rows"] if r["benchmark"] == benchmark]
        share.plot(budgets, [100 * r["on_target_before"] for r in mine], marker="o", color="tab:red", label="before")
        mean = [100 * r["on_target_after"] for r in mine]
        share.errorbar(
            budgets,
            mean,
            yerr=[
                [m - 100 * r["on_target_after_range"][0] for m, r in zip(mean, mine)],
                [100 * r["on_target_after_range"][1] - m for m, r in zip(mean, mine)],
            ],
            marker="o",
            capsize=3,
            color="tab:blue",
            label="after (range over seeds)",
        )
        share.set_ylim(0, 105)
        share.set_xticks(budgets)
        share.set_title(f"{benchmark}: samples on target (closed within {tolerance} of min(natural, B))", fontsize=9)
        share.set_xlabel("requested budget (thinking tokens)")
        share.set_ylabel("share of samples (%)")
        share.legend(fontsize=7)
    report.save_figure(fig, path)


def write_report(recipe: Recipe) -> str:
    """conditioning.md (returned), conditioning.json and conditioning.png in the run's report folder."""
    folder = RunLayout(recipe.output_dir).report
    built = build(recipe)
    text = markdown(built)
    write_text_atomic(folder / "conditioning.md", text)
    write_json_atomic(folder / "conditioning.json", {k: v for k, v in built.items() if k != "_samples"})
    plot(built, folder / "conditioning.png")
    return text
