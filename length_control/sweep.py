"""Sweeps: the loop at several settings, sharing what the settings share.

    length-control sweep RECIPE budget=[84,105,126] splice.termination_span=[think_close,think_close_eos]

A `key=[a, b, ...]` on a key whose value is not a list is an axis (other
`key=value`s override every setting); the settings are every combination of
the axes, each its own run folder `<output_dir>/sweep/<setting>/`. The stages
run stage-major on one engine, and what the settings share is done once:

- the before arm is sampled once per eval setting; the other settings (other
  budgets, other stage-2 settings) take its samples and run only the
  termination probe at their budget (`evaluate.plan(samples=...)`);
- traces are sampled once per generation setting, at the largest budget: the
  other budgets cut them (`longer_traces.LongerTraces`: a trace sampled to B_max
  holds every shorter first pass) and generate only the answers after their
  close; the same budget with another span or seed generates nothing;
- the forced arm cuts its first passes from the before arm's samples.

Then per setting: splice, train, eval after, and its own report; last the
sweep's report in `<output_dir>/sweep/report/`: `sweep.md` (one Table 2 row
per setting and benchmark, and the ablation of each axis other than the
budget side by side, the report's App. B masking ablation when the axis is
`splice.termination_span`), `sweep.json` and `sweep.png` (overlong rate and
score against the budget, the trained arm per ablation and the forced arm).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from length_control import evaluate, generate, preflight, report
from length_control._schema import ConfigError
from length_control.artifacts import write_json_atomic, write_text_atomic
from length_control.contracts import Plan, RunLayout
from length_control.pipeline import PipelineStage, run_stages
from length_control.policy import policy_path
from length_control.recipe import Recipe, load_recipe

# Keys every setting shares: the engine serves all of them, the loop closes one run, the folders are the sweep's.
_FIXED = ("name", "output_dir", "engine", "context_limit", "model", "loop")


@dataclass(frozen=True)
class Setting:
    values: dict[str, Any]  # axis key -> this setting's value
    recipe: Recipe

    @property
    def slug(self) -> str:
        return self.recipe.output_dir.name


def settings(
    path: Path, arguments: list[str], resolve: Callable[[Recipe], Recipe] = lambda recipe: recipe
) -> list[Setting]:
    """The settings of `length-control sweep RECIPE ARGUMENTS`, each recipe validated (and `resolve`d)."""
    base = load_recipe(path)
    data = base.model_dump(mode="json")
    axes: dict[str, list[Any]] = {}
    overrides: list[str] = []
    for argument in arguments:
        key, sep, raw = argument.partition("=")
        value = yaml.safe_load(raw) if sep else None
        if isinstance(value, list) and not isinstance(_value_at(data, key), list):
            if key.split(".")[0] in _FIXED:
                raise ConfigError(
                    path,
                    [
                        f"{key}: a sweep cannot vary {key.split('.')[0]} (one engine and one "
                        "run folder serve every setting); set it once, as key=value"
                    ],
                )
            if len(value) < 1 or len(set(map(json.dumps, value))) != len(value):
                raise ConfigError(path, [f"{key}={raw}: an axis lists distinct values, e.g. budget=[84,105,126]"])
            axes[key] = value
        else:
            overrides.append(argument)
    if not axes:
        raise ConfigError(path, ["a sweep needs at least one axis: key=[a,b,...], e.g. budget=[84,105,126]"])
    base = load_recipe(path, overrides)
    if base.loop.until_overlong is not None:
        raise ConfigError(
            path, ["loop.until_overlong: a sweep runs one round per setting; set loop.until_overlong=null"]
        )
    if base.conditioning is not None:
        raise ConfigError(
            path,
            [
                "conditioning: a budget-conditioned run already covers its budgets; run it with "
                "`length-control run`, or sweep the recipe without conditioning"
            ],
        )
    short = {key: key.rsplit(".", 1)[-1] for key in axes}
    if len(set(short.values())) < len(short):
        short = {key: key for key in axes}
    out = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        slug = "_".join(f"{short[key]}-{value}" for key, value in values.items())
        folder = sweep_dir(base) / slug
        recipe = load_recipe(
            path,
            [
                *overrides,
                *(f"{key}={json.dumps(value)}" for key, value in values.items()),
                f"output_dir={folder}",
                f"name={base.name}.{slug}",
            ],
        )
        out.append(Setting(values, resolve(recipe)))
    return out


def _value_at(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def sweep_dir(base: Recipe) -> Path:
    """Where a sweep of the recipe `base` puts its settings' run folders and its report."""
    return base.output_dir / "sweep"


