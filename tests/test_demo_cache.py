"""The demo policy's cache is verified on use: a build whose files no longer match its build.json (a flipped
byte, a missing file), or whose build.json predates the record, is rebuilt with a line naming why. On a
stand-in builder that writes a small folder as the real one lays it out (the real build takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from length_control import demo
from length_control.demo import cache, model
from length_control.recipe import DemoModelSpec

SPEC = DemoModelSpec()


@pytest.fixture
def builds(tmp_path: Path, monkeypatch) -> list[Path]:
    """Where the stand-in builder built, one entry per build, in a cache of the test's own."""
    monkeypatch.setenv("LC_CACHE_DIR", str(tmp_path / "cache"))
    built = []

    def build(spec: DemoModelSpec, out: Path) -> dict:
        (out / "model").mkdir(parents=True)
        (out / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (out / "model" / "config.json").write_text('{"model_type": "qwen2"}')
        (out / "stage1_sft.parquet").write_bytes(b"PAR1")
        summary = {"spec": spec.model_dump(), "parameters": 1}
        (out / "build.json").write_text(json.dumps(summary))
        built.append(out)
        return summary

    monkeypatch.setattr(model, "build", build)
    return built


def test_a_build_records_its_files_and_is_reused_while_they_match(builds: list[Path], capsys) -> None:
    folder = cache.cached_build(SPEC)
    assert folder == model.build_folder(SPEC) and len(builds) == 1
    recorded = json.loads((folder / "build.json").read_text())
    assert recorded["parameters"] == 1  # the builder's summary, kept
    assert sorted(recorded["files"]) == ["model/config.json", "model/model.safetensors", "stage1_sft.parquet"]
    assert cache.cached_build(SPEC) == folder and len(builds) == 1
    assert capsys.readouterr().err == ""


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_the_record(folder: Path) -> None:
    build = json.loads((folder / "build.json").read_text())
    del build["files"]
    (folder / "build.json").write_text(json.dumps(build))


@pytest.mark.parametrize(
    "damage, why",
    [
        (
            lambda folder: _flip_a_byte(folder / "model" / "model.safetensors"),
            "model/model.safetensors does not match the sha256 its build.json records",
        ),
        (lambda folder: (folder / "stage1_sft.parquet").unlink(), "stage1_sft.parquet is missing"),
        (
            lambda folder: (folder / "model" / "adapter_config.json").write_text("{}"),
            "model/adapter_config.json is not in its build.json",
        ),
        (_drop_the_record, "its build.json records no file hashes (built before they were recorded)"),
        (lambda folder: (folder / "build.json").write_text("{"), "its build.json is unreadable"),
    ],
)
def test_a_build_that_does_not_match_its_record_is_rebuilt_with_a_line(
    builds: list[Path], capsys, damage, why: str
) -> None:
    folder = cache.cached_build(SPEC)
    damage(folder)
    assert cache.cached_build(SPEC) == folder and len(builds) == 2
    assert capsys.readouterr().err == f"demo policy {folder}: {why}: rebuilding it\n"
    assert cache.why_untrusted(folder) is None


def test_a_recipe_resolves_to_the_verified_build(builds: list[Path], capsys) -> None:
    from length_control.recipe import load_recipe

    from conftest import REPO

    recipe = demo.resolve(load_recipe(REPO / "recipes" / "demo-cpu.yaml"))
    folder = recipe.model.path.parent
    _flip_a_byte(folder / "model" / "model.safetensors")
    assert demo.resolve(load_recipe(REPO / "recipes" / "demo-cpu.yaml")).model.path == folder / "model"
    assert len(builds) == 2 and "model/model.safetensors does not match" in capsys.readouterr().err
