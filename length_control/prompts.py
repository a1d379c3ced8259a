"""Prompts: read a source definition's rows and turn them into prompt records.

A prompt record, what generate and evaluate both sample from:
`{"id", "source", "messages", "reference", "meta"}`, where `messages` is the
chat (system + user) the policy is prompted with, and `reference` the gold
answer (or null). The same records feed trace generation and evaluation.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import random
import re
import string
import unicodedata
import zlib
from datetime import date, datetime
from pathlib import Path
from typing import Any

from length_control.sources import SourceSpec

LETTERS = string.ascii_uppercase


def read_rows(spec: SourceSpec) -> list[dict[str, Any]]:
    """All rows of the source's split, as dicts (local files with pyarrow, Hub ids with datasets)."""
    location = spec.dataset
    if location.path is not None:
        return _read_local(location.path)
    import datasets

    dataset = datasets.load_dataset(location.hf, location.config, split=location.split)
    return dataset.to_list()


def _read_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; fix `dataset.path` in the source definition")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_prompts(spec: SourceSpec, rows: list[dict[str, Any]], sample: int | None = None) -> list[dict[str, Any]]:
    """Filter, deduplicate, sample and format rows into prompt records (deterministic)."""
    records, seen = [], set()
    for index, row in enumerate(rows):
        if spec.window is not None and not _in_window(row.get(spec.window.field), spec.window):
            continue
        row_id = str(row[spec.id]) if spec.id is not None else str(index)
        gold = row[spec.reference] if spec.reference is not None else None
        reference = str(gold).strip() if gold is not None else None
        fields = dict(row)
        if spec.multiple_choice is not None:
            fields["choices"], reference = _shuffle_choices(row, spec, row_id)
        if spec.code_tests is not None:
            fields["code_instructions"] = _code_instructions(row.get("starter_code") or "")
            reference = _code_reference(row, spec, row_id)
        try:
            user = spec.prompt.format_map(fields)
        except KeyError as error:
            raise KeyError(f"source {spec.name}: prompt names column {error} that row {row_id} lacks") from None
        if len(user) < spec.min_chars:
            continue
        if spec.dedup != "none":
            key = _dedup_key(user, spec.dedup)
            if key in seen:
                continue
            seen.add(key)
        messages = ([{"role": "system", "content": spec.system}] if spec.system else []) + [
            {"role": "user", "content": user}
        ]
        records.append(
            {"id": f"{spec.name}/{row_id}", "source": spec.name, "messages": messages, "reference": reference,
             "meta": {"row": index}}
        )
    size = sample if sample is not None else spec.sample
    if size is not None and size < len(records):
        chosen = sorted(random.Random(spec.seed).sample(range(len(records)), size))
        records = [records[i] for i in chosen]
    return records


def _code_instructions(starter_code: str) -> str:
    """LiveCodeBench's own instructions: the starter code, or stdin/stdout."""
    if starter_code.strip():
        return ("You will use the following starter code to write the solution to the problem and enclose your "
                f"code within delimiters.\n```python\n{starter_code}\n```")
    return ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on "
            "the sample inputs). Enclose your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```")


def _code_reference(row: dict[str, Any], spec: SourceSpec, row_id: str) -> str:
    """The sandbox's reference: public + private tests and the function name, as JSON."""
    columns = spec.code_tests
    tests = json.loads(row[columns.public])
    if columns.private and row.get(columns.private):
        location = spec.dataset.path or f"{spec.dataset.hf} {spec.dataset.config or ''} {spec.dataset.split}".strip()
        tests += _decode_tests(row[columns.private], f"source {spec.name} ({location}), row {row_id}")
    func_name = json.loads(row[columns.metadata] or "{}").get("func_name") if columns.metadata else None
    return json.dumps({"tests": tests, "func_name": func_name})


class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench pickles a JSON string; unpickling anything else could run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


MAX_TESTS_BYTES = 512 << 20  # one row's private tests, inflated; a bomb of a few hundred KB would fill memory


def _decode_tests(encoded: str, where: str = "private tests", limit: int = MAX_TESTS_BYTES) -> list[dict[str, Any]]:
    """Plain JSON, or LiveCodeBench's base64(zlib(pickle(json))) private tests; every error names `where`."""
    try:
        return json.loads(encoded)
    except json.JSONDecodeError:
        pass
    try:
        packed = base64.b64decode(encoded)
        payload = _StringsOnly(io.BytesIO(_inflate(packed, limit))).load()
        if not isinstance(payload, str):
            raise ValueError(f"the pickle holds a {type(payload).__name__}, not LiveCodeBench's JSON string")
        return json.loads(payload)
    except pickle.UnpicklingError as error:  # stays an UnpicklingError: a refusal is not a broken file
        raise pickle.UnpicklingError(f"{where}: {error}") from error
    except (ValueError, zlib.error, EOFError) as error:
        raise ValueError(f"{where}: cannot decode the private tests as JSON or base64(zlib(pickle(JSON))): "
                         f"{error}") from error


def _inflate(packed: bytes, limit: int) -> bytes:
    """zlib-decompress at most `limit` bytes, refusing as soon as there would be more."""
    inflater, out = zlib.decompressobj(), bytearray()
    while packed:
        out += inflater.decompress(packed, limit + 1 - len(out))
        if len(out) > limit:
            raise ValueError(f"they inflate past {limit >> 20} MiB")
        packed = inflater.unconsumed_tail
    if not inflater.eof:
        raise ValueError("the zlib stream is truncated")
    return bytes(out)


def _dedup_key(text: str, mode: str) -> str:
    if mode == "normalized":
        text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return hashlib.sha256(text.encode()).hexdigest()


def _shuffle_choices(row: dict[str, Any], spec: SourceSpec, row_id: str) -> tuple[str, str]:
    """Lettered options in a per-row seeded order, and the letter of the correct one."""
    mc = spec.multiple_choice
    options = [str(row[mc.correct]).strip()] + [str(row[column]).strip() for column in mc.incorrect]
    order = list(range(len(options)))
    random.Random(f"{spec.seed}:{row_id}").shuffle(order)
    lines = [f"{LETTERS[i]}) {options[j]}" for i, j in enumerate(order)]
    return "\n".join(lines), LETTERS[order.index(0)]


def _in_window(value: Any, window) -> bool:
    if value is None:
        return False
    day = value.date() if isinstance(value, datetime) else value
    if not isinstance(day, date):
        day = datetime.fromisoformat(str(value)).date()
    return window.start <= day < window.end
