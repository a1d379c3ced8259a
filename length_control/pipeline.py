"""The whole loop for one recipe, stage after stage.

    length-control run RECIPE [key=value ...] [--from STAGE] [--dry-run]

Each stage module plans (`plan(recipe, ...) -> Plan`) and runs a plan
(`run(plan)`); `STAGES` lists them in order. A plan is made just before its
stage runs, from what the stages before it wrote, and `--dry-run` prints
every plan without running one: what it shows is what runs.

Each stage skips itself when its manifest says it is up to date, so a rerun
resumes where the last one stopped; `--from STAGE` redoes that stage and
every one after it. The stages that run a model share one engine
(`engines.recipe_engine.SharedEngine`): the stage-1 policy's (eval before,
eval forced, generate), then each seed's after arm, whose model is swapped
into the running engine when it has the policy's architecture. The engine
is closed while Axolotl trains, to free its memory, unless it stays up
(`stays_up_during_training`: for vLLM, `keep_during_training`): then the
whole run costs one engine start.

With `loop.until_overlong` (`run --until-overlong 0.01 --max-rounds 3`) the
loop closes: while the after arm is above the target on some benchmark, the
trained model (first seed) becomes the policy of another round of generate ->
splice -> train -> eval after, in `rounds/<n>/`, with the rows of every
earlier round kept in its stage-2 dataset; it stops when the target is met,
when a round's score falls past `loop.score_guard`, or after `max_rounds`.
The report shows every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from length_control import evaluate, generate, preflight, report, splice, train
from length_control._schema import ConfigError
from length_control.artifacts import MANIFEST, MissingInput, WouldRun, checking, summary_line, write_text_atomic
from length_control.contracts import AXOLOTL_CONFIG, Plan, RunLayout
from length_control.engines.recipe_engine import SharedEngine, stays_up_during_training
from length_control.policy import policy_path
from length_control.recipe import LoopSpec, Recipe

Results = list[tuple[Plan, Any]]


def _summaries(results: Results) -> str:
    return "\n".join(
        f"{plan.label}: {summary_line(summary)}" if len(results) > 1 else summary_line(summary)
        for plan, summary in results
    )


def _metrics(results: Results) -> str:
    return evaluate.format_metrics(
        [(plan.arm + (f" (seed {plan.seed})" if plan.seed is not None else ""), metrics) for plan, metrics in results]
    )


def _arm(arm: str) -> Callable[[Recipe], list[Plan]]:
    return lambda recipe: evaluate.plans(recipe, arm) if arm in recipe.eval.arms else []


@dataclass(frozen=True)
class PipelineStage:
    name: str
    plans: Callable[[Recipe], list[Plan]]  # none: the stage does not run for this recipe
    run: Callable[..., Any]
    run_all: Callable[[list[Plan]], list[Any]] | None = None  # runs every plan at once, in their order
    engine: bool = False  # runs a model: takes the engine the run's stages share
    show: Callable[[Results], str] = _summaries
    help: str | None = None  # a CLI command of its own (`length-control NAME RECIPE`); the arms share `evaluate`
    manifest: bool = True  # finishes with a manifest, so a rerun skips it when up to date (the report: rebuilt)


STAGES = [
    PipelineStage("eval-before", _arm("before"), evaluate.run, engine=True, show=_metrics),
    PipelineStage("eval-forced", _arm("forced"), evaluate.run, engine=True, show=_metrics),
    PipelineStage(
        "generate",
        lambda recipe: [generate.plan(recipe)],
        generate.run,
        engine=True,
        help="traces from the policy up to the budget, then the answers",
    ),
    PipelineStage(
        "splice",
        lambda recipe: [splice.plan(recipe)],
        splice.run,
        help="build the stage-2 dataset from the traces and answers",
    ),
    PipelineStage(
        "train",
        lambda recipe: [train.plan(recipe, seed) for seed in recipe.train.seeds],
        train.run,
        run_all=train.run_all,
        help="stage 2: train the policy on the stage-2 dataset with Axolotl, once per seed",
    ),
    PipelineStage("eval-after", _arm("after"), evaluate.run, engine=True, show=_metrics),
    PipelineStage(
        "report",
        lambda recipe: [report.plan(recipe)],
        report.run,
        show=lambda results: results[0][1],
        help="the overlong-rate report from the eval arms' sample files (Table 2 layout, JSON, PNG)",
        manifest=False,
    ),
]
STAGE_NAMES = [stage.name for stage in STAGES]


def plans_of(recipe: Recipe) -> Callable[[PipelineStage], list[Plan]]:
    """Each stage's plans for `recipe`: its own, or a budget-conditioned run's (`conditioning.plans_of`)."""
    if recipe.conditioning is not None:
        from length_control import conditioning

        return conditioning.plans_of(recipe)
    return lambda stage: stage.plans(recipe)


def preflight_of(recipe: Recipe) -> preflight.Preflight:
    """The preflight of `recipe`, or of every budget's run of a budget-conditioned one."""
    if recipe.conditioning is not None:
        from length_control import conditioning

        return conditioning.check(recipe)
    return preflight.check(recipe)


def run_stage(stage: PipelineStage, recipe: Recipe) -> str:
    """One stage alone, every plan of it (`length-control generate ...`, a Slurm job's `run --stage`); a stage's
    plans that run a model share one engine, as in a whole run (the after arm's seeds swap their weights in)."""
    with SharedEngine(recipe, policy_path(recipe.model), log_name=stage.name) as engine:
        text = stage.show(_run_plans(stage, plans_of(recipe)(stage), engine))
    if stage.name == "report" and recipe.conditioning is not None:
        from length_control import conditioning

        text += "\n" + conditioning.write_report(recipe)
    return text


def why_it_runs(stage: PipelineStage, plans: list[Plan]) -> str | None:
    """Why `stage` would run now, or None when every plan of it is up to date: asked of the stage itself, which
    stops at its up-to-date check (`artifacts.checking`). A stage without a manifest (the report) always runs."""
    if not stage.manifest:
        return "rebuilt on every run"
    with checking():
        for plan in plans:
            try:
                stage.run(plan)
            except WouldRun as stale:
                return f"{plan.folder}: {stale.why}"
            except MissingInput as missing:
                return str(missing)
    return None


def _run_plans(stage: PipelineStage, plans: list[Plan], engine: SharedEngine | None = None) -> Results:
    """Every plan of a stage: all at once where the stage can (`run_all`), else one by one, on `engine` if it
    runs a model (without one, each opens its own)."""
    if stage.run_all is not None:
        return list(zip(plans, stage.run_all(plans)))
    return [(plan, stage.run(plan, engine) if stage.engine else stage.run(plan)) for plan in plans]


def run(recipe: Recipe, *, start: str | None = None, echo: Callable[[str], None] = print) -> None:
    if start is not None and start not in STAGE_NAMES:
        raise ValueError(f"no stage {start!r}; one of {', '.join(STAGE_NAMES)}")
    echo(f"policy: {policy_path(recipe.model)}")
    echo("[preflight]")
    echo(preflight_of(recipe).text())  # every problem at once, before any engine starts
    run_stages(recipe, plans_of(recipe), start=start, echo=echo)
    if recipe.conditioning is not None:
        from length_control import conditioning

        echo("[conditioning report]")
        echo(conditioning.write_report(recipe))
    if recipe.loop.until_overlong is not None:
        _closed_loop(recipe, echo)


