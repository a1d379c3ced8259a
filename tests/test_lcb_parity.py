"""LiveCodeBench parity: hand-written programs whose verdicts follow LiveCodeBench's runner.

Each case names the rule of lcb_runner/evaluation/testing_util.py (or
extraction_utils.py) that it pins, and the verdict the runner gives: pass,
wrong (-2), timeout (-3; or -1, the runner's global timeout, for a program
that outlives its alarm) or error (-4, or -1 for a process that exits).
These verdicts were checked against LiveCodeBench's own `run_test` once, by
hand; here they run through `lcb.judge` in the sandbox, with a 1 s timeout.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from length_control import lcb
from length_control.grading import grade_code


@dataclass(frozen=True)
class Case:
    name: str
    rule: str
    program: str
    tests: tuple[tuple[str, str], ...]
    verdict: str  # pass | wrong | timeout | error
    fn_name: str | None = None

    def reference(self) -> str:
        kind = "functional" if self.fn_name else "stdin"
        tests = [{"input": i, "output": o, "testtype": kind} for i, o in self.tests]
        return json.dumps({"tests": tests, "func_name": self.fn_name})


SUM = (("2 3\n", "5\n"), ("10 -4\n", "6\n"))


def _digits(number: int) -> str:
    """str(number) past this process's 4,300-digit limit (the test's expected outputs only)."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return str(number)
    finally:
        sys.set_int_max_str_digits(limit)


SEVEN_TO_20000 = _digits(7**20000)

