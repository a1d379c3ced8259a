"""The `length-control` command: thin over the library, one subcommand per job.

    length-control validate RECIPE [--deep] [k=v]    check a recipe, print every problem (--deep: the preflight)
    length-control config RECIPE KEY [key=value ...] print one resolved recipe value
    length-control demo-model OUT [--variant V]      build (or reuse) the embedded demo policy
    length-control generate RECIPE [key=value ...]   traces up to the budget, and the answers after it
    length-control splice RECIPE [key=value ...]     the stage-2 dataset (Axolotl's pre-tokenized rows)
    length-control inspect DATASET [--row N]         a stage-2 row with its trained span, and the stats
    length-control train RECIPE [key=value ...]      stage 2 with Axolotl
    length-control evaluate RECIPE [--arm A] [k=v]   score and overlong rate at the context limit
    length-control evaluate --model M --set S --context-limit N   the same for any model, no recipe
    length-control report RECIPE [key=value ...]     the overlong-rate report (Table 2 layout, JSON, PNG)
    length-control run RECIPE [key=value ...] [--from STAGE] [--dry-run] [--until-overlong R --max-rounds N]
                                                     the preflight, then every stage; up-to-date ones are skipped
                                                     (with cluster.slurm: submitted as Slurm jobs, `slurm`)
    length-control run RECIPE --stage STAGE          one stage here, whatever the recipe's cluster (a job's command)
    length-control run RECIPE --stage generate --shard N   one shard of it (a Slurm array task's command;
                                                     eval-before and eval-forced too, with eval.shard_problems)
    length-control status RUN|RECIPE                 the Slurm jobs of a run and their states
    length-control cancel RUN|RECIPE                 cancel the Slurm jobs of a run
    length-control sweep RECIPE key=[a,b] [...]      the loop per combination of the axes, sharing what they share

`key=value` overrides may come anywhere on the line. A user's mistake exits 2
with one message, and so does a disk that fills up (`disk.DiskFull`); a
traceback is a bug. A command that writes stages into a
run folder holds the folder's lock (`runlock`) from before its demo policy is
built: a second writer is refused at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from length_control._schema import ConfigError
from length_control.disk import DiskFull, is_no_space
from length_control.errors import UserError
from length_control.recipe import Recipe, load_recipe


def _load(args: argparse.Namespace, *extra: str, build: bool = True) -> Recipe:
    """The recipe of a command, its demo policy (if any) resolved to a model folder (built unless `build` is False)."""
    from length_control import demo

    return demo.resolve(load_recipe(args.recipe, [*args.overrides, *extra]), build=build)


@contextmanager
def _writing(args: argparse.Namespace, *extra: str) -> Iterator[Recipe]:
    """The recipe of a command that writes stages into its run folder, its demo policy resolved once the
    folder's lock is held (taken first: a second writer is refused before it would wait for a policy build)."""
    from length_control import demo, runlock

    recipe = load_recipe(args.recipe, [*args.overrides, *extra])
    with runlock.holding(recipe.output_dir):
        yield demo.resolve(recipe)


def _validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.deep:
        from length_control import demo, pipeline

        print(pipeline.preflight_of(demo.resolve(recipe)).text())
    print(f"ok: {args.recipe}")
    print(_summary(recipe))
    return 0


def _summary(recipe: Recipe) -> str:
    model = recipe.model.path or recipe.model.hub or f"demo policy ({recipe.model.demo.variant})"
    return "\n".join(
        [
            f"  run          {recipe.name} -> {recipe.output_dir}",
            f"  model        {model}",
            f"  budget       {recipe.budget} thinking tokens, eval context limit {recipe.context_limit}"
            + (
                f"; conditioned on {', '.join(map(str, recipe.conditioning.budgets))}, stated as "
                f"{recipe.conditioning.instruction!r}"
                if recipe.conditioning is not None
                else ""
            ),
            f"  prompts      {', '.join(ref.source.stem for ref in recipe.prompts.sources)}",
            f"  engine       {recipe.engine.kind}",
            f"  train        {recipe.train.template.name} via {recipe.train.launcher}",
            f"  eval         {', '.join(f'{s.source.stem} x{s.samples_per_problem}' for s in recipe.eval.sets)}",
            *([_cluster_summary(recipe.cluster.slurm)] if recipe.cluster is not None else []),
        ]
    )


