"""A hand-checked grading set: math answers (boxed, fractions, LaTeX), multiple-choice
outputs, and programs that pass, fail, time out, crash and hog memory; and grading
many jobs on all cores. LiveCodeBench's rules in detail: test_lcb_parity.py; hostile
programs: test_sandbox.py."""

from __future__ import annotations

import json

import pytest

from length_control import lcb
from length_control.grading import GRADERS, grade_code, grade_exact, grade_many, grade_math, grade_multiple_choice

# (response after </think>, gold, correct?)
MATH = [
    ("The answer is \\boxed{47}.", "47", True),
    ("Therefore, the final answer is: $\\boxed{47}$. I hope it is correct", "47", True),
    ("\\boxed{046}", "46", True),
    ("So we get \\boxed{48}.", "47", False),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{3/4}", "\\frac{3}{4}", True),
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{4}", False),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", True),
    ("\\boxed{2^{1/2}}", "\\sqrt{2}", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    ("\\boxed{\\frac{\\pi}{4}}", "\\dfrac{\\pi}{4}", True),
    ("\\boxed{\\pi/4}", "\\frac{\\pi}{4}", True),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{4}", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{x^2+1}", "(x+1)^2", False),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{3}", "-3", False),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{10\\%}", "10", True),
    ("\\boxed{e^{2}}", "e^2", True),
    ("\\boxed{\\infty}", "\\infty", True),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{(2, 1)}", "(1,2)", False),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", True),
    ("\\boxed{[0, 1]}", "[0,1]", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\sin(\\pi/6)}", "\\frac{1}{2}", True),
    ("I could not finish.", "47", False),
    ("The result is $\\frac{7}{8}$.", "0.875", True),
]


@pytest.mark.parametrize("response, gold, correct", MATH)
def test_math(response: str, gold: str, correct: bool) -> None:
    grade = grade_math(response, gold)
    assert grade.correct is correct, grade


MC = [
    ("Reasoning...\nAnswer: B", "B", True),
    ("Answer: b", "B", True),
    ("The answer is (C).", "C", True),
    ("Answer: $\\boxed{D}$", "D", True),
    ("First I thought Answer: A, but no.\nAnswer: C", "C", True),
    ("Answer: A", "B", False),
    ("The answer is D", "A", False),
    ("I am not sure.", "A", False),
    ("ANSWER: C", "C", True),
    ("answer is B.", "B", True),
]


@pytest.mark.parametrize("response, gold, correct", MC)
def test_multiple_choice(response: str, gold: str, correct: bool) -> None:
    grade = grade_multiple_choice(response, gold)
    assert grade.correct is correct, grade


STDIN_TESTS = json.dumps(
    [{"input": "2 3\n", "output": "5\n", "testtype": "stdin"}, {"input": "10 -4\n", "output": "6", "testtype": "stdin"}]
)
FUNCTIONAL = json.dumps(
    {
        "func_name": "countEven",
        "tests": [
            {"input": "[1, 2, 4]", "output": "2", "testtype": "functional"},
            {"input": "[]", "output": "0", "testtype": "functional"},
        ],
    }
)

PROGRAMS = [
    ("```python\na, b = map(int, input().split())\nprint(a + b)\n```", STDIN_TESTS, True, "passed 2 tests"),
    (
        "```python\nclass Solution:\n    def countEven(self, nums):\n        return sum(n % 2 == 0 for n in nums)\n```",
        FUNCTIONAL,
        True,
        "passed 2 tests",
    ),
    (
        "```python\na, b = map(int, input().split())\nprint(a - b)\n```",
        STDIN_TESTS,
        False,
        "test 0: wrong answer (line 0: '-1' != '5')",
    ),
    ("```python\nwhile True:\n    pass\n```", STDIN_TESTS, False, "test 0: time limit exceeded (1 s)"),
    ("```python\nraise ValueError(3)\n```", STDIN_TESTS, False, "test 0: runtime error: ValueError(3)"),
    ("```python\nraise SystemExit(3)\n```", STDIN_TESTS, False, "test 0: wrong answer (line 0: '' != '5')"),
    ("```python\nx = bytearray(4 << 30)\n```", STDIN_TESTS, False, "test 0: runtime error: MemoryError()"),
    ("no code at all", STDIN_TESTS, False, "no code block"),
]


@pytest.mark.parametrize("response, tests, correct, why", PROGRAMS)
def test_programs(response: str, tests: str, correct: bool, why: str, monkeypatch) -> None:
    monkeypatch.setattr(lcb, "TIMEOUT_S", 1)
    grade = grade_code(response, tests)
    assert grade.correct is correct and grade.why.startswith(why), grade


def test_grade_many_keeps_order_across_graders_and_processes() -> None:
    jobs = [("exact", f"The answer is {n}.", str(n if n % 3 else n + 1)) for n in range(12)]
    jobs += [
        ("multiple_choice", "Answer: B", "B"),
        ("code", PROGRAMS[0][0], STDIN_TESTS),
        ("code", PROGRAMS[2][0], STDIN_TESTS),
        ("math", "\\boxed{\\frac{1}{2}}", "0.5"),
    ]
    grades = grade_many(jobs, workers=2)
    assert grades == [get(*job[1:]) for get, job in zip([GRADERS[name] for name, _, _ in jobs], jobs)]
    assert [g.correct for g in grades] == [n % 3 != 0 for n in range(12)] + [True, True, False, True]
    assert grade_many([]) == []
    with pytest.raises(ValueError, match="no grader 'nope'"):
        grade_many([("nope", "", "")])


def test_exact() -> None:
    assert grade_exact("\n\nThe answer is 12.", "12").correct
    assert not grade_exact("\n\nThe answer is 13.", "12").correct
    assert grade_exact("\n\nThe answer is 12.", "12").extracted == "12"
