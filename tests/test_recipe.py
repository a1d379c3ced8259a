"""The recipe schema: shipped recipes pass; each bad recipe gets one clear message
that names the key, the bad value and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from length_control._schema import ConfigError
from length_control.recipe import load_recipe

from conftest import REPO


@pytest.mark.parametrize("name", ["demo-cpu", "demo-gpu", "qwen3-14b-30k"])
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.name == name
    assert recipe.budget < recipe.context_limit
    assert recipe.train.template.is_file()


def test_the_gpu_demo_is_the_cpu_demo_on_another_engine() -> None:
    """`./run.sh demo` runs recipes/demo-<profile>.yaml: on a GPU the same loop and table, only the engine set
    for a GPU that training shares."""
    cpu, gpu = (
        load_recipe(REPO / "recipes" / f"demo-{profile}.yaml").model_dump(exclude={"name", "output_dir"})
        for profile in ("cpu", "gpu")
    )
    cpu_engine = cpu.pop("engine")["vllm"]
    assert cpu_engine["gpu_memory_utilization"] is None
    assert gpu.pop("engine")["vllm"] == {**cpu_engine, "gpu_memory_utilization": 0.3, "max_num_seqs": 256}
    assert cpu == gpu
    assert {p.stem.removeprefix("demo-") for p in (REPO / "recipes").glob("demo-*.yaml")} >= {
        p.name for p in (REPO / "envs").iterdir() if p.is_dir()
    }  # a demo for every profile


def test_report_setting() -> None:
    """The 14B recipe is the report's setting (Hermes 4, section 3.1 and App. B)."""
    recipe = load_recipe(REPO / "recipes" / "qwen3-14b-30k.yaml")
    assert (recipe.budget, recipe.context_limit) == (30000, 40960)
    sampling = recipe.eval.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.6, 0.95, 20)
    samples = {s.source.stem: s.samples_per_problem for s in recipe.eval.sets}
    assert samples == {"aime_2024": 64, "aime_2025": 64, "gpqa_diamond": 8, "livecodebench_v6": 16}
    assert recipe.train.overrides["sequence_len"] == 32768


def test_paths_resolve_relative_to_the_recipe(repo_copy: Path) -> None:
    recipe = load_recipe(repo_copy / "recipes" / "demo-cpu.yaml")
    assert recipe.output_dir == repo_copy / "runs" / "demo-cpu"
    assert recipe.train.template == repo_copy / "axolotl_configs" / "cpu-tiny.yaml"
    assert recipe.prompts.sources[0].source == repo_copy / "prompts_sources" / "demo_train.yaml"


def test_overrides_are_dotted_and_typed(repo_copy: Path) -> None:
    recipe = load_recipe(repo_copy / "recipes" / "demo-cpu.yaml", ["budget=120", "generation.sampling.top_k=-1"])
    assert recipe.budget == 120
    assert recipe.generation.sampling.top_k == -1


