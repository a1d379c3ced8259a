"""Engine plumbing that needs no engine: per-request seeds, data-parallel splits and
device slices."""

from __future__ import annotations

import json

import pytest

from length_control.engine import EngineError, _split, replica_devices, request_seed


def test_request_seeds_are_stable_and_distinct() -> None:
    seeds = {request_seed(0, f"p{i}", s) for i in range(200) for s in range(4)}
    assert len(seeds) == 800
    assert request_seed(0, "p1", 0) == request_seed(0, "p1", 0) != request_seed(1, "p1", 0)
    assert all(0 <= seed < 2**31 for seed in seeds)


@pytest.mark.parametrize("n, parts", [(0, 3), (7, 3), (8, 2), (3, 4)])
def test_split_is_contiguous_and_balanced(n: int, parts: int) -> None:
    chunks = _split(list(range(n)), parts)
    assert len(chunks) == parts
    assert [x for chunk in chunks for x in chunk] == list(range(n))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_replicas_get_their_own_devices() -> None:
    assert [replica_devices(r, 2, None) for r in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert [replica_devices(r, 1, "3,5") for r in range(2)] == ["3", "5"]
    with pytest.raises(EngineError, match="lower data_parallel_size"):
        replica_devices(1, 2, "0,1,2")


def test_the_endpoint_engine_asks_for_and_reads_prompt_logprobs() -> None:
    """The termination probe's `score_tail` through a server: vLLM's `prompt_logprobs` extension,
    keyed by token id as a string in JSON; a server without it is a clear error."""
    import httpx

    from length_control.engine import OpenAIEngine
    from length_control.recipe import OpenAIOptions

    bodies = []

    def server(request: httpx.Request, with_logprobs: bool = True) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        prompt = body["prompt"]
        logprobs = [None] + [{str(token): {"logprob": -0.5 * i, "rank": 1}} for i, token in enumerate(prompt[1:], 1)]
        choice = {"token_ids": [7], "finish_reason": "length"}
        if body.get("prompt_logprobs") == 0 and with_logprobs:
            choice["prompt_logprobs"] = logprobs
        return httpx.Response(200, json={"choices": [choice]})

    options = OpenAIOptions(endpoints=["http://server/v1"], model="m", max_retries=0)
    request = {"key": "p#0", "prompt_token_ids": [5, 6, 8, 9], "max_tokens": 1, "seed": 0, "score_tail": 2}
    with OpenAIEngine(options, transport=httpx.MockTransport(server)) as engine:
        scored, plain = engine.generate([request, {**request, "key": "p#1", "score_tail": None}])
    assert scored["tail_logprobs"] == [-1.0, -1.5] and "tail_logprobs" not in plain
    assert bodies[0]["prompt_logprobs"] == 0 and "prompt_logprobs" not in bodies[1]
    without = httpx.MockTransport(lambda r: server(r, with_logprobs=False))
    with OpenAIEngine(options, transport=without) as engine, pytest.raises(EngineError, match="no prompt_logprobs"):
        engine.generate([request])
