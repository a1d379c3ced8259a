"""Every bench at its smoke size (`--smoke`): its own code on tiny inputs, down to the figures it prints last.

A bench nothing runs rots (bench/build_dataset.py once crashed on a manifest key for months). These run
each bench as a user does, a script in a subprocess, and check its last lines: in seconds on the CPU where
the bench needs no engine, in the engine tier where it measures vLLM itself (its engine start, its
thinking budget, the generate stage against a bare vLLM script), which the scripted engine cannot stand in
for. bench/build_dataset.py, bench/demo_robustness.py and bench/stage1_rows.py have their smoke tests in
their own files; bench/gpu_smoke.sh is itself the GPU tier's smoke test (tests/test_gpu_smoke.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def bench(name: str, *args: str, timeout: int = 300) -> list[str]:
    """The bench's stdout lines, once it exited 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.splitlines()


def test_grade_parallel() -> None:
    lines = bench("grade_parallel.py", "--smoke")
    assert lines[0].startswith("3 samples, 5 test cases run, 2 right; ")  # two in three right: 2 + 2 + 1 cases
    assert lines[-1].startswith("serial / parallel: ") and "pure-CPU reference: " in lines[-1]


def test_text_round_trip() -> None:
    lines = bench("text_round_trip.py", "--smoke")
    assert lines[-6].startswith("4 samples of >= 600 characters of math and code thinking (seed 0)")
    assert [line.split()[0] for line in lines[-4:]] == ["qwen3", "deepseek-v3", "llama-3.1", "gpt-oss"]
    assert all(line.count("%") == 4 for line in lines[-4:])


def test_splice_memory() -> None:
    lines = bench("splice_memory.py", "--smoke")
    assert lines[0].startswith("splice: 3 traces x 200 tokens: 3 rows in ")
    assert lines[-2].startswith("peak memory of the stage-2 build, 6 / 3 traces: ")
    assert lines[-1].startswith("peak memory of generate's bookkeeping, 6 / 3 traces: ")


def test_endpoint_client() -> None:
    lines = bench("endpoint_client.py", "--smoke")
    assert lines[0] == "stub server (instant replies, own process): 64 requests a round, 1 rounds"
    assert lines[-2] == "token ids: 0 of 64 request pairs differ (engine vs bare, same round)"
    assert lines[-1].startswith("endpoint engine / bare async client: median ")


@pytest.mark.engine
def test_engine_mode() -> None:
    lines = bench("engine_mode.py", "--smoke", timeout=600)
    assert lines[-3] == "same token ids on both sides: True"
    assert lines[-2].startswith("start: three processes ") and lines[-1].startswith("generate: three processes ")


@pytest.mark.engine
def test_generate_overhead() -> None:
    lines = bench("generate_overhead.py", "--smoke", timeout=600)
    assert lines[-3].startswith("8 trace requests per side, B = 640, shards of 32; ")
    assert lines[-2].startswith("generation phase, generate stage / bare vLLM script: median ")
    assert lines[-1].startswith("whole run, generate stage / bare vLLM script: median ")


@pytest.mark.engine
def test_thinking_budget() -> None:
    lines = bench("thinking_budget.py", "--smoke", timeout=600)
    assert lines[-4].startswith("8 prompts, budget 126, ")
    assert lines[-1].startswith("one pass / two passes: ")
