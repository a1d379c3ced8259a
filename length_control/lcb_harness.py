"""Inside the sandbox: run one program the way LiveCodeBench's runner runs it, a test per request.

Started by `length_control.lcb` through `length_control.sandbox` as `python -I -S`
(the standard library only, nothing of this package). It talks JSON lines on its
own copies of stdin and stdout; the program gets /dev/null as stdin and the
stderr pipe as stdout, as LiveCodeBench's worker process has nothing on stdin and
an uncaptured stdout. The expected outputs never come in: the grader compares.

    -> {"hello": 1}
    <- {"code", "fn_name", "timeout", "output_chars"}  -> {"ready": 1} | {"error", "kind"}
    <- {"input"}                                       -> {"output"} | {"value"} | {"error", "kind"}

The rules are those of lcb_runner/evaluation/testing_util.py (LiveCodeBench):

- every program runs after an import prelude (`from typing import *` and 17
  more), which also sets the recursion limit to 50,000; ints convert to and
  from up to 50,000 digits;
- with a `fn_name` (LeetCode), the program is executed, `Solution()` is made if
  the text says `class Solution`, and each test calls the method with one JSON
  value per input line; a tuple comes back as a list;
- without one, the program's imports go first and everything else becomes the
  body of a function (a final `if __name__ == '__main__':` is unwrapped first),
  called once per test with stdout captured and stdin mocked: `sys.stdin` is a
  stand-in whose `read`/`readlines` give the whole input (split on newlines),
  `readline` the next line with its newline and `buffer.readline` always the
  first; the real stdin, which `from sys import *` bound before, reads lines
  without newlines while a test runs; `SystemExit` ends a test normally;
- every test, and the execution of the program, has `timeout` seconds (an
  alarm); an exception whose repr names TimeoutException is a time limit,
  any other a runtime error;
- of `reliability_guard`, what changes an ordinary program's verdict: `quit`
  and `help` are None and five modules (`resource` among them) cannot be
  imported; `exit()` works. Its removal of `os.kill`, `os.fork`, ... is not
  copied: the sandbox contains programs instead.
"""

import ast
import builtins
import io
import json
import os
import signal
import sys

STAR_IMPORTS = (
    "string",
    "re",
    "datetime",
    "collections",
    "heapq",
    "bisect",
    "copy",
    "math",
    "random",
    "statistics",
    "itertools",
    "functools",
    "operator",
    "io",
    "sys",
    "json",
    "builtins",
    "typing",
)
PLAIN_IMPORTS = STAR_IMPORTS[:-2]
PRELUDE = (
    "".join(f"from {name} import *\n" for name in STAR_IMPORTS)
    + "".join(f"import {name}\n" for name in PLAIN_IMPORTS)
    + "sys.setrecursionlimit(50000)\n"
)
INT_DIGITS = 50_000
GUARDED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")  # unimportable there


class TimeoutException(Exception):
    """Raised by the alarm; named as LiveCodeBench names it, because its rule reads the name."""


class OutputLimit(BaseException):
    """The captured stdout passed its limit (a BaseException, so `except Exception` cannot keep it running)."""


def _alarm(signum, frame):
    raise TimeoutException


def _exit(code=None):
    raise SystemExit(code)


# ---------------------------------------------------------------- the program


def _unwrap_main(code):
    try:
        tree = ast.parse(code)
        last = tree.body[-1]
        if isinstance(last, ast.If) and ast.unparse(last.test).strip() == "__name__ == '__main__'":
            return ast.unparse(tree.body[:-1]) + "\n" + ast.unparse(last.body)
    except Exception:
        pass
    return code


def _as_function(code):
    """The prelude, the program's imports, and the rest as the body of `wrapped_function` (the code as it is
    if it does not parse)."""
    try:
        body = ast.parse(code).body
        imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
        rest = [node for node in body if not isinstance(node, (ast.Import, ast.ImportFrom))]
        function = ast.FunctionDef(
            name="wrapped_function",
            args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
            body=rest,
            decorator_list=[],
            lineno=0,
        )  # unparse reads it
        return PRELUDE + "\n" + ast.unparse(imports) + "\n" + ast.unparse(function)
    except Exception:
        return code