def _cluster_summary(slurm) -> str:
    where = f"partition {slurm.partition}" if slurm.partition else "the default partition"
    return f"  cluster      Slurm jobs on {where}, {slurm.gpus_per_node} GPUs per node, --time {slurm.time} a job"


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


def _demo_model(args: argparse.Namespace) -> int:
    from length_control.demo.cache import cached_build
    from length_control.demo.model import export
    from length_control.recipe import DemoModelSpec

    spec = DemoModelSpec(variant=args.variant, seed=args.seed)
    cached_build(spec)  # verified (rebuilt if a file changed) before it is copied
    summary = export(spec, args.out)
    print(
        f"demo policy ({args.variant}) in {args.out}: {summary['parameters']:,} parameters, "
        f"vocabulary {summary['vocab_size']}, </think> = {summary['think_close_ids']}, "
        f"built in {summary['seconds']} s"
    )
    return 0


def _stage(stage) -> Callable[[argparse.Namespace], int]:
    """A command that runs one pipeline stage on its own and prints its summary."""

    def run(args: argparse.Namespace) -> int:
        from length_control import pipeline

        with _writing(args) as recipe:
            print(pipeline.run_stage(stage, recipe))
        return 0

    return run


def _inspect(args: argparse.Namespace) -> int:
    from length_control import inspect_rows

    inspect_rows.show(args.dataset, row=args.row, tokenizer=args.tokenizer)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from length_control import evaluate
    from length_control.engines.recipe_engine import SharedEngine

    if args.model is not None:
        return _evaluate_model(args)
    if args.recipe is None or args.set or args.context_limit is not None:
        raise ConfigError(
            args.recipe or Path("evaluate"),
            ["give a RECIPE, or --model PATH with --set SOURCE and --context-limit N (no recipe)"],
        )
    if args.seed is not None and args.arm != "after":
        raise ConfigError(args.recipe, ["--seed picks a stage-2 model: use it with --arm after"])
    with _writing(args) as recipe:
        plans = (
            [evaluate.plan(recipe, "after", args.seed)] if args.seed is not None else evaluate.plans(recipe, args.arm)
        )
        with SharedEngine(recipe, plans[0].model, log_name=f"evaluate-{args.arm}") as engine:  # the seeds share it
            print(evaluate.format_metrics([(plan.label, evaluate.run(plan, engine)) for plan in plans]))
    return 0