def _folder(all_settings: list[Setting]) -> Path:
    """The sweep's folder, from its settings: their run folders' parent."""
    return all_settings[0].recipe.output_dir.parent


# ---------------------------------------------------------------- what the settings share


def _eval_key(recipe: Recipe) -> str:
    """Settings with the same key sample the same before arm (it depends on no budget or stage-2 setting)."""
    return json.dumps(
        [recipe.section("eval"), recipe.seed, recipe.section("model"), recipe.stated_budget()], sort_keys=True
    )


def _generation_key(recipe: Recipe) -> str:
    """Settings with the same key sample the same traces, up to their budget."""
    return json.dumps(
        [
            recipe.section("generation"),
            recipe.section("prompts"),
            recipe.seed,
            recipe.section("model"),
            recipe.stated_budget(),
        ],
        sort_keys=True,
    )


def plans_of(all_settings: list[Setting]) -> Callable[[PipelineStage], list[Plan]]:
    """Every setting's plans of a stage, with what they share: a before arm and traces per group, the
    traces' group led by its largest budget (which generates first)."""
    recipes = [setting.recipe for setting in all_settings]
    eval_leader: dict[str, Recipe] = {}
    for recipe in recipes:
        eval_leader.setdefault(_eval_key(recipe), recipe)
    trace_leader: dict[str, Recipe] = {}
    for recipe in sorted(recipes, key=lambda r: -r.budget):
        trace_leader.setdefault(_generation_key(recipe), recipe)

    def plans(stage: PipelineStage) -> list[Plan]:
        if stage.name == "eval-before":
            out = []
            for recipe in recipes:
                if "before" in recipe.eval.arms:
                    leader = eval_leader[_eval_key(recipe)]
                    shared = RunLayout(leader.output_dir).eval("before") if leader is not recipe else None
                    out.append(evaluate.plan(recipe, "before", samples=shared))
            return out
        if stage.name == "generate":
            leaders = [r for r in recipes if trace_leader[_generation_key(r)] is r]
            return [generate.plan(r) for r in leaders] + [
                generate.plan(r, longer=RunLayout(trace_leader[_generation_key(r)].output_dir).generate)
                for r in recipes
                if r not in leaders
            ]
        return [plan for recipe in recipes for plan in stage.plans(recipe)]

    return plans


def run(all_settings: list[Setting], *, start: str | None = None, echo: Callable[[str], None] = print) -> None:
    """The preflight of every setting (every problem before any engine starts), then every stage."""
    echo(f"sweep: {len(all_settings)} settings -> {_folder(all_settings)}")
    echo(f"policy: {policy_path(all_settings[0].recipe.model)}")
    echo("[preflight]")
    for setting in all_settings:
        found = preflight.check(setting.recipe)
    echo(found.text())
    run_stages(all_settings[0].recipe, plans_of(all_settings), start=start, echo=echo)
    echo("[sweep report]")
    echo(write_report(all_settings))


# ---------------------------------------------------------------- the sweep's report


def build(all_settings: list[Setting]) -> dict[str, Any]:
    """Per setting and benchmark, its report's row (from its eval samples), with the setting's values."""
    rows = []
    for setting in all_settings:
        built = report.build(setting.recipe)
        for benchmark, row in built["benchmarks"].items():
            rows.append(
                {
                    "setting": setting.slug,
                    **setting.values,
                    "budget": setting.recipe.budget,
                    "benchmark": benchmark,
                    **{k: v for k, v in row.items() if k != "per_seed"},
                }
            )
    return {"axes": list(all_settings[0].values), "rows": rows}


