"""The whole loop on the demo policy, end to end with real vLLM and real Axolotl:
eval before, traces, stage-2 rows, training on two seeds, eval after and forced, the
termination probe, a second round of the closed loop, and the report, whose figures are
recomputed here from the sample files; a rerun of one seed's training, evaluated on an
engine of its own instead of swapped into the running one, gives a byte-identical report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from length_control import pipeline, report
from length_control.artifacts import fingerprint
from length_control.evaluate import read_probes, summarize

from conftest import demo_recipe

pytestmark = pytest.mark.engine

BENCHMARKS = ("demo-count", "demo-check")


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_the_demo_loop(tmp_path: Path) -> None:
    recipe = demo_recipe(
        [
            f"output_dir={tmp_path}",
            "train.seeds=[0,1]",
            # A weaker stage 2 than the demo's (the loss of a batch of 4 is mostly its SFT rows'; the
            # report's span, the close and EOS alone), so that the closed loop has a second round to run,
            # whatever that does to the score.
            "train.overrides={num_epochs: 1, learning_rate: 5.0e-4}",
            "splice.termination_span=think_close_eos",
            "splice.sft_mix.share=0.5",
            "loop.until_overlong=0.0",
            "loop.max_rounds=2",
            "loop.score_guard=-1.0",
        ]
    )
    lines: list[str] = []
    pipeline.run(recipe, echo=lines.append)
    stages = [line for line in lines if line.startswith("[")]
    assert stages[: len(pipeline.STAGE_NAMES) + 1] == ["[preflight]"] + [f"[{name}]" for name in pipeline.STAGE_NAMES]
    checked = lines[lines.index("[preflight]") + 1]  # what the preflight read before any engine started
    assert (
        "demo_train.yaml: 240 rows read, 240 kept, 240 prompts" in checked and "forced close '\\n</think>'" in checked
    )
    # Round 1 missed the target, so round 2 ran; it may meet the target or end the loop at max_rounds.
    assert stages[-2].startswith("[round 2] policy: ")
    assert stages[-1].startswith(("[loop] round 2: stopped after 2", "[loop] round 2: target met"))
    # One engine start a round (the demo keeps it up through training): every other model, each
    # seed's stage-2 model included, was swapped into it. The seed redone below runs on a fresh
    # engine, and its report must not move.
    engine_log = (tmp_path / "logs" / "engine.log").read_text()
    assert engine_log.count("Initializing a V1 LLM engine") == 2
    assert engine_log.count("length-control: swapped in the weights of") == 4  # 2 seeds x 2 rounds

    built = report.build(recipe)
    for arm in ("before", "forced", "after/0", "after/1"):
        folder = tmp_path / "eval" / arm.replace("after/", "after/seed-")
        samples = report.load_samples(folder)
        recomputed = summarize(samples, recipe.context_limit, probes=read_probes(folder))["benchmarks"]
        assert built["arms"][arm] == recomputed
        assert len(samples) == 2 * 40 * 8
    for name in BENCHMARKS:
        row = built["benchmarks"][name]
        assert 0.2 <= row["overlong_before"] <= 0.6  # the stage-1 policy runs past its limit
        assert row["overlong_forced"] == 0.0  # forcing closes every sample by construction
        for seed in ("0", "1"):
            # stage 2 taught every seed to stop, and the probe sees it without sampling
            assert row["per_seed"][seed]["overlong_after"] < row["overlong_before"]
            assert row["per_seed"][seed]["close_nll_after"] < row["close_nll_before"]
        assert row["probe_traces"] > 0 and row["greedy_close_before"] < row["greedy_close_after"]
        # the answer-drift and early-close probes ran on every arm that takes them, on held-out samples
        assert row["drift_samples"] > 0 and row["answer_nll_before"] >= 0 and row["early_close_traces"] > 0
        assert all(0 <= row["per_seed"][seed]["greedy_answer_agreement"] <= 1 for seed in ("0", "1"))
    check = built["benchmarks"]["demo-check"]
    assert check["score_forced"] > check["score_before"]  # a cut thinking can still be right
    text = (tmp_path / "report" / "report.md").read_text()
    assert all(text.count(f"| {name} | 0 |") == 1 for name in BENCHMARKS)  # the per-seed table

    # The closed loop's second round: the seed-0 model is its policy, the first round's rows
    # are kept, and it is measured against the stage-1 policy. (Whether a round helps is the
    # training's business: with this weak stage 2 it need not.)
    round_2 = tmp_path / "rounds" / "2"
    assert _manifest(round_2 / "generate")["inputs"]["model"] == fingerprint(tmp_path / "train" / "seed-0" / "model")
    rows = [_manifest(folder / "stage2")["summary"]["length_rows"] for folder in (tmp_path, round_2)]
    assert rows[1] >= rows[0]
    assert [r["round"] for r in built["rounds"]] == [2]
    assert set(built["rounds"][0]["benchmarks"]) == set(BENCHMARKS)
    assert "| 2 | demo-count |" in text

    # The KL anchor's targets are computed once for both seeds, side by side, and both train on that file.
    [anchored] = (tmp_path / "train").glob("anchored-rows-*.parquet")
    configs = [yaml.safe_load((tmp_path / "train" / f"seed-{s}" / "axolotl.yaml").read_text()) for s in (0, 1)]
    assert {config["datasets"][0]["path"] for config in configs} == {str(anchored)}

    # A rerun skips every finished stage; a seed redone gives the same model and report.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")}
    anchored_at = anchored.stat().st_mtime_ns
    pipeline.run(recipe, echo=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")} == stamps
    report_json = (tmp_path / "report" / "report.json").read_bytes()
    for stage in ("train", "eval/after"):
        (tmp_path / stage / "seed-1" / "manifest.json").unlink()
    pipeline.run(recipe, echo=lambda _: None)
    redone = {p.relative_to(tmp_path) for p in tmp_path.rglob("manifest.json") if p.stat().st_mtime_ns != stamps.get(p)}
    assert redone == {Path("train/seed-1/manifest.json"), Path("eval/after/seed-1/manifest.json")}
    assert anchored.stat().st_mtime_ns == anchored_at  # the redone seed read the anchored rows as they were
    assert (tmp_path / "report" / "report.json").read_bytes() == report_json  # training is deterministic here

    # Any checkpoint measured without a recipe (evaluate --model) gets the samples its after arm got: the same
    # requests (seed, sampling, context limit), so the same overlong rate, and report --samples compares it.
    from length_control import cli

    evaluated = tmp_path / "evaluate"
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "train" / "seed-0" / "model"),
                "--set",
                str(recipe.eval.sets[0].source),
                "--context-limit",
                str(recipe.context_limit),
                "--samples",
                "8",
                "--budget",
                str(recipe.budget),
                "--output",
                str(evaluated),
                "model.dtype=float32",
                "engine.vllm.extra_args={enforce_eager: true}",
                "engine.vllm.env={VLLM_ENABLE_V1_MULTIPROCESSING: '0'}",
            ]
        )
        == 0
    )
    after = [s for s in report.load_samples(tmp_path / "eval" / "after" / "seed-0") if s["benchmark"] == "demo-count"]
    assert report.load_samples(evaluated / "eval" / "before") == after
    assert (
        cli.main(
            [
                "report",
                "--samples",
                str(tmp_path / "eval" / "before" / "samples.parquet"),
                str(evaluated / "eval" / "before" / "samples.parquet"),
                "--output",
                str(evaluated / "report"),
            ]
        )
        == 0
    )
    compared = json.loads((evaluated / "report" / "report.json").read_text())["benchmarks"]["demo-count"]
    assert compared["overlong_after"] == built["benchmarks"]["demo-count"]["per_seed"]["0"]["overlong_after"]
