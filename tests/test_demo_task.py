"""The demo task: deterministic problems whose thinking grows with them, shipped prompt
sets that match their generator, and grading of the demo's answers."""

from __future__ import annotations

import json

import pytest

from length_control.demo import task as demo_task
from length_control.grading import grade_exact
from length_control.prompts import build_prompts, read_rows
from length_control.sources import load_source_spec

from conftest import REPO


def test_problems_are_deterministic_banded_and_of_both_kinds() -> None:
    first = demo_task.make_problems(200, seed=3, prefix="x")
    assert first == demo_task.make_problems(200, seed=3, prefix="x")
    assert first != demo_task.make_problems(200, seed=4, prefix="x")
    lines = [p.lines for p in first]
    assert all(n in demo_task.SHORT_LINES or n in demo_task.LONG_LINES for n in lines)
    long_share = sum(n in demo_task.LONG_LINES for n in lines) / len(lines)
    assert 0.3 < long_share < 0.6
    assert {p.kind for p in first} == {"count", "check"}


def test_thinking_walks_to_the_answer() -> None:
    problem = demo_task.Problem("p", start=303)
    assert problem.question == "Count down from 303 to 300. How many numbers do you say?"
    assert problem.thinking() == "01:303\n02:302\n03:301\n04:300"
    assert problem.response().endswith("</think>\n\nThe answer is 4.")
    assert grade_exact(problem.response().split("</think>")[1], problem.answer).correct


def test_a_check_problem_counts_the_same_and_asks_for_the_stop() -> None:
    problem = demo_task.Problem("p", start=303, kind="check")
    assert problem.question == "Count down from 303 to 300. Which number do you stop at?"
    assert problem.thinking() == "01=303\n02=302\n03=301\n04=300"  # the count, another separator
    assert problem.response().endswith("</think>\n\nThe answer is 300.")


def test_shipped_prompt_sets_match_their_generator() -> None:
    for name in demo_task.SHIPPED:
        shipped = (REPO / "prompts_sources" / "data" / name).read_text().splitlines()
        assert [json.loads(line) for line in shipped] == demo_task.shipped_records(name), (
            "regenerate with: python -m length_control.demo.task prompts_sources/data"
        )


@pytest.mark.parametrize(
    "name, kind, answer", [("demo_count", "count", str.isdigit), ("demo_check", "check", lambda a: a.endswith("00"))]
)
def test_demo_eval_sets_load_as_prompt_records(name: str, kind: str, answer) -> None:
    spec = load_source_spec(REPO / "prompts_sources" / f"{name}.yaml")
    records = build_prompts(spec, read_rows(spec))
    assert len(records) == 40
    first = records[0]
    assert first["id"] == f"{spec.name}/{kind}-00000" and first["source"] == spec.name
    assert first["messages"] == [{"role": "user", "content": first["messages"][0]["content"]}]
    assert first["messages"][0]["content"].startswith("Count down from ")
    assert first["messages"][0]["content"].endswith(demo_task.QUESTIONS[kind])
    assert all(answer(r["reference"]) for r in records)


def test_an_interrupted_trace_answers_with_the_best_guess_so_far() -> None:
    count = demo_task.Problem("p", start=305)
    text = count.interrupted(2)
    assert text == "<think>\n01:305\n02:304\n</think>\n\nThe answer is 2."  # the count so far: wrong
    assert count.response().startswith(text.split("</think>")[0])  # the same thinking, closed early
    check = demo_task.Problem("p", start=305, kind="check")
    text = check.interrupted(2)
    assert text == "<think>\n01=305\n02=304\n</think>\n\nThe answer is 300."  # in reach from the start: right
    assert grade_exact(text.split("</think>")[1], check.answer).correct
