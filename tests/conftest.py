"""Shared fixtures. Engines (vLLM, Axolotl) always run in subprocesses in their
own environments: importing either changes the importing process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The shipped recipes, sources and templates, copied so that tests may edit them."""
    for folder in ("recipes", "prompts_sources", "axolotl_configs"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


@pytest.fixture(scope="session")
def tokenizer_policy(tmp_path_factory) -> Path:
    """The demo tokenizer in a model folder (no weights): all a stage needs of a policy when the engine
    is scripted, and all the preflight loads."""
    import json

    from length_control.demo import task as demo_task
    from length_control.demo.model import build_tokenizer
    from length_control.recipe import DemoModelSpec

    problems = demo_task.make_problems(200, seed=0, prefix="tok")
    conversations = [demo_task.sft_conversation(p, "<think>", "</think>") for p in problems]
    folder = tmp_path_factory.mktemp("policy")
    build_tokenizer(conversations, DemoModelSpec(), folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return folder


def demo_recipe(overrides: list[str], profile: str = "cpu"):
    """A profile's shipped demo recipe with `overrides`, its demo policy built (or taken from the cache)."""
    from length_control import demo
    from length_control.recipe import load_recipe

    return demo.resolve(load_recipe(REPO / "recipes" / f"demo-{profile}.yaml", overrides))


# What the 14B templates target: 8 Hopper GPUs (Axolotl's capabilities, for its schema check).
H100x8 = {"bf16": True, "fp8": True, "tf32": True, "n_gpu": 8, "compute_capability": "sm_90"}


def fake_gpu(folder: Path, name: str, driver: str) -> dict[str, str]:
    """A PATH whose nvidia-smi lists one GPU with this driver, as the real one prints it."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        f'#!/bin/sh\nif [ "$1" = -L ]; then echo "GPU 0: {name} (UUID: GPU-0)"; '
        f'else echo "{name}, {driver}, 81559 MiB"; fi\n'
    )
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def require_gpu_stack() -> None:
    """Skip unless the gpu profile's environments are set up; fail instead when LC_GPU_STACK=1 asks for them."""
    from length_control.envs import envs_dir

    missing = [engine for engine in ("vllm", "axolotl") if not (envs_dir("gpu") / engine / ".stamp").is_file()]
    if not missing:
        return
    why = f"the gpu profile's {' and '.join(missing)} environment(s) are not set up in {envs_dir('gpu')}"
    if os.environ.get("LC_GPU_STACK") == "1":
        pytest.fail(f"{why}, and LC_GPU_STACK=1 asks for this tier: LC_PROFILE=gpu ./run.sh setup")
    pytest.skip(f"{why} (LC_GPU_STACK=1 ./run.sh test builds them)")


def on_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """On an xdist worker: OpenMP threads that sleep when they wait, for the worker and every engine it
    starts. Two workers' torch and vLLM threads share the cores; spinning threads (OpenMP's default)
    then take the cores from the threads with work, and a 6-minute policy build took over 20."""
    if on_xdist_worker(config):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The longest test files (on the 2-core CI machine, from a fresh clone: the demo loop 17 min with its
# policy build, the four tokenizer families 11 min, then test_generate ~6 and test_train ~5), started
# first. xdist queues the third file behind the demo loop (a one-test file) at once; the others go to
# whichever worker is free. Left in name order, test_train came last and ran alone for 8 minutes.
LONGEST_FIRST = ("test_end_to_end.py", "test_families.py", "test_generate.py", "test_train.py", "test_gpu_stack.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In one process: fast unit tests first, engine tests last. On workers, which take whole files in this
    order: the longest files first, then the other engine tests, and the unit tests fill in at the end."""

    def engine(item: pytest.Item) -> bool:
        return item.get_closest_marker("engine") is not None

    if not on_xdist_worker(config):
        items.sort(key=engine)
        return
    longest = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (longest.get(item.path.name, len(longest)), not engine(item)))
