"""Stage-2 dataset: close the thinking at the budget, train the termination only.

    length-control splice RECIPE [key=value ...]

Each trace that ran into the budget B becomes one row of Axolotl's
pre-tokenized format (`input_ids`, `attention_mask`, `labels`), built from
the policy's own token ids — nothing is decoded and re-encoded:

    input_ids = prompt + thinking + close + answer + EOS

- case 1: thinking = the first B output tokens, close = the forced close
  ("\\n</think>"), answer = the policy's continuation;
- case 2: thinking = the output before the policy's own `</think>`, close =
  those tokens, answer = what it wrote after them plus its continuation.

`labels` are -100 everywhere except the termination span
(`splice.termination_span`): `</think>` only, `</think>` + EOS (the report's
choice, default), `</think>` + answer + EOS, or that where the policy had
decided its answer and `</think>` + EOS where not (`trains_answer`). A share of stage-1 SFT
conversations is mixed in with ordinary assistant-only labels. Rows without
an answer (the answer pass ran out of tokens), with answers past
`max_answer_tokens`, or longer than the training `sequence_len` are dropped or
cut as the recipe says, and every such row is counted in the stats.
The split is the one generate made (`cut.CutPolicy`), read back from its records.

The build streams: one generate shard at a time, rows written in row groups,
so memory stays flat however many traces there are. Writes
`stage2/rows.parquet` (exactly the three columns, so Axolotl reads it as is)
and `stage2/meta.parquet` (per row: kind, prompt id, case, span); the schemas
are `contracts.ROWS_SCHEMA` and `contracts.META_SCHEMA`.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from length_control import contracts
from length_control.artifacts import Stage, atomic_path, tool_versions
from length_control.contracts import (
    IGNORE,
    META,
    META_SCHEMA,
    ROWS,
    ROWS_SCHEMA,
    Answer,
    Plan,
    RowMeta,
    RowSource,
    RunLayout,
    StageInputs,
    TraceIds,
    id_lists,
)
from length_control.cut import recorded_close
from length_control.errors import EmptyOutput
from length_control.policy import load_tokenizer, policy_path
from length_control.recipe import Recipe, SpliceSpec
from length_control.think import Termination


@dataclass(frozen=True)
class Row:
    input_ids: np.ndarray | list[int]
    labels: np.ndarray | list[int]
    span: tuple[int, int]  # input_ids[span[0]:span[1]] holds every trained token


class Stage2Row(NamedTuple):
    """A row on its way into the stage-2 files (`write_dataset`): the row, and where it came from."""

    row: Row
    source: RowSource


def trains_answer(spec: SpliceSpec, answer: Answer) -> bool:
    """Whether a row's answer after the close carries loss: always with `think_close_answer_eos`; with
    `think_close_decided_answer_eos` where the policy had decided it (generate scored every token of it at
    least `spec.decided_answer_p`): on a near tie training would tip the policy to the answer it happened to
    write, and the row trains the close and EOS only."""
    if spec.termination_span == "think_close_decided_answer_eos":
        least = answer["answer_least_p"]
        return least is not None and least >= spec.decided_answer_p
    return spec.termination_span == "think_close_answer_eos"


def splice_row(
    trace: TraceIds,
    answer: Answer,
    *,
    termination: Termination,
    spec: SpliceSpec,
    max_len: int | None,
    train_thinking: bool = False,
) -> tuple[Row | None, str]:
    """One stage-2 row from a trace and its answer, or (None, why it was dropped).

    The split is the one generate made (`cut.CutPolicy`), read back from
    the answer record (`cut.recorded_close`): the thinking is the output
    before `close_at`, then the close; in case 2 the policy's own close is
    in the output, and what it wrote after it comes before the answer. The
    row ends with the end id the policy wrote (Qwen3 may end with
    <|im_end|> or <|endoftext|>). Token ids may come as lists or numpy
    arrays; the row's are int32 arrays, sliced and concatenated without a
    Python object per token.

    `train_thinking` (a budget-conditioned run, `conditioning.train_thinking`):
    the row's own thinking, from its first token to the close, is trained too.
    """
    closed = recorded_close(np.asarray(trace["output_token_ids"], dtype=np.int32), answer)
    thinking, close = closed.thinking, np.asarray(closed.close, dtype=np.int32)
    body = np.concatenate([closed.after_close, np.asarray(answer["answer_token_ids"], dtype=np.int32)])
    # where `</think>` starts in the close: a forced close may carry a "\n" before it; the policy's own starts there
    tag_offset = termination.forced_close_tag_start if answer["case"] == 1 else 0
    if answer["finish_reason"] != "stop" or not len(body) or not termination.ends_turn(int(body[-1])):
        return None, "no_answer"
    body, end = body[:-1], body[-1:]  # the end id goes back on after any cut
    if len(body) > spec.max_answer_tokens:
        if spec.on_long_answer == "drop":
            return None, "long_answer"
        body = body[: spec.max_answer_tokens]
    prefix_len = len(trace["prompt_token_ids"]) + len(thinking)
    if max_len is not None and prefix_len + len(close) + len(body) + 1 > max_len:
        if spec.on_overlength == "drop" or prefix_len + len(close) + 1 > max_len:
            return None, "too_long"
        body = body[: max_len - prefix_len - len(close) - 1]  # cut the (masked) answer, keep the termination
    input_ids = np.concatenate([np.asarray(trace["prompt_token_ids"], dtype=np.int32), thinking, close, body, end])
    tag_start = prefix_len + tag_offset
    close_end = prefix_len + len(close)
    labels = np.full(len(input_ids), IGNORE, dtype=np.int32)
    if trains_answer(spec, answer):
        labels[tag_start:] = input_ids[tag_start:]
    else:
        labels[tag_start:close_end] = input_ids[tag_start:close_end]
        if spec.termination_span != "think_close":
            labels[-1] = input_ids[-1]
    span_start = tag_start
    if train_thinking:
        span_start = len(trace["prompt_token_ids"]) + answer["thinking_start"]
        labels[span_start:tag_start] = input_ids[span_start:tag_start]
    span_end = close_end if spec.termination_span == "think_close" else len(input_ids)
    return Row(input_ids, labels, (span_start, span_end)), "kept"


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class SpliceInputs(StageInputs):
    """The generate folders a stage-2 dataset is built from, by role; rows come in this order, earlier rounds'
    first. The policy's traces are the run's own folder (`traces`), or in a budget-conditioned run every
    budget's (`budgets`, by B) in its place."""

    traces: Path | None = None
    earlier: tuple[Path, ...] = ()  # a closed loop's earlier rounds' traces: their rows accumulate
    budgets: dict[int, Path] = field(default_factory=dict)

    @property
    def policy_traces(self) -> list[Path]:
        """The traces of the policy this stage 2 trains (not an earlier round's)."""
        return list(self.budgets.values()) if self.budgets else [self.traces]

    def named(self) -> dict[str, Path]:
        own = {f"budget {budget}": folder for budget, folder in self.budgets.items()} or {"generate": self.traces}
        return {f"earlier{i}": folder for i, folder in enumerate(self.earlier)} | own