STDIN = [
    Case("right", "a right program passes every test", "a, b = map(int, input().split())\nprint(a + b)", SUM, "pass"),
    Case("wrong", "a wrong line fails", "a, b = map(int, input().split())\nprint(a - b)", SUM, "wrong"),
    Case(
        "first-failure",
        "grading stops at the first failing test",
        "a, b = map(int, input().split())\nprint(5 if a == 2 else 0)",
        SUM,
        "wrong",
    ),
    Case("float-as-int", "lines compare as Decimals: 8.0 equals 8", "print(8.0)", (("\n", "8\n"),), "pass"),
    Case("exponent", "Decimal('1e3') equals Decimal('1000')", "print('1e3')", (("\n", "1000\n"),), "pass"),
    Case(
        "no-tolerance",
        "Decimals compare exactly: 0.1000001 is not 0.1",
        "print(0.1000001)",
        (("\n", "0.1\n"),),
        "wrong",
    ),
    Case("negative-zero", "Decimal('-0') equals Decimal('0')", "print('-0')", (("\n", "0\n"),), "pass"),
    Case("nan", "a NaN is equal as text only: 'NaN' is not 'nan'", "print('NaN')", (("\n", "nan\n"),), "wrong"),
    Case(
        "token-spacing",
        "numeric lines split on whitespace: '1  2' equals '1 2'",
        "print('1  2')",
        (("\n", "1 2\n"),),
        "pass",
    ),
    Case(
        "word-spacing",
        "non-numeric lines must be equal after stripping: 'a  b' is not 'a b'",
        "print('a  b')",
        (("\n", "a b\n"),),
        "wrong",
    ),
    Case(
        "strip",
        "the output and each line are stripped",
        "print()\nprint('  5  ')\nprint()\nprint()",
        (("\n", "5"),),
        "pass",
    ),
    Case(
        "line-count",
        "an inner empty line changes the line count",
        "print(1)\nprint()\nprint(2)",
        (("\n", "1\n2\n"),),
        "wrong",
    ),
    Case(
        "main-guard",
        "a final `if __name__ == '__main__':` is unwrapped (either quotes)",
        'def main():\n    print(input())\nif __name__ == "__main__":\n    main()',
        (("hi\n", "hi\n"),),
        "pass",
    ),
    Case(
        "main-guard-reversed",
        "only that exact condition is unwrapped; the module is tmp_sol",
        "def main():\n    print(input())\nif '__main__' == __name__:\n    main()",
        (("hi\n", "hi\n"),),
        "wrong",
    ),
    Case(
        "wrapped-globals",
        "everything but imports runs inside a function: `global` finds nothing",
        "count = 0\ndef bump():\n    global count\n    count += 1\nbump()\nprint(count)",
        (("\n", "1\n"),),
        "error",
    ),
    Case(
        "class-solution-in-stdin",
        "'class Solution' in the text makes the runner instantiate it",
        "class Solution:\n    pass\nprint(input())",
        (("hi\n", "hi\n"),),
        "error",
    ),
    Case(
        "stdin-readline",
        "sys.stdin.readline gives lines with their newline",
        "import sys\nprint(repr(sys.stdin.readline()))",
        (("ab\ncd\n", "'ab\\n'\n"),),
        "pass",
    ),
    Case(
        "stdin-readlines",
        "sys.stdin.readlines splits the input on newlines (no newlines kept)",
        "import sys\nprint(sys.stdin.readlines())",
        (("ab\ncd\n", "['ab', 'cd', '']\n"),),
        "pass",
    ),
    Case(
        "stdin-iterate",
        "sys.stdin during a test is not iterable",
        "import sys\nfor line in sys.stdin:\n    print(line.strip())",
        (("ab\n", "ab\n"),),
        "error",
    ),
    Case(
        "from-sys-stdin",
        "`from sys import stdin` binds the real stdin, whose readline is patched",
        "from sys import stdin\nprint(stdin.readline() + '|' + stdin.readline())",
        (("ab\ncd\n", "ab|cd\n"),),
        "pass",
    ),
    Case(
        "real-stdin-exhausted",
        "the real stdin's patched readline raises StopIteration past the end",
        "from sys import stdin\nfor _ in range(4):\n    stdin.readline()\nprint('done')",
        (("ab\ncd\n", "done\n"),),
        "error",
    ),
    Case(
        "open-0",
        "open(0) is the real builtin (the prelude's `from builtins import *`): empty stdin",
        "print(open(0).read().strip())",
        (("ab\n", "ab\n"),),
        "wrong",
    ),
    Case(
        "buffer-read",
        "sys.stdin.buffer.read() gives the input's bytes",
        "import sys\nprint(sum(map(int, sys.stdin.buffer.read().split())))",
        (("1\n2\n", "3\n"),),
        "pass",
    ),
    Case(
        "buffer-readline",
        "sys.stdin.buffer.readline() always gives the first line",
        "import sys\ninput = sys.stdin.buffer.readline\nprint(int(input()) + int(input()))",
        (("1\n2\n", "3\n"),),
        "wrong",
    ),
    Case(
        "input-eof",
        "input() past the end raises EOFError",
        "print(input())\nprint(input())\nprint(input())",
        (("a\nb\n", "a\nb\n"),),
        "error",
    ),
    Case(
        "stdout-write", "sys.stdout.write is captured", "import sys\nsys.stdout.write('5\\n')", (("\n", "5\n"),), "pass"
    ),
    Case(
        "from-sys-stdout",
        "`from sys import stdout` writes to the real stdout, which is not captured",
        "from sys import stdout\nstdout.write('5\\n')",
        (("\n", "5\n"),),
        "wrong",
    ),
    Case("exit", "exit() and SystemExit end a test normally", "print(5)\nexit()", (("\n", "5\n"),), "pass"),
    Case(
        "sys-exit-code",
        "SystemExit ends a test normally, whatever its code",
        "import sys\nprint(5)\nsys.exit(3)",
        (("\n", "5\n"),),
        "pass",
    ),
    Case("quit", "quit is None (reliability_guard)", "print(5)\nquit()", (("\n", "5\n"),), "error"),
    Case(
        "resource",
        "`import resource` fails (reliability_guard)",
        "import resource\nprint(5)",
        (("\n", "5\n"),),
        "error",
    ),
    Case(
        "prelude-names",
        "the prelude imports names: Counter, gcd, accumulate without imports",
        "print(Counter('aab')['a'], gcd(4, 6), list(accumulate([1, 2])))",
        (("\n", "2 2 [1, 3]\n"),),
        "pass",
    ),
    Case(
        "recursion-limit",
        "the prelude sets the recursion limit to 50,000",
        "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\nprint(depth(20000))",
        (("\n", "20000\n"),),
        "pass",
    ),
    Case(
        "int-digits", "ints print with up to 50,000 digits", "print(len(str(7 ** 20000)))", (("\n", "16902\n"),), "pass"
    ),
    Case(
        "int-digits-limit",
        "past 50,000 digits str(int) raises",
        "print(10 ** 60000)",
        (("\n", "1" + "0" * 60000 + "\n"),),
        "error",
    ),
    Case("runtime-error", "an exception is a runtime error", "print(1 // 0)", (("\n", "0\n"),), "error"),
    Case("syntax-error", "a program that does not compile is an error", "print(", (("\n", "\n"),), "error"),
    Case("loop", "a test past its timeout is a time limit", "while True:\n    pass", (("\n", "\n"),), "timeout"),
    Case(
        "per-test-timeout",
        "the timeout is per test, not for all tests together",
        "import time\ntime.sleep(0.6)\nprint(input())",
        (("a\n", "a\n"), ("b\n", "b\n"), ("c\n", "c\n")),
        "pass",
    ),
    Case(
        "swallowed-alarm",
        "a program that catches the alarm runs on into the global limit",
        "while True:\n    try:\n        while True:\n            pass\n    except Exception:\n        pass",
        (("\n", "\n"),),
        "timeout",
    ),
]