def _load(code, fn_name, timeout):
    """The callable each test runs: the method (functional) or the wrapped program (stdin)."""
    source = PRELUDE + "\n\n" + code if fn_name else _as_function(_unwrap_main(code))
    signal.alarm(timeout)
    try:
        module = type(sys)("tmp_sol", "")
        exec(source, module.__dict__)
        target = module.Solution() if "class Solution" in source else module
    finally:
        signal.alarm(0)
    name = fn_name or "wrapped_function"
    if not hasattr(target, name):
        raise AttributeError(f"the program defines no {name}")
    return getattr(target, name)


# ---------------------------------------------------------------- one test


class _Capture(io.StringIO):
    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def write(self, text):
        if self.tell() + len(text) > self.limit:
            raise OutputLimit(f"output limit exceeded ({self.limit} characters)")
        return super().write(text)

    def close(self):  # a program may close sys.stdout; what it wrote stays readable
        pass


class _StdinBuffer:
    def __init__(self, text):
        self._data = text.encode()

    def read(self, *args):
        return self._data

    def readline(self, *args):
        return self._data.split(b"\n")[0] + b"\n"


class _Stdin:
    """`sys.stdin` during a test; what it does not define comes from a StringIO of the input."""

    def __init__(self, text):
        self._text, self._stream = text, io.StringIO(text)
        self.buffer = _StdinBuffer(text)

    def read(self, *args):
        return self._text

    def readline(self, *args):
        return self._stream.readline(*args)

    def readlines(self, *args):
        return self._text.split("\n")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _run_stdin(function, text, timeout, output_chars):
    real_stdin, real_stdout = sys.stdin, sys.stdout
    lines = iter(text.split("\n"))
    patched = {
        "read": lambda *args: text,
        "readlines": lambda *args: text.split("\n"),
        "readline": lambda *args: next(lines),
    }
    for name, value in patched.items():
        setattr(real_stdin, name, value)
    captured = sys.stdout = _Capture(output_chars)
    sys.stdin = _Stdin(text)
    signal.alarm(timeout)
    try:
        function()
    except SystemExit:
        pass
    finally:
        signal.alarm(0)
        sys.stdin, sys.stdout = real_stdin, real_stdout
        for name in patched:
            real_stdin.__dict__.pop(name, None)
    return captured.getvalue()


def _run_call(method, text, timeout):
    args = [json.loads(line) for line in text.split("\n")]
    signal.alarm(timeout)
    try:
        value = method(*args)
    finally:
        signal.alarm(0)
    return list(value) if isinstance(value, tuple) else value


def encode(value):
    """A JSON tree that keeps what `==` sees: tuples, sets, int keys, exact floats, and ints of any length."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return {"int": hex(value)}
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, list):
        return {"list": [encode(item) for item in value]}
    if isinstance(value, tuple):
        return {"tuple": [encode(item) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(key), encode(item)] for key, item in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {"set": [encode(item) for item in value]}
    module = type(value).__module__
    if module in ("fractions", "decimal") or isinstance(value, complex):
        return {module if module != "builtins" else "complex": str(value)}
    return {"other": type(value).__name__}


# ---------------------------------------------------------------- the conversation


def main():
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.set_int_max_str_digits(INT_DIGITS)
    signal.signal(signal.SIGALRM, _alarm)
    builtins.exit = _exit  # site's exit(), which -S leaves out
    builtins.quit = builtins.help = None  # as LiveCodeBench's reliability_guard leaves them
    for name in GUARDED_MODULES:
        sys.modules[name] = None

    def reply(message):
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    def failure(error):
        kind = (
            "time limit"
            if "timeoutexception" in repr(error).lower()
            else "output limit"
            if isinstance(error, OutputLimit)
            else "runtime error"
        )
        return {"error": repr(error)[:300], "kind": kind}

    reply({"hello": 1})
    job = json.loads(requests.readline())
    fn_name, timeout = job["fn_name"], job["timeout"]
    try:
        run = _load(job["code"], fn_name, timeout)
    except BaseException as error:
        reply(failure(error))
        return
    reply({"ready": 1})
    for line in requests:
        text = json.loads(line)["input"]
        try:
            if fn_name:
                answer = {"value": encode(_run_call(run, text, timeout))}
            else:
                answer = {"output": _run_stdin(run, text, timeout, job["output_chars"])}
        except BaseException as error:
            answer = failure(error)
        reply(answer)


if __name__ == "__main__":
    main()