def plan(recipe: Recipe, earlier: tuple[Path, ...] = (), budgets: dict[int, Path] | None = None) -> Plan:
    """In a closed loop, `earlier` are the earlier rounds' generate folders: their rows accumulate. A
    budget-conditioned run's rows come from the generate folders of its budgets (`budgets`, by B) in place
    of the run's own."""
    s = recipe.splice
    mix = f"{s.sft_mix.share} of the rows from {_mix_source(recipe)}" if s.sft_mix else "none"
    reads = SpliceInputs(
        traces=None if budgets else RunLayout(recipe.output_dir).generate,
        earlier=tuple(Path(folder) for folder in earlier),
        budgets=dict(budgets or {}),
    )
    return Plan(
        "splice",
        recipe,
        RunLayout(recipe.output_dir).stage2,
        reads=reads,
        steps=[
            *(f"rows from {folder}" for folder in reads.budgets.values()),
            f"termination span {s.termination_span}; answers > {s.max_answer_tokens} tokens: {s.on_long_answer}; "
            f"rows > sequence_len ({max_len(recipe) or 'not fixed'}): {s.on_overlength}",
            f"SFT mix: {mix}",
        ],
    )


def run(plan: Plan) -> dict[str, Any]:
    """Build the stage-2 dataset from the traces of every generate folder the plan reads."""
    recipe, folder = plan.recipe, plan.folder
    mix = recipe.splice.sft_mix
    sft_path = mix_path(recipe) if mix is not None else None
    limit = max_len(recipe)
    stage = Stage(
        folder,
        inputs={name: contracts.upstream(path)["output"] for name, path in plan.inputs.items()}
        | ({"sft_mix": sft_path} if sft_path else {}),
        # the cut's settings stay under "splice", where they were before they had a section of their own,
        # so that stage-2 folders made before the move stay valid
        config={
            "budget": recipe.budget,
            "splice": recipe.section("splice") | recipe.cut.manifest_config(),
            "max_len": limit,
            "conditioning": recipe.section("conditioning"),
        },
        versions=tool_versions("transformers"),
    )
    if stage.is_up_to_date():
        return stage.read_manifest()["summary"]
    stats: Counter[str] = Counter()
    reads: SpliceInputs = plan.reads
    termination = contracts.read_termination(reads.policy_traces[-1])  # every budget's run writes the same
    folders = [*reads.earlier, *reads.policy_traces]
    rows = (row for traces in folders for row in length_rows(traces, recipe, termination, limit, stats))
    model = policy_path(recipe.model)
    summary = write_dataset(folder, rows, mix_rows=_mix_rows(recipe, model, sft_path, limit, stats), stats=stats)
    if summary["length_rows"] == 0:
        raise EmptyOutput(_why_empty(stats, reads.policy_traces, recipe))
    summary["tokenizer"] = model
    stage.finish(**summary)
    return summary


