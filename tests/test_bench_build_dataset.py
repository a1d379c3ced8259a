"""bench/build_dataset.py at its smoke size, on a scripted run of two traces: the same path as the full
bench (the run's case-1 samples written as a finished generate folder, `length-control splice` on it as a
command, the chat rows Axolotl would read, the text round trip on the real tokenizers), in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from length_control import generate
from length_control.engines.fake import ScriptedEngine, transcripts
from length_control.recipe import load_recipe

from conftest import REPO
from test_stages_fake import CUT, LONG, Ids, make_recipe


def test_the_smoke_size_runs_our_build_on_a_finished_run(tmp_path: Path, tokenizer_policy: Path) -> None:
    make_recipe(tmp_path, tokenizer_policy, [LONG, CUT])  # LONG runs past B (case 1), CUT closes within it
    recipe = load_recipe(tmp_path / "recipe.yaml", ["generation.answer_max_tokens=16"])  # room for LONG's answer
    generate.run(generate.plan(recipe), engine=ScriptedEngine(transcripts(Ids(tokenizer_policy).script())))

    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "build_dataset.py"),
            "--recipe",
            str(tmp_path / "recipe.yaml"),
            "--smoke",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for thinking in ("14", "30,000"):  # the run's own length, and stretched
        assert any(
            line.startswith(f"1 samples of {thinking} thinking tokens (1 case-1 traces x 1, ")
            and "axolotl preprocess not run (--smoke)" in line
            for line in lines
        ), done.stdout
    assert "2 samples of >= 600 characters of math and code thinking (seed 0)" in done.stdout
    assert [line.split()[0] for line in lines[-4:]] == ["qwen3", "deepseek-v3", "llama-3.1", "gpt-oss"]
