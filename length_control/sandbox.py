"""Run a generated program against its tests, in a subprocess with limits.

The program is the last ```python block of the answer. Each test runs in a
fresh `python -I` process (no site, no environment) in an empty temporary
folder, with a wall-clock limit, a CPU-time limit and an address-space limit
(resource.setrlimit), so an infinite loop or a memory hog fails its test
instead of the evaluation. Two test kinds, as LiveCodeBench has them:

- `stdin`: the input is fed on stdin; stdout must match the expected output
  line by line after stripping;
- `functional`: each input line is a JSON argument of `Solution().<func_name>`
  (or a top-level function of that name); the JSON return value must equal
  the expected one.

The reference is JSON: `{"tests": [{"input", "output", "testtype"}], "func_name": ...}`
or just the list of tests.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from length_control.grading import Grade

TIME_LIMIT_S = 6.0
MEMORY_LIMIT_BYTES = 1 << 30

_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)

_FUNCTIONAL_HARNESS = """
import json, sys
args = [json.loads(line) for line in sys.stdin.read().splitlines() if line.strip()]
namespace = {}
exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace)
target = namespace["Solution"]() if "Solution" in namespace else None
fn = getattr(target, NAME) if target is not None else namespace[NAME]
print(json.dumps(fn(*args)))
"""


def extract_program(answer_text: str) -> str | None:
    blocks = _BLOCK.findall(answer_text)
    return blocks[-1] if blocks else None


def _limits() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    cpu = int(TIME_LIMIT_S) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))


def _run(folder: Path, script: str, stdin: str) -> tuple[str, str]:
    """(status, stdout): status is ok, timeout, memory or crash."""
    try:
        done = subprocess.run([sys.executable, "-I", script], input=stdin, capture_output=True, text=True,
                              cwd=folder, timeout=TIME_LIMIT_S, preexec_fn=_limits, env={})
    except subprocess.TimeoutExpired:
        return "timeout", ""
    if done.returncode != 0:
        return ("memory" if "MemoryError" in done.stderr else "crash"), done.stdout
    return "ok", done.stdout


def grade_program(answer_text: str, reference: str) -> Grade:
    program = extract_program(answer_text)
    if program is None:
        return Grade(None, False, "no ```python block after the thinking")
    spec = json.loads(reference)
    tests, func_name = (spec, None) if isinstance(spec, list) else (spec["tests"], spec.get("func_name"))
    with tempfile.TemporaryDirectory(prefix="lc-sandbox-") as scratch:
        folder = Path(scratch)
        (folder / "solution.py").write_text(program)
        if func_name:
            (folder / "harness.py").write_text(_FUNCTIONAL_HARNESS.replace("NAME", repr(func_name)))
        for number, test in enumerate(tests):
            functional = test.get("testtype") == "functional"
            status, stdout = _run(folder, "harness.py" if functional else "solution.py", test["input"])
            if status != "ok":
                return Grade(program, False, f"test {number}: {status}")
            if functional:
                try:
                    passed = json.loads(stdout.strip().splitlines()[-1]) == json.loads(test["output"])
                except (IndexError, json.JSONDecodeError):
                    passed = False
            else:
                passed = [line.strip() for line in stdout.strip().splitlines()] == \
                         [line.strip() for line in test["output"].strip().splitlines()]
            if not passed:
                return Grade(program, False, f"test {number}: wrong output")
    return Grade(program, True, f"passed {len(tests)} tests")
