"""Stage 2 with real Axolotl: every template validates for its hardware; full fine-tuning
and LoRA (merged) put the learning signal on the termination span; a dataset rewritten
at the same path is prepared anew."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from length_control import anchor, generate, splice, train
from length_control.envs import engine_bin, engine_environ, envs_dir
from length_control.policy import policy_path
from length_control.recipe import KLAnchor
from length_control.train import render_config

from conftest import REPO, demo_recipe, require_gpu_stack

pytestmark = pytest.mark.engine

# The hardware each template is for: None = the CPU here.
TARGETS = {
    "cpu-tiny.yaml": None,
    "cpu-tiny-lora.yaml": None,
    "qwen3-14b-fsdp2-32k.yaml": 8,
    "qwen3-14b-lora-32k.yaml": 8,
    "qwen3-14b-fsdp2-32k-multinode.yaml": 16,
}


def test_every_template_is_listed() -> None:
    assert sorted(p.name for p in (REPO / "axolotl_configs").glob("*.yaml")) == sorted(TARGETS)


def test_training_without_a_gpu_runs_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Axolotl's compiled KD loss corrupted the heap under inductor's AVX-512 code on an Intel Xeon with AMX, so
    with no GPU listed Axolotl runs eager; with one, compiled; and a user's own TORCHDYNAMO_DISABLE stands."""
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    for listed, env in ((False, {"TORCHDYNAMO_DISABLE": "1"}), (True, {})):
        monkeypatch.setattr("length_control.envs.gpus_listed", lambda listed=listed: listed)
        assert train._eager_on_cpu() == env
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    monkeypatch.setattr("length_control.envs.gpus_listed", lambda: False)
    assert train._eager_on_cpu() == {}


