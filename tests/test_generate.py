"""Trace generation with real vLLM and the demo policy: the trace contract, both cases
of closing at the budget, resume after SIGKILL, and the OpenAI endpoint engine
against a real vLLM server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from length_control import contracts, demo, generate, splice
from length_control.engines.openai import OpenAIEngine
from length_control.engines.protocol import EngineError
from length_control.engines.recipe_engine import SharedEngine
from length_control.envs import engine_bin, engine_environ
from length_control.policy import load_tokenizer, policy_path
from length_control.recipe import OpenAIOptions, load_recipe
from length_control.think import ThinkTokens

from conftest import REPO

pytestmark = pytest.mark.engine

RECIPE = REPO / "recipes" / "demo-cpu.yaml"
# A budget of 104 thinking tokens (105 output tokens with <think>) cuts long counts in the
# thinking (case 1) and the longest short counts (14 lines: </think> at token 100) in their
# answer (case 2); prompt + the first pass + the forced close stays inside the context limit (176).
OVERRIDES = ["budget=104", "generation.shard_size=48"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    recipe = demo.resolve(load_recipe(RECIPE, [*OVERRIDES, f"output_dir={tmp_path_factory.mktemp('gen-a')}"]))
    generate.run(generate.plan(recipe))
    return recipe.output_dir / "generate"


@pytest.fixture(scope="module")
def recipe_a(run_a: Path):
    return demo.resolve(load_recipe(RECIPE, [*OVERRIDES, f"output_dir={run_a.parent}"]))


def test_traces_follow_the_contract(run_a: Path, recipe_a) -> None:
    tokenizer = load_tokenizer(policy_path(recipe_a.model))
    think = ThinkTokens(tokenizer, recipe_a.model.think)
    prompts = {p["id"]: p for p in generate.load_prompts(recipe_a)}
    traces = contracts.read_shards(run_a, "traces")
    assert len(traces) == len(prompts) * recipe_a.generation.samples_per_prompt
    assert len({t["seed"] for t in traces}) == len(traces)  # one seed per request
    for trace in traces:
        assert set(trace) == {
            "prompt_id",
            "sample",
            "prompt_token_ids",
            "output_token_ids",
            "finish_reason",
            "think_close",
            "seed",
        }
        messages = prompts[trace["prompt_id"]]["messages"]
        chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert trace["prompt_token_ids"] == chat
        output = trace["output_token_ids"]
        first_pass = think.first_pass_tokens(recipe_a.budget)  # <think> and B thinking tokens
        assert first_pass == recipe_a.budget + 1 and len(output) <= first_pass
        assert trace["finish_reason"] in ("stop", "length")
        if trace["finish_reason"] == "length":
            assert len(output) == first_pass and think.budget_cut(output, recipe_a.budget) == first_pass
        if trace["think_close"] is not None:
            assert output[trace["think_close"]] == think.close_ids[0]
            assert think.close_ids[0] not in output[: trace["think_close"]]
        else:
            assert think.close_ids[0] not in output


def test_both_cases_are_closed_and_answered(run_a: Path, recipe_a) -> None:
    tokenizer = load_tokenizer(policy_path(recipe_a.model))
    forced = tokenizer.encode(recipe_a.model.think.forced_close, add_special_tokens=False)
    think_close = tokenizer.encode(recipe_a.model.think.close, add_special_tokens=False)
    traces = {(t["prompt_id"], t["sample"]): t for t in contracts.read_shards(run_a, "traces")}
    answers = contracts.read_shards(run_a, "answers")
    overrun = {key for key, t in traces.items() if t["finish_reason"] == "length"}
    assert {(a["prompt_id"], a["sample"]) for a in answers} == overrun
    cases = {1: 0, 2: 0}
    for answer in answers:
        trace = traces[(answer["prompt_id"], answer["sample"])]
        cases[answer["case"]] += 1
        if answer["case"] == 1:
            assert trace["think_close"] is None and answer["close_token_ids"] == forced
        else:
            start = trace["think_close"]
            assert start is not None
            assert answer["close_token_ids"] == trace["output_token_ids"][start : start + len(think_close)]
        assert 0 < len(answer["answer_token_ids"]) <= recipe_a.generation.answer_max_tokens
    assert cases[1] > 0 and cases[2] > 0, cases
    manifest = (run_a / "manifest.json").read_text()
    assert f'"case1": {cases[1]}' in manifest and f'"case2": {cases[2]}' in manifest
    # Stage 2 places the termination from these ids alone.
    assert contracts.read_termination(run_a) == ThinkTokens(tokenizer, recipe_a.model.think).termination()


def test_a_rerun_skips_the_finished_stage(run_a: Path, recipe_a) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in run_a.iterdir()}
    generate.run(generate.plan(recipe_a))
    assert {p.name: p.stat().st_mtime_ns for p in run_a.iterdir()} == before


def test_sigkill_then_resume_gives_identical_files(run_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen-b"
    command = [str(engine_bin("vllm", "length-control")), "generate", str(RECIPE), *OVERRIDES, f"output_dir={out}"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=engine_environ(), start_new_session=True
    )
    second_shard = out / "generate" / "traces-00001.parquet"
    deadline = time.monotonic() + 600
    while not second_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its engine, mid-run
    process.wait()
    assert second_shard.exists() and not (out / "generate" / "manifest.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=engine_environ())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    files = sorted(p.name for p in run_a.glob("*.parquet"))
    assert files == sorted(p.name for p in (out / "generate").glob("*.parquet"))
    for name in files:
        assert (run_a / name).read_bytes() == (out / "generate" / name).read_bytes(), name


def test_traces_cut_from_a_larger_budget_are_the_ones_sampled_at_it(run_a: Path, tmp_path: Path) -> None:
    """Prefix sharing on real vLLM, as a budget sweep does it: the first passes at B = 97 cut from run_a's at
    104 (same seeded requests), then only the answers after the close at 97 generated, give the files and
    the stage-2 rows that sampling at 97 gives."""
    at = {
        name: demo.resolve(load_recipe(RECIPE, [*OVERRIDES, "budget=97", f"output_dir={tmp_path / name}"]))
        for name in ("sampled", "cut")
    }
    with SharedEngine(at["sampled"], policy_path(at["sampled"].model), log_name="prefix-sharing") as engine:
        sampled = generate.run(generate.plan(at["sampled"]), engine)
        cut = generate.run(generate.plan(at["cut"], longer=run_a), engine)
    assert cut == sampled and 0 < sampled["case1"] < sampled["traces"]
    folders = {name: recipe.output_dir / "generate" for name, recipe in at.items()}
    files = sorted(p.name for p in folders["sampled"].glob("*.parquet"))
    assert files == sorted(p.name for p in folders["cut"].glob("*.parquet"))
    for name in files:
        assert contracts.read_records(folders["cut"] / name) == contracts.read_records(folders["sampled"] / name), name
    rows = {}
    for name, recipe in at.items():
        splice.run(splice.plan(recipe))
        rows[name] = contracts.read_records(recipe.output_dir / "stage2" / "rows.parquet")
    assert rows["cut"] == rows["sampled"] and len(rows["cut"]) > sampled["case1"]


# ---------------------------------------------------------------- endpoints


async def no_wait(seconds: float) -> None:
    """The engine's backoff, without the wait."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(recipe_a, tmp_path_factory):
    """A real vLLM OpenAI server for the demo policy on 127.0.0.1."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        str(engine_bin("vllm")),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        policy_path(recipe_a.model),
        "--served-model-name",
        "demo",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "256",
    ]
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=engine_environ(VLLM_HOST_IP="127.0.0.1"),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        else:
            pytest.fail("the vLLM server did not start:\n" + log.read_text()[-3000:])
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_endpoint_engine_generates_token_ids(vllm_server: str, recipe_a) -> None:
    tokenizer = load_tokenizer(policy_path(recipe_a.model))
    requests, _ = generate.trace_requests(
        recipe_a, tokenizer, ThinkTokens(tokenizer, recipe_a.model.think), generate.load_prompts(recipe_a)[:8]
    )
    dead = f"http://127.0.0.1:{_free_port()}/v1"  # nobody listens: requests there are retried on the live one
    options = OpenAIOptions(endpoints=[dead, vllm_server], model="demo", max_concurrency=4, max_retries=2)
    with OpenAIEngine(options, sleep=no_wait) as engine:
        results = engine.generate(requests)
    assert [r["key"] for r in results] == [r["key"] for r in requests]
    for request, result in zip(requests, results):
        assert 0 < len(result["output_token_ids"]) <= request["max_tokens"]
        assert result["finish_reason"] in ("stop", "length")
        assert all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in result["output_token_ids"])

    # The termination probe's request: the log-probabilities of the prompt's last tokens. After the
    # thinking's first line, the policy's own next token is far likelier than `</think>`.
    first = results[0]
    line = first["output_token_ids"][:8]
    close = tokenizer.encode("</think>", add_special_tokens=False)
    scored = [
        {
            "key": f"score{i}",
            "prompt_token_ids": requests[0]["prompt_token_ids"] + line[:7] + [token],
            "max_tokens": 1,
            "seed": 0,
            "temperature": 0.0,
            "score_tail": 2,
        }
        for i, token in enumerate((line[7], close[0]))
    ]
    with OpenAIEngine(options, sleep=no_wait) as engine:
        own, closing = engine.generate(scored)
    assert len(own["tail_logprobs"]) == len(closing["tail_logprobs"]) == 2
    assert abs(own["tail_logprobs"][0] - closing["tail_logprobs"][0]) < 1e-3  # the same token before
    assert own["tail_logprobs"][0] <= 0.0
    assert closing["tail_logprobs"][1] < own["tail_logprobs"][1] <= 0.0


def test_endpoint_failures_surface_instead_of_dropping_samples() -> None:
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    options = OpenAIOptions(endpoints=[dead], model="demo", max_retries=2)
    request = {"key": "p#0", "prompt_token_ids": [1, 2], "max_tokens": 4, "seed": 1}
    with OpenAIEngine(options, sleep=no_wait) as engine, pytest.raises(EngineError, match="failed 3 times"):
        engine.generate([request])
