"""length-control: teach a reasoning model to stop thinking at a token budget.

Stage modules (one per stage, docs/DESIGN.md) expose `plan(recipe, ...)` and
`run(plan)`; `contracts` holds what passes between them, `pipeline` their
order, and the CLI in `length_control.cli` is thin over them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("length-control")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
