"""The 14B recipe's dry run renders every command and config, and Axolotl accepts the
rendered config for the GPUs it targets."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from length_control import demo, evaluate, pipeline
from length_control.envs import engine_bin, engine_environ
from length_control.recipe import load_recipe

from conftest import REPO, H100x8

ONE_H200 = {**H100x8, "n_gpu": 1}


def _axolotl_check(config: Path, capabilities: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(engine_bin("axolotl")),
            "-m",
            "length_control.axolotl_check",
            str(config),
            "--capabilities",
            json.dumps(capabilities),
        ],
        capture_output=True,
        text=True,
        env=engine_environ(),
        timeout=600,
    )


@pytest.fixture
def plan(tmp_path: Path) -> tuple[str, Path]:
    recipe = load_recipe(REPO / "recipes" / "qwen3-14b-30k.yaml", [f"output_dir={tmp_path}"])
    return pipeline.dry_run(recipe, check_axolotl=False), tmp_path  # Axolotl's check: the engine tests below


def test_dry_run_renders_every_stage(plan) -> None:
    text, out = plan
    for stage in (
        "[generate]",
        "[splice]",
        "[train seed 0]",
        "[eval-before]",
        "[eval-after seed 0]",
        "[eval-forced]",
        "[report]",
    ):
        assert stage in text
    assert "prompts: " in text
    # data parallel 4 x tensor parallel 2: four engines, each on its own two devices
    for devices in ("0,1", "2,3", "4,5", "6,7"):
        assert f"CUDA_VISIBLE_DEVICES={devices} " in text
    assert '"tensor_parallel_size": 2' in text and '"max_model_len": 40960' in text
    assert "max_tokens 30000" in text
    assert (
        f"axolotl train {out / 'train' / 'seed-0' / 'axolotl.yaml'} --launcher accelerate -- --num_processes 8" in text
    )
    assert f"rendered axolotl.yaml: {out / 'dry-run' / 'axolotl-seed-0.yaml'}" in text
    config = yaml.safe_load((out / "dry-run" / "axolotl-seed-0.yaml").read_text())
    assert config["base_model"] == "Qwen/Qwen3-14B" and config["sequence_len"] == 32768
    assert "sequence_len 32768: fixed by the recipe" in text
    assert config["excess_length_strategy"] == "raise" and config["fsdp_version"] == 2
    # kernels that install from PyPI as wheels: PyTorch SDPA and Liger, no flash-attn or Cut Cross-Entropy fork
    assert config["attn_implementation"] == "sdpa" and config["sample_packing"]
    assert config["plugins"] == ["axolotl.integrations.liger.LigerPlugin"]
    assert config["liger_fused_linear_cross_entropy"] and not config.get("cut_cross_entropy")
    assert not list(out.glob("generate*")) and not (out / "train").exists()  # nothing ran


def test_the_after_arm_evaluates_the_model_training_leaves(tmp_path: Path) -> None:
    """A LoRA template leaves its merged model: the after arm's plan must name that folder."""
    for template, leaves in (("qwen3-14b-lora-32k.yaml", "model/merged"), ("qwen3-14b-fsdp2-32k.yaml", "model")):
        recipe = load_recipe(
            REPO / "recipes" / "qwen3-14b-30k.yaml",
            [f"output_dir={tmp_path}", f"train.template=../axolotl_configs/{template}"],
        )
        plan = evaluate.plan(recipe, "after", 0)
        assert plan.model == str(tmp_path / "train" / "seed-0" / leaves), template


@pytest.mark.engine
def test_axolotl_accepts_the_rendered_14b_config(plan) -> None:
    _, out = plan
    result = _axolotl_check(out / "dry-run" / "axolotl-seed-0.yaml", H100x8)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.engine
def test_the_gpu_demo_renders_for_one_gpu(tmp_path: Path) -> None:
    """What `./run.sh demo` runs on a GPU machine, up to the launch: the engine's share of the GPU, three
    seeds beside it, and a training config Axolotl accepts for one H200."""
    recipe = demo.resolve(load_recipe(REPO / "recipes" / "demo-gpu.yaml", [f"output_dir={tmp_path}"]), build=False)
    text = pipeline.dry_run(recipe, check_axolotl=False)
    assert '"gpu_memory_utilization": 0.3' in text and '"max_model_len": 176' in text
    # The demo's SFT mix is the policy build's: measured when built (a cached build), else a stated lower bound.
    length = re.search(
        r"sequence_len (\d+): the longest row stage 2 can write: spliced rows <= the engine's "
        r"context \(176\)(, SFT-mix rows <= (\d+) tokens|; the SFT mix is not on this machine yet)",
        text,
    )
    assert length and int(length[1]) == -(-max(176, int(length[3] or 0)) // 64) * 64, text
    assert "CUDA_VISIBLE_DEVICES" not in text  # one engine, on the GPU vLLM finds
    for seed in (0, 1, 2):
        assert f"[train seed {seed}]" in text
    result = _axolotl_check(tmp_path / "dry-run" / "axolotl-seed-0.yaml", ONE_H200)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.engine
def test_the_dry_run_stops_a_typo_in_the_training_overrides(tmp_path: Path) -> None:
    """Axolotl drops a key it does not know and trains with its default; the dry run refuses it first."""
    result = subprocess.run(
        [
            str(engine_bin("vllm", "length-control")),
            "run",
            str(REPO / "recipes" / "demo-cpu.yaml"),
            "--dry-run",
            f"output_dir={tmp_path / 'typo'}",
            "train.overrides={micro_batch_sise: 1, num_epochs: 1}",
        ],
        capture_output=True,
        text=True,
        env=engine_environ(),
        timeout=600,
    )
    said = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in said
    assert "unknown Axolotl key(s): micro_batch_sise (did you mean micro_batch_size?)" in said
    assert "fix train.overrides or the template" in said
    recipe = load_recipe(REPO / "recipes" / "qwen3-14b-30k.yaml", [f"output_dir={tmp_path / '14b'}"])
    assert "1 rendered config(s) pass Axolotl's schema, unknown keys included" in pipeline.dry_run(recipe)
