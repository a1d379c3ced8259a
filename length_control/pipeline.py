"""The whole loop for one recipe, stage after stage.

    length-control run RECIPE [key=value ...] [--from STAGE]

Each stage skips itself when its manifest says it is up to date, so a rerun
resumes where the last one stopped; `--from STAGE` redoes that stage and
every one after it.
"""

from __future__ import annotations

from collections.abc import Callable

from length_control import evaluate, generate, report, splice, train
from length_control.artifacts import Stage
from length_control.policy import policy_path
from length_control.recipe import Recipe


def summary_line(values: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items())


def _eval(arm: str) -> Callable[[Recipe], str]:
    return lambda recipe: evaluate.format_metrics(evaluate.run(recipe, arm=arm), arm)


# (name, the folder its manifest lives in, what runs it)
STAGES: list[tuple[str, str | None, Callable[[Recipe], str]]] = [
    ("policy", None, lambda recipe: f"policy: {policy_path(recipe.model)}"),
    ("eval-before", "eval/before", _eval("before")),
    ("generate", "generate", lambda recipe: summary_line(generate.run(recipe))),
    ("splice", "stage2", lambda recipe: summary_line(splice.run(recipe))),
    ("train", "train", lambda recipe: summary_line(train.run(recipe))),
    ("eval-after", "eval/after", _eval("after")),
    ("eval-forced", "eval/forced", _eval("forced")),
    ("report", None, report.run),
]
STAGE_NAMES = [name for name, _, _ in STAGES]


def run(recipe: Recipe, *, start: str | None = None, echo: Callable[[str], None] = print) -> None:
    if start is not None and start not in STAGE_NAMES:
        raise ValueError(f"no stage {start!r}; one of {', '.join(STAGE_NAMES)}")
    redo = False
    for name, folder, stage in STAGES:
        redo = redo or name == start
        if redo and folder is not None:
            Stage(recipe.output_dir / folder, inputs={}, config=None).invalidate()
        echo(f"[{name}]")
        echo(stage(recipe))
