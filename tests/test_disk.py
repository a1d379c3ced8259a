"""A disk that fills up: every write that fails for lack of space is one message (`disk.DiskFull`, exit 2) with
its path, and leaves no partial file. On a real full filesystem (a 1 MiB tmpfs; mounting needs root)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from length_control import contracts, disk, train
from length_control.artifacts import write_text_atomic
from length_control.errors import UserError


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 1 MiB tmpfs mounted in `tmp_path`: a real filesystem a few MB of output cannot fit in."""
    folder = tmp_path / "small-fs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (it needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_an_atomic_write_on_a_full_disk_is_one_message_and_leaves_no_file(small_filesystem: Path) -> None:
    out = small_filesystem / "generate"
    with pytest.raises(disk.DiskFull) as raised:
        write_text_atomic(out / "termination.json", "x" * 2_000_000)
    assert isinstance(raised.value, UserError)  # the CLI prints it and exits 2
    assert str(raised.value).startswith(f"{out / 'termination.json'}: no space left on the device (")
    assert "point output_dir at one with room" in str(raised.value)
    assert list(out.iterdir()) == []  # neither the file nor its temporary


def test_a_parquet_write_on_a_full_disk_is_one_message_and_leaves_no_file(small_filesystem: Path) -> None:
    import random

    draw = random.Random(0)
    ids = [draw.randrange(1 << 30) for _ in range(400_000)]  # 1.6 MB of ids that do not compress
    record = {"prompt_id": "p", "sample": 0, "prompt_token_ids": ids, "output_token_ids": [], "seed": 0}
    with pytest.raises(disk.DiskFull, match=r"traces-00000\.parquet: no space left"):
        contracts.write_records(contracts.shard_path(small_filesystem, "traces", 0), [record], contracts.TRACES)
    assert list(small_filesystem.iterdir()) == []


def test_the_train_log_on_a_full_disk_is_one_message(small_filesystem: Path) -> None:
    log = small_filesystem / "train" / "seed-0" / "train.log"
    talk = [sys.executable, "-c", "for step in range(40_000): print('{}: loading, tokenizing, training'.format(step))"]
    with pytest.raises(disk.DiskFull, match=f"^{log}: no space left on the device"):
        train._run_logged(talk, log, desc="train seed 0")


def test_a_trainer_that_failed_for_space_is_one_message(tmp_path: Path) -> None:
    """Axolotl's own writes (its prepared data, checkpoints, the model) fail in its process: its output says why."""
    log = tmp_path / "train" / "seed-0" / "train.log"
    crash = "import sys; print('OSError: [Errno 28] No space left on device'); sys.exit(1)"
    with pytest.raises(disk.DiskFull, match=f"^{log.parent}: no space left on the device"):
        train._run_logged([sys.executable, "-c", crash], log, desc="train seed 0")
    other = "import sys; print('ValueError: bad config'); sys.exit(1)"
    with pytest.raises(train.TrainError, match="bad config"):
        train._run_logged([sys.executable, "-c", other], log, desc="train seed 0")


def test_checkpoints_kept_follow_the_rendered_config() -> None:
    assert disk.checkpoints_kept({"save_strategy": "no"}, steps=1000) == 0
    assert disk.checkpoints_kept({}, steps=1000) == 2  # each epoch (Axolotl's default) and the end
    assert disk.checkpoints_kept({"save_steps": 100}, steps=1000) == 4  # Axolotl's default save_total_limit
    assert disk.checkpoints_kept({"save_steps": 100, "save_total_limit": 20}, steps=1000) == 11
    assert disk.checkpoints_kept({"saves_per_epoch": 2, "num_epochs": 3, "save_total_limit": 1}, steps=10) == 1
