"""The stages' logic on every engine that runs without vLLM, through the `Engine` protocol alone.

The scripted engine, and the endpoint client (`OpenAIEngine`) in front of
local HTTP servers that serve the same script (`tests/openai_server.py`:
separate processes speaking the OpenAI completions API, not `vllm serve`).
Each engine is handed to the stages behind `ProtocolOnly`, which forwards the
protocol's members and nothing else, so a stage that reached past the
protocol fails here. Every engine must write the same files, and so must
the endpoint client when one of two servers is killed mid-generation.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from length_control import evaluate, generate
from length_control.engines.fake import ScriptedEngine, transcripts
from length_control.engines.openai import OpenAIEngine
from length_control.engines.protocol import Engine, EngineError
from length_control.recipe import OpenAIOptions, load_recipe

from test_stages_fake import EVALS, Ids, make_recipe

REPO = Path(__file__).resolve().parents[1]


class ProtocolOnly:
    """An engine with the `Engine` protocol's members and no other: what a stage may use."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __enter__(self) -> ProtocolOnly:
        self._engine.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._engine.__exit__(*exc)

    def close(self) -> None:
        self._engine.close()

    def describe(self) -> list[str]:
        return self._engine.describe()

    def swap_weights(self, model) -> bool:
        return self._engine.swap_weights(model)

    def generate(self, requests, *, desc: str = "generate"):
        return self._engine.generate(requests, desc=desc)

    def stream(self, requests, *, desc: str = "generate"):
        return self._engine.stream(requests, desc=desc)


class Server:
    """One `tests/openai_server.py` process serving `script`, on a free port of 127.0.0.1."""

    def __init__(self, script: Path, *, hold_after: int | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, str(REPO / "tests" / "openai_server.py"), str(script)]
        command += ["--hold-after", str(hold_after)] if hold_after is not None else []
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("listening "), f"the server did not start: {line!r}"
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def lines(self):
        """What the server prints after it started, line by line, until it exits."""
        assert self.process.stdout is not None
        yield from self.process.stdout

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def ids(tokenizer_policy: Path) -> Ids:
    return Ids(tokenizer_policy)


@pytest.fixture(scope="module")
def script(ids: Ids, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "script.json"
    path.write_text(json.dumps([[list(context), written] for context, written in ids.script().items()]))
    return path


@pytest.fixture
def servers(script: Path):
    """Start servers with `servers(count, hold_after=...)`; every one is killed at the end."""
    started: list[Server] = []

    def start(count: int = 1, **options) -> list[Server]:
        started.extend(Server(script, **options) for _ in range(count))
        return started[-count:]

    yield start
    for server in started:
        server.kill()


def endpoint_engine(*servers: Server, max_retries: int = 0) -> OpenAIEngine:
    endpoints = [server.url for server in servers]
    options = OpenAIOptions(endpoints=endpoints, model="scripted", max_concurrency=4, max_retries=max_retries)
    return OpenAIEngine(options, sleep=no_wait)


async def no_wait(seconds: float) -> None:
    """The engine's backoff, without the wait."""


def stage_files(folder: Path) -> dict[str, bytes]:
    """A stage's output files by name; the manifest and the hidden plan also name the recipe's paths."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json" and p.name[0] != "."}


def run_stages(folder: Path, policy: Path, engine: Engine) -> dict[str, object]:
    """Generate and the forced and before arms (the probes' scoring included) of a tiny recipe on `engine`."""
    recipe = make_recipe(folder, policy, EVALS)
    with ProtocolOnly(engine) as protocol:
        summary = generate.run(generate.plan(recipe), engine=protocol)
        metrics = {arm: evaluate.run(evaluate.plan(recipe, arm), engine=protocol) for arm in ("forced", "before")}
    return {
        "summary": {key: value for key, value in summary.items() if "seconds" not in key},
        "metrics": metrics,
        "files": {name: stage_files(recipe.output_dir / name) for name in ("generate", "eval/forced", "eval/before")},
    }


def test_a_stage_sees_only_the_protocol() -> None:
    assert isinstance(ProtocolOnly(ScriptedEngine(lambda context: [])), Engine)
    assert [name for name in vars(ProtocolOnly) if not name.startswith("_")] == [
        "close",
        "describe",
        "swap_weights",
        "generate",
        "stream",
    ]


def test_generate_and_the_eval_arms_write_the_same_files_on_every_engine(
    tmp_path: Path, tokenizer_policy: Path, ids: Ids, servers
) -> None:
    scripted = run_stages(tmp_path / "scripted", tokenizer_policy, ScriptedEngine(transcripts(ids.script())))
    [server] = servers(1)
    endpoint = run_stages(tmp_path / "endpoint", tokenizer_policy, endpoint_engine(server))
    assert scripted["summary"]["case1"] == scripted["summary"]["case2"] == 1  # both cases of the close ran
    assert scripted["metrics"]["before"]["benchmarks"]["evals"]["samples"] == len(EVALS)
    assert endpoint == scripted


# ---------------------------------------------------------------- faults at the engine edge


def kill_when_holding(server: Server, held: int) -> None:
    """SIGKILL `server` once it holds `held` requests unanswered: it dies with them in flight."""
    for line in server.lines():
        if line.strip() == f"holding {held}":
            server.kill()
            return


def test_a_server_killed_mid_generation_leaves_its_requests_to_the_live_one(
    tmp_path: Path, tokenizer_policy: Path, servers, caplog
) -> None:
    """Local servers (tests/openai_server.py in front of the scripted engine, not `vllm serve`): the generate
    stage on two, one killed with requests in flight, gives the rows of a run on one healthy server."""
    overrides = ["generation.samples_per_prompt=4"]  # 12 traces (3 prompts have room) and their answers
    make_recipe(tmp_path / "healthy", tokenizer_policy, EVALS)
    make_recipe(tmp_path / "faulty", tokenizer_policy, EVALS)
    healthy_recipe = load_recipe(tmp_path / "healthy" / "recipe.yaml", overrides)
    faulty_recipe = load_recipe(tmp_path / "faulty" / "recipe.yaml", overrides)
    [healthy] = servers(1)
    with endpoint_engine(healthy) as engine:
        expected = generate.run(generate.plan(healthy_recipe), engine=engine)

    [doomed] = servers(1, hold_after=2)  # answers 2 requests, then holds every one it gets
    [live] = servers(1)
    killer = threading.Thread(target=kill_when_holding, args=(doomed, 2), daemon=True)
    killer.start()
    with caplog.at_level(logging.WARNING), endpoint_engine(doomed, live) as engine:
        summary = generate.run(generate.plan(faulty_recipe), engine=engine)
    killer.join()

    assert doomed.process.returncode == -signal.SIGKILL  # killed mid-way, with 2 requests on it
    assert f"endpoint {doomed.url} is down" in caplog.text and f"go to {live.url}" in caplog.text
    assert summary["traces"] == expected["traces"] == 12
    assert stage_files(faulty_recipe.output_dir / "generate") == stage_files(healthy_recipe.output_dir / "generate")


def test_with_every_endpoint_down_the_error_names_the_fix(servers) -> None:
    dead = servers(2)
    for server in dead:
        server.kill()
    request = {"key": "p#0", "prompt_token_ids": [1, 2], "max_tokens": 4, "seed": 1}
    with endpoint_engine(*dead, max_retries=2) as engine:
        with pytest.raises(EngineError, match="failed 3 times: every endpoint is down") as caught:
            engine.generate([request])
    assert "Start the servers again (or list running ones in engine.openai.endpoints) and rerun" in str(caught.value)
