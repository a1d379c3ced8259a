"""The whole loop for one recipe, stage after stage.

    length-control run RECIPE [key=value ...] [--from STAGE]

Each stage skips itself when its manifest says it is up to date, so a rerun
resumes where the last one stopped; `--from STAGE` redoes that stage and
every one after it. The stages that run the stage-1 policy (eval before,
eval forced, generate) come first and share one engine: one engine start
per model.
"""

from __future__ import annotations

from collections.abc import Callable

from length_control import evaluate, generate, report, splice, train
from length_control.artifacts import MANIFEST, summary_line
from length_control.engine import SharedEngine
from length_control.policy import policy_path
from length_control.recipe import Recipe


def _eval(arm: str) -> Callable[[Recipe, SharedEngine], str]:
    return lambda recipe, policy: evaluate.format_metrics(
        evaluate.run(recipe, arm=arm, engine=policy if arm != "after" else None), arm
    )


# (name, the folder its manifest lives in, what runs it given the stage-1 policy's shared engine)
STAGES: list[tuple[str, str | None, Callable[[Recipe, SharedEngine], str]]] = [
    ("policy", None, lambda recipe, policy: f"policy: {policy_path(recipe.model)}"),
    ("eval-before", "eval/before", _eval("before")),
    ("eval-forced", "eval/forced", _eval("forced")),
    ("generate", "generate", lambda recipe, policy: summary_line(generate.run(recipe, engine=policy))),
    ("splice", "stage2", lambda recipe, policy: summary_line(splice.run(recipe))),
    ("train", "train", lambda recipe, policy: summary_line(train.run(recipe))),
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
                (recipe.output_dir / folder / MANIFEST).unlink(missing_ok=True)
            echo(f"[{name}]")
            if name.startswith("eval-") and name.removeprefix("eval-") not in recipe.eval.arms:
                echo("not in eval.arms: skipped")
                continue
            echo(stage(recipe, policy))
            if name == _LAST_POLICY_STAGE:
                policy.close()
    finally:
        policy.close()
