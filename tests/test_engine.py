"""Engine plumbing that needs no engine: per-request seeds, device slices, and the
endpoint engine against an in-process transport."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import pytest

from length_control.engines.openai import OpenAIEngine
from length_control.engines.protocol import EngineError
from length_control.engines.recipe_engine import SharedEngine
from length_control.engines.requests import request_seed
from length_control.engines.vllm import VLLMEngine, replica_devices, same_architecture
from length_control.recipe import VLLMOptions, load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_request_seeds_are_stable_and_distinct() -> None:
    seeds = {request_seed(0, f"p{i}", s) for i in range(200) for s in range(4)}
    assert len(seeds) == 800
    assert request_seed(0, "p1", 0) == request_seed(0, "p1", 0) != request_seed(1, "p1", 0)
    assert all(0 <= seed < 2**31 for seed in seeds)


def test_replicas_get_their_own_devices() -> None:
    assert [replica_devices(r, 2, None) for r in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert [replica_devices(r, 1, "3,5") for r in range(2)] == ["3", "5"]
    with pytest.raises(EngineError, match="lower data_parallel_size"):
        replica_devices(1, 2, "0,1,2")


def test_the_endpoint_engine_asks_for_and_reads_prompt_logprobs() -> None:
    """The termination probe's `score_tail` through a server: vLLM's `prompt_logprobs` extension,
    keyed by token id as a string in JSON; a server without it is a clear error."""
    import httpx

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


def test_the_endpoint_engine_keeps_its_limit_in_flight_and_takes_follow_ups() -> None:
    """`max_concurrency` requests at once, never more; a request added mid-stream is served; `generate`
    returns results in request order whatever order they finish in."""
    import asyncio
    import random

    import httpx

    from length_control.recipe import OpenAIOptions

    in_flight, most = 0, 0

    async def server(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(random.Random(request.content).random() / 1000)  # finish out of order
        in_flight -= 1
        body = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"token_ids": body["prompt"][-1:], "finish_reason": "stop"}]})

    options = OpenAIOptions(endpoints=["http://a/v1", "http://b/v1"], model="m", max_concurrency=16)
    requests = [{"key": f"p{i}", "prompt_token_ids": [i], "max_tokens": 1, "seed": i} for i in range(200)]
    with OpenAIEngine(options, transport=httpx.MockTransport(server)) as engine:
        assert [r["output_token_ids"] for r in engine.generate(requests)] == [[i] for i in range(200)]
        feed, keys = deque(requests[:3]), []
        for result in engine.stream(feed):
            keys.append(result["key"])
            if result["key"] == "p1":
                feed.appendleft({**requests[1], "key": "p1/answer", "prompt_token_ids": [1, 99]})
    assert most == 16
    assert sorted(keys) == ["p0", "p1", "p1/answer", "p2"]


def _checkpoint(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, **config}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_a_checkpoint_of_the_same_shape_and_tokenizer_can_be_swapped_in(tmp_path: Path) -> None:
    policy = _checkpoint(tmp_path / "policy", _name_or_path="stage-1", transformers_version="5.16.1", use_cache=True)
    (policy / "generation_config.json").write_text('{"eos_token_id": 2}')
    (policy / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "local_files_only": false}')
    # As Axolotl saves a full fine-tune: other bookkeeping, the same model.
    trained = _checkpoint(tmp_path / "trained", _name_or_path="stage-2", torch_dtype="float32", use_cache=False)
    (trained / "generation_config.json").write_text('{"do_sample": true, "eos_token_id": [2]}')
    (trained / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "local_files_only": true}')
    assert same_architecture(policy, trained)
    other_eos = _checkpoint(tmp_path / "other-eos")
    (other_eos / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    assert not same_architecture(_checkpoint(tmp_path / "plain"), other_eos)
    assert not same_architecture(policy, _checkpoint(tmp_path / "wider", hidden_size=128))
    retokenized = _checkpoint(tmp_path / "retokenized")
    (retokenized / "tokenizer.json").write_text('{"added_tokens": []}')
    assert not same_architecture(policy, retokenized)
    stops = _checkpoint(tmp_path / "stops", _name_or_path="stage-1", use_cache=True)
    (stops / "tokenizer_config.json").write_text((policy / "tokenizer_config.json").read_text())
    (stops / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    assert not same_architecture(policy, stops)
    assert not same_architecture(policy, tmp_path / "missing")
    assert not same_architecture(policy, "Qwen/Qwen3-14B")  # a Hub id: nothing to compare


class _Loadable:
    """An engine that swaps weights as vLLM's does (same architecture only): records starts, swaps and closes."""

    def __init__(self, model: str, log: list) -> None:
        self.model, self.log = model, log

    def __enter__(self):
        self.log.append(("start", Path(self.model).name))
        return self

    def close(self) -> None:
        self.log.append(("close", Path(self.model).name))

    def swap_weights(self, model: str) -> bool:
        if not same_architecture(self.model, model):
            return False
        self.log.append(("load", Path(model).name))
        self.model = model
        return True

    def stream(self, requests, *, desc: str = ""):
        while requests:
            request = requests.popleft()
            yield {"key": request["key"], "model": Path(self.model).name}


