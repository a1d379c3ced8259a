"""Grading: what a response answered, and whether it is right.

Only the text after the thinking is graded: an answer written inside an
unclosed thinking is no answer. Each grader returns what it extracted and
why it scored, so a sample file explains every number in the report.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


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


GRADERS: dict[str, Callable[[str, str], Grade]] = {"exact": grade_exact}


def get_grader(name: str) -> Callable[[str, str], Grade]:
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"no grader {name!r}; known: {', '.join(sorted(GRADERS))}") from None
