"""The preflight: every problem a recipe's data, tokenizer, lengths and output folder hold,
reported at once before any engine starts (unit tier: no engine, a tokenizer-only policy)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from length_control import pipeline, preflight
from length_control.recipe import Recipe, load_recipe

from conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "sources"
LOCAL_DATA = {  # the 14B recipe's sources -> fixture files in their real schemas
    "webinstruct_verified": "webinstruct_verified.jsonl",
    "deepmath_103k": "deepmath_103k.jsonl",
    "rstar_coder": "rstar_coder_synthetic_rl.jsonl",
    "aime_2024": "aime_2024.jsonl",
    "aime_2025": "aime_2025.jsonl",
    "gpqa_diamond": "gpqa_diamond.jsonl",
    "livecodebench_v6": "lcb_code_generation_lite_release_v6.jsonl",
}
SHORT = "Count down from 102 to 100. How many numbers do you say?"
HUGE = "Count down from 925 to 900" + ", slowly and out loud" * 8 + ". How many numbers do you say?"


def small_recipe(folder: Path, policy: Path, prompts: list[str], evals: list[str], **settings) -> Recipe:
    """A recipe over `policy` with its own prompt and eval files (one question per row)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, questions in (("prompts", prompts), ("evals", evals)):
        rows = [{"id": f"q{i}", "question": q, "answer": "3"} for i, q in enumerate(questions)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "dataset": {"path": f"{name}.jsonl"},
                    "prompt": "{question}",
                    "reference": "answer",
                    "id": "id",
                    "grader": "exact",
                }
            )
        )
    (folder / "axolotl.yaml").write_text("{}\n")
    recipe = {
        "name": "small",
        "output_dir": "run",
        "model": {"path": str(policy)},
        "budget": 15,
        "context_limit": 60,
        "prompts": {"sources": ["prompts.yaml"]},
        "train": {"template": "axolotl.yaml"},
        "eval": {"sets": ["evals.yaml"]},
    } | settings
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(folder / "recipe.yaml")


def test_the_14b_recipe_with_local_data_passes_and_says_what_it_read(repo_copy: Path, tmp_path: Path) -> None:
    for name, data in LOCAL_DATA.items():
        definition = repo_copy / "prompts_sources" / f"{name}.yaml"
        spec = yaml.safe_load(definition.read_text())
        spec["dataset"] = {"path": str(FIXTURES / data)}
        definition.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    recipe = load_recipe(repo_copy / "recipes" / "qwen3-14b-30k.yaml", [f"output_dir={tmp_path / 'run'}"])
    notes = preflight.check(recipe).text()
    for name in LOCAL_DATA:
        assert f"{name}.yaml: " in notes and " rows read" in notes
    assert "tokenizer of Qwen/Qwen3-14B: not on this machine" in notes
    assert f"output_dir {tmp_path / 'run'}: writable" in notes


