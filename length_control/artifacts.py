"""Artifacts: atomic writes and the manifests that make stages resumable.

Every stage writes into its own folder of the run and finishes by writing
`manifest.json` there, last and atomically. The manifest records what the
output was made from (the fingerprints of its inputs, the recipe section that
shaped it, the versions of the tools) and a fingerprint of the output itself,
which the next stage records as its input. A rerun compares the manifest it
would write with the one on disk: equal means up to date (skip), different or
missing means stale (redo). A killed stage leaves no manifest, so it is never
mistaken for a finished one. A finished stage that is redone says why, in one
line: which inputs, config keys or tool versions changed, or which output file
is missing or no longer the one its manifest recorded (the manifest keeps each
file's fingerprint under `files`).

    with atomic_path(out / "rows.parquet") as tmp:
        table.write(tmp)          # renamed onto rows.parquet only on success
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from length_control import disk
from length_control.errors import UserError

MANIFEST = "manifest.json"

# Files larger than this are fingerprinted by size and mtime, not content:
# hashing a 28 GB checkpoint on every rerun would cost more than the stage.
_CONTENT_HASH_LIMIT = 256 * 1024 * 1024


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    The temporary file lives in the same folder so the rename is atomic on
    POSIX. On an exception it is removed and `path` is left as it was; a
    write that fails for lack of space raises `disk.DiskFull` naming `path`.
    """
    path = Path(path)
    with disk.writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> str:
    """A content fingerprint of a file or a folder (recursively, by relative path).

    Hidden entries (temp files, caches) are ignored, so an interrupted write
    beside an artifact does not change its fingerprint.
    """
    path = Path(path)
    if path.is_file():
        return _file_fingerprint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or folder")
    return _folder_fingerprint(path)


def _folder_fingerprint(folder: Path, exclude: frozenset[str] = frozenset()) -> str:
    return _combined(_file_fingerprints(folder, exclude))


