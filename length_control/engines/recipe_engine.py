"""The engine a recipe names, shared by a run's stages, and what generic code may know of it.

The pipeline, the stages, the preflight, training and Slurm ask here, never
an engine's own recipe section: `ENGINES` maps `engine.kind` to the engine
class (an `EngineKind`), which alone reads its section.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from length_control.engines.openai import OpenAIEngine
from length_control.engines.protocol import Engine, EngineKind, collect
from length_control.engines.vllm import VLLMEngine

ENGINES: dict[str, EngineKind] = {"vllm": VLLMEngine, "openai": OpenAIEngine}


def engine_kind(recipe) -> EngineKind:
    return ENGINES[recipe.engine.kind]


def open_engine(recipe, model: Path | str, *, log_name: str) -> Engine:
    """The engine the recipe names, for `model` (a context manager; nothing starts before it is entered)."""
    return engine_kind(recipe).from_recipe(recipe, model, log_name=log_name)


def model_len(recipe) -> int:
    """The engine's input+output token limit."""
    return engine_kind(recipe).model_len(recipe)


def model_len_setting(recipe) -> str:
    """The recipe setting that raises `model_len`, for a message that names the fix."""
    return engine_kind(recipe).MODEL_LEN_SETTING


def stays_up_during_training(recipe) -> bool:
    """Whether the run's engine keeps running while Axolotl trains."""
    return engine_kind(recipe).stays_up_during_training(recipe)


def runs_on_job_devices(recipe) -> bool:
    """Whether a job that runs the engine needs GPUs of its own (servers bring theirs)."""
    return engine_kind(recipe).RUNS_ON_JOB_DEVICES


class SharedEngine:
    """One engine for the stages of a run, started on first use, following the model each stage asks for.

    The pipeline hands it to every stage that runs a model: eval before, eval
    forced and generate (the stage-1 policy), then each seed's after arm. A
    stage names its model with `serving(model)`; when the running engine has
    another, it is asked to `swap_weights` (vLLM does, in seconds, when the
    two checkpoints share their architecture, against an engine start of
    30-80 s on a CPU and minutes for a large model on GPUs); when it cannot
    (servers serve what they were started with), it is closed and a new one
    started. A stage that is up to date never starts it.
    """

    def __init__(self, recipe, model: str, log_name: str) -> None:
        self._recipe, self._log_name = recipe, log_name
        self._wanted = str(model)
        self._engine: Engine | None = None
        self._serves: str | None = None  # the model the running engine has

    def serving(self, model: Path | str) -> SharedEngine:
        """This engine, for `model` from the next request on."""
        self._wanted = str(model)
        return self

    def swap_weights(self, model: Path | str) -> bool:
        """Always: the next request runs on `model`, by a swap or a new engine."""
        self.serving(model)
        return True

    def describe(self) -> list[str]:
        return (self._engine or open_engine(self._recipe, self._wanted, log_name=self._log_name)).describe()

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        return collect(self, requests, desc=desc)

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        if not requests:
            return iter(())
        if self._engine is not None and self._serves != self._wanted:
            if self._engine.swap_weights(self._wanted):
                self._serves = self._wanted
            else:
                self.close()
        if self._engine is None:
            self._engine = open_engine(self._recipe, self._wanted, log_name=self._log_name).__enter__()
            self._serves = self._wanted
        return self._engine.stream(requests, desc=desc)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine, self._serves = None, None

    def __enter__(self) -> SharedEngine:
        return self  # the engine starts on first use, not here

    def __exit__(self, *exc: object) -> None:
        self.close()


def engine_for(recipe, model: Path | str, *, log_name: str, shared: Engine | None):
    """The shared engine when the caller has one (left open, set to `model`; any other engine a caller hands in
    is used as it is), else a new one for this stage."""
    if shared is None:
        return open_engine(recipe, model, log_name=log_name)
    return contextlib.nullcontext(shared.serving(model) if isinstance(shared, SharedEngine) else shared)
