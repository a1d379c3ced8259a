"""The `length-control` command: thin over the library, one subcommand per job.

    length-control validate RECIPE [key=value ...]   check a recipe, print every problem
    length-control config RECIPE KEY [key=value ...] print one resolved recipe value
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from length_control._schema import ConfigError
from length_control.recipe import Recipe, load_recipe


def _validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"ok: {args.recipe}")
    print(_summary(recipe))
    return 0


def _summary(recipe: Recipe) -> str:
    model = recipe.model.path or recipe.model.hub or f"demo policy ({recipe.model.demo.variant})"
    return "\n".join(
        [
            f"  run          {recipe.name} -> {recipe.output_dir}",
            f"  model        {model}",
            f"  budget       {recipe.budget} thinking tokens, eval context limit {recipe.context_limit}",
            f"  prompts      {', '.join(ref.source.stem for ref in recipe.prompts.sources)}",
            f"  engine       {recipe.engine.kind}",
            f"  train        {recipe.train.template.name} via {recipe.train.launcher}",
            f"  eval         {', '.join(f'{s.source.stem} x{s.samples_per_problem}' for s in recipe.eval.sets)}",
        ]
    )


def _config(args: argparse.Namespace) -> int:
    value = load_recipe(args.recipe, args.overrides).model_dump(mode="json")
    for part in args.key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise ConfigError(args.recipe, [f"{args.key}: no such key in the resolved recipe"])
    print(value if isinstance(value, str) else json.dumps(value))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="length-control", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    validate = command("validate", _validate, "check a recipe and print every problem at once")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys (dotted)")

    config = command("config", _config, "print one value of the resolved recipe (for scripts)")
    config.add_argument("recipe", type=Path)
    config.add_argument("key", help="dotted key, e.g. output_dir or eval.sets.0.source")
    config.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