def run_stages(
    recipe: Recipe,
    plans_of: Callable[[PipelineStage], list[Plan]],
    *,
    start: str | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Every stage in order, each with the plans `plans_of` makes for it just before it runs, on one engine.

    The plans of a stage may belong to several recipes (a sweep's settings): each stage runs for all of
    them before the next, so the stage-1 policy's stages share one engine and training closes it once.
    The engine follows `recipe`'s settings, which the recipes share.
    """
    engine = SharedEngine(recipe, policy_path(recipe.model), log_name="engine")
    redo = False
    try:
        for stage in STAGES:
            redo = redo or stage.name == start
            echo(f"[{stage.name}]")
            plans = plans_of(stage)
            if not plans:
                echo("not in eval.arms: skipped")
                continue
            if stage.name == "train" and not stays_up_during_training(recipe):
                engine.close()  # free its memory for training
            started = time.monotonic()
            for plan in plans:
                if redo:
                    (plan.folder / MANIFEST).unlink(missing_ok=True)
            results = _run_plans(stage, plans, engine)
            names = list(dict.fromkeys(plan.recipe.name for plan, _ in results))
            for name in names:
                if len(names) > 1:
                    echo(f"-- {name}")
                echo(stage.show([(plan, result) for plan, result in results if plan.recipe.name == name]))
            echo(f"({stage.name}: {time.monotonic() - started:.0f} s)")
    finally:
        engine.close()


def dry_run(recipe: Recipe, check_axolotl: bool = True) -> str:
    """Every stage's plan, nothing run; the rendered configs go to `<run>/dry-run/`.

    With `check_axolotl` (and the Axolotl environment set up) each rendered training config passes Axolotl's own
    schema first, unknown keys included: a typo in `train.overrides` stops here, not on the GPUs.
    """
    folder = RunLayout(recipe.output_dir).dry_run
    training_configs = []
    out = [f"run {recipe.name} -> {recipe.output_dir}", f"policy: {policy_path(recipe.model)}", "", "[preflight]"]
    if recipe.model.path is not None and not recipe.model.path.exists():  # the demo policy, not built yet
        out.append("  the policy is not built yet; the preflight runs once it is (run, or validate --deep)")
    else:
        out.append(preflight_of(recipe).text())
    for stage in STAGES:
        for plan in plans_of(recipe)(stage):
            out += ["", plan.describe()]
            if stage.engine:
                out.append(
                    "  (on the engine the run's model stages share, logs/engine.log: the stage-1 policy's for "
                    "eval-before, eval-forced and generate; the after arms swap their weights in)"
                )
            for name, text in plan.configs.items():
                stem, dot, suffix = name.rpartition(".")
                path = folder / (f"{stem}-seed-{plan.seed}.{suffix}" if plan.seed is not None and dot else name)
                write_text_atomic(path, text)
                out.append(f"  rendered {name}: {path}")
                if name == AXOLOTL_CONFIG:
                    training_configs.append(path)
    if check_axolotl and training_configs:
        out += ["", _check_training_configs(recipe, training_configs)]
    loop = recipe.loop
    if loop.until_overlong is not None:
        out += [
            "",
            f"[loop] while overlong after > {100 * loop.until_overlong:.1f} % on a benchmark and the score "
            f"change stays above {100 * loop.score_guard:+.1f} %: up to {loop.max_rounds - 1} more rounds of "
            f"generate -> splice -> train -> eval after in {recipe.output_dir / 'rounds'}/<n>/, each with the "
            f"previous round's seed-{recipe.train.seeds[0]} model as the policy, rows accumulating",
        ]
    text = "\n".join(out) + "\n"
    write_text_atomic(folder / "plan.txt", text)
    return text


def _check_training_configs(recipe: Recipe, configs: list) -> str:
    """Axolotl's verdict on the rendered configs, as a line; an invalid one is the user's error."""
    from length_control.envs import envs_dir

    if not (envs_dir() / "axolotl" / "bin" / "python").exists():
        return "[axolotl check] skipped: the axolotl environment is not set up (./run.sh setup)"
    invalid = train.check_configs(configs)
    if invalid:
        raise ConfigError(
            configs[0],
            [
                f"Axolotl rejects {path}: {error}; fix train.overrides or the template {recipe.train.template}"
                for path, error in invalid.items()
            ],
        )
    return f"[axolotl check] {len(configs)} rendered config(s) pass Axolotl's schema, unknown keys included"


# ---------------------------------------------------------------- the closed loop


def round_recipe(recipe: Recipe, previous: Recipe, number: int) -> Recipe:
    """Round `number` of the closed loop: the previous round's model (its first seed) is the
    policy; the round lives in `rounds/<number>/` and runs only the after arm."""
    policy = train.model_of(RunLayout(previous.output_dir).train(recipe.train.seeds[0]))
    return recipe.model_copy(
        update={
            "output_dir": RunLayout(recipe.output_dir).round(number).root,
            "model": recipe.model.model_copy(update={"path": policy, "hub": None, "demo": None}),
            "eval": recipe.eval.model_copy(update={"arms": ["after"]}),
        }
    )


def loop_verdict(rows: dict[str, dict], loop: LoopSpec) -> str | None:
    """Why the loop stops after a round with these report rows, or None to go on."""
    worst = min(rows.items(), key=lambda item: item[1]["score_relative_change"] or 0.0)
    if (worst[1]["score_relative_change"] or 0.0) < loop.score_guard:
        return (
            f"stopped: {worst[0]}'s score changed by {100 * worst[1]['score_relative_change']:+.1f} %, "
            f"past the score guard ({100 * loop.score_guard:+.1f} %)"
        )
    above = {name: row["overlong_after"] for name, row in rows.items() if row["overlong_after"] > loop.until_overlong}
    if not above:
        return f"target met: overlong after <= {100 * loop.until_overlong:.1f} % on every benchmark"
    return None


def _closed_loop(recipe: Recipe, echo: Callable[[str], None]) -> None:
    """More rounds while the after arm is above `loop.until_overlong` (rows accumulate)."""
    loop = recipe.loop
    previous, generated = recipe, [RunLayout(recipe.output_dir).generate]
    with SharedEngine(recipe, policy_path(recipe.model), log_name="engine") as engine:
        for number in range(2, loop.max_rounds + 2):
            verdict = loop_verdict(report.round_rows(recipe, previous), loop)
            if verdict is None and number > loop.max_rounds:
                verdict = f"stopped after {loop.max_rounds} rounds, above the target"
            if verdict is not None:
                echo(f"[loop] round {number - 1}: {verdict}")
                return
            this = round_recipe(recipe, previous, number)
            echo(f"[round {number}] policy: {this.model.path}")
            echo(summary_line(generate.run(generate.plan(this), engine)))
            echo(summary_line(splice.run(splice.plan(this, earlier=tuple(generated)))))
            if not stays_up_during_training(recipe):
                engine.close()
            plans = [train.plan(this, seed) for seed in this.train.seeds]
            echo(_summaries(list(zip(plans, train.run_all(plans)))))
            echo(_metrics([(plan, evaluate.run(plan, engine)) for plan in evaluate.plans(this, "after")]))
            echo(report.run(report.plan(recipe)))
            previous = this
            generated.append(RunLayout(this.output_dir).generate)