def test_every_problem_is_reported_at_once_with_its_file_and_fix(tmp_path: Path, tokenizer_policy: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    recipe = small_recipe(
        tmp_path / "r",
        tokenizer_policy,
        prompts=[SHORT, HUGE],
        evals=[HUGE],
        output_dir=str(blocker / "run"),
        generation={"on_long_prompt": "error"},
    )
    with open(tmp_path / "r" / "prompts.jsonl", "a") as data:
        data.write('{"id": "q9", "question": \n')  # a corrupt third line
    with pytest.raises(preflight.PreflightError) as raised:
        preflight.check(recipe)
    problems = raised.value.problems
    assert any(f"{blocker} is a file; point output_dir at a folder" in p for p in problems)
    assert any(f"{tmp_path / 'r' / 'prompts.jsonl'}:3" in p for p in problems)
    assert any(
        "prompts: prompts: 1 of 2 prompts leave no room for B = 15" in p and "generation.on_long_prompt: drop" in p
        for p in problems
    )
    assert any("eval: evals: every prompt fills the context limit (60)" in p for p in problems)
    assert "nothing was started" in str(raised.value)


def test_long_prompts_that_will_be_dropped_are_counted_not_refused(tmp_path: Path, tokenizer_policy: Path) -> None:
    recipe = small_recipe(tmp_path, tokenizer_policy, prompts=[SHORT, HUGE], evals=[SHORT, HUGE])
    notes = preflight.check(recipe).text()
    assert "prompts: prompts: 1 of 2 prompts leave no room for B = 15" in notes and "will be dropped" in notes
    assert "eval: evals: 1 of 2 prompts fill the context limit (60): they will be dropped" in notes
    assert "disk: the run writes at most " in notes


def _with_weights(policy: Path, folder: Path) -> Path:
    """`policy` with a weights file of 65,536 parameters (one 256 x 256 matrix): what the models are sized from."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    shutil.copytree(policy, folder)
    save_file(
        {"model.layers.0.mlp.up_proj.weight": np.zeros((256, 256), np.float32)}, str(folder / "model.safetensors")
    )
    return folder


def test_the_disk_line_sizes_every_part_the_run_writes(tmp_path: Path, tokenizer_policy: Path) -> None:
    policy = _with_weights(tokenizer_policy, tmp_path / "policy")
    two_seeds = {"template": "axolotl.yaml", "seeds": [0, 1]}
    notes = preflight.check(small_recipe(tmp_path / "r", policy, [SHORT], [SHORT], train=two_seeds)).text()
    line = next(note for note in notes.splitlines() if "disk: " in note)
    parts = dict(re.findall(r"(?:\(|, )([a-z][a-z0-9 -]*) ([\d.]+) MB", line))
    assert list(parts) == [
        "traces",
        "stage-2 rows",
        "prepared data",
        "models",
        "checkpoints",
        "eval samples",
        "logs and report",
    ]
    assert parts["models"] == "0.5"  # 2 seeds x 65,536 parameters x 4 bytes (float32: no bf16 in the config)
    assert float(parts["checkpoints"]) > 0  # Axolotl's default: a checkpoint each epoch
    total = float(re.search(r"writes at most ([\d.]+) MB", line)[1])
    assert abs(total - sum(map(float, parts.values()))) <= 0.05 * len(parts)
    assert "free on its filesystem" in line

    anchored = {**two_seeds, "kl_anchor": {"weight": 0.5, "top_k": 4096}}
    notes = preflight.check(small_recipe(tmp_path / "r", policy, [SHORT], [SHORT], train=anchored)).text()
    line = next(note for note in notes.splitlines() if "disk: " in note)
    parts = dict(re.findall(r"(?:\(|, )([a-z][a-z0-9 -]*) ([\d.]+) MB", line))
    assert list(parts)[2:4] == ["prepared data", "anchor targets"] and float(parts["anchor targets"]) > 0

    half = {**two_seeds, "overrides": {"bf16": True, "save_strategy": "no"}}
    notes = preflight.check(small_recipe(tmp_path / "r", policy, [SHORT], [SHORT], train=half)).text()
    assert "models 0.3 MB, checkpoints 0.0 MB" in notes  # 2 bytes a parameter; no checkpoint kept


def test_a_run_the_disk_cannot_hold_is_refused_with_the_space_needed(tmp_path: Path, tokenizer_policy: Path) -> None:
    recipe = small_recipe(
        tmp_path,
        tokenizer_policy,
        [SHORT],
        [SHORT],
        eval={"sets": [{"source": "evals.yaml", "samples_per_problem": 10**12}]},
    )
    with pytest.raises(preflight.PreflightError) as raised:
        preflight.check(recipe)
    (problem,) = raised.value.problems
    assert problem.startswith("disk: the run writes at most ") and "eval samples " in problem
    assert re.search(r"free on its filesystem: [\d.]+ GB needed; free [\d.]+ GB there or point output_dir", problem)


def test_a_tokenizer_that_cannot_spell_the_think_tags_is_refused(tmp_path: Path, tokenizer_policy: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "count": 1, "<eos>": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "word-level"
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="<eos>").save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    recipe = small_recipe(tmp_path / "r", folder, prompts=[SHORT], evals=[SHORT])
    with pytest.raises(preflight.PreflightError) as raised:
        preflight.check(recipe)
    problems = "\n".join(raised.value.problems)
    for key, tag in (("close", "'</think>'"), ("forced_close", "'\\n</think>'")):  # measured: both came out empty
        assert f"model.think.{key} {tag}: the tokenizer of {folder} encodes it to no token" in problems
    assert "no chat template" in problems


def test_run_stops_at_the_preflight_before_any_engine(tmp_path: Path, tokenizer_policy: Path) -> None:
    recipe = small_recipe(tmp_path, tokenizer_policy, prompts=[SHORT], evals=[SHORT])
    (tmp_path / "evals.jsonl").unlink()
    with pytest.raises(preflight.PreflightError, match=r"evals.jsonl"):
        pipeline.run(recipe, echo=lambda _: None)
    assert not recipe.output_dir.exists()  # no stage folder, no engine log


def test_a_data_error_is_one_message_and_exit_2_never_a_traceback(tmp_path: Path, tokenizer_policy: Path) -> None:
    import subprocess
    import sys

    small_recipe(tmp_path, tokenizer_policy, prompts=[SHORT], evals=[SHORT])
    with open(tmp_path / "evals.jsonl", "a") as data:
        data.write("{not json\n")
    for command in (["validate", "--deep"], ["run", "--dry-run"]):
        result = subprocess.run(
            [sys.executable, "-m", "length_control.cli", command[0], str(tmp_path / "recipe.yaml"), *command[1:]],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2, result.stderr
        assert f"{tmp_path / 'evals.jsonl'}:2" in result.stderr and "Traceback" not in result.stderr
