"""The records at the stages' boundaries: each TypedDict in `contracts` has exactly its Arrow schema's fields, each
of the Python type its Arrow type reads as, so the schema stays the one truth of what a stage writes; and
`metrics.json` holds only the keys `contracts.BenchmarkMetrics` names."""

from __future__ import annotations

import types
import typing

import pyarrow as pa
import pytest

from length_control import contracts
from length_control.contracts import DRIFT, EARLY_CLOSE, PROBE
from length_control.evaluate import summarize

RECORDS = [
    (contracts.TRACES, contracts.Trace),
    (contracts.ANSWERS, contracts.Answer),
    (contracts.META_SCHEMA, contracts.RowMeta),
    (contracts.SAMPLES_SCHEMA, contracts.Sample),
    (contracts.PROBE_SCHEMA, contracts.ProbeRecord),
    (contracts.DRIFT_SCHEMA, contracts.DriftRecord),
    (contracts.EARLY_CLOSE_SCHEMA, contracts.EarlyCloseRecord),
]


def python_type(arrow: pa.DataType) -> object:
    if arrow == contracts.IDS:
        return contracts.TokenIds
    for is_kind, python in (
        (pa.types.is_string, str),
        (pa.types.is_boolean, bool),
        (pa.types.is_integer, int),
        (pa.types.is_floating, float),
    ):
        if is_kind(arrow):
            return python
    raise AssertionError(f"no Python type for {arrow}")


@pytest.mark.parametrize(("schema", "record"), RECORDS, ids=[record.__name__ for _, record in RECORDS])
def test_each_record_type_has_its_schemas_fields_and_types(schema: pa.Schema, record: type) -> None:
    hints = typing.get_type_hints(record)
    assert sorted(hints) == sorted(schema.names)
    for field in schema:
        hint, expected = hints[field.name], python_type(field.type)
        if hint == expected:
            continue
        # a nullable field: the type or None
        assert isinstance(hint, types.UnionType) and set(typing.get_args(hint)) == {expected, type(None)}, field.name


def test_a_record_written_and_read_back_is_the_same_record(tmp_path) -> None:
    trace = contracts.Trace(
        prompt_id="p",
        sample=1,
        prompt_token_ids=[1, 2],
        output_token_ids=[3, 4, 5],
        finish_reason="length",
        think_close=None,
        seed=7,
    )
    contracts.write_records(tmp_path / "traces.parquet", [trace], contracts.TRACES)
    assert contracts.read_records(tmp_path / "traces.parquet") == [trace]


def sample(problem: str, index: int, closed: bool, correct: bool) -> contracts.SampleScore:
    return contracts.SampleScore(
        benchmark="evals",
        problem_id=problem,
        sample=index,
        prompt_tokens=5,
        thinking_tokens=10 if closed else 20,
        closed_think=closed,
        overlong=not closed,
        correct=correct,
    )


def test_the_metrics_of_every_probe_are_named_in_benchmark_metrics() -> None:
    key = {"benchmark": "evals", "problem_id": "a", "sample": 0}
    probes = {
        PROBE: [{**key, "close_nll": 0.5, "greedy_close": True}],
        DRIFT: [
            {**key, "close": close, "answer_start": 3, "answer_nll": 0.1, "greedy_token_ids": [1]}
            | {"greedy_agrees": True, "stage1_greedy_min_p": min_p}
            for close, min_p in (("forced", 0.9), ("own", 0.4))
        ],
        EARLY_CLOSE: [{**key, "positions": 2, "close_p_mean": 0.1, "close_p_max": 0.2}],
    }
    samples = [sample("a", 0, True, True), sample("a", 1, False, False), sample("b", 0, True, False)]
    bare = summarize(samples, context_limit=64)["benchmarks"]["evals"]
    assert set(bare) == contracts.BenchmarkMetrics.__required_keys__
    probed = summarize(samples, context_limit=64, probes=probes)["benchmarks"]["evals"]
    optional = contracts.BenchmarkMetrics.__optional_keys__ - {"prompts_too_long"}  # the eval's own file adds it
    assert set(probed) == contracts.BenchmarkMetrics.__required_keys__ | optional
