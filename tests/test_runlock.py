"""One writer per run folder: a second `run` (or sweep) on a folder being written exits 2 at once with the
holder named, before any demo policy is built; a lock left by a killed holder is taken over with a line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from length_control import cli, demo, runlock
from length_control.errors import UserError

from conftest import REPO

RECIPE = REPO / "recipes" / "demo-cpu.yaml"


@contextmanager
def held_elsewhere(folder: Path, group: str | None = None) -> Iterator[subprocess.Popen]:
    """Another process holding `folder`'s lock until the block ends (with `group`: as one of that group)."""
    script = (
        "import sys; from length_control import runlock\n"
        f"with runlock.holding({str(folder)!r}, group={group!r}):\n    print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0


@pytest.fixture
def no_policy_build(monkeypatch) -> None:
    """A refused writer never gets as far as the demo policy (a build would take minutes)."""
    monkeypatch.setattr(demo, "resolve", lambda *args, **kwargs: pytest.fail("resolved the demo policy"))


def test_a_second_run_exits_2_at_once_naming_the_holder(tmp_path: Path, no_policy_build, capsys) -> None:
    folder = tmp_path / "run"
    with held_elsewhere(folder) as holder:
        started = time.monotonic()
        assert cli.main(["run", str(RECIPE), f"output_dir={folder}"]) == 2
        assert time.monotonic() - started < 5
        record = json.loads((folder / runlock.HOLDER).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        assert capsys.readouterr().err == (
            f"error: {folder} is being written by pid {holder.pid} on {socket.gethostname()} (started "
            f"{record['started']}, `-c`): wait for it to finish, or give this run another output_dir\n"
        )
    # Once the holder ends, the folder is free and its record gone: nothing to take over.
    assert not (folder / runlock.HOLDER).exists()
    with runlock.holding(folder):
        pass
    assert capsys.readouterr().err == ""


def test_a_sweep_is_refused_when_one_of_its_run_folders_is_being_written(
    tmp_path: Path, no_policy_build, capsys
) -> None:
    setting = tmp_path / "sweep" / "budget-126"
    with held_elsewhere(setting) as holder:
        assert cli.main(["sweep", str(RECIPE), "budget=[84,126]", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {setting} is being written by pid {holder.pid} on ")


def _record(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runlock.HOLDER).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00", "command": "run"})
    )


def test_a_lock_left_by_a_killed_holder_is_taken_over_with_a_line(tmp_path: Path, capsys) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _record(tmp_path, int(gone.stdout))  # its process has ended: the kernel released its lock, the record stayed
    with runlock.holding(tmp_path):
        assert json.loads((tmp_path / runlock.HOLDER).read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err == (
        f"{tmp_path}: took over the lock left by pid {gone.stdout.strip()} on {socket.gethostname()} (started "
        "2025-01-01T00:00:00+00:00, `run`), which is no longer running\n"
    )
    assert not (tmp_path / runlock.HOLDER).exists()


def test_the_lock_is_the_kernels_not_the_record(tmp_path: Path, capsys) -> None:
    """A record naming a running process that holds no lock (its pid reused since) does not block a run."""
    _record(tmp_path, os.getppid())
    with runlock.holding(tmp_path):
        pass
    assert capsys.readouterr().err.endswith("`run`), which no longer holds it\n")


def test_an_output_dir_that_cannot_be_made_is_one_message(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"output_dir .*/file/run: cannot create it \(.*\); point output_dir"):
        with runlock.holding(tmp_path / "file" / "run"):
            pass


def test_the_tasks_of_one_array_hold_the_lock_together_and_no_one_else_gets_in(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(runlock, "GROUP_WAIT", 0.5)
    with held_elsewhere(tmp_path, group="Slurm job array 12") as first:
        with held_elsewhere(tmp_path, group="Slurm job array 12"):
            with runlock.holding(tmp_path, group="Slurm job array 12"):  # a third task: all three write at once
                pass
            for intruder in ({}, {"group": "Slurm job array 13"}):  # a writer alone, or another array's task
                held_by = f"pid {first.pid} on .*; with the rest of Slurm job array 12"
                with pytest.raises(runlock.RunLocked, match=held_by):
                    with runlock.holding(tmp_path, **intruder):
                        pass
        assert json.loads((tmp_path / runlock.HOLDER).read_text())["group"] == "Slurm job array 12"  # one still in
    assert not (tmp_path / runlock.HOLDER).exists()  # the last task to leave took the record with it
    with held_elsewhere(tmp_path):  # and a writer alone keeps the group out
        with pytest.raises(runlock.RunLocked):
            with runlock.holding(tmp_path, group="Slurm job array 12"):
                pass
    assert capsys.readouterr().err == ""
