"""The report recomputes every figure from the sample files, in the Table 2 layout."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from length_control import report
from length_control.artifacts import MissingInput
from length_control.recipe import load_recipe

from conftest import REPO


def _samples(path: Path, rows: list[tuple[str, str, int, bool, bool]]) -> None:
    """rows: (benchmark, problem, thinking tokens, closed, correct)"""
    records = [
        {
            "benchmark": b,
            "problem_id": p,
            "sample": i,
            "thinking_tokens": t,
            "prompt_tokens": 20,
            "closed_think": c,
            "overlong": not c,
            "correct": ok,
        }
        for i, (b, p, t, c, ok) in enumerate(rows)
    ]
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), path / "samples.parquet")


def test_report_layout_and_figures(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}", "train.seeds=[0]"])
    _samples(
        tmp_path / "eval" / "before",
        [
            ("demo", "a", 50, True, True),
            ("demo", "a", 60, True, False),
            ("demo", "b", 300, False, False),
            ("demo", "b", 300, False, False),
        ],
    )
    _samples(
        tmp_path / "eval" / "after" / "seed-0",
        [
            ("demo", "a", 50, True, True),
            ("demo", "a", 60, True, True),
            ("demo", "b", 199, True, False),
            ("demo", "b", 300, False, False),
        ],
    )
    text = report.run(report.plan(recipe))
    row = report.build(recipe)["benchmarks"]["demo"]
    assert row["score_before"] == 0.25 and row["score_after"] == 0.5  # pass@1 averaged per problem
    assert row["score_relative_change"] == 1.0
    assert row["overlong_before"] == 0.5 and row["overlong_after"] == 0.25
    assert row["overlong_relative_change"] == -0.5 and row["samples_per_problem"] == 2
    assert "| demo | 25.0% ± 25.0% | 50.0% | +100.0% | 50.0% | 25.0% | -50.0% | 2 |" in text
    assert "Per stage-2 seed" not in text  # one seed: no spread to show
    assert (
        "Stage 2's loss: `</think>`, the policy's own answer where it had decided it, and EOS "
        "(splice.termination_span: think_close_decided_answer_eos). Beside it, 0.25 x KL(stage-1 model || "
        "trained) over the stage-1 model's top 16 next tokens at every untrained output token of a spliced row "
        "(train.kl_anchor)." in text
    )
    assert (tmp_path / "report" / "thinking_lengths.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "report.json").is_file()


def test_report_shows_mean_and_range_over_seeds_and_the_probe(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}", "train.seeds=[0,1]"])
    _samples(tmp_path / "eval" / "before", [("demo", "a", 50, True, True), ("demo", "b", 300, False, False)])
    _samples(tmp_path / "eval" / "after" / "seed-0", [("demo", "a", 50, True, True), ("demo", "b", 199, True, True)])
    _samples(tmp_path / "eval" / "after" / "seed-1", [("demo", "a", 50, True, True), ("demo", "b", 300, False, False)])
    for folder, nll, closes in [("before", 4.0, False), ("after/seed-0", 0.5, True), ("after/seed-1", 1.5, False)]:
        record = {"benchmark": "demo", "problem_id": "b", "sample": 1, "close_nll": nll, "greedy_close": closes}
        pq.write_table(pa.Table.from_pylist([record]), tmp_path / "eval" / folder / "probe.parquet")
    built = report.build(recipe)
    row = built["benchmarks"]["demo"]
    assert row["overlong_before"] == 0.5 and row["overlong_after"] == 0.25
    assert row["overlong_after_range"] == [0.0, 0.5] and row["score_after_range"] == [0.5, 1.0]
    assert (
        row["per_seed"]["0"]["overlong_relative_change"] == -1.0
        and row["per_seed"]["1"]["score_relative_change"] == 0.0
    )
    assert row["close_nll_before"] == 4.0 and row["close_nll_after"] == 1.0 and row["greedy_close_after"] == 0.5
    text = report.markdown(built)
    assert (
        "| demo | 50.0% ± 50.0% | 75.0% [50.0%, 100.0%] | +50.0% [+0.0%, +100.0%] | 50.0% | 25.0% [0.0%, 50.0%] |"
        in text
    )
    assert "| demo | 1 | 4.00 | 1.00 | 0.0% | 50.0% [0.0%, 100.0%] |" in text
    assert "| demo | 1 | 50.0% ± 50.0% | +0.0% | 50.0% | +0.0% | 1.50 | 0.0% |" in text


def test_report_shows_what_else_stage_2_moved_and_says_it(tmp_path: Path) -> None:
    """The answer-drift probe against the forced arm's reference, the early-close probe against the before arm,
    per seed, and one line that names the seed whose answers moved."""
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}", "train.seeds=[0,1]"])
    for arm in ("before", "forced", "after/seed-0", "after/seed-1"):
        _samples(tmp_path / "eval" / arm, [("demo", "a", 50, True, True), ("demo", "b", 300, True, True)])

    def probe(arm: str, name: str, records: list[dict]) -> None:
        pq.write_table(
            pa.Table.from_pylist([{"benchmark": "demo", "problem_id": "b", **r} for r in records]),
            tmp_path / "eval" / arm / name,
        )

    def drift(
        agrees: list[bool | None],
        nll: list[float] | None = None,
        close: str = "forced",
        min_p: list[float] | None = None,
    ) -> list[dict]:
        return [
            {
                "sample": i,
                "close": close,
                "answer_nll": (nll or [0.1] * len(agrees))[i],
                "greedy_agrees": a,
                "stage1_greedy_min_p": (min_p or [0.9] * len(agrees))[i],
            }
            for i, a in enumerate(agrees)
        ]

    probe("forced", "drift.parquet", drift([None, None]))
    probe("after/seed-0", "drift.parquet", drift([True, True]))
    probe("after/seed-1", "drift.parquet", drift([True, False], nll=[0.1, 2.1]))
    for arm, p in (("before", 0.001), ("after/seed-0", 0.002), ("after/seed-1", 0.001)):
        probe(arm, "early_close.parquet", [{"sample": 0, "positions": 4, "close_p_mean": p, "close_p_max": 2 * p}])
    built = report.build(recipe)
    row = built["benchmarks"]["demo"]
    assert (row["drift_samples"], row["answer_nll_before"], row["early_close_p_before"]) == (2, 0.1, 0.001)
    assert row["greedy_answer_agreement_range"] == [0.5, 1.0] and row["answer_nll_after_range"] == [0.1, 1.1]
    assert row["per_seed"]["1"]["greedy_answer_agreement"] == 0.5
    text = report.markdown(built)
    assert (
        "| demo | 2 (0) | 0.10 | 0.60 [0.10, 1.10] | 75.0% [50.0%, 100.0%] | 75.0% [50.0%, 100.0%] | 1 | 0.0010 | "
        "0.0015 [0.0010, 0.0020] |"
    ) in text
    assert built["drift_verdict"].startswith(
        "Stage 2 changed more than the stop: demo seed 1: 50.0% of the greedy "
        "answers the stage-1 model had decided after a close at B are its own"
    )
    assert built["drift_verdict"] in text and "seed 0" not in built["drift_verdict"]

    # The same flip where the stage-1 model was split (a token of its greedy answer at 0.48): a tie tipped, not drift.
    for arm in ("forced", "after/seed-0", "after/seed-1"):
        agrees = {"forced": [None, None], "after/seed-0": [True, True], "after/seed-1": [True, False]}[arm]
        probe(arm, "drift.parquet", drift(agrees, min_p=[0.9, 0.48]))
    built = report.build(recipe)
    row = built["benchmarks"]["demo"]
    assert (row["split_samples"], row["per_seed"]["1"]["greedy_answer_agreement"]) == (1, 0.5)
    assert (row["per_seed"]["1"]["decided_answer_agreement"], row["per_seed"]["1"]["ties_tipped"]) == (1.0, 1)
    assert "| demo | 2 (1) |" in report.markdown(built)
    assert built["drift_verdict"].startswith("Stage 2 changed the stop and nothing else")
    assert built["drift_verdict"].endswith(
        "no likelier (1 samples over the seeds where the stage-1 model was split "
        "between answers went the other way: near ties, which any change of "
        "weights may tip)."
    )

    probe("after/seed-1", "drift.parquet", drift([True, True]))
    probe(
        "after/seed-1", "early_close.parquet", [{"sample": 0, "positions": 4, "close_p_mean": 0.2, "close_p_max": 0.5}]
    )
    assert report.build(recipe)["drift_verdict"] == (
        "Stage 2 changed more than the stop: demo seed 1: p(close early) "
        "0.0010 -> 0.2000. The after arm's score then falls short of the "
        "forced arm's for that reason, not the stop."
    )
    probe(
        "after/seed-1", "early_close.parquet", [{"sample": 0, "positions": 4, "close_p_mean": 0.001, "close_p_max": 0}]
    )
    assert report.build(recipe)["drift_verdict"].startswith("Stage 2 changed the stop and nothing else")

    # answers after the policy's own close (within B), against the before arm's greedy answers
    probe("before", "drift.parquet", drift([None], close="own"))
    probe("after/seed-0", "drift.parquet", drift([True, True]) + drift([False], close="own"))
    probe("after/seed-1", "drift.parquet", drift([True, True]) + drift([True], close="own"))
    built = report.build(recipe)
    assert built["benchmarks"]["demo"]["own_close_greedy_answer_agreement_range"] == [0.0, 1.0]
    assert built["drift_verdict"] == (
        "Stage 2 changed more than the stop: demo seed 0: 0.0% of the greedy answers "
        "the stage-1 model had decided after its own close are its own. The after "
        "arm's score then falls short of the forced arm's for that reason, not the stop."
    )


def test_report_names_the_missing_seed(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [f"output_dir={tmp_path}", "train.seeds=[0,1]"])
    _samples(tmp_path / "eval" / "before", [("demo", "a", 50, True, True)])
    _samples(tmp_path / "eval" / "after" / "seed-0", [("demo", "a", 50, True, True)])
    with pytest.raises(MissingInput, match=r"after \(seed 1\)"):
        report.build(recipe)


def test_sample_files_from_anywhere_get_the_same_rows(tmp_path: Path, capsys) -> None:
    """report --samples: the eval's sample files, no recipe, give the row the run's report gives."""
    from length_control import cli

    _samples(
        tmp_path / "before",
        [
            ("demo", "a", 50, True, True),
            ("demo", "a", 60, True, False),
            ("demo", "b", 300, False, False),
            ("demo", "b", 300, False, False),
        ],
    )
    _samples(
        tmp_path / "after",
        [
            ("demo", "a", 50, True, True),
            ("demo", "a", 60, True, True),
            ("demo", "b", 199, True, False),
            ("demo", "b", 300, False, False),
        ],
    )
    files = [str(tmp_path / arm / "samples.parquet") for arm in ("before", "after")]
    assert cli.main(["report", "--samples", *files, "--output", str(tmp_path / "out")]) == 0
    assert "| demo | 25.0% ± 25.0% | 50.0% | +100.0% | 50.0% | 25.0% | -50.0% | 2 |" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.json").is_file()
    assert cli.main(["report", "--samples", files[0]]) == 2
    assert "two files or more" in capsys.readouterr().err


def test_raw_outputs_are_measured_with_their_tokenizer_at_the_context_limit(
    tmp_path: Path, tokenizer_policy: Path, capsys
) -> None:
    """A JSONL of prompts and raw outputs (text or ids): overlong = no close within the limit, counted in the
    model's tokens; without a `correct` field the scores are n/a."""
    import json

    from length_control import cli
    from length_control.policy import load_tokenizer

    tok = load_tokenizer(str(tokenizer_policy))
    prompt = "Count down from 102 to 100. How many numbers do you say?"
    closes = "<think>\n01:102\n02:101\n03:100\n</think>\n\nThe answer is 3."
    late = "<think>\n" + "".join(f"{i:02d}:9{i:02d}\n" for i in range(1, 30)) + "</think>\n\nThe answer is 29."
    never = "<think>\n01:102\n02:101"
    limit = len(tok.encode(prompt, add_special_tokens=False)) + len(tok.encode(closes, add_special_tokens=False)) + 5
    before = [{"prompt": prompt, "output": text, "problem_id": str(i)} for i, text in enumerate([closes, late, never])]
    after = [
        {
            "prompt_token_ids": tok.encode(prompt, add_special_tokens=False),
            "output_token_ids": tok.encode(closes, add_special_tokens=False),
            "problem_id": str(i),
        }
        for i in range(3)
    ]
    for name, rows in (("before", before), ("after", after)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = [str(tmp_path / "before.jsonl"), str(tmp_path / "after.jsonl")]
    assert cli.main(["report", "--samples", *files]) == 2
    assert "give --tokenizer" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "report",
                "--samples",
                *files,
                "--tokenizer",
                str(tokenizer_policy),
                "--context-limit",
                str(limit),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    row = json.loads((tmp_path / "out" / "report.json").read_text())["benchmarks"]["samples"]
    assert (row["overlong_before"], row["overlong_after"]) == (2 / 3, 0.0)  # `late` closes past the limit
    assert row["score_before"] is None and "n/a ± n/a" in capsys.readouterr().out
