"""bench/gpu_smoke.sh, the GPU smoke test, on a machine without a GPU: the checks that need none (the gpu
profile's imports, the training config with the GPU kernels checked by Axolotl) pass, the GPU checks are
skipped, not failed, and a broken config fails its check. Needs the gpu profile's environments
(`LC_PROFILE=gpu ./run.sh setup`, ~16 GB): skipped without them, unless LC_GPU_STACK=1 says they must be
there. No engine starts; ~2 minutes on 2 cores."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, require_gpu_stack

SCRIPT = REPO / "bench" / "gpu_smoke.sh"
GPU_CHECKS = ("policy", "train", "generate", "forced-close")

pytestmark = [pytest.mark.engine, pytest.mark.gpu_stack]


@pytest.fixture(autouse=True, scope="module")
def gpu_environments() -> None:
    require_gpu_stack()


def _has_gpu() -> bool:
    listed = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return bool(listed) and any(line.startswith("GPU ") for line in listed.stdout.splitlines())


def smoke(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, from another folder, in the gpu profile (the test session's LC_PROFILE,
    which run.sh exports, is not the script's)."""
    env = {**os.environ, "LC_PROFILE": "gpu"}
    return subprocess.run(
        [str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True, env=env, cwd=out.parent, timeout=900
    )


def lines(result: subprocess.CompletedProcess) -> dict[str, str]:
    """Each check's line, by check."""
    found = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("ok", "FAIL", "skip"):
            found[rest.strip().split(":", 1)[0]] = line
    return found


@pytest.fixture(scope="module")
def no_gpu_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("smoke") / "logs"
    # On a machine with a GPU the GPU checks would run (minutes, an engine start): this test is the other half.
    result = smoke(out, *(["--skip-gpu"] if _has_gpu() else []))
    print(result.stdout, result.stderr)
    return result, out


def test_the_checks_without_a_gpu_pass_and_the_gpu_checks_are_skipped(no_gpu_run) -> None:
    result, out = no_gpu_run
    said = lines(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert said["setup"].startswith("ok ")
    assert said["imports"].startswith("ok   imports: vllm env") and "flashinfer" in said["imports"]
    assert said["config"].startswith("ok   config: the demo's training config with bf16")
    assert said["gpu"].startswith("skip gpu: ")
    for check in GPU_CHECKS:
        assert said[check].startswith(f"skip {check}: "), said[check]
    if not _has_gpu():
        assert said["train"] == "skip train: no GPU (torch.cuda.is_available() is false)"
    assert result.stdout.splitlines()[-1].startswith("total: ")
    assert "2 ok, 0 failed, 5 skipped" in result.stdout.splitlines()[-1]
    for step in ("setup", "imports", "config"):
        assert (out / f"{step}.log").is_file()


def test_the_checked_config_has_the_gpu_kernels(no_gpu_run) -> None:
    _, out = no_gpu_run
    config = yaml.safe_load((out / "config" / "axolotl.yaml").read_text())
    assert config["bf16"] is True and config["tf32"] is True
    assert config["attn_implementation"] == "sdpa" and config["sample_packing"] is True
    assert config["plugins"] == ["axolotl.integrations.liger.LigerPlugin"]
    for kernel in ("liger_fused_linear_cross_entropy", "liger_rms_norm", "liger_glu_activation", "liger_rope"):
        assert config[kernel] is True, kernel
    assert config["max_steps"] == 10
    assert config["base_model"].endswith("/model") and "demo-models" in config["base_model"]


def test_a_broken_config_fails_its_check(tmp_path: Path) -> None:
    """A typo in a kernel's key: Axolotl would drop it and train without the kernel; the check says so."""
    out = tmp_path / "logs"
    result = smoke(out, "--only", "config", "train.overrides.liger_rms_nrom=true")
    said = lines(result)
    assert result.returncode == 1, result.stdout + result.stderr
    assert said["config"].startswith(
        "FAIL config: Axolotl rejects config/axolotl.yaml: invalid: unknown Axolotl "
        "key(s): liger_rms_nrom (did you mean liger_rms_norm?)"
    ), said["config"]
    assert said["config"].endswith(f"; log: {out / 'config.log'}")
    assert set(said) == {"setup", "config"}  # --only: no other check ran
    assert "0 ok, 1 failed, 0 skipped" in result.stdout.splitlines()[-1]


def test_a_bad_override_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = smoke(tmp_path / "logs", "--only", "config", "budget=500")
    said = lines(result)
    assert result.returncode == 1
    assert said["config"].startswith("FAIL config: ConfigError: ") and "budget = 500" in said["config"]
    assert "Traceback" not in result.stdout
