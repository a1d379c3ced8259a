"""Prompt and eval sources: one YAML file per dataset in `prompts_sources/`.

A source says where rows come from (a Hugging Face dataset id, or a local
JSONL / Parquet / JSON file), how a row becomes a chat prompt and a reference
answer, and which rows to keep. The same schema serves trace-generation
prompts (the report's WebInstruct-Verified, rStar-Coder, DeepMath-103K) and
eval sets (AIME, GPQA Diamond, LiveCodeBench), which add a grader.

    name: deepmath-103k
    dataset: {hf: zwhe99/DeepMath-103K, split: train}
    prompt: "{question}"
    reference: final_answer

A row without an id (no `id` key, or no such column in the row) gets a hash
of its prompt text as its id (prompts.py says why).
"""

from __future__ import annotations

import string
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from length_control._schema import FilePath, StrictModel, read_yaml, validate


class DatasetLocation(StrictModel):
    """Exactly one of `hf` (a Hub dataset id) or `path` (a local file)."""

    hf: str | None = Field(None, description="Hugging Face dataset id, e.g. zwhe99/DeepMath-103K")
    path: FilePath | None = Field(None, description="local .jsonl / .json / .parquet file")
    config: str | None = Field(None, description="dataset config (subset) name")
    split: str = Field("train", description="split to read")

    @model_validator(mode="after")
    def _one_location(self) -> DatasetLocation:
        if (self.hf is None) == (self.path is None):
            raise ValueError("give exactly one of 'hf' (a Hub dataset id) or 'path' (a local file)")
        if self.path is not None and self.path.suffix not in {".jsonl", ".json", ".parquet"}:
            raise ValueError(f"path {self.path.name}: use a .jsonl, .json or .parquet file")
        return self

    def describe(self) -> str:
        """Where the rows come from, for messages: the file, or the Hub id with its config and split."""
        if self.path is not None:
            return str(self.path)
        return " ".join(part for part in (self.hf, self.config, self.split) if part)


class MultipleChoice(StrictModel):
    """Options in columns, shuffled per row with `seed`; the reference becomes a letter."""

    correct: str = Field(description="column with the correct option")
    incorrect: list[str] = Field(min_length=1, description="columns with the wrong options")


class DateWindow(StrictModel):
    """Keep rows whose `field` (an ISO date) lies in [start, end) — e.g. LiveCodeBench v6."""

    field: str
    start: date
    end: date


class CodeTests(StrictModel):
    """Columns that hold a code problem's tests (graded in a sandbox)."""

    public: str = Field(description="column with the public tests (JSON list)")
    private: str | None = Field(None, description="column with the private tests (JSON or LCB's zlib+pickle)")
    metadata: str | None = Field(None, description="column with JSON metadata holding `func_name`")


class SourceSpec(StrictModel):
    name: str = Field(description="short name used in ids and reports")
    dataset: DatasetLocation
    prompt: str = Field(
        description="user message: a format string over the row's columns, e.g. '{question}' ('{{' for a brace), "
        "and over fields made from a row: {choices} (the lettered options, with `multiple_choice`), "
        "{code_instructions} (LiveCodeBench's, with `code_tests`), {starter_code_block} (the row's `starter_code` "
        "as LiveCodeBench shows it after a blank line, or nothing)"
    )
    system: str | None = Field(None, description="system message, if any")
    reference: str | None = Field(None, description="column with the gold answer (null for prompts-only sources)")
    id: str | None = Field(None, description="column with a stable row id (rows without it: a hash of the prompt text)")
    aliases: dict[str, list[str]] = Field(
        {},
        description="a column's names in other published layouts of the dataset, read where a row lacks it: "
        "{problem: [question]}",
    )
    min_chars: int = Field(0, ge=0, description="drop prompts shorter than this many characters")
    dedup: Literal["none", "exact", "normalized"] = Field("none", description="drop repeated prompts")
    sample: int | None = Field(None, gt=0, description="keep this many rows, chosen with `seed` (null: all)")
    seed: int = 0
    grader: Literal["exact", "math", "multiple_choice", "code"] | None = Field(
        None, description="how eval answers are scored (eval sets only)"
    )
    multiple_choice: MultipleChoice | None = Field(None, description="render lettered options as `{choices}`")
    window: DateWindow | None = None
    code_tests: CodeTests | None = None

    _definition: Path | None = PrivateAttr(None)

    @property
    def definition(self) -> str:
        """The source definition file, for messages (a spec built in code has none: its name, then)."""
        return str(self._definition) if self._definition is not None else f"source {self.name!r}"

    @field_validator("prompt")
    @classmethod
    def _plain_fields(cls, prompt: str) -> str:
        """Only plain column names: `{0}` or `{a.b}` would fail on every row, long after validation."""
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(prompt) if field is not None]
        except ValueError as error:
            raise ValueError(f"not a valid format string ({error}); write a literal brace as {{{{ or }}}}") from None
        for field in fields:
            if not field or field.isdigit() or "." in field or "[" in field:
                raise ValueError(f"{{{field}}}: name a column, e.g. {{question}} (a literal brace is {{{{ or }}}})")
        return prompt

    @model_validator(mode="after")
    def _grader_needs(self) -> SourceSpec:
        if self.grader == "multiple_choice" and self.multiple_choice is None:
            raise ValueError("grader 'multiple_choice' needs a `multiple_choice:` section naming the option columns")
        if self.grader == "code" and self.code_tests is None:
            raise ValueError("grader 'code' needs a `code_tests:` section naming the test columns")
        return self


def load_source_spec(path: Path) -> SourceSpec:
    """Read and validate one source definition (paths relative to its file)."""
    path = Path(path).resolve()
    spec = validate(SourceSpec, read_yaml(path), path, path.parent)
    spec._definition = path
    return spec