def _file_fingerprints(folder: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """Each file's fingerprint under `folder`, by relative path, in path order (hidden entries left out)."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder)
        if rel.as_posix() in exclude or any(part.startswith(".") for part in rel.parts):
            continue
        files[rel.as_posix()] = _file_fingerprint(file)
    return files


def _combined(files: dict[str, str]) -> str:
    """One fingerprint of a folder's files (`_file_fingerprints`)."""
    digest = hashlib.sha256()
    for rel, file_fingerprint in files.items():
        digest.update(f"{rel}\0{file_fingerprint}\n".encode())
    return digest.hexdigest()


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > _CONTENT_HASH_LIMIT:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    return sha256_file(path)


def tool_versions(*distributions: str) -> dict[str, str]:
    """Versions of the named distributions that are installed here (others are skipped)."""
    versions = {"python": platform.python_version()}
    for name in ("length-control", *distributions):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def summary_line(summary: dict[str, Any]) -> str:
    """A stage's summary as one line for people: "rows 208, case1 104, ..."."""
    return ", ".join(f"{key} {value}" for key, value in summary.items())


class MissingInput(UserError, FileNotFoundError):
    """A stage's input is not there (yet); the message names the command that makes it."""


def finished_manifest(folder: Path) -> dict[str, Any]:
    """A finished stage folder's manifest: `output` (its fingerprint, the next stage's input) and `summary`."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = {}
    if "output" not in manifest:
        raise MissingInput(f"{folder} has no finished {MANIFEST}: run that stage first")
    return manifest


def finished_output(folder: Path) -> str:
    """The output fingerprint of a finished stage folder (for the next stage's inputs)."""
    return finished_manifest(folder)["output"]


class WouldRun(Exception):
    """A stage that is not up to date, stopped by `checking()` before it did any work; `why` says why it would run."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


_checking = contextvars.ContextVar("checking", default=False)


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """Stages run in this block stop at their up-to-date check: an up-to-date one returns its summary as it always
    does, any other raises `WouldRun`. A caller that must know which stages would run (the Slurm submission gives
    only those a job) asks each stage's own rule rather than a copy of it."""
    token = _checking.set(True)
    try:
        yield
    finally:
        _checking.reset(token)


class Stage:
    """One stage's output folder and its manifest.

    `inputs` maps a name to a path (fingerprinted here) or to a fingerprint
    string (an upstream stage's `output` fingerprint); `config` is the recipe
    section that shapes the output; `versions` the tools that make it.
    """

    def __init__(
        self,
        folder: Path,
        *,
        inputs: Mapping[str, Path | str],
        config: Any,
        versions: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.expected = {
            "inputs": {
                name: value if isinstance(value, str) else fingerprint(value) for name, value in sorted(inputs.items())
            },
            "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "versions": dict(versions or tool_versions()),
        }

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_up_to_date(self) -> bool:
        """True when a finished manifest matches what this run would write.

        A stage that finished before and runs again prints why (`why_stale`), so a redone stage is never
        silent about it; one that never finished (or was killed before its manifest) just runs.
        """
        why = self.why_stale()
        if why is not None and _checking.get():
            raise WouldRun(why)
        if why is not None and self.manifest_path.exists():
            print(f"{self.folder} is redone: {why}", flush=True)
        return why is None

    def why_stale(self) -> str | None:
        """Why the stage must run, or None when its manifest matches what this run would write."""
        if not self.manifest_path.exists():
            return f"it has no {MANIFEST}"
        manifest = self.read_manifest()
        if not isinstance(manifest, dict):
            return f"its {MANIFEST} is unreadable"
        if {key: manifest.get(key) for key in self.expected} != self.expected:
            return "; ".join(_settings_changed(manifest, self.expected)) or "its manifest's settings differ"
        return _output_changed(manifest, _file_fingerprints(self.folder, exclude=frozenset({MANIFEST})))

    def finish(self, **summary: Any) -> dict[str, Any]:
        """Write the manifest (last, atomically): the stage is done."""
        files = _file_fingerprints(self.folder, exclude=frozenset({MANIFEST}))
        manifest = {**self.expected, "output": _combined(files), "files": files, "summary": summary}
        write_json_atomic(self.manifest_path, manifest)
        return manifest

    @property
    def output(self) -> str:
        """The finished output's fingerprint, for the next stage's inputs."""
        return finished_output(self.folder)


def _settings_changed(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a finished stage's manifest and the one a run would write, for people: the
    inputs by name, the config by dotted key, the tools with both versions."""
    changed = []
    inputs = _changed_keys(manifest.get("inputs") or {}, expected["inputs"], nested=False)
    if inputs:
        changed.append(f"inputs changed: {', '.join(inputs)}")
    keys = _changed_keys(manifest.get("config") or {}, expected["config"])
    if keys:
        changed.append(f"config changed: {', '.join(keys)}")
    was, now = manifest.get("versions") or {}, expected["versions"]
    tools = [
        f"{name} {was.get(name, 'none')} -> {now.get(name, 'none')}" for name in _changed_keys(was, now, nested=False)
    ]
    if tools:
        changed.append(f"versions changed: {', '.join(tools)}")
    return changed


_ABSENT = object()


def _changed_keys(was: Any, now: Any, prefix: str = "", nested: bool = True) -> list[str]:
    """The keys whose values differ between two mappings (dotted, down to the leaves when `nested`)."""
    if not (isinstance(was, dict) and isinstance(now, dict)):
        return [prefix] if was != now else []
    changed = []
    for key in sorted({*was, *now}):
        name = f"{prefix}.{key}" if prefix else str(key)
        if nested and key in was and key in now:
            changed += _changed_keys(was[key], now[key], name)
        elif was.get(key, _ABSENT) != now.get(key, _ABSENT):
            changed.append(name)
    return changed


def _output_changed(manifest: dict[str, Any], files: dict[str, str]) -> str | None:
    """Which output files are missing, changed or added since the manifest was written (None: none is), by
    its per-file record (a manifest from before that record names none)."""
    if manifest.get("output") == _combined(files):
        return None
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return "its output no longer matches its manifest"
    missing = [name for name in recorded if name not in files]
    added = [name for name in files if name not in recorded]
    differ = [name for name in recorded if name in files and files[name] != recorded[name]]
    return (
        "; ".join(
            f"{what}: {', '.join(names)}"
            for what, names in (
                ("output missing", missing),
                ("output not matching its manifest", differ),
                ("output not in its manifest", added),
            )
            if names
        )
        or "its output no longer matches its manifest"
    )
