"""Grading: what a response answered, and whether it is right.

Only the text after the thinking is graded: an answer written inside an
unclosed thinking is no answer. Each grader returns what it extracted and
why it scored, so a sample file explains every number in the report.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from length_control import lcb, sandbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grade:
    extracted: str | None
    correct: bool
    why: str


_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def grade_exact(answer_text: str, reference: str) -> Grade:
    """'The answer is X' (the last one), else the last non-empty line; equal to the reference."""
    found = _ANSWER_IS.findall(answer_text)
    if found:
        extracted = found[-1].strip()
    else:
        lines = [line.strip() for line in answer_text.strip().splitlines() if line.strip()]
        extracted = lines[-1].rstrip(".") if lines else None
    if extracted is None:
        return Grade(None, False, "no answer after the thinking")
    correct = extracted == reference.strip()
    return Grade(extracted, correct, "matches the reference" if correct else f"expected {reference.strip()!r}")


def grade_math(answer_text: str, reference: str) -> Grade:
    """math-verify: the answer's last boxed/expression against the gold, symbolically."""
    from math_verify import parse, verify

    gold = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$")
    found = parse(answer_text)
    if not found:
        return Grade(None, False, "no parsable answer after the thinking")
    extracted = str(found[-1])
    if not gold:
        return Grade(extracted, False, f"the reference {reference!r} does not parse")
    correct = bool(verify(gold, found))
    return Grade(extracted, correct, "equal to the reference" if correct else f"not equal to {reference!r}")


_LETTER = re.compile(r"answer\s*(?:is|:)?\s*\(?\$?\\?(?:boxed\{)?([A-D])\b", re.IGNORECASE)


def grade_multiple_choice(answer_text: str, reference: str) -> Grade:
    """The last 'Answer: X' (or 'answer is (X)'), X in A-D, against the gold letter."""
    found = _LETTER.findall(answer_text)
    if not found:
        return Grade(None, False, "no 'Answer: X' after the thinking")
    extracted = found[-1].upper()
    correct = extracted == reference.strip().upper()
    return Grade(extracted, correct, "the right letter" if correct else f"expected {reference.strip()}")


def grade_code(answer_text: str, reference: str) -> Grade:
    """The program in the answer, run in the sandbox on the reference's tests as LiveCodeBench runs them."""
    program = lcb.extract_program(answer_text)
    if not program or not program.strip():
        return Grade(None, False, "no code block (the text between the last two ``` lines) after the thinking")
    passed, why = lcb.judge(program, reference)
    return Grade(program, passed, why)


GRADERS: dict[str, Callable[[str, str], Grade]] = {
    "exact": grade_exact,
    "math": grade_math,
    "multiple_choice": grade_multiple_choice,
    "code": grade_code,
}


def get_grader(name: str) -> Callable[[str, str], Grade]:
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"no grader {name!r}; known: {', '.join(sorted(GRADERS))}") from None


def grade_many(jobs: Sequence[tuple[str, str, str]], workers: int | None = None) -> list[Grade]:
    """Grade (grader name, answer text, reference) jobs on all cores; the grades in the jobs' order.

    Code and math jobs go to a pool of one process per core (a code job spends
    its time in its sandboxed program, a math job in math-verify, both on the
    CPU); exact and multiple-choice jobs take microseconds and stay in this
    process. A machine that cannot contain code raises
    `sandbox.SandboxUnavailable` before any job is graded.
    """
    for name, _, _ in jobs:
        get_grader(name)
    if any(name == "code" for name, _, _ in jobs):
        lcb.check()
        log.info("code runs contained by %s", sandbox.describe())
    heavy = [number for number, (name, _, _) in enumerate(jobs) if name not in _IN_PROCESS]
    workers = min(workers or len(os.sched_getaffinity(0)), len(heavy))
    pooled = heavy if workers > 1 else []
    grades = dict.fromkeys(pooled)
    for number, job in enumerate(jobs):
        if number not in grades:
            grades[number] = _grade_job(job)
    if pooled:
        chunk = max(1, min(16, len(pooled) // (8 * workers)))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            grades.update(zip(pooled, pool.map(_grade_job, [jobs[number] for number in pooled], chunksize=chunk)))
    return [grades[number] for number in range(len(jobs))]


_IN_PROCESS = {"exact", "multiple_choice"}


def _grade_job(job: tuple[str, str, str]) -> Grade:
    name, answer_text, reference = job
    return GRADERS[name](answer_text, reference)