@pytest.mark.parametrize(
    "template", sorted(TARGETS) + ["cpu-tiny.yaml+kl_anchor", "qwen3-14b-fsdp2-32k.yaml+kl_anchor"]
)
def test_template_renders_and_validates(template: str, tmp_path: Path) -> None:
    template, _, anchored = template.partition("+")
    gpus = TARGETS[template]
    config = render_config(
        REPO / "axolotl_configs" / template,
        base_model="Qwen/Qwen3-14B",
        datasets=[tmp_path / "rows.parquet"],
        output_dir=tmp_path / "out",
        sequence_len=32768 if gpus else 512,
        prepared_root=tmp_path / "prepared",
        overrides=train.anchor_config(
            KLAnchor(weight=0.5) if anchored else None,
            yaml.safe_load((REPO / "axolotl_configs" / template).read_text()).get("plugins"),
        ),
        content_key="0123456789abcdef",
    )
    assert config["excess_length_strategy"] == "raise"
    assert config["dataset_prepared_path"] == str(tmp_path / "prepared" / "0123456789abcdef")
    (tmp_path / "axolotl.yaml").write_text(yaml.safe_dump(config))
    command = [str(engine_bin("axolotl")), "-m", "length_control.axolotl_check", str(tmp_path / "axolotl.yaml")]
    if gpus:
        command += [
            "--capabilities",
            json.dumps({"bf16": True, "fp8": True, "tf32": True, "n_gpu": gpus, "compute_capability": "sm_90"}),
        ]
    result = subprocess.run(command, capture_output=True, text=True, env=engine_environ(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> Path:
    """A run folder with generated traces and a stage-2 dataset (no training yet)."""
    recipe = demo_recipe([f"output_dir={tmp_path_factory.mktemp('stage2')}"])
    generate.run(generate.plan(recipe))
    splice.run(splice.plan(recipe))
    return recipe.output_dir


def _nll(model_dir: str, rows_path: Path, meta_path: Path) -> dict[str, float]:
    """Mean NLL of the trained termination tokens and of the masked reasoning, over the case-1 rows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = pq.read_table(rows_path).to_pylist()
    meta = pq.read_table(meta_path).to_pylist()
    term, reason = [], []
    with torch.no_grad():
        for row, info in zip(rows, meta):
            if info["kind"] != "length":
                continue
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
            nll = -logp.gather(1, ids[0, 1:, None])[:, 0]  # nll[i] predicts token i + 1
            trained = [i for i, label in enumerate(row["labels"]) if label != -100]
            term += [nll[i - 1].item() for i in trained]
            reason += [nll[i - 1].item() for i in range(info["span_start"] - 60, info["span_start"] - 1)]
    return {"termination": sum(term) / len(term), "reasoning": sum(reason) / len(reason)}


def test_the_anchor_targets_are_the_stage1_models_next_token(stage2: Path, tmp_path: Path) -> None:
    """Axolotl's KD loss takes the target at position t as the distribution of token t + 1 (the student's logits
    there): the token the policy sampled next is among the stage-1 model's top-k at its anchored position, with
    the log-probability the model gives it; SFT rows and trained tokens are anchored nowhere."""
    import torch
    from transformers import AutoModelForCausalLM

    recipe = demo_recipe([f"output_dir={stage2}"])
    rows, meta, out = stage2 / "stage2" / "rows.parquet", stage2 / "stage2" / "meta.parquet", tmp_path / "a.parquet"
    anchored = anchor.write_targets(Path(policy_path(recipe.model)), rows, meta, out, top_k=4)
    table, sources = pq.read_table(out).to_pylist(), pq.read_table(meta).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(policy_path(recipe.model), dtype=torch.float32).eval()
    found = checked = 0
    for row, source in zip(table, sources):
        mask = [m[0] for m in row["target_mask"]]
        if source["kind"] == "sft":
            assert not any(mask)
            continue
        assert all(not m or row["labels"][t + 1] == -100 for t, m in enumerate(mask))
        assert mask[source["span_start"] - 1] == 0  # the position that predicts </think> trains it
        logp = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0], dim=-1)
        for t in (t for t, m in enumerate(mask) if m):
            nxt = row["input_ids"][t + 1]
            checked += 1
            if nxt in row["target_token_ids"][t]:
                found += 1
                k = row["target_token_ids"][t].index(nxt)
                assert abs(row["target_logprobs"][t][k] - logp[t, nxt].item()) < 1e-4
    assert checked == anchored > 0
    assert found >= 0.99 * checked, (found, checked)  # sampled at top_k 20, temperature 0.6: nearly always top 4


@pytest.mark.parametrize("template", ["cpu-tiny.yaml", "cpu-tiny-lora.yaml", "cpu-tiny.yaml-without-anchor"])
def test_training_moves_the_termination_not_the_reasoning(stage2: Path, template: str, tmp_path: Path) -> None:
    """The demo's training (its KL anchor on: Axolotl's KD trainer, the stage-1 model as teacher), with LoRA,
    and without the anchor."""
    run = tmp_path / "run"
    shutil.copytree(stage2, run, ignore=shutil.ignore_patterns("train", "prepared", "eval"))
    template, _, without = template.partition("-without-")
    overrides = [f"output_dir={run}", f"train.template=../axolotl_configs/{template}"]
    anchored = not without
    if not anchored:
        overrides.append("train.kl_anchor=null")
    if "lora" in template:
        # The template's own learning rate, one epoch over the demo's two traces a prompt (three moved the
        # masked reasoning by 0.07 nats on CI's machine).
        overrides.append("train.overrides={num_epochs: 1}")
    recipe = demo_recipe(overrides + ["train.seeds=[0]"])
    summary = train.run(train.plan(recipe, 0))
    model = train.model_of(run / "train" / "seed-0")
    assert (model / "config.json").is_file() and summary["steps"] > 0
    if "lora" in template:
        assert model.name == "merged" and (run / "train" / "seed-0" / "merge.log").is_file()
    config = yaml.safe_load((run / "train" / "seed-0" / "axolotl.yaml").read_text())
    assert config.get("kd_trainer", False) == bool(anchored)
    dataset = Path(config["datasets"][0]["path"])  # the anchored rows: one file for every seed, under train/
    assert dataset.is_file() and dataset.parent == run / ("train" if anchored else "stage2")
    assert dataset.name.startswith("anchored-rows-") if anchored else dataset.name == "rows.parquet"

    rows, meta = run / "stage2" / "rows.parquet", run / "stage2" / "meta.parquet"
    before = _nll(policy_path(recipe.model), rows, meta)
    after = _nll(str(model), rows, meta)
    assert after["termination"] < 0.5 * before["termination"], (before, after)
    assert after["reasoning"] < before["reasoning"] + 0.05, (before, after)


@pytest.mark.gpu_stack
def test_the_gpu_axolotl_learns_the_same_span(stage2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gpu profile's Axolotl (a CUDA build of torch, run on this CPU) trains the demo's rows as the CPU one
    does: the termination span learned, the masked reasoning left alone."""
    require_gpu_stack()
    run = tmp_path / "run"
    shutil.copytree(stage2, run, ignore=shutil.ignore_patterns("train", "prepared", "eval"))
    recipe = demo_recipe([f"output_dir={run}", "train.seeds=[0]"])
    monkeypatch.setenv("LC_PROFILE", "gpu")
    plan = train.plan(recipe, 0)
    gpu_axolotl = envs_dir("gpu") / "axolotl" / "bin"
    assert plan.steps[1].startswith(str(gpu_axolotl / "python") + " -m length_control.anchor")  # the KL anchor
    assert plan.steps[2].startswith(str(gpu_axolotl / "axolotl") + " train")
    assert train.run(plan)["steps"] > 0
    rows, meta = run / "stage2" / "rows.parquet", run / "stage2" / "meta.parquet"
    before = _nll(policy_path(recipe.model), rows, meta)
    after = _nll(str(train.model_of(run / "train" / "seed-0")), rows, meta)
    assert after["termination"] < 0.5 * before["termination"], (before, after)
    assert after["reasoning"] < before["reasoning"] + 0.05, (before, after)