def markdown(sweep: dict[str, Any]) -> str:
    axes, rows = sweep["axes"], sweep["rows"]
    pct, spread = report.pct, report.spread
    head = [
        *axes,
        "benchmark",
        "overlong before",
        "overlong after",
        "overlong forced",
        "score before",
        "score after",
        "rel. change",
        "score forced",
    ]
    lines = [
        "Every setting, the after columns as the mean [min, max] over its stage-2 seeds; overlong = no "
        "`</think>` within the context limit; the before arm is sampled once and shared.",
        "",
        report.table_row(head),
        "|" + "---|" * len(head),
    ]
    for r in rows:
        lines.append(
            report.table_row(
                [
                    *(str(r[axis]) for axis in axes),
                    r["benchmark"],
                    pct(r["overlong_before"]),
                    spread(r, "overlong_after"),
                    pct(r.get("overlong_forced")),
                    pct(r["score_before"]),
                    spread(r, "score_after"),
                    spread(r, "score_relative_change", signed=True),
                    pct(r.get("score_forced")),
                ]
            )
        )
    for axis in axes:
        if axis == "budget":
            continue
        values = list(dict.fromkeys(r[axis] for r in rows))
        others = [a for a in axes if a != axis]
        lines += [
            "",
            f"Ablation of {axis}: overlong after / relative score change, side by side.",
            "",
            report.table_row([*others, "benchmark", *map(str, values)]),
            "|" + "---|" * (len(others) + 1 + len(values)),
        ]
        groups: dict[tuple, dict[Any, dict]] = {}
        for r in rows:
            groups.setdefault((*(r[a] for a in others), r["benchmark"]), {})[r[axis]] = r
        for key, by_value in groups.items():
            cells = [
                f"{spread(by_value[v], 'overlong_after')} / {spread(by_value[v], 'score_relative_change', True)}"
                if v in by_value
                else "n/a"
                for v in values
            ]
            lines.append(report.table_row([*map(str, key), *cells]))
    return "\n".join(lines) + "\n"


def plot(sweep: dict[str, Any], path: Path) -> None:
    """Overlong rate and score against the budget, a row of two panels per benchmark: the trained arm
    (one line per combination of the other axes, the range over seeds as bars), the forced arm, and
    the before arm as a level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, axes = sweep["rows"], sweep["axes"]
    others = [a for a in axes if a != "budget"]
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    fig, panels = plt.subplots(len(benchmarks), 2, figsize=(11, 3.8 * len(benchmarks)), squeeze=False)
    for (overlong_ax, score_ax), benchmark in zip(panels, benchmarks):
        mine = sorted((r for r in rows if r["benchmark"] == benchmark), key=lambda r: r["budget"])
        lines: dict[tuple, list[dict]] = {}
        for r in mine:
            lines.setdefault(tuple(r[a] for a in others), []).append(r)
        for ax, key, label in ((overlong_ax, "overlong", "overlong rate"), (score_ax, "score", "score (pass@1)")):
            ax.axhline(100 * mine[0][f"{key}_before"], color="tab:red", linestyle=":", label="before")
            for other, points in lines.items():
                budgets = [p["budget"] for p in points]
                mean = [100 * p.get(f"{key}_after", float("nan")) for p in points]
                ranges = [[100 * v for v in p.get(f"{key}_after_range", [0, 0])] for p in points]
                # at 0 when every seed agrees: the mean of equal values can round past them
                low = [max(0.0, m - least) for m, (least, _) in zip(mean, ranges)]
                high = [max(0.0, most - m) for m, (_, most) in zip(mean, ranges)]
                name = ", ".join(f"{a.rsplit('.', 1)[-1]}={v}" for a, v in zip(others, other)) or "trained"
                ax.errorbar(budgets, mean, yerr=[low, high], marker="o", capsize=3, label=f"after ({name})")
            forced = {}
            for r in mine:
                if f"{key}_forced" in r:
                    cut = r.get("cut.at", "")
                    forced.setdefault(cut, {})[r["budget"]] = 100 * r[f"{key}_forced"]
            for cut, points in forced.items():
                ax.plot(
                    list(points),
                    list(points.values()),
                    marker="s",
                    color="tab:gray",
                    linestyle="--" if cut == "line_end" else "-",
                    label=f"forced{f' ({cut} cut)' if cut else ''}",
                )
            ax.set_title(f"{benchmark}: {label} against the budget")
            ax.set_xlabel("budget B (thinking tokens)")
            ax.set_ylabel(f"{label} (%)")
            ax.legend(fontsize=7)
    report.save_figure(fig, path)


def write_report(all_settings: list[Setting]) -> str:
    """The sweep's report from every setting's eval samples: sweep.md (returned), sweep.json, sweep.png."""
    folder = _folder(all_settings) / "report"
    sweep = build(all_settings)
    text = markdown(sweep)
    write_text_atomic(folder / "sweep.md", text)
    write_json_atomic(folder / "sweep.json", sweep)
    plot(sweep, folder / "sweep.png")
    return text
