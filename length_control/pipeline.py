"""The whole loop for one recipe, stage after stage.

    length-control run RECIPE [key=value ...]

Each stage skips itself when its manifest says it is up to date, so a rerun
resumes where the last one stopped. Stages that are not built yet are listed
as such, never faked.
"""

from __future__ import annotations

from collections.abc import Callable

from length_control import evaluate, generate, splice, train
from length_control.policy import policy_path
from length_control.recipe import Recipe


def _policy(recipe: Recipe) -> str:
    path = policy_path(recipe.model)
    return f"policy: {path}"


def _generate(recipe: Recipe) -> str:
    return ", ".join(f"{key} {value}" for key, value in generate.run(recipe).items())


def _splice(recipe: Recipe) -> str:
    return ", ".join(f"{key} {value}" for key, value in splice.run(recipe).items())


def _train(recipe: Recipe) -> str:
    return ", ".join(f"{key} {value}" for key, value in train.run(recipe).items())


def _eval(arm: str) -> Callable[[Recipe], str]:
    return lambda recipe: evaluate.format_metrics(evaluate.run(recipe, arm=arm), arm)


STAGES: list[tuple[str, Callable[[Recipe], str] | None]] = [
    ("policy", _policy),
    ("eval-before", _eval("before")),
    ("generate", _generate),
    ("splice", _splice),
    ("train", _train),
    ("eval-after", _eval("after")),
    ("eval-forced", None),
    ("report", None),
]


def run(recipe: Recipe, echo: Callable[[str], None] = print) -> None:
    for name, stage in STAGES:
        if stage is None:
            echo(f"[{name}] not built yet")
            continue
        echo(f"[{name}]")
        echo(stage(recipe))
