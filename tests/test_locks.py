"""The environment profiles' locks (envs/<profile>/*.lock): what set-up installs, checked without installing."""

from __future__ import annotations

import re
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


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_a_profiles_engines_agree_on_torch_transformers_and_python(profile: Path) -> None:
    locks = {engine: _pins(profile / f"{engine}.lock") for engine in ("vllm", "axolotl")}
    for package in ("torch", "transformers"):  # one torch and one tokenizer behaviour on both sides
        assert locks["vllm"][package] == locks["axolotl"][package], package
    pythons = {(profile / f"{engine}.in").read_text().count(f"# python: {want}")
               for engine in ("vllm", "axolotl") for want in ["3.11" if profile.name == "cpu" else "3.12"]}
    assert pythons == {1}


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


def test_the_gpu_locks_take_cudas_torch_and_the_templates_extras() -> None:
    vllm, axolotl = (_pins(REPO / "envs" / "gpu" / f"{engine}.lock") for engine in ("vllm", "axolotl"))
    assert vllm["torch"] == axolotl["torch"] == "2.14.0"  # PyPI's CUDA 13 build
    assert vllm["vllm"] == "0.33.0" and "flashinfer-python" in vllm
    assert axolotl["axolotl"] == "0.21.0" and "axolotl-ringmaster" in axolotl  # context parallelism
