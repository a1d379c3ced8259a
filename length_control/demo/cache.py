"""The demo policy's cache, verified on every use.

    folder = cached_build(spec)   # the build for spec: checked file by file, rebuilt if a file changed

`model.cached_build` trusts a cache folder once its build.json is there, and
a byte flipped in the cached weights since (a disk fault, a stray edit) would
make a report that is wrong without a word. So every user of the demo policy
comes through here: the build's build.json records the sha256 of every file
the build wrote (`files`), and a folder whose files do not match it, or whose
build.json predates the record, is rebuilt with a line naming the file. The
demo model is about a megabyte: checking it costs milliseconds.

The builder (`model.py`) is left as it is: its source is part of the cache
key, and what it builds must stay the same bytes.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from length_control.artifacts import sha256_file, write_json_atomic
from length_control.demo import model
from length_control.recipe import DemoModelSpec

BUILD = "build.json"
FILES = "files"  # build.json's record: relative path -> sha256 of every other file of the build


def cached_build(spec: DemoModelSpec, echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Path:
    """The folder of a verified build for `spec` (`model.cached_build`'s), rebuilt first if a file changed."""
    from filelock import FileLock

    folder = model.build_folder(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One process at a time checks, discards and records (the builder's own lock guards only the build).
    with FileLock(folder.with_name(f".{folder.name}.verify.lock")):
        why = why_untrusted(folder) if (folder / BUILD).is_file() else None
        if why is not None:
            echo(f"demo policy {folder}: {why}: rebuilding it")
            shutil.rmtree(folder)
        model.cached_build(spec)
        build = _read_build(folder)
        if FILES not in build:  # built just now
            write_json_atomic(folder / BUILD, build | {FILES: file_hashes(folder)})
    return folder


def why_untrusted(folder: Path) -> str | None:
    """Why a built folder does not hold what its build wrote (the first file that differs), or None."""
    build = _read_build(folder)
    if build is None:
        return f"its {BUILD} is unreadable"
    recorded = build.get(FILES)
    if not isinstance(recorded, dict):
        return f"its {BUILD} records no file hashes (built before they were recorded)"
    found = file_hashes(folder)
    for name, digest in recorded.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} does not match the sha256 its {BUILD} records"
    extra = sorted(set(found) - set(recorded))
    return f"{extra[0]} is not in its {BUILD}" if extra else None


def file_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a build but build.json, by relative path (hidden files left out)."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and path.name != BUILD
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def _read_build(folder: Path) -> dict | None:
    """A build's summary (build.json), or None when it cannot be read."""
    try:
        build = json.loads((folder / BUILD).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return build if isinstance(build, dict) else None
