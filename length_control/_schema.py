"""Shared parts of the YAML schemas: strict models, file-relative paths, and
error messages that name the key, the bad value and the fix.

A recipe and a source definition are both YAML files validated by pydantic.
Paths in them resolve relative to the file that names them, so a recipe can
be moved with its repo. Unknown keys are errors ("did you mean ...?"), and
all problems of a file are reported at once.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo

from length_control.errors import UserError


class ConfigError(UserError, ValueError):
    """A YAML file that does not describe a valid config: one line per problem."""

    def __init__(self, file: Path | str, problems: list[str]) -> None:
        self.file = str(file)
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{self.file}: {len(problems)} {noun}:\n{lines}")


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value.resolve()


def _must_be_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file not found: {value}; fix the path (relative paths start at the YAML file's folder)")
    return value


FilePath = Annotated[Path, AfterValidator(_resolve)]
"""A path relative to the YAML file that names it (need not exist)."""

ExistingFile = Annotated[Path, AfterValidator(_resolve), AfterValidator(_must_be_file)]
"""A path relative to the YAML file that names it; the file must exist."""


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a recipe must not."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, ["file not found; check the path"])
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(path, [f"not valid YAML: {error}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(path, [f"the top level must be a mapping of keys, got {type(data).__name__}"])
    return data


def validate(model: type[StrictModel], data: dict[str, Any], file: Path, base_dir: Path) -> Any:
    """Validate `data` as `model`; raise ConfigError with one line per problem."""
    try:
        return model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as error:
        raise ConfigError(file, [_describe(model, item) for item in error.errors()]) from None


# ---------------------------------------------------------------- messages


def _describe(model: type[BaseModel], error: Any) -> str:
    loc = tuple(error["loc"])
    key = _dotted(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean '{guess[0]}'?" if guess else f"known keys here: {', '.join(allowed)}"
        return f"{key}: unknown key; {hint}"
    if kind == "missing":
        return f"{key}: required key is missing; add it"
    value = _short(error.get("input"))
    if kind == "value_error":
        where = key if isinstance(error.get("input"), dict) else f"{key} = {value}"
        return f"{where}: {error['ctx']['error']}"
    if kind == "literal_error":
        choices = error["ctx"]["expected"]
        guess = difflib.get_close_matches(str(error.get("input")), [c.strip("'") for c in choices.split(" or ")], n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        return f"{key} = {value}: must be one of {choices}{hint}"
    return f"{key} = {value}: {error['msg'][0].lower()}{error['msg'][1:]}; fix the value"


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `loc` inside `model` (for "did you mean")."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / X | None / Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation
