"""Prompt sources: every shipped definition in prompts_sources/ turns rows of its
real dataset's schema into DESIGN.md's prompt records.

The Hub datasets cannot be downloaded here, so each test loads the shipped YAML
and points its `dataset` at a tiny local file in the same schema
(tests/fixtures/sources/, column names and encodings as in
shared/notes/datasets.md); everything else in the definition is as shipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import re
import zlib
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from length_control._schema import ConfigError, read_yaml
from length_control.errors import DataError, UserError
from length_control.prompts import build_prompts, check_source, read_rows
from length_control.sources import DatasetLocation, SourceSpec, load_source_spec

from conftest import REPO

SOURCES = REPO / "prompts_sources"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sources"

# shipped definition -> local file in the real dataset's schema
FIXTURE_OF = {
    "webinstruct_verified": "webinstruct_verified.jsonl",
    "deepmath_103k": "deepmath_103k.jsonl",
    "rstar_coder": "rstar_coder_synthetic_rl.jsonl",
    "aime_2024": "aime_2024.jsonl",
    "aime_2025": "aime_2025.jsonl",
    "gpqa_diamond": "gpqa_diamond.jsonl",
    "livecodebench_v6": "lcb_code_generation_lite_release_v6.jsonl",
}
# other published layouts the shipped definitions read too
OTHER_LAYOUTS = {
    "rstar_coder_synthetic_sft.jsonl": {"question", "seed_question", "seed_source", "response", "code"},
    "rstar_coder_seed_sft.jsonl": {
        "question_id",
        "question",
        "starter_code",
        "response",
        "code",
        "verified",
        "is_passed",
    },
    "opencompass_aime2025.jsonl": {"question", "answer"},
}

BOXED = " Please reason step by step, and put your final answer within \\boxed{}."
AIME_INSTRUCTION = (
    "Solve the following math problem efficiently and clearly. The last line of your response should be of the "
    "following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. Think step by step before "
    "answering.\n\n"
)
GPQA_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering.\n\n"
)


# ---------------------------------------------------------------- helpers


def fixture_rows(source: str) -> list[dict]:
    return read_fixture(FIXTURE_OF.get(source, source))


def read_fixture(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def local_spec(source: str, folder: Path, data: Path | None = None, **changes) -> SourceSpec:
    """The shipped definition with `dataset` pointing at a local file, and `changes` (written as YAML, loaded as a
    user would)."""
    raw = read_yaml(SOURCES / f"{source}.yaml") | changes
    raw["dataset"] = {"path": str(data or FIXTURES / FIXTURE_OF[source])}
    file = folder / f"{source}.local.yaml"
    file.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    spec = load_source_spec(file)
    shipped = load_source_spec(SOURCES / f"{source}.yaml")
    assert spec.model_dump(exclude={"dataset", *changes}) == shipped.model_dump(exclude={"dataset", *changes})
    return spec


def text_id(text: str) -> str:
    """The id of a row without one, computed here independently: 16 hex digits of the prompt text's SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def changed(spec: SourceSpec, **changes) -> SourceSpec:
    """A validated copy of `spec` with some keys changed."""
    return SourceSpec.model_validate(spec.model_dump() | changes)


def build(spec: SourceSpec, **kwargs) -> list[dict]:
    records = build_prompts(spec, read_rows(spec), **kwargs)
    check_contract(records, spec)
    return records


def check_contract(records: list[dict], spec: SourceSpec) -> None:
    """DESIGN.md: a prompt record is `id`, `source`, `messages`, `reference`, `meta`, and JSON-serialisable."""
    for record in records:
        assert set(record) == {"id", "source", "messages", "reference", "meta"}
        assert record["source"] == spec.name
        assert record["id"].startswith(f"{spec.name}/")
        assert [m["role"] for m in record["messages"]] == ["user"]  # no shipped source has a system message
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in record["messages"])
        assert record["reference"] is None or isinstance(record["reference"], str)
        assert isinstance(record["meta"], dict)
        assert json.loads(json.dumps(record)) == record
    assert len({r["id"] for r in records}) == len(records)


def user(record: dict) -> str:
    return record["messages"][-1]["content"]


def row_of(record: dict, rows: list[dict]) -> dict:
    return rows[record["meta"]["row"]]


def ids(records: list[dict]) -> list[str]:
    return [r["id"] for r in records]


# ---------------------------------------------------------------- definitions


@pytest.mark.parametrize("file", sorted(SOURCES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_definition_validates(file: Path) -> None:
    spec = load_source_spec(file)
    assert spec.name
    assert (spec.dataset.hf is None) != (spec.dataset.path is None)
    assert "{" in spec.prompt


def test_shipped_names_are_unique() -> None:
    names = [load_source_spec(file).name for file in SOURCES.glob("*.yaml")]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("source", "hf", "config", "split", "reference", "id_column"),
    [
        ("webinstruct_verified", "TIGER-Lab/WebInstruct-verified", None, "train", "answer", "id"),
        ("deepmath_103k", "zwhe99/DeepMath-103K", None, "train", "final_answer", None),
        ("rstar_coder", "microsoft/rStar-Coder", "synthetic_rl", "train", None, "question_id"),
        ("aime_2024", "HuggingFaceH4/aime_2024", None, "train", "answer", "id"),
        ("aime_2025", "yentinglin/aime_2025", None, "train", "answer", "id"),
        ("gpqa_diamond", "Idavidrein/gpqa", "gpqa_diamond", "train", "Correct Answer", "Record ID"),
        (
            "livecodebench_v6",
            "lighteval/code_generation_lite",
            "release_v6",
            "test",
            "public_test_cases",
            "question_id",
        ),
    ],
)
def test_shipped_hub_locations_match_the_dataset_notes(source, hf, config, split, reference, id_column) -> None:
    spec = load_source_spec(SOURCES / f"{source}.yaml")
    assert (spec.dataset.hf, spec.dataset.config, spec.dataset.split) == (hf, config, split)
    assert (spec.reference, spec.id) == (reference, id_column)


def test_a_frozen_spec_can_be_copied_onto_a_local_file(tmp_path: Path) -> None:
    """`model_copy(update=...)` works on the frozen models and gives what the rewritten YAML gives."""
    shipped = load_source_spec(SOURCES / "aime_2024.yaml")
    copy = shipped.model_copy(update={"dataset": DatasetLocation(path=FIXTURES / FIXTURE_OF["aime_2024"])})
    assert shipped.dataset.hf == "HuggingFaceH4/aime_2024"  # the original is untouched
    assert build(copy) == build(local_spec("aime_2024", tmp_path))


@pytest.mark.parametrize("name", sorted([*FIXTURE_OF.values(), *OTHER_LAYOUTS]))
def test_fixtures_have_the_real_schema(name: str) -> None:
    """The fixtures themselves: 3-6 rows, the documented columns and encodings."""
    rows = read_fixture(name)
    assert 3 <= len(rows) <= 6
    columns = OTHER_LAYOUTS | {
        "webinstruct_verified.jsonl": {"id", "question", "answer", "answer_type", "category", "difficulty"},
        "deepmath_103k.jsonl": {"question", "final_answer", "difficulty", "topic"}
        | {f"r1_solution_{i}" for i in (1, 2, 3)},
        "rstar_coder_synthetic_rl.jsonl": {"question_id", "question", "seed_question", "seed_source"},
        "aime_2024.jsonl": {"id", "problem", "solution", "answer", "url", "year"},
        "aime_2025.jsonl": {"id", "problem", "solution", "answer", "url", "year"},
        "lcb_code_generation_lite_release_v6.jsonl": {
            "question_title",
            "question_content",
            "platform",
            "question_id",
            "contest_id",
            "contest_date",
            "starter_code",
            "difficulty",
            "public_test_cases",
            "private_test_cases",
            "metadata",
        },
    }
    for row in rows:
        if name == "gpqa_diamond.jsonl":  # a subset of the 78 CSV columns, with the real names
            used = {"Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"}
            assert used | {"Record ID", "Canary String", "High-level domain"} <= set(row)
            assert "dummy" in row["Canary String"]
            continue
        assert set(row) == columns[name]
    if name == "deepmath_103k.jsonl":
        assert all(isinstance(row["difficulty"], float) for row in rows)
    if name.startswith("aime_"):
        assert all(isinstance(row["id"], int) and isinstance(row["answer"], str) for row in rows)
    if name in ("webinstruct_verified.jsonl", "lcb_code_generation_lite_release_v6.jsonl"):
        assert all(isinstance(value, str) for row in rows for value in row.values())
    if name.startswith("lcb_"):
        for row in rows:
            datetime.fromisoformat(row["contest_date"])
            public = json.loads(row["public_test_cases"])
            private = json.loads(pickle.loads(zlib.decompress(base64.b64decode(row["private_test_cases"]))))
            for test in public + private:
                assert set(test) == {"input", "output", "testtype"} and test["testtype"] in {"stdin", "functional"}
            meta = json.loads(row["metadata"])
            assert ("func_name" in meta) == bool(row["starter_code"])


# ---------------------------------------------------------------- trace-generation sources


def test_webinstruct_verified(tmp_path: Path) -> None:
    spec = local_spec("webinstruct_verified", tmp_path)
    rows = fixture_rows("webinstruct_verified")
    records = build(spec)
    # 5e...0004 repeats 0001 up to whitespace and case: `dedup: normalized` drops it
    assert ids(records) == [f"webinstruct-verified/5f0c6a1e-000{i}" for i in (1, 2, 3, 5)]
    for record in records:
        row = row_of(record, rows)
        assert record["id"] == f"webinstruct-verified/{row['id']}"
        assert user(record) == row["question"] + BOXED
        assert record["reference"] == row["answer"]
    assert records[2]["reference"] == "\\frac{3}{5}"
    assert user(records[2]).endswith("within \\boxed{}.")
    assert "$\\{a, b\\} \\subset" in user(records[2])  # braces in the data are text, not format fields


def test_deepmath_103k(tmp_path: Path) -> None:
    spec = local_spec("deepmath_103k", tmp_path)
    rows = fixture_rows("deepmath_103k")
    records = build(spec)
    # row 3 is row 2 in fullwidth digits (NFKC), dropped as a duplicate
    assert [record["meta"]["row"] for record in records] == [0, 1, 2]
    # no id column: each id is a hash of the prompt text, the same whatever the row order
    assert ids(records) == [f"deepmath-103k/{text_id(user(record))}" for record in records]
    assert ids(build_prompts(spec, rows[2::-1])) == ids(records)[::-1]
    for record in records:
        row = row_of(record, rows)
        assert user(record) == row["question"] + BOXED
        assert record["reference"] == row["final_answer"]
    assert records[0]["reference"] == "\\dfrac{\\pi}{4}"
    assert "$S = \\{1, 2, \\dots, 10\\}$" in user(records[1])
    assert len(build(changed(spec, dedup="none"))) == 4
    assert len(build(changed(spec, dedup="exact"))) == 4  # only normalisation sees the fullwidth copy


def test_rstar_coder_min_chars_and_dedup(tmp_path: Path) -> None:
    spec = local_spec("rstar_coder", tmp_path)
    rows = fixture_rows("rstar_coder")
    by_id = {row["question_id"]: row for row in rows}
    assert [len(by_id[f"rs-000{i}"]["question"]) for i in (2, 3, 5)] == [52, 2000, 1999]
    records = build(spec)
    # rs-0002 (52 chars) and rs-0005 (1,999) are too short; rs-0003 has exactly 2,000;
    # rs-0004 is rs-0001 with other whitespace and case
    assert ids(records) == ["rstar-coder/rs-0001", "rstar-coder/rs-0003", "rstar-coder/rs-0006"]
    for record in records:
        assert record["reference"] is None
        assert user(record) == by_id[record["id"].split("/", 1)[1]]["question"]
    # each rule alone
    assert len(build(changed(spec, min_chars=0, dedup="none"))) == 6
    only_dedup = build(changed(spec, min_chars=0))
    assert "rstar-coder/rs-0004" not in ids(only_dedup) and len(only_dedup) == 5
    only_length = build(changed(spec, dedup="none"))
    assert ids(only_length) == [f"rstar-coder/rs-000{i}" for i in (1, 3, 4, 6)]
    assert len(build(changed(spec, dedup="exact"))) == 4  # exact dedup keeps the near-duplicate


@pytest.mark.parametrize("source", ["webinstruct_verified", "deepmath_103k", "rstar_coder"])
def test_sample_is_deterministic(source: str, tmp_path: Path) -> None:
    spec = local_spec(source, tmp_path)
    everything = build(changed(spec, sample=None))
    assert spec.sample == 100_000
    assert build(spec) == everything  # a sample larger than the source keeps it all, in order
    small = changed(spec, sample=2)
    first = build(small)
    assert len(first) == 2
    assert build(small) == first
    assert build_prompts(spec, read_rows(spec), sample=2) == first  # the argument overrides the definition
    positions = [everything.index(record) for record in first]
    assert positions == sorted(positions)  # a subset of the kept records, in source order
    selections = {tuple(ids(build(changed(spec, sample=2, seed=seed)))) for seed in range(20)}
    assert len(selections) > 1  # the seed chooses


# ---------------------------------------------------------------- eval sets


@pytest.mark.parametrize(("source", "name"), [("aime_2024", "aime24"), ("aime_2025", "aime25")])
def test_aime(source: str, name: str, tmp_path: Path) -> None:
    spec = local_spec(source, tmp_path)
    rows = fixture_rows(source)
    records = build(spec)
    assert spec.grader == "math"
    assert ids(records) == [f"{name}/{row['id']}" for row in rows]
    for record, row in zip(records, rows):
        assert user(record) == AIME_INSTRUCTION + row["problem"]
        assert "$\\boxed{ANSWER}$" in user(record)
        assert record["reference"] == row["answer"].strip()
        assert record["reference"].isdigit()
    # an answer column read as integers still gives string references
    as_ints = [row | {"answer": int(row["answer"])} for row in rows]
    assert [r["reference"] for r in build_prompts(spec, as_ints)] == [r["reference"] for r in records]


def _options(text: str) -> dict[str, str]:
    found = re.findall(r"^([A-D])\) (.*)$", text, flags=re.MULTILINE)
    return dict(found)


def test_gpqa_diamond(tmp_path: Path) -> None:
    spec = local_spec("gpqa_diamond", tmp_path)
    rows = fixture_rows("gpqa_diamond")
    records = build(spec)
    assert spec.grader == "multiple_choice"
    assert ids(records) == [f"gpqa-diamond/{row['Record ID']}" for row in rows]
    for record, row in zip(records, rows):
        text = user(record)
        assert text.startswith(GPQA_INSTRUCTION + row["Question"] + "\n\n")
        options = _options(text)
        assert list(options) == ["A", "B", "C", "D"]
        assert text.endswith("\n".join(f"{letter}) {option}" for letter, option in options.items()))
        columns = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
        wanted = [row[column].strip() for column in columns]
        assert sorted(options.values()) == sorted(wanted)  # all four, stripped of the CSV's trailing newlines
        assert record["reference"] in "ABCD"
        assert options[record["reference"]] == row["Correct Answer"].strip()
    assert len({r["reference"] for r in records}) > 1  # the correct option is not always in the same place

    # the same per row, whatever the row order or the other rows
    assert build_prompts(spec, rows[::-1]) == [
        r | {"meta": {"row": len(rows) - 1 - r["meta"]["row"]}} for r in records[::-1]
    ]
    assert build_prompts(spec, rows[2:3])[0]["messages"] == records[2]["messages"]
    assert build(spec) == records
    # ... and the seed reorders
    orders = {tuple(_options(user(r)).values()) for seed in range(8) for r in build(changed(spec, seed=seed))[:1]}
    assert len(orders) > 1


@pytest.fixture(scope="module")
def gpqa_spec(tmp_path_factory) -> SourceSpec:
    return local_spec("gpqa_diamond", tmp_path_factory.mktemp("gpqa"))


_option = (
    st.text(st.characters(codec="ascii", exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e"), min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool)
)


@settings(max_examples=60, deadline=None)
@given(
    options=st.lists(_option, min_size=4, max_size=4, unique=True),
    record_id=st.text(min_size=1, max_size=12),
    seed=st.integers(0, 2**31),
)
def test_gpqa_letter_points_at_the_correct_option(gpqa_spec, options, record_id, seed) -> None:
    spec = changed(gpqa_spec, seed=seed)
    row = {"Question": "Q?", "Correct Answer": options[0] + "\n", "Record ID": record_id}
    row |= {f"Incorrect Answer {i}": options[i] for i in (1, 2, 3)}
    (record,) = build_prompts(spec, [row])
    shown = _options(user(record))
    assert sorted(shown.values()) == sorted(options)
    assert shown[record["reference"]] == options[0]
    assert build_prompts(spec, [row]) == [record]


IN_WINDOW = ["lcb-v6/3412", "lcb-v6/2041C", "lcb-v6/arc196_b"]


def test_livecodebench_v6_window(tmp_path: Path) -> None:
    spec = local_spec("livecodebench_v6", tmp_path)
    rows = fixture_rows("livecodebench_v6")
    records = build(spec)
    assert spec.grader == "code"
    # 2024-07-31T23:59:59 is before; 2024-08-01T00:00:00 and 2025-04-30T23:59:59 are in;
    # 2025-05-01T00:00:00 and 2025-06-01 are past the end
    assert ids(records) == IN_WINDOW
    for record in records:
        row = row_of(record, rows)
        assert "2024-08-01" <= row["contest_date"] < "2025-05-01"
        assert row["question_content"] in user(record)
        assert ("starter code" in user(record)) == bool(row["starter_code"])
        reference = json.loads(record["reference"])
        assert reference["tests"][: len(json.loads(row["public_test_cases"]))] == json.loads(row["public_test_cases"])
        assert len(reference["tests"]) > len(json.loads(row["public_test_cases"]))  # the private tests, decoded
        assert reference["func_name"] == json.loads(row["metadata"]).get("func_name")
        assert reference["tests"][0]["testtype"] in {"stdin", "functional"}
    assert "{x} and {{y}}" in user(records[1])  # braces in the statement stay as they are
    # a row without a date is outside any window
    undated = [row | {"contest_date": None} if row["question_id"] == "3412" else row for row in rows]
    assert ids(build_prompts(spec, undated)) == IN_WINDOW[1:]
    # the datasets JSON builder parses contest_date as a timestamp: same window
    as_datetimes = [row | {"contest_date": datetime.fromisoformat(row["contest_date"])} for row in rows]
    assert build_prompts(spec, as_datetimes) == records


# ---------------------------------------------------------------- local Parquet


def test_parquet_reads_like_jsonl(tmp_path: Path) -> None:
    """DeepMath ships Parquet: the same rows from a .parquet file give the same prompts."""
    rows = fixture_rows("deepmath_103k")
    data = tmp_path / "train-00000-of-00001.parquet"
    table = pa.Table.from_pylist(rows)
    assert table.schema.field("difficulty").type == pa.float64()
    pq.write_table(table, data)
    from_parquet = build(local_spec("deepmath_103k", tmp_path, data))
    from_jsonl = build(local_spec("deepmath_103k", tmp_path))
    assert from_parquet == from_jsonl


def test_parquet_timestamps_are_windowed(tmp_path: Path) -> None:
    """A Parquet copy of LiveCodeBench whose contest_date is timestamp[s] keeps the same problems."""
    rows = fixture_rows("livecodebench_v6")
    rows = [row | {"contest_date": datetime.fromisoformat(row["contest_date"])} for row in rows]
    table = pa.Table.from_pylist(rows)
    table = table.set_column(
        table.schema.get_field_index("contest_date"), "contest_date", table["contest_date"].cast(pa.timestamp("s"))
    )
    data = tmp_path / "test.parquet"
    pq.write_table(table, data)
    spec = local_spec("livecodebench_v6", tmp_path, data)
    assert isinstance(read_rows(spec)[0]["contest_date"], datetime)
    assert ids(build(spec)) == IN_WINDOW


def test_private_tests_never_unpickle_code() -> None:
    import base64
    import os
    import pickle
    import zlib

    from length_control.prompts import _decode_tests

    honest = base64.b64encode(zlib.compress(pickle.dumps(json.dumps([{"input": "1", "output": "2"}])))).decode()
    assert _decode_tests(honest) == [{"input": "1", "output": "2"}]
    hostile = base64.b64encode(zlib.compress(pickle.dumps(os.getcwd.__call__)))  # a callable, not a string
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _decode_tests(hostile.decode())


# ---------------------------------------------------------------- other published layouts


def test_rstar_coder_synthetic_sft_rows_get_a_hash_of_their_prompt_as_id(tmp_path: Path) -> None:
    """synthetic_sft has no question_id: each row's id is its prompt text's hash, not a KeyError."""
    data = FIXTURES / "rstar_coder_synthetic_sft.jsonl"
    spec = local_spec("rstar_coder", tmp_path, data)
    rows = read_fixture(data.name)
    records = build(spec)
    # row 1 is too short; row 3 is row 0's question with another response, dropped by dedup
    assert [record["meta"]["row"] for record in records] == [0, 2]
    for record in records:
        assert user(record) == row_of(record, rows)["question"]
        assert record["id"] == f"rstar-coder/{text_id(user(record))}"
    # the same ids whatever the row order and the rows around them
    assert ids(build_prompts(spec, [rows[2], rows[0]])) == ids(records)[::-1]
    # a repeated text without an id, kept (no dedup), gets a numbered id in row order
    everything = build(changed(spec, min_chars=0, dedup="none"))
    assert ids(everything)[3] == f"{ids(everything)[0]}-2"
    check = check_source(spec)
    assert check.hashed_ids == 2 and check.summary().endswith("2 prompts (2 ids hashed from the prompt text)")


def test_rstar_coder_seed_rows_show_their_starter_code(tmp_path: Path) -> None:
    """seed_sft / seed_testcase rows carry `starter_code`: where it is there, the prompt shows it."""
    data = FIXTURES / "rstar_coder_seed_sft.jsonl"
    spec = local_spec("rstar_coder", tmp_path, data)
    rows = read_fixture(data.name)
    records = build(spec)
    # rows 0 and 1 are two solutions of one question: dedup keeps the first
    assert ids(records) == ["rstar-coder/seed-0001", "rstar-coder/seed-0002"]
    with_starter, stdin = records
    assert rows[0]["starter_code"] and not rows[2]["starter_code"]
    assert user(with_starter).startswith(rows[0]["question"] + "\n\nYou will use the following starter code")
    assert user(with_starter).endswith(f"```python\n{rows[0]['starter_code']}\n```")
    assert user(stdin) == rows[2]["question"]  # nothing added to a stdin problem
    # without dedup the two solutions share a question_id, so they would share request seeds and keys
    with pytest.raises(
        DataError,
        match=r"`id` column 'question_id' repeats its values in row 1 \('seed-0001' is also "
        r"row 0's\)",
    ):
        build_prompts(changed(spec, dedup="none"), rows)


def test_aime_2025_reads_both_published_layouts(tmp_path: Path) -> None:
    """opencompass/AIME2025 has `question` and no `id`: the shipped definition reads it as it reads lighteval's."""
    data = FIXTURES / "opencompass_aime2025.jsonl"
    spec = local_spec("aime_2025", tmp_path, data)
    rows = read_fixture(data.name)
    records = build(spec)
    assert [user(record) for record in records] == [AIME_INSTRUCTION + row["question"] for row in rows]
    assert [record["reference"] for record in records] == [row["answer"] for row in rows]
    assert ids(records) == [f"aime25/{text_id(user(record))}" for record in records]
    # lighteval's layout keeps its own column and ids (test_aime); a row with both reads `problem`
    both = [{"id": 7, "problem": "P?", "question": "Q?", "answer": "1"}]
    assert [(r["id"], user(r)) for r in build_prompts(spec, both)] == [("aime25/7", AIME_INSTRUCTION + "P?")]


# ---------------------------------------------------------------- what fails before the GPUs do


def test_a_missing_data_file_names_the_path_and_the_key_that_names_it(tmp_path: Path) -> None:
    data = tmp_path / "nowhere" / "train.jsonl"
    spec = local_spec("deepmath_103k", tmp_path, data)
    with pytest.raises(DataError) as caught:
        read_rows(spec)
    assert isinstance(caught.value, UserError)  # the CLI prints it and exits 2, no traceback
    assert str(caught.value) == (
        f"{data}: no such data file; `dataset.path` in {tmp_path / 'deepmath_103k.local.yaml'} names it (relative "
        "paths start at that file's folder): fix the path there, or create the file"
    )
    check = check_source(spec)
    assert (check.rows_read, check.prompts, check.problems) == (0, [], [str(caught.value)])  # once, not "no rows" too


def test_a_corrupt_jsonl_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    rows = fixture_rows("deepmath_103k")
    separator = rows[1] | {"question": rows[1]["question"] + "\u2028(a line separator inside a JSON string)"}
    lines = [
        json.dumps(rows[0]),
        "",
        json.dumps(separator, ensure_ascii=False),
        json.dumps(rows[2])[:-1],
        "[1, 2]",
        json.dumps(rows[3]),
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = local_spec("deepmath_103k", tmp_path, data)
    with pytest.raises(DataError) as caught:
        read_rows(spec)
    # line 4 (1-based, the blank line counted) is cut short; line 5 is not an object
    assert re.fullmatch(
        rf"{re.escape(str(data))}:4: not valid JSON \(Expecting ',' delimiter at column \d+\); "
        r"fix or remove the line; other bad lines: 5",
        str(caught.value),
    ), str(caught.value)
    # the readable rows are still checked; the U+2028 inside a string does not split its line
    check = check_source(spec)
    assert check.problems == [str(caught.value)]
    assert (check.rows_read, len(check.prompts)) == (3, 3)
    data.write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    assert read_rows(spec)[1]["question"] == separator["question"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "train.json",
            b'[\n  {"question": "a"},\n  {"question": "b",}\n]\n',
            r":3: not valid JSON \(Expecting property name",
        ),
        ("train.jsonl", b'{"question": "a"}\n{"question": "\xff"}\n', r":2: not UTF-8 text \(invalid start byte"),
        ("train.parquet", b"question,answer\n", r": not a readable Parquet file \("),
    ],
)
def test_other_unreadable_files_name_the_file(name: str, content: bytes, expected: str, tmp_path: Path) -> None:
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(data))}{expected}"):
        read_rows(local_spec("deepmath_103k", tmp_path, data))


def test_a_prompt_field_the_rows_lack_names_the_definition_the_field_and_the_columns(tmp_path: Path) -> None:
    spec = local_spec("deepmath_103k", tmp_path, prompt="{questoin}")
    with pytest.raises(DataError) as caught:
        build(spec)
    assert str(caught.value) == (
        f"{tmp_path / 'deepmath_103k.local.yaml'}: `prompt` names column 'questoin', missing from 4 of 4 rows "
        "(first: row 0); that row has 'question', 'final_answer', 'difficulty', 'topic', 'r1_solution_1', "
        "'r1_solution_2', 'r1_solution_3'; did you mean 'question'? fix `prompt`, or list the column's names in "
        "other layouts under `aliases: {questoin: [...]}`"
    )
    # without the shipped alias, opencompass's AIME rows lack `problem`: the same error, not a KeyError
    opencompass = local_spec("aime_2025", tmp_path, FIXTURES / "opencompass_aime2025.jsonl", aliases={})
    with pytest.raises(DataError, match=r"`prompt` names column 'problem', missing from 3 of 3 rows .*'question'"):
        build(opencompass)


def test_a_format_spec_that_does_not_fit_the_value_names_the_rows_and_the_error(tmp_path: Path) -> None:
    spec = local_spec("deepmath_103k", tmp_path, prompt="{question:d}")
    with pytest.raises(DataError) as caught:
        build(spec)
    assert str(caught.value) == (
        f"{tmp_path / 'deepmath_103k.local.yaml'}: `prompt` cannot be formatted with 4 of 4 rows (first: row 0): "
        "Unknown format code 'd' for object of type 'str'; fix `prompt`"
    )