def _evaluate_model(args: argparse.Namespace) -> int:
    """Any checkpoint's overlong rate and score, measured as the loop measures its arms."""
    from length_control import evaluate, runlock
    from length_control.recipe import eval_recipe

    overrides = list(args.overrides)
    if args.recipe is not None:  # `evaluate --model M key=value`: argparse puts the first override in RECIPE's place
        if "=" not in str(args.recipe):
            raise ConfigError(
                args.recipe, ["--model evaluates a model without a recipe: drop the recipe, or drop --model"]
            )
        overrides.insert(0, str(args.recipe))
    if not args.set or args.context_limit is None:
        raise ConfigError(Path("evaluate --model"), ["--model needs --set SOURCE (one or more) and --context-limit N"])
    recipe = eval_recipe(
        args.model,
        args.set,
        context_limit=args.context_limit,
        samples_per_problem=args.samples,
        budget=args.budget,
        think=args.think,
        output_dir=args.output,
        overrides=overrides,
    )
    plan = evaluate.plan(recipe, "before")
    with runlock.holding(recipe.output_dir):
        print(evaluate.format_metrics([(Path(args.model).name or args.model, evaluate.run(plan))]))
    print(f"samples: {plan.folder / 'samples.parquet'} (compare two with: length-control report --samples A B)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from length_control import demo, pipeline, slurm

    loop = [
        f"loop.{key}={value}"
        for key, value in (("until_overlong", args.until_overlong), ("max_rounds", args.max_rounds))
        if value is not None
    ]
    if args.stage is not None:
        return _run_one_stage(args, *loop)
    if args.shard:
        raise ConfigError(args.recipe, ["--shard N runs one shard of a stage: add --stage generate (or an eval arm)"])
    written = load_recipe(args.recipe, [*args.overrides, *loop])
    if args.dry_run:
        recipe = demo.resolve(written, build=False)
        print(pipeline.dry_run(recipe))
        if written.cluster is not None:
            print(slurm.dry_run(written, recipe))
        return 0
    if written.cluster is not None:
        return _submit(written, start=args.start)
    with _writing(args, *loop) as recipe:
        pipeline.run(recipe, start=args.start)
    return 0


def _run_one_stage(args: argparse.Namespace, *extra: str) -> int:
    """`run RECIPE --stage NAME`: that stage alone, here, whatever the recipe's cluster says (each Slurm job's
    command)."""
    from length_control import pipeline

    if args.start is not None or args.dry_run:
        raise ConfigError(args.recipe, ["--stage runs one stage: drop --from and --dry-run"])
    if args.stage not in pipeline.STAGE_NAMES:
        raise ConfigError(
            args.recipe, [f"--stage {args.stage}: no such stage; one of {', '.join(pipeline.STAGE_NAMES)}"]
        )
    if args.shard:
        return _run_shards(args, *extra)
    with _writing(args, *extra) as recipe:
        print(pipeline.run_stage(next(s for s in pipeline.STAGES if s.name == args.stage), recipe))
    return 0


def _run_shards(args: argparse.Namespace, *extra: str) -> int:
    """`run RECIPE --stage STAGE --shard N`: those shards of generate or an eval arm alone (a Slurm array task's
    command). The tasks of one array hold the run folder's lock together (`slurm.array_group`)."""
    from length_control import demo, pipeline, runlock, slurm

    if args.stage not in slurm.SHARDED:
        raise ConfigError(
            args.recipe,
            [f"--shard goes with --stage {' or '.join(slurm.SHARDED)} (they write shards), not {args.stage}"],
        )
    recipe = load_recipe(args.recipe, [*args.overrides, *extra])
    with runlock.holding(recipe.output_dir, group=slurm.array_group()):
        stage = next(s for s in pipeline.STAGES if s.name == args.stage)
        plans = pipeline.plans_of(demo.resolve(recipe))(stage)
        why = slurm.unsharded(stage, plans)
        if why is not None:
            raise ConfigError(args.recipe, [f"--shard: {why}; drop --shard"])
        print(slurm.sharding(stage).run_shards(plans[0], args.shard))
    return 0


def _submit(written: Recipe, start: str | None) -> int:
    """`run` with cluster.slurm: the chain is decided holding the run folder's lock and submitted once it is
    released, so the first job finds it free."""
    from length_control import demo, runlock, slurm

    with runlock.holding(written.output_dir):
        chain = slurm.prepare(written, demo.resolve(written), start=start)
    print(slurm.submitted_text(chain, slurm.submit(chain)))
    return 0


def _run_folder(args: argparse.Namespace) -> Path:
    """The run folder `status` and `cancel` name: a run folder, or a recipe's output_dir."""
    from length_control.contracts import RunLayout

    if args.target.is_dir():
        if args.overrides:
            raise ConfigError(args.target, ["key=value overrides go with a RECIPE, not a run folder: drop them"])
        return RunLayout(args.target.resolve()).slurm
    return RunLayout(load_recipe(args.target, args.overrides).output_dir).slurm


def _status(args: argparse.Namespace) -> int:
    from length_control import slurm

    print(slurm.status(_run_folder(args)))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from length_control import slurm

    print(slurm.cancel(_run_folder(args)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from length_control import pipeline, report
    from length_control.artifacts import write_json_atomic, write_text_atomic
    from length_control.recipe import preset_tags

    if args.samples is None:
        if args.recipe is None:
            raise ConfigError(Path("report"), ["give a RECIPE, or --samples BEFORE AFTER [...] (no recipe)"])
        print(pipeline.run_stage(next(s for s in pipeline.STAGES if s.name == "report"), _load(args)))
        return 0
    if args.recipe is not None:
        raise ConfigError(args.recipe, ["--samples reports sample files without a recipe: drop one of the two"])
    tags = preset_tags(args.think) if args.think else None
    built = report.from_samples(
        args.samples, tokenizer=args.tokenizer, tags=tags, context_limit=args.context_limit, budget=args.budget
    )
    text = report.markdown(built)
    if args.output is not None:
        write_text_atomic(args.output / "report.md", text)
        write_json_atomic(args.output / "report.json", built)
    print(text, end="")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """The sweep's folder and every setting's run folder are locked before a demo policy is resolved."""
    from length_control import demo, runlock, sweep

    unresolved = sweep.settings(args.recipe, args.overrides)
    if unresolved[0].recipe.cluster is not None:
        raise ConfigError(
            args.recipe, ["cluster: a sweep does not run through Slurm yet; run it here with cluster=null"]
        )
    folders = [setting.recipe.output_dir for setting in unresolved]
    with runlock.holding(folders[0].parent, *folders):
        sweep.run(sweep.settings(args.recipe, args.overrides, resolve=demo.resolve), start=args.start)
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
    validate.add_argument(
        "--deep",
        action="store_true",
        help="also the preflight: read every data file, load the tokenizer and check the think "
        "tags, measure the prompts, check output_dir and the disk (builds the demo policy)",
    )

    config = command("config", _config, "print one value of the resolved recipe (for scripts)")
    config.add_argument("recipe", type=Path)
    config.add_argument("key", help="dotted key, e.g. output_dir or eval.sets.0.source")
    config.add_argument("overrides", nargs="*", metavar="key=value")

    demo = command("demo-model", _demo_model, "build the embedded demo policy (cached) and copy it to OUT")
    demo.add_argument("out", type=Path, help="folder to write model/, stage1_sft.parquet and build.json to")
    demo.add_argument("--variant", default="standard", choices=["standard", "multi-token-close"])
    demo.add_argument("--seed", type=int, default=0)

    from length_control import pipeline

    for stage in pipeline.STAGES:
        if stage.help is not None and stage.name != "report":
            sub = command(stage.name, _stage(stage), stage.help)
            sub.add_argument("recipe", type=Path)
            sub.add_argument("overrides", nargs="*", metavar="key=value")

    report = command(
        "report",
        _report,
        "the overlong-rate report of a run (Table 2 layout, JSON, PNG), or of "
        "sample files from anywhere (--samples BEFORE AFTER...)",
    )
    report.add_argument("recipe", type=Path, nargs="?")
    report.add_argument("overrides", nargs="*", metavar="key=value")
    report.add_argument(
        "--samples",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="no recipe: the before arm's samples, then the after arm's (the eval's samples.parquet, "
        "or JSONL/Parquet of prompts and raw outputs with --tokenizer)",
    )
    report.add_argument("--tokenizer", help="with raw samples: the model's tokenizer folder or Hub id")
    report.add_argument("--think", help="with raw samples: the think tags' preset (default <think>...</think>)")
    report.add_argument("--context-limit", type=int, help="with raw samples: the input+output limit overlong counts at")
    report.add_argument("--budget", type=int, help="B, for the report's heading")
    report.add_argument("--output", type=Path, help="with --samples: also write report.md and report.json here")

    inspect = command("inspect", _inspect, "show a stage-2 row (trained span highlighted) and the dataset's stats")
    inspect.add_argument("dataset", type=Path, help="a stage2/ folder (rows.parquet, meta.parquet, manifest.json)")
    inspect.add_argument("--row", type=int, default=0)
    inspect.add_argument("--tokenizer", help="model folder or Hub id (default: the one the dataset was built with)")

    evaluate = command(
        "evaluate",
        _evaluate,
        "score and overlong rate of a policy at the recipe's context limit, "
        "or of any model (--model) on eval sets (--set) at --context-limit",
    )
    evaluate.add_argument("recipe", type=Path, nargs="?")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate.add_argument(
        "--arm",
        default="before",
        choices=["before", "after", "forced"],
        help="before: the stage-1 policy; after: the stage-2 model; "
        "forced: the stage-1 policy forced to close at the budget",
    )
    evaluate.add_argument("--seed", type=int, help="with --arm after: only this stage-2 seed (default: every seed)")
    evaluate.add_argument("--model", help="no recipe: a model folder or Hub id to evaluate as it is")
    evaluate.add_argument(
        "--set",
        type=Path,
        action="append",
        default=[],
        metavar="SOURCE",
        help="with --model: an eval set's source definition, e.g. prompts_sources/aime_2024.yaml",
    )
    evaluate.add_argument("--context-limit", type=int, help="with --model: the input+output token limit")
    evaluate.add_argument("--samples", type=int, default=1, help="with --model: samples per problem")
    evaluate.add_argument("--budget", type=int, help="with --model: B, for the termination probe at it")
    evaluate.add_argument("--think", help="with --model: the think tags' preset (qwen3, deepseek-r1, ...)")
    evaluate.add_argument("--output", type=Path, help="with --model: the run folder (default runs/evaluate-<model>)")

    run = command("run", _run, "run every stage of a recipe in order (up-to-date stages are skipped)")
    run.add_argument("recipe", type=Path)
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.add_argument("--from", dest="start", metavar="STAGE", help="redo this stage and every one after it")
    run.add_argument("--dry-run", action="store_true", help="render every command and config; run nothing")
    run.add_argument(
        "--stage",
        metavar="STAGE",
        help="run only this stage, here, even with a cluster section (each Slurm job's command)",
    )
    run.add_argument(
        "--shard",
        type=int,
        action="append",
        metavar="N",
        help="with --stage generate, eval-before or eval-forced: only shard N (repeatable), no manifest "
        "(a Slurm array task's command)",
    )
    run.add_argument(
        "--until-overlong",
        type=float,
        metavar="RATE",
        help="closed loop: more rounds until the after arm's overlong rate is at most RATE (= loop.until_overlong)",
    )
    run.add_argument("--max-rounds", type=int, metavar="N", help="closed loop: at most N rounds (= loop.max_rounds)")

    for name, run_it, what in (
        ("status", _status, "each stage's Slurm job of a run and its state (a run folder, or its recipe)"),
        ("cancel", _cancel, "cancel the Slurm jobs of a run that are queued or running (a run folder, or its recipe)"),
    ):
        sub = command(name, run_it, what)
        sub.add_argument("target", type=Path, metavar="RUN|RECIPE")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="with a RECIPE: override recipe keys")

    sweep = command(
        "sweep",
        _sweep,
        "the loop at every combination of the axes key=[a,b,...], sharing the before "
        "arm and the traces; a Table 2 row per setting, the ablations, a plot",
    )
    sweep.add_argument("recipe", type=Path)
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="key=[a,b,...] | key=value",
        help="an axis (a list on a key that is not a list) or an override of every setting",
    )
    sweep.add_argument("--from", dest="start", metavar="STAGE", help="redo this stage and every one after it")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # `key=value` overrides may come anywhere on the line, after flags too (`run R --dry-run budget=100`)
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if token.startswith("-") or "=" not in token or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write no stage turned into DiskFull itself (its path, where the error has one)
        if not is_no_space(error):
            raise
        print(f"error: {DiskFull(error.filename)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