FUNCTIONAL = [
    Case(
        "typing-prelude",
        "the prelude has `from typing import *`: List needs no import",
        "class Solution:\n    def total(self, nums: List[int]) -> int:\n        return sum(nums)",
        (("[1, 2]", "3"),),
        "pass",
        "total",
    ),
    Case(
        "args-per-line",
        "each input line is one JSON argument",
        "class Solution:\n    def add(self, a, b):\n        return a + b",
        (("1\n2", "3"),),
        "pass",
        "add",
    ),
    Case(
        "top-level-function",
        "without 'class Solution' the function is looked up on the module",
        "def total(nums):\n    return sum(nums)",
        (("[1, 2]", "3"),),
        "pass",
        "total",
    ),
    Case(
        "tuple-as-list",
        "a returned tuple counts as a list",
        "class Solution:\n    def pair(self, x):\n        return x, 2",
        (("1", "[1, 2]"),),
        "pass",
        "pair",
    ),
    Case(
        "nested-tuple",
        "only the outer tuple becomes a list",
        "class Solution:\n    def pairs(self, x):\n        return [(x, 2)]",
        (("1", "[[1, 2]]"),),
        "wrong",
        "pairs",
    ),
    Case(
        "int-float",
        "values compare with ==: 2 equals 2.0",
        "class Solution:\n    def double(self, x):\n        return 2 * x",
        (("1", "2.0"),),
        "pass",
        "double",
    ),
    Case(
        "float-exact",
        "no float tolerance: 0.1 + 0.2 is not 0.3",
        "class Solution:\n    def add(self, x):\n        return x + 0.2",
        (("0.1", "0.3"),),
        "wrong",
        "add",
    ),
    Case(
        "bool-int",
        "True == 1",
        "class Solution:\n    def odd(self, x):\n        return x % 2 == 1",
        (("3", "1"),),
        "pass",
        "odd",
    ),
    Case(
        "int-keys",
        "a dict with int keys is not JSON's string keys",
        "class Solution:\n    def table(self, x):\n        return {x: 2}",
        (("1", '{"1": 2}'),),
        "wrong",
        "table",
    ),
    Case(
        "big-int",
        "expected ints of more than 4,300 digits parse (limit 50,000)",
        "class Solution:\n    def power(self, x):\n        return x ** 20000",
        (("7", SEVEN_TO_20000),),
        "pass",
        "power",
    ),
    Case(
        "missing-method",
        "a missing method is an error",
        "class Solution:\n    def other(self, x):\n        return x",
        (("1", "1"),),
        "error",
        "wanted",
    ),
    Case(
        "raises",
        "an exception in the method is a runtime error",
        "class Solution:\n    def f(self, x):\n        return 1 // x",
        (("0", "0"),),
        "error",
        "f",
    ),
    Case(
        "method-loop",
        "a call past its timeout is a time limit",
        "class Solution:\n    def f(self, x):\n        while True:\n            pass",
        (("1", "0"),),
        "timeout",
        "f",
    ),
    Case(
        "prints-ignored",
        "what a method prints is not its answer",
        "class Solution:\n    def f(self, x):\n        print('noise')\n        return 4",
        (("1", "4"),),
        "pass",
        "f",
    ),
    Case(
        "functional-exit",
        "SystemExit in a method is an error (only stdin tests catch it)",
        "import sys\nclass Solution:\n    def f(self, x):\n        sys.exit(0)",
        (("1", "0"),),
        "error",
        "f",
    ),
]

CASES = STDIN + FUNCTIONAL


def _verdict(why: str) -> str:
    if why.startswith("passed"):
        return "pass"
    if "wrong answer" in why:
        return "wrong"
    if "time limit" in why:
        return "timeout"
    return "error"


@pytest.fixture(scope="module")
def judged() -> dict[str, tuple[bool, str]]:
    """Every case at once: the sandboxes are processes, so two threads keep both cores busy."""
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda case: lcb.judge(case.program, case.reference(), timeout=1), CASES)
        return {case.name: result for case, result in zip(CASES, results)}


def test_the_set_is_large_and_named_uniquely() -> None:
    assert len(CASES) >= 30 and len({case.name for case in CASES}) == len(CASES)
    assert {case.verdict for case in CASES} == {"pass", "wrong", "timeout", "error"}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_verdict(case: Case, judged) -> None:
    passed, why = judged[case.name]
    assert (_verdict(why), passed) == (case.verdict, case.verdict == "pass"), f"{case.rule}: {why}"


EXTRACTION = [
    ("between the last two fence lines", "Idea.\n```python\nprint(1)\n```\nor\n```python\nprint(2)\n```", "print(2)"),
    ("any line with ``` is a fence, the language tag is not needed", "```\nprint(3)\n```", "print(3)"),
    ("a trailing non-Python block is the program", "```python\nprint(1)\n```\nOutput:\n```text\n1\n```", "1"),
    ("fewer than two fences: no program", "print(1)\n```", None),
]


@pytest.mark.parametrize("rule, answer, program", EXTRACTION, ids=[rule for rule, _, _ in EXTRACTION])
def test_extraction(rule: str, answer: str, program: str | None) -> None:
    assert lcb.extract_program(answer) == program


def test_the_grader_extracts_then_judges(monkeypatch) -> None:
    monkeypatch.setattr(lcb, "TIMEOUT_S", 1)
    case = STDIN[0]
    grade = grade_code(f"Reasoning.\n```python\n{case.program}\n```\n", case.reference())
    assert (grade.extracted, grade.correct, grade.why) == (case.program, True, "passed 2 tests")
    assert grade_code("I would add them.", case.reference()).why.startswith("no code block")