def test_the_shared_engine_swaps_weights_when_it_can_and_restarts_when_it_cannot(tmp_path, monkeypatch) -> None:
    from length_control.engines import recipe_engine

    log: list = []
    monkeypatch.setattr(recipe_engine, "open_engine", lambda recipe, model, log_name: _Loadable(model, log))
    policy = _checkpoint(tmp_path / "policy")
    seeds = [_checkpoint(tmp_path / f"seed-{s}", _name_or_path=f"seed {s}") for s in (0, 1)]
    merged = _checkpoint(tmp_path / "merged", hidden_size=128)
    shared = SharedEngine(recipe=None, model=str(policy), log_name="engine")
    assert log == []  # nothing starts before the first request
    for model in (policy, policy, *seeds, merged):
        [result] = shared.serving(model).generate([{"key": "k"}], desc="eval")
        assert result["model"] == model.name  # every request runs on the model its stage asked for
    shared.serving(seeds[0]).generate([], desc="nothing to do")  # an up-to-date stage starts nothing
    shared.close()
    assert log == [
        ("start", "policy"),
        ("load", "seed-0"),
        ("load", "seed-1"),
        ("close", "seed-1"),
        ("start", "merged"),
        ("close", "merged"),
    ]


def test_vllm_declines_a_swap_to_another_architecture_before_touching_its_workers(tmp_path: Path) -> None:
    policy = _checkpoint(tmp_path / "policy")
    engine = VLLMEngine(policy, max_model_len=64, options=VLLMOptions(), log_path=tmp_path / "vllm.log")
    assert not engine.swap_weights(_checkpoint(tmp_path / "merged", hidden_size=128))  # not started: no worker asked


def test_generic_code_reads_the_engine_options_of_the_kind_the_recipe_names() -> None:
    """The endpoint engine does not inherit the offline engine's settings (`engine.vllm`), nor vice versa."""
    from length_control.engines import recipe_engine

    vllm_settings = ["engine.vllm.max_model_len=50000", "engine.vllm.keep_during_training=true"]
    offline = load_recipe(REPO / "recipes" / "demo-cpu.yaml", vllm_settings)
    servers = load_recipe(
        REPO / "recipes" / "demo-cpu.yaml",
        [*vllm_settings, "engine.kind=openai", "engine.openai={endpoints: ['http://a/v1'], model: m}"],
    )
    assert recipe_engine.model_len(offline) == 50000
    assert recipe_engine.model_len(servers) == servers.context_limit < 50000
    assert recipe_engine.model_len_setting(offline) == "engine.vllm.max_model_len"
    assert "context_limit" in recipe_engine.model_len_setting(servers)
    assert recipe_engine.runs_on_job_devices(offline) and not recipe_engine.runs_on_job_devices(servers)
    assert recipe_engine.stays_up_during_training(offline)
    closed = load_recipe(REPO / "recipes" / "demo-cpu.yaml", ["engine.vllm.keep_during_training=false"])
    assert not recipe_engine.stays_up_during_training(closed)
    assert isinstance(recipe_engine.open_engine(servers, "any", log_name="x"), OpenAIEngine)
    assert isinstance(recipe_engine.open_engine(offline, "any", log_name="x"), VLLMEngine)


def test_engines_go_online_only_for_a_model_named_by_its_hub_id(monkeypatch) -> None:
    from length_control.envs import engine_environ

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    assert engine_environ()["HF_HUB_OFFLINE"] == "1"  # local folders: never a Hub lookup
    assert "HF_HUB_OFFLINE" not in engine_environ(online=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert engine_environ(online=True)["HF_HUB_OFFLINE"] == "1"  # the user's setting wins


def test_the_endpoint_engine_sends_every_sampling_field_the_offline_worker_takes() -> None:
    import httpx

    from length_control.engines.requests import SAMPLING_KEYS
    from length_control.recipe import OpenAIOptions

    bodies = []

    def server(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"token_ids": [7], "finish_reason": "stop"}]})

    sampling = {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.05,
        "stop_token_ids": [2, 9],
        "thinking_token_budget": 126,
    }
    assert set(sampling) == set(SAMPLING_KEYS)
    request = {"key": "p#0", "prompt_token_ids": [5, 6], "max_tokens": 4, "seed": 3, **sampling}
    options = OpenAIOptions(endpoints=["http://server/v1"], model="m", max_retries=0)
    with OpenAIEngine(options, transport=httpx.MockTransport(server)) as engine:
        engine.generate([request, {**request, "key": "p#1", "stop_token_ids": None}])
    assert {k: bodies[0][k] for k in sampling} == sampling
    assert "stop_token_ids" not in bodies[1]  # unset stays unset: the server's default
