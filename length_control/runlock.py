"""One writer per run folder.

    with runlock.holding(recipe.output_dir):
        pipeline.run(recipe)

Two processes writing stages into one run folder would mix their files
without a word (on GPUs, where outputs are not batch-invariant, not even to
the same bytes). So every command that writes stages (`run`, the one-stage
commands, `evaluate`, `sweep`) holds its folder's lock, `.lock` in it, for
its whole life, and a second writer is refused at once, exit 2, with the
holder's pid, host, start time and command, which the holder keeps in
`.lock.json` beside the lock. The lock is the kernel's (flock, through
`filelock`): it goes with its process however that ends, so a holder that was
killed leaves only its record, and the next writer takes over with a line
saying so. Reading a run (`report`, `inspect`, `--dry-run`) takes no lock.

The tasks of one Slurm job array write a stage's shards side by side, each
its own: they hold the lock as a group (`holding(folder, group=...)`), each
taking it shared, the group named in the record; any other writer, another
array's tasks included, is refused while one of them holds it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from length_control.artifacts import write_json_atomic
from length_control.errors import UserError

LOCK = ".lock"
HOLDER = ".lock.json"  # who holds the lock: pid, host, started, command (and group)
GROUP_WAIT = 10.0  # seconds a group's task waits to join: a sibling holds the lock alone while it writes the record


class RunLocked(UserError):
    """Another process is writing the run folder."""


@contextmanager
def holding(*folders: Path, group: str | None = None) -> Iterator[None]:
    """Hold the lock of every folder (created if need be) until the block ends; RunLocked if one is held.
    `group`: hold it with the other processes of this group (the tasks of one Slurm job array)."""
    with ExitStack() as stack:
        for folder in folders:
            stack.enter_context(_holding(Path(folder)) if group is None else _sharing(Path(folder), group))
        yield


def _make(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"output_dir {folder}: cannot create it ({error.strerror}); point output_dir at a folder you can write"
        ) from None


@contextmanager
def _holding(folder: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    _make(folder)
    lock = FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLocked(
            f"{folder} is being written by {describe(read_holder(folder))}: wait for it to finish, "
            "or give this run another output_dir"
        ) from None
    try:
        _take_over(folder)
        write_json_atomic(folder / HOLDER, this_process())
        yield
    finally:
        (folder / HOLDER).unlink(missing_ok=True)
        lock.release()


def _take_over(folder: Path) -> None:
    """Say so when the lock, now free, still has a record: its holder ended without releasing it (killed)."""
    left = read_holder(folder)
    if left is not None:
        gone = "is no longer running" if not _is_running(left) else "no longer holds it"
        print(f"{folder}: took over the lock left by {describe(left)}, which {gone}", file=sys.stderr, flush=True)


@contextmanager
def _sharing(folder: Path, group: str) -> Iterator[None]:
    """The lock held shared with the rest of `group` (the same kernel lock as `_holding`'s, flock, taken shared):
    the first task to come takes it alone, writes the group's record and lets it down to shared; the others join
    once the record names their group. The last one to leave (the only one that can take it alone) removes the
    record."""
    import fcntl

    _make(folder)
    descriptor = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _join(folder, descriptor, group)
        try:
            yield
        finally:
            if _flock(descriptor, fcntl.LOCK_EX):
                (folder / HOLDER).unlink(missing_ok=True)
    finally:
        os.close(descriptor)  # releases the lock


def _join(folder: Path, descriptor: int, group: str) -> None:
    import fcntl

    deadline = time.monotonic() + GROUP_WAIT
    while True:
        if _flock(descriptor, fcntl.LOCK_EX):  # nobody holds it: this task opens the group's hold
            _take_over(folder)
            write_json_atomic(folder / HOLDER, this_process() | {"group": group})
            if _flock(descriptor, fcntl.LOCK_SH):
                return
        elif _flock(descriptor, fcntl.LOCK_SH):
            if (read_holder(folder) or {}).get("group") == group:
                return
            fcntl.flock(descriptor, fcntl.LOCK_UN)  # another group's, or its holder has just ended: look again
        if time.monotonic() > deadline:
            raise RunLocked(
                f"{folder} is being written by {describe(read_holder(folder))}: wait for it to finish, "
                "or give this run another output_dir"
            )
        time.sleep(0.1)


def _flock(descriptor: int, operation: int) -> bool:
    """Take (or convert to) the lock without waiting; False when another process holds it in the way."""
    import fcntl

    try:
        fcntl.flock(descriptor, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def this_process() -> dict[str, Any]:
    """The holder's record: enough for someone refused to find the holder (`length-control run R`, not a path)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def read_holder(folder: Path) -> dict[str, Any] | None:
    """The record of the lock's holder, or None when there is none (or a half-written one)."""
    try:
        holder = json.loads((Path(folder) / HOLDER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:  # it has the lock and has not written its record yet
        return "another process"
    command = f", `{holder['command']}`" if holder.get("command") else ""
    if holder.get("group"):
        command += f"; with the rest of {holder['group']}"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}{command})"


def _is_running(holder: dict[str, Any]) -> bool:
    """Whether the holder's process still runs; True when it is on another host (no way to tell from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True  # another user's process, or a record without a pid
    return True