def test_an_empty_source_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n", encoding="utf-8")
    spec = local_spec("deepmath_103k", tmp_path, data)
    assert read_rows(spec) == []
    expected = (
        f"{tmp_path / 'deepmath_103k.local.yaml'}: no rows in {data}; point `dataset` at the data (or another split)"
    )
    with pytest.raises(DataError) as caught:
        build_prompts(spec, [])
    assert str(caught.value) == expected
    assert check_source(spec).problems == [expected]


def test_a_filter_that_keeps_nothing_is_an_error_naming_it(tmp_path: Path) -> None:
    spec = local_spec("rstar_coder", tmp_path, min_chars=5000)
    with pytest.raises(DataError) as caught:
        build(spec)
    assert str(caught.value) == (
        f"{tmp_path / 'rstar_coder.local.yaml'}: `min_chars` drops all 6 rows that reach it (6 read); the longest "
        "prompt has 2,600 characters; lower `min_chars`"
    )
    check = check_source(spec)
    assert (check.rows_read, check.dropped, check.rows_kept, check.prompts) == (6, {"min_chars": 6, "dedup": 0}, 0, [])
    assert check.summary() == "6 rows read, min_chars dropped 6, dedup dropped 0, 0 kept, 0 prompts; 1 problem"

    late = local_spec(
        "livecodebench_v6", tmp_path, window={"field": "contest_date", "start": "2030-01-01", "end": "2031-01-01"}
    )
    with pytest.raises(
        DataError,
        match=r"`window` drops all 6 rows that reach it \(6 read\); widen `window` "
        r"\(2030-01-01 to 2031-01-01\)",
    ):
        build(late)
    misnamed = local_spec(
        "livecodebench_v6", tmp_path, window={"field": "contest_day", "start": "2024-08-01", "end": "2025-05-01"}
    )
    with pytest.raises(DataError, match="6 of them have no 'contest_day'"):
        build(misnamed)