def _why_empty(stats: Counter, policy_traces: list[Path], recipe: Recipe) -> str:
    """Why no trace of the policy became a stage-2 row, with the setting that changes it."""
    summaries = [contracts.upstream(folder)["summary"] for folder in policy_traces]
    traces = sum(summary["traces"] for summary in summaries)
    ended = sum(summary["ended_within_budget"] for summary in summaries)
    lines = [f"stage 2 has no row to train on: of {traces} traces, {traces - ended} ran past B = {recipe.budget}"]
    if traces == ended:
        lines.append("every trace ended within the budget: lower `budget` (or sample more prompts)")
    if stats["no_answer"]:
        lines.append(
            f"{stats['no_answer']} answers did not finish within generation.answer_max_tokens "
            f"({recipe.generation.answer_max_tokens}): raise it"
        )
    if stats["long_answer"]:
        lines.append(
            f"{stats['long_answer']} answers were longer than splice.max_answer_tokens "
            f"({recipe.splice.max_answer_tokens}): raise it or set splice.on_long_answer: truncate"
        )
    if stats["too_long"]:
        lines.append(
            f"{stats['too_long']} rows were longer than the training sequence_len ({max_len(recipe)}): "
            "raise train.overrides.sequence_len or set splice.on_overlength: truncate"
        )
    return "; ".join(lines)


def length_rows(
    folder: Path, recipe: Recipe, termination: Termination, max_len: int | None, stats: Counter
) -> Iterator[Stage2Row]:
    """Stage-2 rows, one generate shard at a time, from token ids alone (no tokenizer is loaded)."""
    import pyarrow.parquet as pq

    budget = contracts.upstream(folder)["config"]["budget"]  # the folder's own: a conditioned run's differ
    train_thinking = recipe.conditioning is not None and recipe.conditioning.train_thinking
    for traces_path, answers_path in contracts.shard_pairs(folder):
        answers = _answers(pq.ParquetFile(answers_path).read())
        # A few traces at a time, their ids as numpy views: a shard never sits in memory whole
        # (and reading threads only cost at this size).
        columns = ["prompt_id", "sample", "prompt_token_ids", "output_token_ids"]
        for batch in pq.ParquetFile(traces_path).iter_batches(batch_size=64, columns=columns, use_threads=False):
            keys = zip(batch.column("prompt_id").to_pylist(), batch.column("sample").to_pylist())
            prompts, outputs = id_lists(batch.column("prompt_token_ids")), id_lists(batch.column("output_token_ids"))
            for i, key in enumerate(keys):
                answer = answers.get(key)
                if answer is None:
                    continue  # ended within the budget: not a stage-2 sample
                row, why = splice_row(
                    TraceIds(prompt_token_ids=prompts(i), output_token_ids=outputs(i)),
                    answer,
                    termination=termination,
                    spec=recipe.splice,
                    max_len=max_len,
                    train_thinking=train_thinking,
                )
                stats[why] += 1
                if row is not None:
                    stats[f"case{answer['case']}"] += 1
                    if recipe.splice.scores_answers():
                        stats["answer_undecided"] += not trains_answer(recipe.splice, answer)
                    stats["case1_cut_at_line_end"] += answer["cut_back"] > 0
                    yield Stage2Row(
                        row,
                        RowSource(
                            kind="length",
                            prompt_id=answer["prompt_id"],
                            sample=answer["sample"],
                            case=answer["case"],
                            close_at=answer["close_at"],
                            cut_back=answer["cut_back"],
                            budget=budget,
                        ),
                    )


