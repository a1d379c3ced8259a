"""bench/demo_robustness.py's bounds, on report rows made up to sit on each side of them, and the bench at its
smoke size with a stand-in for length-control; bench/stage1_rows.py at its smoke size and, in the engine tier,
on the demo policy."""

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


STAND_IN = """#!{python}
import json, subprocess, sys
from pathlib import Path

# length-control as demo_robustness.py calls it: `run RECIPE key=value ...`. The recipe and the overrides
# are checked by the real `validate`; the report is the one the test gives.
command, recipe, *overrides = sys.argv[1:]
assert command == "run", sys.argv
subprocess.run([sys.executable, "-m", "length_control.cli", "validate", recipe, *overrides], check=True, cwd={repo!r})
out = Path(next(o for o in overrides if o.startswith("output_dir=")).removeprefix("output_dir="))
(out / "report").mkdir(parents=True, exist_ok=True)
(out / "report" / "report.json").write_text({report!r})
Path({calls!r}).open("a").write(json.dumps(sys.argv[1:]) + "\\n")
"""


def test_the_smoke_size_runs_the_bench_on_one_small_run(tmp_path) -> None:
    """`--smoke` with a stand-in for length-control: one run (native kernels, the first build seed) with the
    small-run overrides, which the real `validate` accepts; its report read, judged and printed last."""
    import json
    import subprocess
    import sys

    calls = tmp_path / "calls.jsonl"
    cli = tmp_path / "length-control"
    cli.write_text(
        STAND_IN.format(python=sys.executable, repo=str(REPO), report=json.dumps(_report()), calls=str(calls))
    )
    cli.chmod(0o755)
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "demo_robustness.py"), "--smoke", "--cli", str(cli), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert call[:4] == [
        "run",
        str(REPO / "recipes" / "demo-cpu.yaml"),
        f"output_dir={out / 'native-build-1'}",
        "model.demo.seed=1",
    ]
    assert call[4:] == bench.SMOKE
    lines = done.stdout.splitlines()
    assert lines[-3].split()[:4] == ["native", "1", "demo-check", "0"] and lines[-3].endswith("ok")
    assert lines[-1].startswith("bounds: overlong after <= 1 %") and ": 1/1 within (" in lines[-1]


def _holds_what_stage_1_trained(rows: list[dict], build: dict) -> None:
    """bench/stage1_rows.py's rows: the demo's full conversations trained whole, the interrupted ones only after
    the close, in the build's numbers."""
    assert len(rows) == build["sft_rows"] + build["interrupted_rows"]
    close = build["think_close_ids"]
    for row in rows[build["sft_rows"] :][:50]:
        trained = [i for i, label in enumerate(row["labels"]) if label != -100]
        ids = row["input_ids"]
        at = next(i for i in range(len(ids)) if ids[i : i + len(close)] == close)
        assert trained[0] == at + len(close)  # the answer after the close, not the close


def test_stage1_rows_at_its_smoke_size(tmp_path) -> None:
    """bench/stage1_rows.py --smoke: a demo policy of 12 conversations, built in seconds in a cache of its own."""
    import json
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    out = tmp_path / "rows.parquet"
    env = os.environ | {"LC_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, str(REPO / "bench" / "stage1_rows.py"), str(out), "--smoke"], check=True, env=env)
    (build,) = [json.loads(path.read_text()) for path in (tmp_path / "cache").glob("demo-models/*/build.json")]
    assert build["sft_rows"] == 12 and build["interrupted_rows"] > 0
    _holds_what_stage_1_trained(pq.read_table(out).to_pylist(), build)


@pytest.mark.engine  # needs the built demo policy (its tokenizer)
def test_stage1_rows_holds_what_stage_1_trained(tmp_path) -> None:
    import json
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from length_control.demo.cache import cached_build
    from length_control.recipe import DemoModelSpec

    out = tmp_path / "rows.parquet"
    subprocess.run([sys.executable, str(REPO / "bench" / "stage1_rows.py"), str(out)], check=True)
    build = json.loads((cached_build(DemoModelSpec()) / "build.json").read_text())
    _holds_what_stage_1_trained(pq.read_table(out).to_pylist(), build)