def test_check_source_reports_every_problem_that_build_prompts_raises(tmp_path: Path) -> None:
    """One path: the preflight's check and the stages' build find the same problems, all of them at once."""
    rows = fixture_rows("livecodebench_v6")
    rows[0] = rows[0] | {"contest_date": "next week"}
    del rows[1]["question_content"]
    rows[3] = rows[3] | {"question_id": rows[2]["question_id"]}
    rows[4] = rows[4] | {"contest_date": "2025-04-01T00:00:00", "private_test_cases": "not base64!"}
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    spec = local_spec("livecodebench_v6", tmp_path, data)
    check = check_source(spec)
    with pytest.raises(DataError) as caught:
        build_prompts(spec, read_rows(spec))
    assert str(caught.value).splitlines() == check.problems
    definition = f"{tmp_path / 'livecodebench_v6.local.yaml'}: "
    window, missing, undecodable, repeated = check.problems
    assert window == (
        f"{definition}`window.field`: column 'contest_date' cannot be read in row 0: 'next week' is not "
        "an ISO date; fix those rows in the data"
    )
    assert missing.startswith(f"{definition}`prompt` names column 'question_content', missing from row 1; ")
    assert undecodable.startswith(
        f"{definition}`code_tests.private`: column 'private_test_cases' cannot be read in "
        "row 4: the private tests: cannot decode"
    )
    assert repeated.startswith(
        f"{definition}`id` column 'question_id' repeats its values in row 3 ('2041C' is also row 2's)"
    )
    # row 5 is past the window; rows 2 and 3 pass every filter
    assert (check.rows_read, check.dropped, check.rows_kept, ids(check.prompts)) == (
        6,
        {"window": 1},
        2,
        ["lcb-v6/2041C", "lcb-v6/2041C"],
    )
    assert not check.ok
    as_shipped = local_spec("livecodebench_v6", tmp_path)
    clean = check_source(as_shipped)
    assert clean.ok and clean.prompts == build(as_shipped)
    assert clean.summary() == "6 rows read, window dropped 3, 3 kept, 3 prompts"


@pytest.mark.parametrize("prompt", ["{0}", "{}", "{row.question}", "{row[0]}", "{question"])
def test_a_prompt_that_no_row_could_fill_fails_at_load(prompt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prompt"):
        local_spec("deepmath_103k", tmp_path, prompt=prompt)
