"""A scripted engine: a stage's logic checked without a model or a GPU.

Generation is the slow, random part of every stage, and what a stage does
around it (cutting at B, closing the thinking, asking for the answer,
resuming, scoring) is where its bugs hide. `ScriptedEngine` keeps the
`Engine` contract (`engines.protocol`) with a script in place of a model: the script says
what the "model" writes after any context, so a test knows every sample
exactly and runs in milliseconds, and it records what the stage asked for.
A recipe's logic can be checked the same way before a GPU is rented.

    engine = ScriptedEngine(transcripts({tuple(prompt): thinking + close + answer + [eos]}))
    generate.run(recipe, engine=engine)
    engine.requests   # every request the stage sent, in order
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from length_control.engines.protocol import collect

Continuation = Callable[[list[int]], list[int]]  # context ids -> what the model writes after them (EOS included)
LogProb = Callable[[list[int], int], float]  # (context ids, next token) -> log p(token | context)

UNLIKELY = math.log(1e-6)


class ScriptedEngine:
    """An `Engine` that writes what `continuation` says.

    A request is answered with the first `max_tokens` tokens of the
    continuation of its prompt, up to and with the first of its
    `stop_token_ids` as vLLM stops: "length" when the continuation is longer,
    else all of it and "stop". A `score_tail` request writes nothing (the probes
    read only its `tail_logprobs`, so no script needs its contexts); they come
    from `logprob`; by default a token is certain when the script would write
    it next and nearly impossible otherwise, as for a greedy model. `stream`
    holds `in_flight` requests and finishes the shortest output first, as a
    real engine does, so a stage that relies on results in request order
    fails here too.
    """

    def __init__(self, continuation: Continuation, logprob: LogProb | None = None, *, in_flight: int = 8) -> None:
        self.continuation = continuation
        self.logprob = logprob or self._scripted_logprob
        self.in_flight = in_flight
        self.requests: list[dict[str, Any]] = []  # every request received, in order
        self.calls = 0  # generate and stream calls, empty ones included

    def __enter__(self) -> ScriptedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def describe(self) -> list[str]:
        return [f"a scripted engine ({self.in_flight} in flight)"]

    def swap_weights(self, model: Path | str) -> bool:
        """Always: the script is the model, whatever the stage names."""
        return True

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict[str, Any]]:
        return collect(self, requests, desc=desc)

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        self.calls += 1
        running: list[dict[str, Any]] = []
        while requests or running:
            while requests and len(running) < self.in_flight:
                self.requests.append(request := requests.popleft())
                running.append(self._result(request))
            running.sort(key=lambda result: len(result["output_token_ids"]))
            yield running.pop(0)

    def _result(self, request: dict[str, Any]) -> dict[str, Any]:
        prompt = list(request["prompt_token_ids"])
        # a probe's scoring request never reads the token it makes the engine write: none is scripted
        written = [] if request.get("score_tail") else _up_to_stop(self.continuation(prompt), request)
        limit = request["max_tokens"]
        result = {
            "key": request["key"],
            "output_token_ids": written[:limit],
            "finish_reason": "length" if len(written) > limit else "stop",
            "stop_reason": None,
        }
        if request.get("score_tail"):
            first = len(prompt) - request["score_tail"]
            result["tail_logprobs"] = [self.logprob(prompt[:i], prompt[i]) for i in range(first, len(prompt))]
        return result

    def _scripted_logprob(self, context: list[int], token: int) -> float:
        return 0.0 if self.continuation(context)[:1] == [token] else UNLIKELY


def _up_to_stop(written: list[int], request: dict[str, Any]) -> list[int]:
    """What the engine writes of `written` when it stops on the request's `stop_token_ids`: up to the first."""
    stops = set(request.get("stop_token_ids") or ())
    end = next((at + 1 for at, token in enumerate(written) if token in stops), len(written))
    return written[:end]


def transcripts(table: Mapping[tuple[int, ...], Sequence[int]]) -> Continuation:
    """A continuation from a table {context: what the model writes after it}.

    A context that runs along a transcript (a listed context, then the start
    of what is written after it) continues that transcript, as a greedy model
    would: the answer pass after a trace cut at B continues the trace. The
    longest listed context that fits wins, so `prompt + cut + forced close`
    can be listed beside `prompt` to script the answer after a forced close.
    A context that fits none raises: a test should expect every request.
    """
    by_length = sorted(
        ((tuple(context), list(written)) for context, written in table.items()),
        key=lambda entry: len(entry[0]),
        reverse=True,
    )

    def continuation(context: list[int]) -> list[int]:
        for listed, written in by_length:
            head, rest = tuple(context[: len(listed)]), context[len(listed) :]
            if head == listed and rest == written[: len(rest)]:
                return written[len(rest) :]
        raise LookupError(f"no transcript fits the context ending in {context[-12:]} ({len(context)} tokens)")

    return continuation
