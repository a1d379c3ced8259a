"""Prompts: read a source definition's rows and turn them into prompt records.

A prompt record, what generate and evaluate both sample from:
`{"id", "source", "messages", "reference", "meta"}`, where `messages` is the
chat (system + user) the policy is prompted with, and `reference` the gold
answer (or null). The same records feed trace generation and evaluation.

Data problems surface here, before any engine starts: `read_rows` and
`build_prompts` raise a `DataError` naming the file (and line), the column and
the fix, and `check_source` runs the same code to collect every problem of a
source at once, for the preflight. Rows are numbered from 0, as in `meta.row`.
"""

from __future__ import annotations

import base64
import codecs
import difflib
import hashlib
import io
import json
import pickle
import random
import re
import string
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from length_control.errors import DataError
from length_control.sources import CodeTests, DateWindow, SourceSpec

LETTERS = string.ascii_uppercase


@dataclass
class SourceCheck:
    """One source read and built as generate and evaluate do, with every problem instead of the first.

    `dropped` maps each filter the definition sets (`window`, `min_chars`,
    `dedup`), in the order they run, to the rows it dropped; a row with a
    problem is in `problems`, not in `dropped`. `rows_kept` passed every
    filter; `prompts` are the records `sample` leaves of them (what
    build_prompts returns), `hashed_ids` how many of those have a hash of
    their prompt text as id (rows without an id). A problem reads
    `file[:line]: what is wrong; the fix`.
    """

    source: str
    definition: str
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows_kept: int = 0
    prompts: list[dict[str, Any]] = field(default_factory=list)
    hashed_ids: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The counts in one line, for people: "6 rows read, window dropped 1, 5 kept, 5 prompts"."""
        dropped = "".join(f", {name} dropped {count:,}" for name, count in self.dropped.items())
        hashed = f" ({self.hashed_ids:,} ids hashed from the prompt text)" if self.hashed_ids else ""
        problems = f"; {len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}" if self.problems else ""
        return (
            f"{self.rows_read:,} rows read{dropped}, {self.rows_kept:,} kept, {len(self.prompts):,} prompts"
            f"{hashed}{problems}"
        )


def check_source(spec: SourceSpec, sample: int | None = None) -> SourceCheck:
    """Read and build `spec` (with a recipe's `sample` override) and report rather than raise.

    Reads the whole source, as generate does (a Hub source is downloaded).
    """
    check = SourceCheck(spec.name, spec.definition)
    rows, unreadable = _read(spec)
    check.rows_read = len(rows)
    if unreadable is not None:
        check.problems.append(str(unreadable))
    if rows or unreadable is None:  # the readable rows of a partly corrupt file still get checked
        check.prompts, problems = _build(spec, rows, sample, check)
        check.problems += [str(DataError(spec.definition, problem)) for problem in problems]
    return check


# ---------------------------------------------------------------- reading


def read_rows(spec: SourceSpec) -> list[dict[str, Any]]:
    """All rows of the source's split, as dicts (local files with pyarrow, Hub ids with datasets).

    A missing or unreadable local file raises DataError (the first bad line as `file:LINE`).
    """
    rows, unreadable = _read(spec)
    if unreadable is not None:
        raise unreadable
    return rows


def _read(spec: SourceSpec) -> tuple[list[dict[str, Any]], DataError | None]:
    """The rows that could be read, and what made the others unreadable (None: nothing)."""
    location = spec.dataset
    if location.path is None:
        import datasets

        return datasets.load_dataset(location.hf, location.config, split=location.split).to_list(), None
    path = location.path
    if not path.is_file():
        return [], DataError(
            path,
            f"no such data file; `dataset.path` in {spec.definition} names it (relative "
            "paths start at that file's folder): fix the path there, or create the file",
        )
    if path.suffix == ".parquet":
        return _read_parquet(path, spec)
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # some editors start UTF-8 files with a BOM
    if path.suffix == ".json" and data.lstrip().startswith(b"["):
        return _read_json_array(path, data)
    return _read_jsonl(path, data)


def _read_parquet(path: Path, spec: SourceSpec) -> tuple[list[dict[str, Any]], DataError | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist(), None
    except (pa.ArrowException, OSError) as error:
        return [], DataError(
            path,
            f"not a readable Parquet file ({error}); rewrite it, or point `dataset.path` "
            f"in {spec.definition} at a good copy",
        )


def _read_jsonl(path: Path, data: bytes) -> tuple[list[dict[str, Any]], DataError | None]:
    """One JSON object per line; the first bad line is reported as `file:LINE` (1-based), with the others' numbers.

    Lines end at "\n" only: `str.splitlines` would also end one inside a JSON string at U+2028 and its kin.
    """
    rows, bad_lines = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            bad_lines.append((number, f"not UTF-8 text ({error.reason} at byte {error.start} of the line)"))
            continue
        except json.JSONDecodeError as error:
            bad_lines.append((number, f"not valid JSON ({error.msg} at column {error.colno})"))
            continue
        if not isinstance(row, dict):
            bad_lines.append((number, f"a row must be a JSON object {{...}}, not {type(row).__name__}"))
            continue
        rows.append(row)
    if not bad_lines:
        return rows, None
    (line, problem), others = bad_lines[0], [number for number, _ in bad_lines[1:]]
    more = f"; other bad lines: {_some(others)}" if others else ""
    return rows, DataError(path, f"{problem}; fix or remove the line{more}", line=line)


def _read_json_array(path: Path, data: bytes) -> tuple[list[dict[str, Any]], DataError | None]:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        return [], DataError(path, f"not UTF-8 text ({error.reason} at byte {error.start})")
    except json.JSONDecodeError as error:
        return [], DataError(
            path, f"not valid JSON ({error.msg} at column {error.colno}); fix the file", line=error.lineno
        )
    not_objects = [index for index, item in enumerate(items) if not isinstance(item, dict)]
    if not_objects:
        return [item for item in items if isinstance(item, dict)], DataError(
            path, f"every item of the array must be a JSON object {{...}}; items {_some(not_objects)} are not"
        )
    return items, None


def _some(numbers: list[int], shown: int = 10) -> str:
    listed = ", ".join(map(str, numbers[:shown]))
    return listed + (f", ... ({len(numbers) - shown} more)" if len(numbers) > shown else "")


# ---------------------------------------------------------------- building


def build_prompts(spec: SourceSpec, rows: list[dict[str, Any]], sample: int | None = None) -> list[dict[str, Any]]:
    """Filter, deduplicate, sample and format rows into prompt records (deterministic).

    Raises DataError naming the source definition with every problem found: a
    column the definition names that rows lack, a value that cannot be read,
    a repeated id, a filter that keeps no row, no rows at all.
    """
    records, problems = _build(spec, rows, sample, SourceCheck(spec.name, spec.definition, rows_read=len(rows)))
    if problems:
        raise DataError(spec.definition, problems)
    return records


@dataclass
class _Row:
    """A row on its way to a prompt record."""

    index: int
    row: dict[str, Any]
    text: str = ""
    reference: str | None = None
    id: str = ""
    hashed: bool = False  # `id` is a hash of the prompt text


class _RowProblems(Exception):
    """What makes one row unusable, as (kind, describe) pairs: rows of one kind make one message, and
    `describe` turns "row 3" or "5 of 9 rows (first: row 3)" into it."""

    def __init__(self, *found: tuple[tuple[Any, ...], Callable[[str], str]]) -> None:
        super().__init__()
        self.found = list(found)


@dataclass
class _Kind:
    """Rows with one kind of problem: the first of them, how many, and the message."""

    describe: Callable[[str], str]
    first: int
    count: int = 0


class _Problems:
    """A source's problems in the order found; a kind of row problem is one line, however many rows have it."""

    def __init__(self, rows_read: int) -> None:
        self.rows_read = rows_read
        self._lines: list[str | _Kind] = []
        self._kinds: dict[tuple[Any, ...], _Kind] = {}

    def add(self, message: str) -> None:
        self._lines.append(message)

    def add_row(self, error: _RowProblems, index: int) -> None:
        for kind, describe in error.found:
            if kind not in self._kinds:
                self._kinds[kind] = _Kind(describe, index)
                self._lines.append(self._kinds[kind])
            self._kinds[kind].count += 1

    def messages(self) -> list[str]:
        return [line if isinstance(line, str) else line.describe(self._rows(line)) for line in self._lines]

    def _rows(self, kind: _Kind) -> str:
        if kind.count == 1:
            return f"row {kind.first}"
        return f"{kind.count} of {self.rows_read} rows (first: row {kind.first})"


def _build(
    spec: SourceSpec, rows: list[dict[str, Any]], sample: int | None, check: SourceCheck
) -> tuple[list[dict[str, Any]], list[str]]:
    """The one path from rows to records: window, format, min_chars, dedup, ids, sample; counts go to `check`."""
    if not rows:
        return [], [f"no rows in {spec.dataset.describe()}; point `dataset` at the data (or another split)"]
    problems = _Problems(len(rows))
    items = [_Row(index, _with_aliases(row, spec.aliases)) for index, row in enumerate(rows)]
    if spec.window is not None:
        window = spec.window
        items = _filter(
            "window",
            items,
            lambda item: _in_window(item.row, window),
            problems,
            check,
            lambda before: _window_empty(window, before),
        )
    columns = _named_columns(spec)
    items, _ = _passing(items, lambda item: _render(spec, columns, item), problems)
    if spec.min_chars:
        items = _filter(
            "min_chars",
            items,
            lambda item: len(item.text) >= spec.min_chars,
            problems,
            check,
            lambda before: (
                f"the longest prompt has {max(len(item.text) for item in before):,} characters; lower `min_chars`"
            ),
        )
    if spec.dedup != "none":  # keeps the first of each text, so it never leaves nothing
        seen: set[str] = set()
        items, check.dropped["dedup"] = _passing(
            items, lambda item: _first_time(seen, _dedup_key(item.text, spec.dedup)), problems
        )
    check.rows_kept = len(items)
    _give_ids(spec, items, problems)
    size = sample if sample is not None else spec.sample
    if size is not None and size < len(items):
        items = [items[i] for i in sorted(random.Random(spec.seed).sample(range(len(items)), size))]
    check.hashed_ids = sum(item.hashed for item in items)
    return [_record(spec, item) for item in items], problems.messages()


def _passing(items: list[_Row], test: Callable[[_Row], bool], problems: _Problems) -> tuple[list[_Row], int]:
    """The items `test` passes, and how many it failed; a row with a problem is recorded and counts as neither."""
    passed, failed = [], 0
    for item in items:
        try:
            verdict = test(item)
        except _RowProblems as error:
            problems.add_row(error, item.index)
            continue
        if verdict:
            passed.append(item)
        else:
            failed += 1
    return passed, failed


def _filter(
    name: str,
    items: list[_Row],
    test: Callable[[_Row], bool],
    problems: _Problems,
    check: SourceCheck,
    why_none: Callable[[list[_Row]], str],
) -> list[_Row]:
    """Apply the definition's filter `name`; one that leaves nothing is a problem (a run of 0 prompts is no run)."""
    kept, dropped = _passing(items, test, problems)
    check.dropped[name] = dropped
    if dropped and not kept:
        problems.add(f"`{name}` drops all {dropped} rows that reach it ({problems.rows_read} read); {why_none(items)}")
    return kept


def _first_time(seen: set[str], key: str) -> bool:
    if key in seen:
        return False
    seen.add(key)
    return True


def _window_empty(window: DateWindow, before: list[_Row]) -> str:
    undated = sum(item.row.get(window.field) is None for item in before)
    lacking = f"{undated} of them have no {window.field!r}; " if undated else ""
    return f"{lacking}widen `window` ({window.start} to {window.end}) or point `window.field` at the rows' date column"


# ---------------------------------------------------------------- one row


def _with_aliases(row: dict[str, Any], aliases: dict[str, list[str]]) -> dict[str, Any]:
    """The row with each aliased column filled from its first other name the row has (other layouts)."""
    found = {
        column: value
        for column, others in aliases.items()
        if row.get(column) is None
        for value in [next((row[other] for other in others if row.get(other) is not None), None)]
        if value is not None
    }
    return row | found if found else row


def _named_columns(spec: SourceSpec) -> list[tuple[str, str, bool]]:
    """(definition key, column, may the value be null) for every column the definition reads from a row."""
    computed = (
        {"starter_code_block"}
        | ({"choices"} if spec.multiple_choice else set())
        | ({"code_instructions"} if spec.code_tests else set())
    )
    fields = [name for _, name, _, _ in string.Formatter().parse(spec.prompt) if name and name not in computed]
    named = [("prompt", name, False) for name in dict.fromkeys(fields)]
    if spec.reference is not None:
        named.append(("reference", spec.reference, True))
    if spec.multiple_choice is not None:
        mc = spec.multiple_choice
        named += [("multiple_choice.correct", mc.correct, False)]
        named += [("multiple_choice.incorrect", column, False) for column in mc.incorrect]
    if spec.code_tests is not None:
        tests = spec.code_tests
        named.append(("code_tests.public", tests.public, False))
        named += [
            (f"code_tests.{key}", column, True)
            for key, column in (("private", tests.private), ("metadata", tests.metadata))
            if column
        ]
    return named


def _render(spec: SourceSpec, columns: list[tuple[str, str, bool]], item: _Row) -> bool:
    """Set the row's user message, reference and id (its column, else a hash of the text); raise _RowProblems."""
    row = item.row
    lacking = [
        _lacking(key, column, row)
        for key, column, null_ok in columns
        if (column not in row if null_ok else row.get(column) is None)
    ]
    if lacking:
        raise _RowProblems(*lacking)
    fields = row | {"starter_code_block": _starter_code_block(row.get("starter_code"))}
    gold = row[spec.reference] if spec.reference is not None else None
    item.reference = str(gold).strip() if gold is not None else None
    if spec.code_tests is not None:
        fields["code_instructions"] = _code_instructions(row.get("starter_code") or "")
        item.reference = _code_reference(row, spec.code_tests)
    if spec.multiple_choice is not None:
        fields["choices"] = _lettered(_options(row, spec), range(1 + len(spec.multiple_choice.incorrect)))
    item.text = _format(spec.prompt, fields)
    own_id = row.get(spec.id) if spec.id is not None else None
    item.hashed = own_id is None
    item.id = _content_id(item.text) if item.hashed else str(own_id)
    if spec.multiple_choice is not None:  # shuffled per row with its id, so only now; the hash saw column order
        fields["choices"], item.reference = _shuffle_choices(_options(row, spec), spec.seed, item.id)
        item.text = _format(spec.prompt, fields)
    return True


def _lacking(key: str, column: str, row: dict[str, Any]) -> tuple[tuple[Any, ...], Callable[[str], str]]:
    """The problem of a row without a column the definition names: the key, the column, the row's columns."""
    if column in row:
        return (
            "null",
            key,
            column,
        ), lambda rows: f"`{key}` names column {column!r}, which is null in {rows}; fix those rows in the data"
    guess = difflib.get_close_matches(column, [str(name) for name in row], n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    present = ", ".join(repr(str(name)) for name in row)
    return (
        ("missing", key, column),
        lambda rows: (
            f"`{key}` names column {column!r}, missing from {rows}; that row has {present}; {hint}fix `{key}`, or "
            f"list the column's names in other layouts under `aliases: {{{column}: [...]}}`"
        ),
    )


class _BadValue(_RowProblems):
    """A value the definition reads that cannot be read as it says (a date, JSON, encoded tests)."""

    def __init__(self, key: str, column: str, why: str) -> None:
        super().__init__(
            (
                ("value", key, column),
                lambda rows: f"`{key}`: column {column!r} cannot be read in {rows}: {why}; fix those rows in the data",
            )
        )


def _format(prompt: str, fields: dict[str, Any]) -> str:
    try:
        return prompt.format_map(fields)
    except (ValueError, TypeError) as error:  # a format spec that does not fit the value, e.g. {n:d} on text
        why = str(error)  # `error` is unbound once the except clause ends, before the message is made
        raise _RowProblems(
            (("format",), lambda rows: f"`prompt` cannot be formatted with {rows}: {why}; fix `prompt`")
        ) from None


def _starter_code_block(starter_code: str | None) -> str:
    """`{starter_code_block}`: the starter code the solution must use, or nothing for a stdin problem."""
    return f"\n\n{_code_instructions(starter_code)}" if starter_code and starter_code.strip() else ""


def _content_id(text: str) -> str:
    """The id of a row without one: a hash of its prompt text.

    Every request's seed and key come from the prompt id (engine.sample_request),
    and results, resumed shards and splice's joins are matched by it, so an id
    must be the same in every run, on every machine, whatever the row order or
    the rows around it. A hash of the text is; a row index moves when a copy of
    the dataset is re-sharded or re-ordered, and a random id changes every run.
    16 hex digits (64 bits): no collision among millions of prompts.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _give_ids(spec: SourceSpec, items: list[_Row], problems: _Problems) -> None:
    """Make ids unique: a repeated text without an id gets `-2`, `-3` in row order; a repeated own id is a problem."""
    copies: Counter[str] = Counter()
    first_row: dict[str, int] = {}
    for item in items:
        if item.hashed:
            copies[item.id] += 1
            if copies[item.id] > 1:
                item.id = f"{item.id}-{copies[item.id]}"
        elif item.id in first_row:
            problems.add_row(
                _RowProblems(
                    (
                        ("repeated id",),
                        lambda rows, value=item.id, first=first_row[item.id]: (
                            f"`id` column {spec.id!r} repeats its values in {rows} ({value!r} is also row {first}'s); "
                            "ids must be unique: fix the data, or remove `id` to use a hash of the prompt text"
                        ),
                    )
                ),
                item.index,
            )
        else:
            first_row[item.id] = item.index


def _record(spec: SourceSpec, item: _Row) -> dict[str, Any]:
    messages = ([{"role": "system", "content": spec.system}] if spec.system else []) + [
        {"role": "user", "content": item.text}
    ]
    return {
        "id": f"{spec.name}/{item.id}",
        "source": spec.name,
        "messages": messages,
        "reference": item.reference,
        "meta": {"row": item.index},
    }


def with_system_line(prompt: dict[str, Any], line: str | None) -> dict[str, Any]:
    """`prompt` with `line` in its system message (after the source's own, if it has one): how a run
    states its budget (`EvalRecipe.stated_budget`). Unchanged for None."""
    if line is None:
        return prompt
    messages = list(prompt["messages"])
    if messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n{line}"}
    else:
        messages.insert(0, {"role": "system", "content": line})
    return {**prompt, "messages": messages}


def _code_instructions(starter_code: str) -> str:
    """LiveCodeBench's own instructions: the starter code, or stdin/stdout."""
    if starter_code.strip():
        return (
            "You will use the following starter code to write the solution to the problem and enclose your "
            f"code within delimiters.\n```python\n{starter_code}\n```"
        )
    return (
        "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on "
        "the sample inputs). Enclose your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```"
    )


def _code_reference(row: dict[str, Any], columns: CodeTests) -> str:
    """The sandbox's reference: public + private tests and the function name, as JSON."""
    tests = _json_column(row, "code_tests.public", columns.public) or []
    if columns.private and row[columns.private]:
        try:
            tests += _decode_tests(row[columns.private], "the private tests")
        except ValueError as error:
            raise _BadValue("code_tests.private", columns.private, str(error)) from None
    metadata = _json_column(row, "code_tests.metadata", columns.metadata) if columns.metadata else None
    return json.dumps({"tests": tests, "func_name": (metadata or {}).get("func_name")})


def _json_column(row: dict[str, Any], key: str, column: str) -> Any:
    try:
        return json.loads(row[column]) if row[column] else None
    except (json.JSONDecodeError, TypeError) as error:
        raise _BadValue(key, column, f"not JSON text ({error})") from None


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
        raise ValueError(
            f"{where}: cannot decode the private tests as JSON or base64(zlib(pickle(JSON))): {error}"
        ) from error


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


def _options(row: dict[str, Any], spec: SourceSpec) -> list[str]:
    """The options in column order, the correct one first (stripped: GPQA's CSV ends some with a newline)."""
    mc = spec.multiple_choice
    return [str(row[column]).strip() for column in (mc.correct, *mc.incorrect)]


def _shuffle_choices(options: list[str], seed: int, row_id: str) -> tuple[str, str]:
    """Lettered options in a per-row seeded order, and the letter of the correct one."""
    order = list(range(len(options)))
    random.Random(f"{seed}:{row_id}").shuffle(order)
    return _lettered(options, order), LETTERS[order.index(0)]


def _lettered(options: list[str], order) -> str:
    return "\n".join(f"{LETTERS[i]}) {options[j]}" for i, j in enumerate(order))


def _in_window(row: dict[str, Any], window: DateWindow) -> bool:
    """Is the row's date in [start, end)? A row without one is in no window."""
    value = row.get(window.field)
    if value is None:
        return False
    day = value.date() if isinstance(value, datetime) else value
    if not isinstance(day, date):
        try:
            day = datetime.fromisoformat(str(value)).date()
        except ValueError:
            raise _BadValue("window.field", window.field, f"{value!r} is not an ISO date") from None
    return window.start <= day < window.end