def _answers(table) -> dict[tuple[str, int], Answer]:
    """A shard's answer records by (prompt id, sample), their ids as numpy views."""
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    closes, bodies = id_lists(columns["close_token_ids"]), id_lists(columns["answer_token_ids"])
    keys = zip(columns["prompt_id"].to_pylist(), columns["sample"].to_pylist())
    names = ("case", "close_at", "cut_back", "thinking_start", "finish_reason", "answer_least_p")
    fields = zip(*(columns[name].to_pylist() for name in names))
    return {
        key: {
            "prompt_id": key[0],
            "sample": key[1],
            **dict(zip(names, values)),
            "close_token_ids": closes(i),
            "answer_token_ids": bodies(i),
        }
        for i, (key, values) in enumerate(zip(keys, fields))
    }


def _row_columns(rows: list[Row]) -> list:
    """Arrow's input_ids / attention_mask / labels columns for rows: one concatenation each, shared offsets."""
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row.input_ids) for row in rows], out=offsets[1:])
    offsets = pa.array(offsets)

    def column(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))

    input_ids = np.concatenate([np.asarray(row.input_ids, dtype=np.int32) for row in rows]) if rows else []
    labels = np.concatenate([np.asarray(row.labels, dtype=np.int32) for row in rows]) if rows else []
    return [column(input_ids), column(np.ones(len(input_ids), dtype=np.int32)), column(labels)]


def _mix_rows(recipe: Recipe, model: str, mix_path: Path | None, max_len: int | None, stats: Counter):
    """A function of the number of stage-2 rows: the SFT rows that make up `share` of the total.

    Only conversations need the tokenizer (for the chat template), so only they load it.
    """

    def rows(length_rows: int) -> Iterator[Stage2Row]:
        mix = recipe.splice.sft_mix
        if mix is None or mix.share == 0:
            return
        mix_rows = MixSet(mix_path, mix.messages_field, model)
        wanted = min(len(mix_rows), round(length_rows * mix.share / (1 - mix.share)))
        for index in sorted(random.Random(recipe.seed).sample(range(len(mix_rows)), wanted)):
            ids, labels = mix_rows[index]
            if max_len is not None and len(ids) > max_len:
                stats["sft_too_long"] += 1
                continue
            stats["sft"] += 1
            trained = [i for i, label in enumerate(labels) if label != IGNORE]
            yield Stage2Row(
                Row(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), (trained[0], trained[-1] + 1)),
                RowSource(
                    kind="sft", prompt_id=f"sft/{index}", sample=0, case=0, close_at=None, cut_back=None, budget=None
                ),
            )

    return rows


class MixSet:
    """The SFT mix set's rows as (input_ids, labels), by index: pre-tokenized rows (`input_ids` and `labels`
    columns, Axolotl's layout: what stage 1 trained, its masks included) as they are; conversations
    (`messages_field`) rendered with the policy's chat template and trained on the assistant turns, each
    when it is asked for (a Hub set may hold far more than the mix takes)."""

    def __init__(self, path: Path, field: str, model: str) -> None:
        import pyarrow.parquet as pq

        self.model = model
        if {"input_ids", "labels"} <= set(pq.read_schema(path).names):
            table = pq.read_table(path, columns=["input_ids", "labels"])
            self.rows = list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()))
        else:
            self.rows = pq.read_table(path, columns=[field]).column(0).to_pylist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        row = self.rows[index]
        if isinstance(row, tuple):
            return row
        from length_control.chat import assistant_only_row

        return assistant_only_row(self.tokenizer, row)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.model)


