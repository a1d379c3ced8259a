"""bench/demo_robustness.py's bounds, on report rows made up to sit on each side of them."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("demo_robustness", REPO / "bench" / "demo_robustness.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _report(**after) -> dict:
    seed = {
        "score_after": 0.96,
        "overlong_after": 0.0,
        "greedy_answer_agreement": 0.9,
        "decided_answer_agreement": 0.99,
        "own_close_greedy_answer_agreement": 1.0,
        "own_close_decided_answer_agreement": 1.0,
    } | after
    return {"benchmarks": {"demo-check": {"overlong_before": 0.3, "score_forced": 0.97, "per_seed": {"0": seed}}}}


def test_a_seed_is_within_the_bounds_only_when_all_three_hold() -> None:
    """Agreement over the answers the stage-1 model had decided: the ties it was split on may tip (0.9 over all)."""
    assert [ok for _, ok in bench.verdict_rows(_report(), "native 1")] == [True]
    assert [ok for _, ok in bench.verdict_rows(_report(own_close_decided_answer_agreement=None), "n 1")] == [True]
    for off in (
        {"score_after": 0.949},
        {"overlong_after": 0.0125},
        {"decided_answer_agreement": 0.975},
        {"own_close_decided_answer_agreement": 0.975},
        {"decided_answer_agreement": None},
    ):  # a report without the probe proves nothing
        assert [ok for _, ok in bench.verdict_rows(_report(**off), "native 1")] == [False], off
    line, _ = bench.verdict_rows(_report(), "native 1")[0]
    assert line.split() == [
        "native",
        "1",
        "demo-check",
        "0",
        "30.0%",
        "0.0%",
        "97.0%",
        "96.0%",
        "-1.0",
        "90.0%",
        "99.0%",
        "100.0%",
        "100.0%",
        "ok",
    ]


def test_the_avx2_setting_holds_torch_back_and_names_what_vllm_loads() -> None:
    import sys
    from pathlib import Path

    torch_level, vllm_library = bench.kernel_choice(Path(sys.executable), "avx2")
    assert torch_level in ("AVX2", "DEFAULT")  # never above what it is held to
    assert vllm_library in ("_C", "_C_AVX512", "_C_AVX2")


@pytest.mark.engine  # needs the built demo policy (its tokenizer)
def test_stage1_rows_holds_what_stage_1_trained(tmp_path) -> None:
    """bench/stage1_rows.py: the demo's full conversations trained whole, the interrupted ones only after the
    close, in the build's numbers."""
    import json
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from length_control.demo.cache import cached_build
    from length_control.recipe import DemoModelSpec

    out = tmp_path / "rows.parquet"
    subprocess.run([sys.executable, str(REPO / "bench" / "stage1_rows.py"), str(out)], check=True)
    build = json.loads((cached_build(DemoModelSpec()) / "build.json").read_text())
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == build["sft_rows"] + build["interrupted_rows"]
    close = build["think_close_ids"]
    for row in rows[build["sft_rows"] :][:50]:
        trained = [i for i, label in enumerate(row["labels"]) if label != -100]
        ids = row["input_ids"]
        at = next(i for i in range(len(ids)) if ids[i : i + len(close)] == close)
        assert trained[0] == at + len(close)  # the answer after the close, not the close
