"""The engine environments that ./run.sh setup builds: real vLLM and real Axolotl,
each run in its own environment as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from length_control.envs import engine_bin, engine_environ, envs_dir

from conftest import REPO, H100x8

pytestmark = pytest.mark.engine


def _run(engine: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(engine_bin(engine)), *args], capture_output=True, text=True, env=engine_environ(), cwd=cwd, timeout=600
    )


def test_vllm_environment_imports_vllm_on_cpu_torch() -> None:
    probe = (
        "import json, torch, vllm, transformers; from vllm import SamplingParams;"
        "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__,"
        " 'transformers': transformers.__version__, 'cuda': torch.cuda.is_available(),"
        " 'thinking_budget': 'thinking_token_budget' in SamplingParams.__struct_fields__}))"
    )
    result = _run("vllm", "-c", probe)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["vllm"].startswith("0.32.0")
    assert facts["torch"] == "2.13.0+cpu" and not facts["cuda"]
    assert facts["transformers"] == "5.16.1"  # the same as Axolotl's: one tokenizer behaviour
    assert facts["thinking_budget"]


def _render(template: str, tmp_path: Path, **extra: object) -> Path:
    """Fill the keys length-control fills (a stand-in for the train stage's renderer)."""
    config = yaml.safe_load((REPO / "axolotl_configs" / template).read_text())
    config.update(
        base_model=str(tmp_path / "model"),
        datasets=[{"path": str(tmp_path / "rows.jsonl"), "ds_type": "json"}],
        output_dir=str(tmp_path / "out"),
        dataset_prepared_path=str(tmp_path / "prepared"),
        sequence_len=1024,
        excess_length_strategy="raise",
    )
    config.update(extra)
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_axolotl_validates_the_cpu_template(tmp_path: Path) -> None:
    result = _run("axolotl", "-m", "length_control.axolotl_check", str(_render("cpu-tiny.yaml", tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_axolotl_validates_the_14b_template_for_its_gpus(tmp_path: Path) -> None:
    config = _render("qwen3-14b-fsdp2-32k.yaml", tmp_path, sequence_len=32768)
    result = _run("axolotl", "-m", "length_control.axolotl_check", str(config), "--capabilities", json.dumps(H100x8))
    assert result.returncode == 0, result.stderr[-3000:]


def test_axolotl_rejects_a_bad_config(tmp_path: Path) -> None:
    config = _render("cpu-tiny.yaml", tmp_path, micro_batch_size="many")
    result = _run("axolotl", "-m", "length_control.axolotl_check", str(config))
    assert result.returncode == 1
    assert "invalid: " in result.stdout and "micro_batch_size" in result.stdout


def test_a_failure_of_the_axolotl_check_itself_is_internal_not_the_configs(tmp_path: Path) -> None:
    """Axolotl moved a name the check reads (as 0.21 did with AxolotlInputConfigBase): exit 3 with the versions,
    never 'invalid', and the dry run reports a bug of ours, not the user's template."""
    config = _render("cpu-tiny.yaml", tmp_path)
    probe = (
        "import sys, axolotl.utils.config as c\n"
        "def moved():\n    raise AttributeError('merge_input_args moved')\n"
        "c.merge_input_args = moved\n"
        "from length_control import axolotl_check\n"
        "sys.exit(axolotl_check.main([sys.argv[1]]))\n"
    )
    result = _run("axolotl", "-c", probe, str(config))
    assert result.returncode == 3, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{config}: internal: AttributeError: merge_input_args moved (axolotl 0.19.0, torch 2.13.0")


def test_the_dry_run_reports_an_internal_check_failure_as_a_bug(tmp_path: Path, monkeypatch) -> None:
    from length_control import train

    config = tmp_path / "axolotl.yaml"
    said = f"{config}: internal: AttributeError: gone (axolotl 9.9, torch 9.9, transformers 9.9)\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 3, said, ""))
    with pytest.raises(train.TrainError, match="failed on its own, not on the config"):
        train.check_configs([config])


def test_axolotl_cli_runs() -> None:
    result = subprocess.run(
        [str(engine_bin("axolotl", "axolotl")), "--help"], capture_output=True, text=True, env=engine_environ()
    )
    assert result.returncode == 0 and "train" in result.stdout


def test_second_setup_changes_nothing() -> None:
    stamps = {name: (envs_dir() / name / ".stamp").stat().st_mtime_ns for name in ("vllm", "axolotl")}
    result = subprocess.run(
        ["bash", str(REPO / "run.sh"), "setup"], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    assert "setting up" not in result.stderr  # nothing was (re)installed
    assert {name: (envs_dir() / name / ".stamp").stat().st_mtime_ns for name in stamps} == stamps


@pytest.mark.parametrize("engine", ["vllm", "axolotl"])
def test_every_engine_name_the_toolkit_calls_exists(engine: str) -> None:
    """The same lookup as the gpu-stack tier's, in this profile's releases (tests/api_surface.py)."""
    result = _run(engine, str(REPO / "tests" / "api_surface.py"), engine, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