def _edit(data: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()

# (what is wrong, edits to the demo recipe, fragments the one message must contain)
BAD_RECIPES = [
    ("unknown top-level key", {"budgte": 10}, ["budgte: unknown key", "did you mean 'budget'?"]),
    (
        "unknown nested key",
        {"generation.samples_per_promt": 2},
        ["generation.samples_per_promt: unknown key", "did you mean 'samples_per_prompt'?"],
    ),
    (
        "budget not below the context limit",
        {"budget": 176},
        ["budget = 176", "must be smaller than context_limit (176)", "lower budget or raise context_limit"],
    ),
    (
        "missing model folder",
        {"model.demo": _DELETE, "model.path": "../models/nope"},
        ["model.path = '../models/nope'", "does not exist", "point `path` at a Hugging Face model folder"],
    ),
    ("missing section", {"train": _DELETE}, ["train: required key is missing; add it"]),
    ("misspelt choice", {"engine.kind": "vlm"}, ["engine.kind = 'vlm'", "'vllm' or 'openai'", "did you mean 'vllm'?"]),
    ("negative budget", {"budget": -5}, ["budget = -5", "greater than 0"]),
    (
        "missing template",
        {"train.template": "../axolotl_configs/nope.yaml"},
        ["train.template = '../axolotl_configs/nope.yaml'", "file not found", "fix the path"],
    ),
    (
        "openai engine without endpoints",
        {"engine.kind": "openai"},
        ["engine: kind 'openai' needs an `openai:` section with `endpoints` and `model`"],
    ),
    (
        "two model sources",
        {"model.hub": "Qwen/Qwen3-14B"},
        ["model: give exactly one of `path` (a model folder), `hub` (a Hub id) or `demo: {}`"],
    ),
    ("negative temperature", {"eval.sampling.temperature": -1}, ["eval.sampling.temperature = -1", "fix the value"]),
    (
        "eval set without a grader",
        {"eval.sets": [{"source": "../prompts_sources/demo_train.yaml"}]},
        ["eval.sets[0].source: demo_train.yaml has no `grader` and `reference`"],
    ),
    (
        "forced close that does not close",
        {"model.think": {"forced_close": "\n</thinking>"}},
        ["model.think", "forced_close '\\n</thinking>' must end with close '</think>'"],
    ),
    (
        "SFT mix with no data for a non-demo model",
        {"model.demo": _DELETE, "model.hub": "Qwen/Qwen3-14B"},
        ["splice.sft_mix.dataset: required unless the model is the demo policy"],
    ),
    ("bad run name", {"name": "my run"}, ["name = 'my run'", "should match pattern"]),
]


@pytest.mark.parametrize("what, edits, fragments", BAD_RECIPES, ids=[case[0] for case in BAD_RECIPES])
def test_bad_recipe_gets_one_clear_message(repo_copy: Path, what: str, edits: dict, fragments: list[str]) -> None:
    path = repo_copy / "recipes" / "demo-cpu.yaml"
    data = yaml.safe_load(path.read_text())
    for key, value in edits.items():
        _edit(data, key, value)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    for fragment in fragments:
        assert fragment in caught.value.problems[0]


def test_bad_source_file_is_reported_under_the_recipe_key(repo_copy: Path) -> None:
    source = repo_copy / "prompts_sources" / "demo_train.yaml"
    source.write_text(source.read_text().replace("prompt:", "promt:"))
    with pytest.raises(ConfigError) as caught:
        load_recipe(repo_copy / "recipes" / "demo-cpu.yaml")
    problems = caught.value.problems
    assert any(
        "prompts.sources[0].source: demo_train.yaml: promt: unknown key; did you mean 'prompt'?" in p for p in problems
    )
    assert any("prompt: required key is missing" in p for p in problems)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("budget: 1\nbudget: 2\n", "key 'budget' appears twice (lines 1 and 2); keep one"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "the top level must be a mapping of keys, got list"),
    ],
)
def test_unreadable_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert len(caught.value.problems) == 1 and fragment in caught.value.problems[0]


def test_all_schema_problems_are_reported_at_once(repo_copy: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_recipe(repo_copy / "recipes" / "demo-cpu.yaml", ["budgte=1", "engine.kind=x", "seed=abc"])
    assert len(caught.value.problems) == 3


def test_cli_validate_exit_codes(repo_copy: Path) -> None:
    def validate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "length_control.cli", "validate", *args], capture_output=True, text=True
        )

    good = validate(str(repo_copy / "recipes" / "demo-cpu.yaml"))
    assert good.returncode == 0 and good.stdout.startswith("ok: ")
    bad = validate(str(repo_copy / "recipes" / "demo-cpu.yaml"), "budget=1000")
    assert bad.returncode == 2
    assert "1 problem:" in bad.stderr and "budget = 1000" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_overrides_are_taken_after_flags_too(repo_copy: Path, tmp_path: Path, capsys) -> None:
    from length_control import cli

    recipe = str(repo_copy / "recipes" / "demo-cpu.yaml")
    assert cli.main(["run", recipe, "--dry-run", "budget=100", f"output_dir={tmp_path}"]) == 0
    assert "max_tokens 100," in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", recipe, "--dry-run", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
