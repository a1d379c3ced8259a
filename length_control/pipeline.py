"""The whole loop for one recipe, stage after stage.

    length-control run RECIPE [key=value ...] [--from STAGE]

Each stage skips itself when its manifest says it is up to date, so a rerun
resumes where the last one stopped; `--from STAGE` redoes that stage and
every one after it. The stages that run the stage-1 policy (eval before,
eval forced, generate) come first and share one engine: one engine start
per model.

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

from length_control import evaluate, generate, report, splice, train
from length_control.artifacts import MANIFEST, summary_line
from length_control.engine import SharedEngine
from length_control.policy import policy_path
from length_control.layout import generate_dir, rounds_dir
from length_control.recipe import LoopSpec, Recipe


def _eval(arm: str) -> Callable[[Recipe, SharedEngine], str]:
    return lambda recipe, policy: evaluate.format_metrics(
        evaluate.run_arms(recipe, arm, engine=policy if arm != "after" else None)
    )


# (name, the folder its manifests live under, what runs it given the stage-1 policy's shared engine)
STAGES: list[tuple[str, str | None, Callable[[Recipe, SharedEngine], str]]] = [
    ("policy", None, lambda recipe, policy: f"policy: {policy_path(recipe.model)}"),
    ("eval-before", "eval/before", _eval("before")),
    ("eval-forced", "eval/forced", _eval("forced")),
    ("generate", "generate", lambda recipe, policy: summary_line(generate.run(recipe, engine=policy))),
    ("splice", "stage2", lambda recipe, policy: summary_line(splice.run(recipe))),
    ("train", "train", lambda recipe, policy: "\n".join(f"{k}: {v}" for k, v in train.run(recipe).items())),
    ("eval-after", "eval/after", _eval("after")),
    ("report", None, lambda recipe, policy: report.run(recipe)),
]
STAGE_NAMES = [name for name, _, _ in STAGES]
_LAST_POLICY_STAGE = "generate"  # after it, the stage-1 engine is shut down to free its memory for training


def run(recipe: Recipe, *, start: str | None = None, echo: Callable[[str], None] = print) -> None:
    if start is not None and start not in STAGE_NAMES:
        raise ValueError(f"no stage {start!r}; one of {', '.join(STAGE_NAMES)}")
    policy = SharedEngine(recipe, policy_path(recipe.model), log_name="policy")
    redo = False
    try:
        for name, folder, stage in STAGES:
            redo = redo or name == start
            if redo and folder is not None:
                for manifest in (recipe.output_dir / folder).glob(f"**/{MANIFEST}"):
                    manifest.unlink()  # every seed's, for train and eval-after
            echo(f"[{name}]")
            if name.startswith("eval-") and name.removeprefix("eval-") not in recipe.eval.arms:
                echo("not in eval.arms: skipped")
                continue
            started = time.monotonic()
            echo(stage(recipe, policy))
            echo(f"({name}: {time.monotonic() - started:.0f} s)")
            if name == _LAST_POLICY_STAGE:
                policy.close()
    finally:
        policy.close()
    if recipe.loop.until_overlong is not None:
        _closed_loop(recipe, echo)


# ---------------------------------------------------------------- the closed loop


def round_recipe(recipe: Recipe, previous: Recipe, number: int) -> Recipe:
    """Round `number` of the closed loop: the previous round's model (its first seed) is the
    policy; the round lives in `rounds/<number>/` and runs only the after arm."""
    from length_control.demo_model import build_folder
    from length_control.sources import DatasetLocation

    splice_spec = recipe.splice
    mix = splice_spec.sft_mix
    if mix is not None and mix.dataset is None:  # the demo policy's own SFT set, named explicitly
        sft = build_folder(recipe.model.demo) / "stage1_sft.parquet"
        location = DatasetLocation.model_construct(path=sft, hf=None, config=None, split="train")
        splice_spec = splice_spec.model_copy(update={"sft_mix": mix.model_copy(update={"dataset": location})})
    policy = train.trained_model(previous, recipe.train.seeds[0])
    return recipe.model_copy(update={
        "output_dir": rounds_dir(recipe.output_dir, number),
        "model": recipe.model.model_copy(update={"path": policy, "hub": None, "demo": None}),
        "splice": splice_spec,
        "eval": recipe.eval.model_copy(update={"arms": ["after"]}),
    })


def loop_verdict(rows: dict[str, dict], loop: LoopSpec) -> str | None:
    """Why the loop stops after a round with these report rows, or None to go on."""
    worst = min(rows.items(), key=lambda item: item[1]["score_relative_change"] or 0.0)
    if (worst[1]["score_relative_change"] or 0.0) < loop.score_guard:
        return (f"stopped: {worst[0]}'s score changed by {100 * worst[1]['score_relative_change']:+.1f} %, "
                f"past the score guard ({100 * loop.score_guard:+.1f} %)")
    above = {name: row["overlong_after"] for name, row in rows.items() if row["overlong_after"] > loop.until_overlong}
    if not above:
        return f"target met: overlong after <= {100 * loop.until_overlong:.1f} % on every benchmark"
    return None


def _closed_loop(recipe: Recipe, echo: Callable[[str], None]) -> None:
    """More rounds while the after arm is above `loop.until_overlong` (rows accumulate)."""
    loop = recipe.loop
    previous, generated = recipe, [generate_dir(recipe.output_dir)]
    for number in range(2, loop.max_rounds + 2):
        verdict = loop_verdict(report.round_rows(recipe, previous), loop)
        if verdict is None and number > loop.max_rounds:
            verdict = f"stopped after {loop.max_rounds} rounds, above the target"
        if verdict is not None:
            echo(f"[loop] round {number - 1}: {verdict}")
            return
        this = round_recipe(recipe, previous, number)
        echo(f"[round {number}] policy: {this.model.path}")
        echo(summary_line(generate.run(this)))
        echo(summary_line(splice.run(this, earlier=tuple(generated))))
        echo("\n".join(f"{k}: {v}" for k, v in train.run(this).items()))
        echo(evaluate.format_metrics(evaluate.run_arms(this, "after")))
        echo(report.run(recipe))
        previous = this
        generated.append(generate_dir(this.output_dir))
