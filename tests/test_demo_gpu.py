"""`./run.sh demo` on an NVIDIA GPU (recipes/demo-gpu.yaml in the gpu profile): the whole loop with real vLLM
and real Axolotl on the GPU, one engine start, and the report. Skipped where torch sees no GPU (every CPU
machine, CI's too); on a GPU machine `./run.sh test tests/test_demo_gpu.py -s` runs it and prints its time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from length_control import pipeline, report

from conftest import demo_recipe

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU that this environment's torch can use"),
]


def test_the_gpu_demo(tmp_path: Path) -> None:
    recipe = demo_recipe([f"output_dir={tmp_path}"], profile="gpu")
    started = time.monotonic()
    pipeline.run(recipe, echo=print)
    print(f"the GPU demo loop: {time.monotonic() - started:.0f} s (the policy built before)")
    built = report.build(recipe)
    engine_log = (tmp_path / "logs" / "engine.log").read_text()
    assert engine_log.count("Initializing a V1 LLM engine") == 1  # kept up while the seeds trained beside it
    assert engine_log.count("length-control: swapped in the weights of") == len(recipe.train.seeds)
    for name in ("demo-count", "demo-check"):
        row = built["benchmarks"][name]
        assert row["overlong_before"] > 0 and row["overlong_forced"] == 0.0
        for seed in map(str, recipe.train.seeds):
            assert row["per_seed"][seed]["overlong_after"] < row["overlong_before"]
    print((tmp_path / "report" / "report.md").read_text())
