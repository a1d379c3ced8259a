"""ruff over the package, the tests and the benches (pyproject.toml's [tool.ruff]): no lint finding, and the
code as `ruff format` writes it. The ruff is the environment's own, the release envs/<profile>/vllm.lock pins."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import pytest

from conftest import REPO


def _pinned() -> str:
    return re.search(r"^ruff==(\S+)", (REPO / "envs" / "cpu" / "vllm.lock").read_text(), re.MULTILINE)[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    """`ruff ARGS` in the repository, failing (not skipping: CI must run it) where the environment lacks the pin."""
    try:
        installed = importlib.metadata.version("ruff")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != _pinned():
        have = f"ruff {installed}" if installed else "no ruff"
        pytest.fail(
            f"the environment {sys.prefix} has {have}; envs/<profile>/vllm.lock pins ruff {_pinned()}: "
            "./run.sh setup installs it"
        )
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_ruff_check_finds_nothing() -> None:
    result = _ruff("check", "--output-format", "full")
    assert result.returncode == 0, f"ruff check (fix with `ruff check --fix`):\n{result.stdout}{result.stderr}"


def test_the_code_is_formatted() -> None:
    result = _ruff("format", "--check", "--diff")
    assert result.returncode == 0, f"ruff format would change (run `ruff format`):\n{result.stdout}{result.stderr}"
