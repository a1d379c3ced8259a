"""Atomic writes and manifests: a rerun skips what is up to date, redoes what is stale,
and an interrupted stage is never taken for a finished one."""

from __future__ import annotations

from pathlib import Path

import pytest

from length_control.artifacts import Stage, atomic_path, fingerprint, write_json_atomic


def test_atomic_path_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "rows.jsonl"
    with atomic_path(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n"
    assert list(target.parent.iterdir()) == [target]


def _stage(folder: Path, source: Path, config: dict) -> Stage:
    return Stage(folder, inputs={"source": source}, config=config, versions={"tool": "1"})


def test_stage_lifecycle(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a")
    out = tmp_path / "stage"
    stage = _stage(out, source, {"budget": 10})
    assert not stage.is_up_to_date()  # never run

    write_json_atomic(out / "result.json", {"rows": 1})
    assert not stage.is_up_to_date()  # output written but not finished (killed before the manifest)
    stage.finish(rows=1)
    assert stage.is_up_to_date()
    assert _stage(out, source, {"budget": 10}).is_up_to_date()  # a rerun skips

    assert not _stage(out, source, {"budget": 11}).is_up_to_date()  # recipe section changed
    assert not Stage(out, inputs={"source": source}, config={"budget": 10}, versions={"tool": "2"}).is_up_to_date()
    source.write_text("b")
    assert not _stage(out, source, {"budget": 10}).is_up_to_date()  # input changed
    source.write_text("a")
    (out / "result.json").write_text("tampered")
    assert not _stage(out, source, {"budget": 10}).is_up_to_date()  # output changed after finishing


def test_a_finished_stage_that_runs_again_says_why(tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a")
    out = tmp_path / "stage"
    stage = Stage(
        out,
        inputs={"source": source},
        config={"budget": 10, "splice": {"span": "a", "share": 0.5}},
        versions={"tool": "1"},
    )
    assert stage.why_stale() == "it has no manifest.json"
    assert not stage.is_up_to_date() and capsys.readouterr().out == ""  # never finished: it just runs
    write_json_atomic(out / "rows.json", [1])
    write_json_atomic(out / "meta" / "a.json", [1])
    stage.finish()
    assert stage.is_up_to_date() and capsys.readouterr().out == ""

    def why(**update) -> str:
        settings = {"inputs": {"source": source}, "config": stage.expected["config"], "versions": {"tool": "1"}}
        assert not Stage(out, **(settings | update)).is_up_to_date()
        return capsys.readouterr().out

    assert why(config={"budget": 11, "splice": {"span": "b", "share": 0.5}, "seed": 1}) == (
        f"{out} is redone: config changed: budget, seed, splice.span\n"
    )
    assert why(versions={"tool": "2", "vllm": "0.32.0"}) == (
        f"{out} is redone: versions changed: tool 1 -> 2, vllm none -> 0.32.0\n"
    )
    source.write_text("b")
    assert why(inputs={"source": source, "extra": "abc"}) == f"{out} is redone: inputs changed: extra, source\n"
    source.write_text("a")

    (out / "rows.json").write_text("[")  # truncated
    (out / "meta" / "a.json").unlink()
    (out / "stray.txt").write_text("")
    assert why() == (
        f"{out} is redone: output missing: meta/a.json; output not matching its manifest: rows.json; "
        "output not in its manifest: stray.txt\n"
    )
    (out / "manifest.json").write_text("{")
    assert why() == f"{out} is redone: its manifest.json is unreadable\n"


def test_a_manifest_without_its_files_record_still_says_its_output_changed(tmp_path: Path, capsys) -> None:
    """A manifest written before the per-file record: up to date as before, and an output change is named
    as a change, without the file."""
    import json

    stage = Stage(tmp_path, inputs={}, config={}, versions={})
    write_json_atomic(tmp_path / "rows.json", [1])
    manifest = stage.finish()
    del manifest["files"]
    write_json_atomic(tmp_path / "manifest.json", manifest)
    assert stage.is_up_to_date()
    (tmp_path / "rows.json").write_text("[2]")
    assert not stage.is_up_to_date()
    assert capsys.readouterr().out == f"{tmp_path} is redone: its output no longer matches its manifest\n"
    assert "files" not in json.loads((tmp_path / "manifest.json").read_text())


def test_downstream_stage_keys_on_upstream_output(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a")
    upstream = _stage(tmp_path / "up", source, {})
    write_json_atomic(upstream.folder / "out.json", [1])
    upstream.finish()
    downstream = Stage(tmp_path / "down", inputs={"up": upstream.output}, config={}, versions={})
    downstream.finish()
    assert Stage(tmp_path / "down", inputs={"up": upstream.output}, config={}, versions={}).is_up_to_date()

    write_json_atomic(upstream.folder / "out.json", [2])
    upstream.finish()
    assert not Stage(tmp_path / "down", inputs={"up": upstream.output}, config={}, versions={}).is_up_to_date()


def test_fingerprint_ignores_hidden_temp_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x")
    before = fingerprint(tmp_path)
    (tmp_path / ".a.bin.123.tmp").write_bytes(b"partial")
    assert fingerprint(tmp_path) == before
    (tmp_path / "b.bin").write_bytes(b"y")
    assert fingerprint(tmp_path) != before


def test_unfinished_stage_has_no_output(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run that stage first"):
        _ = Stage(tmp_path, inputs={}, config={}).output


def test_a_failed_axolotl_command_stops_with_its_status_and_log_tail(tmp_path: Path) -> None:
    import sys

    from length_control.train import TrainError, _run_logged

    command = [
        sys.executable,
        "-c",
        "print(\"{'loss': '1.5', 'epoch': '0.5'}\"); print('CUDA out of memory'); raise SystemExit(3)",
    ]
    with pytest.raises(TrainError) as caught:
        _run_logged(command, tmp_path / "train.log", desc="train")
    message = str(caught.value)
    assert "exit status 3" in message and "CUDA out of memory" in message and str(tmp_path / "train.log") in message
    assert _run_logged(
        [sys.executable, "-c", "print(\"{'loss': '0.25', 'epoch': '1'}\")"], tmp_path / "ok.log", desc="train"
    ) == [0.25]


def test_a_diverged_training_run_fails_though_it_exits_0(tmp_path: Path) -> None:
    """The trainer logs a NaN loss as 0; the gradient norm gives it away, and the run must not pass as done."""
    import sys

    from length_control.train import TrainError, _run_logged

    lines = ["{'loss': '2.5', 'grad_norm': '1.25', 'epoch': '0.5'}", "{'loss': '0', 'grad_norm': 'nan', 'epoch': '1'}"]
    command = [sys.executable, "-c", "; ".join(f'print("{line}")' for line in lines)]
    with pytest.raises(TrainError, match=r"diverged: step 2 logged loss 0, grad_norm nan .*lower the learning rate"):
        _run_logged(command, tmp_path / "train.log", desc="train")