def write_dataset(
    folder: Path,
    rows: Iterator[Stage2Row],
    *,
    mix_rows,
    stats: Counter,
    group_size: int = 1024,
    group_tokens: int = 1 << 20,
) -> dict[str, Any]:
    """Stream rows into rows.parquet + meta.parquet, a row group at a time.

    A group is flushed at `group_size` rows or `group_tokens` tokens, whichever
    comes first, so memory is bounded for 30k-token rows as for short ones.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_schema, meta_schema = ROWS_SCHEMA, META_SCHEMA
    folder.mkdir(parents=True, exist_ok=True)
    lengths: list[int] = []
    count = {"length": 0}
    with atomic_path(folder / ROWS) as rows_tmp, atomic_path(folder / META) as meta_tmp:
        # Token ids do not suit dictionary pages (a 150k vocabulary overflows them); zstd packs them well.
        with (
            pq.ParquetWriter(rows_tmp, row_schema, use_dictionary=False, compression="zstd") as rows_out,
            pq.ParquetWriter(meta_tmp, meta_schema) as meta_out,
        ):
            batch: list[Stage2Row] = []
            batch_tokens = 0

            def flush() -> None:
                nonlocal batch_tokens
                rows_out.write_table(pa.Table.from_arrays(_row_columns([b.row for b in batch]), schema=row_schema))
                metas = [RowMeta(**b.source, span_start=b.row.span[0], span_end=b.row.span[1]) for b in batch]
                columns = {name: [meta[name] for meta in metas] for name in meta_schema.names}
                meta_out.write_table(pa.Table.from_pydict(columns, schema=meta_schema))
                batch.clear()
                batch_tokens = 0

            def add(item: Stage2Row) -> None:
                nonlocal batch_tokens
                batch.append(item)
                lengths.append(len(item.row.input_ids))
                batch_tokens += lengths[-1]
                if len(batch) >= group_size or batch_tokens >= group_tokens:
                    flush()

            for item in rows:
                count["length"] += 1
                add(item)
            for item in mix_rows(count["length"]):
                add(item)
            if batch or not lengths:
                flush()
    return {
        "rows": len(lengths),
        "length_rows": count["length"],
        "max_len": max(lengths, default=0),
        **dict(sorted(stats.items())),
    }


def max_len(recipe: Recipe) -> int | None:
    """The training sequence_len when the recipe fixes one (template or overrides), else None."""
    import yaml

    template = yaml.safe_load(recipe.train.template.read_text()) or {}
    value = recipe.train.overrides.get("sequence_len", template.get("sequence_len"))
    return int(value) if value is not None else None


def longest_mix_row(recipe: Recipe) -> int | None:
    """The longest row the SFT mix can add: every conversation of the mix set measured as a row, sampled or not
    (which ones are sampled depends on how many length rows generation leaves). None without a mix, or while its
    data is not on this machine yet (a Hub set before splice fetches it, the demo's before its build)."""
    mix = recipe.splice.sft_mix
    if mix is None or mix.share == 0 or mix.dataset is None:
        return None
    path = mix.dataset.path or RunLayout(recipe.output_dir).sft_mix_copy
    if not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return _longest_row(str(path), stat.st_size, stat.st_mtime_ns, policy_path(recipe.model), mix.messages_field)


@functools.lru_cache(maxsize=8)
def _longest_row(path: str, _size: int, _mtime_ns: int, model: str, field: str) -> int:
    rows = MixSet(Path(path), field, model)
    return max((len(rows[i][0]) for i in range(len(rows))), default=0)


def _mix_source(recipe: Recipe) -> str:
    dataset = recipe.splice.sft_mix.dataset
    return str(dataset.path or dataset.hf) if dataset is not None else "<no dataset>"


def mix_path(recipe: Recipe) -> Path:
    """The stage-1 SFT data to mix in: a local file, or a Hub set fetched once into the run folder."""
    mix = recipe.splice.sft_mix
    if mix.dataset is None:
        raise ValueError("splice.sft_mix.dataset is not set: name the stage-1 SFT data")
    if mix.dataset.path is not None:
        return mix.dataset.path
    local = RunLayout(recipe.output_dir).sft_mix_copy
    if not local.is_file():  # needs Hub access, as on a cluster
        import datasets

        table = datasets.load_dataset(mix.dataset.hf, mix.dataset.config, split=mix.dataset.split)
        with atomic_path(local) as tmp:
            table.select_columns([mix.messages_field]).to_parquet(str(tmp))
    return local
