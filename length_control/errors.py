"""What the user can fix, as opposed to a bug.

A `UserError` is printed as its message and exits with status 2: a bad
recipe, a missing or corrupt data file, a stage run before its input exists,
a setting that leaves a stage nothing to do. Its message names the file (and
line) and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem the user fixes; the message says what and how."""


class DataError(UserError, ValueError):
    """A data file that cannot be used as it is: `file:line: problem`, one per line."""

    def __init__(self, file: Path | str, problems: list[str] | str, line: int | None = None) -> None:
        self.file = str(file)
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__("\n".join(f"{where}: {problem}" for problem in self.problems))


class EmptyOutput(UserError, RuntimeError):
    """A stage finished with nothing the next stage can use (no stage-2 row, an empty eval set)."""
