"""Grade a program as LiveCodeBench grades it, with the program in the sandbox and the answers out of it.

The reference is JSON: `{"tests": [{"input", "output", "testtype"}], "func_name": ...}`
or just the list of tests. As in LiveCodeBench (lcb_runner: extraction_utils.py,
testing_util.py), read for the rules, written anew here:

- the program is the text between the last two lines that contain ```;
- a problem with a `func_name` is functional (every test), else stdin/stdout;
- tests run in order and grading stops at the first that fails; each has
  `timeout` seconds (6 by default, LiveCodeBench's), and so has loading the
  program;
- stdin/stdout: the output and the expected output are stripped, split on
  newlines, each line stripped; the line counts must agree, and each pair of
  lines must be equal, or else equal as numbers: both split on whitespace into
  Decimals, compared exactly (`8.0` equals `8`, `1e3` equals `1000`, `0.1000001`
  does not equal `0.1`);
- functional: the returned value (a tuple as a list) must `==` the expected
  JSON value;
- how the program is run (the import prelude, the mocked stdin, the 50,000-digit
  int limit) is in `lcb_harness`, which runs inside the sandbox and never sees
  the expected outputs.

Known differences: the program gets the standard library only (LiveCodeBench's
environment also has numpy); of LiveCodeBench's `reliability_guard` ("not a
security sandbox") only what touches ordinary programs is kept (see
`lcb_harness`), not its removal of `os.kill`, `os.fork`, ...: the sandbox
contains programs instead; a returned value that is not JSON's, a tuple, a set,
a Fraction, a Decimal or a complex compares unequal (there its own `__eq__`
decides); the limits in `sandbox.Limits` apply (there: only the timeouts).
"""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

from length_control.sandbox import Limits, Sandbox, Stopped

TIMEOUT_S = 6
SLACK_S = 2.0  # past the program's own alarm, before the grader stops waiting
HARNESS = Path(__file__).with_name("lcb_harness.py")
INT_DIGITS = 50_000


def extract_program(answer_text: str) -> str | None:
    """The text between the last two lines that contain ``` (None when there are not two)."""
    lines = answer_text.split("\n")
    fences = [number for number, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return None
    return "\n".join(lines[fences[-2] + 1 : fences[-1]])


def check() -> None:
    """Start one sandbox, so that a machine that cannot contain code stops before any grading."""
    with Sandbox(HARNESS, Limits()):
        pass


def judge(program: str, reference: str, *, timeout: int | None = None, limits: Limits = Limits()) -> tuple[bool, str]:
    """(passed, why) for `program` on the reference's tests; `timeout` per test, LiveCodeBench's 6 s by default."""
    spec = json.loads(reference)
    tests, fn_name = (spec, None) if isinstance(spec, list) else (spec["tests"], spec.get("func_name"))
    if not tests:
        return False, "the reference has no tests"
    timeout = timeout or TIMEOUT_S
    budget = dataclasses.replace(limits, cpu_seconds=(timeout + 1) * (len(tests) + 1) + 5)
    try:
        with Sandbox(HARNESS, budget) as box:
            passed, why = _run(box, program, tests, fn_name, timeout, limits.reply_bytes // 12)
            killed = box.oom_kills()
    except Stopped as stopped:  # it did not start in time (a loaded machine): this sample fails, the others go on
        return False, f"starting: {stopped}"
    if killed and not passed and "memory" not in why:
        why += f" (the memory limit killed {killed} of its processes)"
    return passed, why


def _run(
    box: Sandbox, program: str, tests: list[dict], fn_name: str | None, timeout: int, output_chars: int
) -> tuple[bool, str]:
    wait, where = timeout + SLACK_S, "loading the program"
    try:
        reply = box.ask({"code": program, "fn_name": fn_name, "timeout": timeout, "output_chars": output_chars}, wait)
        if "error" in reply:
            return False, f"{where}: {_failure(reply, timeout)}"
        for number, test in enumerate(tests):
            where = f"test {number}"
            reply = box.ask({"input": test["input"]}, wait)
            if "error" in reply:
                return False, f"{where}: {_failure(reply, timeout)}"
            wrong = _compare_value(reply, test["output"]) if fn_name else _compare_output(reply, test["output"])
            if wrong:
                return False, f"{where}: wrong answer ({wrong})"
    except Stopped as stopped:
        return False, f"{where}: {stopped}"
    return True, f"passed {len(tests)} tests"


def _failure(reply: dict, timeout: int) -> str:
    kind = reply.get("kind")
    if kind == "time limit":
        return f"time limit exceeded ({timeout} s)"
    if kind == "output limit":
        return "output limit exceeded (stdout)"
    return f"runtime error: {reply.get('error')}"


# ---------------------------------------------------------------- stdin/stdout


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _numbers(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except (InvalidOperation, ValueError):
        return None


def _compare_output(reply: dict, expected: str) -> str | None:
    """None when the output is right, else where it differs."""
    output = reply.get("output")
    if not isinstance(output, str):
        return "no output in the answer"
    got, want = _lines(output), _lines(expected)
    if len(got) != len(want):
        return f"{len(got)} lines, expected {len(want)}"
    for number, (line, wanted) in enumerate(zip(got, want)):
        if line == wanted:
            continue
        values, wanted_values = _numbers(line), _numbers(wanted)
        try:
            same = values is not None and wanted_values is not None and values == wanted_values
        except InvalidOperation:  # a signalling NaN
            same = False
        if not same:
            return f"line {number}: {_short(line)} != {_short(wanted)}"
    return None


def _short(text: str, length: int = 60) -> str:
    return repr(text if len(text) <= length else text[: length // 2] + "..." + text[-length // 2 :])


# ---------------------------------------------------------------- functional


def _compare_value(reply: dict, expected: str) -> str | None:
    try:
        value = _decode(reply["value"])
    except (AttributeError, KeyError, TypeError, ValueError, ArithmeticError, RecursionError):
        return "no value in the answer"
    try:
        wanted = json.loads(expected, parse_int=_int)
    except (ValueError, RecursionError) as error:
        return f"the expected output is not JSON ({error})"
    try:
        if value == wanted:
            return None
    except (RecursionError, ArithmeticError):
        pass
    return f"returned {_short(str(value))}, expected {_short(expected)}"


def _int(digits: str) -> int:
    """An int of up to 50,000 digits, as LiveCodeBench's process allows, without changing this process's limit."""
    if len(digits) > INT_DIGITS:
        raise ValueError(f"an int of {len(digits)} digits")
    sign, digits = (-1, digits[1:]) if digits.startswith("-") else (1, digits)
    value = 0
    for start in range(0, len(digits), 4000):
        chunk = digits[start : start + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return sign * value


class _Unequal:
    """A value of a type the grader does not rebuild: equal to nothing (the program's `__eq__` stays inside)."""

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return "<unrebuilt value>"


def _decode(tree: Any) -> Any:
    """The value `lcb_harness.encode` describes."""
    if tree is None or isinstance(tree, (bool, str)):
        return tree
    ((kind, body),) = tree.items()
    builders = {
        "int": lambda: int(body, 16),
        "float": lambda: float(body),
        "list": lambda: [_decode(item) for item in body],
        "tuple": lambda: tuple(_decode(item) for item in body),
        "dict": lambda: {_decode(key): _decode(item) for key, item in body},
        "set": lambda: frozenset(_decode(item) for item in body),  # equal to a set, and hashable inside one
        "fractions": lambda: Fraction(body),
        "decimal": lambda: Decimal(body),
        "complex": lambda: complex(body),
        "other": _Unequal,
    }
    return builders[kind]()