def test_a_rewritten_dataset_is_prepared_anew(tmp_path: Path) -> None:
    """Axolotl keys its prepared data by path; ours is keyed by content, so a rewrite is seen."""
    import pyarrow as pa

    model = policy_path(demo_recipe([]).model)
    rows = tmp_path / "rows.parquet"
    prepared = []
    for version in (1, 2):
        table = [
            {
                "input_ids": [1, 2, n, version + 10],
                "attention_mask": [1] * 4,
                "labels": [-100, -100, -100, version + 10],
            }
            for n in range(3, 9)
        ]
        pq.write_table(pa.Table.from_pylist(table), rows)  # the same path both times
        config = render_config(
            REPO / "axolotl_configs" / "cpu-tiny.yaml",
            base_model=model,
            datasets=[rows],
            output_dir=tmp_path / "out",
            sequence_len=64,
            prepared_root=tmp_path / "prepared",
        )
        (tmp_path / "axolotl.yaml").write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [str(engine_bin("axolotl", "axolotl")), "preprocess", str(tmp_path / "axolotl.yaml")],
            capture_output=True,
            text=True,
            env=engine_environ(),
            cwd=tmp_path,
            timeout=600,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        dump = (
            "import json, sys, pathlib, datasets\n"
            "folder = next(pathlib.Path(sys.argv[1]).rglob('dataset_info.json')).parent\n"
            "print(json.dumps([r['input_ids'] for r in datasets.load_from_disk(str(folder))]))\n"
        )
        loaded = subprocess.run(
            [str(engine_bin("axolotl")), "-c", dump, config["dataset_prepared_path"]],
            capture_output=True,
            text=True,
            env=engine_environ(),
        )
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        prepared.append(json.loads(loaded.stdout.strip().splitlines()[-1]))
    assert [sorted(rows) for rows in prepared] == [[[1, 2, n, version + 10] for n in range(3, 9)] for version in (1, 2)]
