"""The run's contracts: where every stage writes, and what its records hold.

A run folder, from the recipe's `output_dir`:

    generate/             traces-NNNNN.parquet, answers-NNNNN.parquet, termination.json
    stage2/               rows.parquet (Axolotl's pre-tokenized rows), meta.parquet
    train/seed-<s>/       axolotl.yaml, train.log, model/  (one per stage-2 seed)
    eval/before/  eval/forced/  eval/after/seed-<s>/    samples.parquet, probe.parquet, metrics.json
    report/               report.md, report.json, thinking_lengths.png
    rounds/<n>/           round n >= 2 of a closed loop: a run folder of its own
    logs/  prepared/  sft_mix/  dry-run/
    slurm/                the jobs submitted to Slurm: scripts, jobs.json, the recipe as submitted, logs/

Every stage folder ends with `manifest.json` (`artifacts.Stage`), and a
stage finds its inputs by reading its upstream's manifest. Records are
Arrow tables with the schemas below, token ids as int32 lists: token ids
are the truth between stages, text is for people. Beside each schema, the
record as Python sees it (a TypedDict with the schema's fields, which
`tests/test_records.py` holds equal), the type its writer builds and its
readers take. Readers and writers here stream and write atomically; no
stage writes or parses another's files by hand.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from length_control.artifacts import MissingInput, atomic_path, finished_manifest, write_json_atomic
from length_control.sources import load_source_spec
from length_control.think import Termination

if TYPE_CHECKING:
    from length_control.recipe import Recipe

ARMS = ("before", "after", "forced")

# ---------------------------------------------------------------- the run folder


@dataclass(frozen=True)
class RunLayout:
    """Every stage folder and file of one run, from its `output_dir`."""

    root: Path

    @property
    def generate(self) -> Path:
        return self.root / "generate"

    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    def train(self, seed: int) -> Path:
        return self.root / "train" / f"seed-{seed}"

    def eval(self, arm: str, seed: int | None = None) -> Path:
        """The after arm has one folder per stage-2 seed; before and forced are shared."""
        if arm not in ARMS:
            raise ValueError(f"no arm {arm!r}; use one of {', '.join(ARMS)}")
        if (arm == "after") != (seed is not None):
            raise ValueError("the after arm needs a stage-2 seed; before and forced take none")
        base = self.root / "eval" / arm
        return base / f"seed-{seed}" if arm == "after" else base

    @property
    def report(self) -> Path:
        return self.root / "report"

    def round(self, number: int) -> RunLayout:
        """Round `number` (>= 2) of a closed loop; round 1 is the run folder itself."""
        return RunLayout(self.root / "rounds" / str(number))

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def prepared(self, seed: int) -> Path:
        """Axolotl's prepared-data cache of one training seed."""
        return self.root / "prepared" / f"seed-{seed}"

    @property
    def sft_mix_copy(self) -> Path:
        """A Hub SFT set, fetched once per run folder."""
        return self.root / "sft_mix" / "source.parquet"

    @property
    def dry_run(self) -> Path:
        return self.root / "dry-run"

    @property
    def slurm(self) -> Path:
        """The Slurm jobs of the run (`slurm.py`); a dry run writes its scripts to `dry-run/slurm/`."""
        return self.root / "slurm"


# File names inside the stage folders.
TERMINATION = "termination.json"
ROWS = "rows.parquet"
META = "meta.parquet"
SAMPLES = "samples.parquet"
PROBE = "probe.parquet"
DRIFT = "drift.parquet"
EARLY_CLOSE = "early_close.parquet"
METRICS = "metrics.json"
AXOLOTL_CONFIG = "axolotl.yaml"

# ---------------------------------------------------------------- schemas

IDS = pa.list_(pa.int32())
TokenIds = list[int] | np.ndarray
"""A list<int32> field: a list, or an int32 numpy view where a reader streams (`id_lists`)."""

TRACES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample", pa.int32()),
        ("prompt_token_ids", IDS),
        ("output_token_ids", IDS),
        ("finish_reason", pa.string()),
        ("think_close", pa.int32()),  # index of the first close-tag token in the output, or null
        ("seed", pa.int64()),
    ]
)
"""A generate trace: the policy's first pass, at most B output tokens."""


class TraceIds(TypedDict):
    """A trace's token ids: all stage 2 reads of it."""

    prompt_token_ids: TokenIds
    output_token_ids: TokenIds


class Trace(TraceIds):
    """A TRACES record."""

    prompt_id: str
    sample: int
    finish_reason: str
    think_close: int | None
    seed: int


DECIDED_P = 0.6
"""A model has decided a text (its answer after a close) when it gives every token of it at least this probability
(a runner-up holds at most 0.4). Below it the text is a near tie: on the demo a count the thinking was cut in reads
"17" at 0.478 and "18" at 0.476 under the stage-1 model, and training tips it one way or the other. The drift
probe judges agreement on decided answers only; `splice.termination_span: think_close_decided_answer_eos` trains
an answer only where the policy had decided it."""

ANSWERS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample", pa.int32()),
        ("case", pa.int8()),  # 1: no close within B, forced; 2: closed within B, the answer was cut
        ("close_at", pa.int32()),  # output tokens before the close: case 1 the cut after B thinking tokens
        ("cut_back", pa.int32()),  # case 1: tokens a line-end cut (cut.at) moved back from B; 0 otherwise
        ("thinking_start", pa.int32()),  # output tokens before the first thinking token (the policy's open tag)
        ("close_token_ids", IDS),  # the forced close (case 1) or the policy's own close tokens (case 2)
        ("answer_token_ids", IDS),
        ("finish_reason", pa.string()),
        # the least probability the policy gave a token of its answer (what follows the close, the end token
        # included), scored where the span trains decided answers only; null elsewhere
        ("answer_least_p", pa.float64()),
    ]
)
"""The answer pass of a trace that ran into B."""


class Answer(TypedDict):
    """An ANSWERS record."""

    prompt_id: str
    sample: int
    case: int
    close_at: int
    cut_back: int
    thinking_start: int
    close_token_ids: TokenIds
    answer_token_ids: TokenIds
    finish_reason: str
    answer_least_p: float | None


ROWS_SCHEMA = pa.schema([("input_ids", IDS), ("attention_mask", IDS), ("labels", IDS)])
"""A stage-2 row, exactly Axolotl's pre-tokenized format (labels IGNORE where no loss)."""
IGNORE = -100  # the label of a token that carries no loss

META_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "length" (a spliced trace) or "sft" (a stage-1 conversation)
        ("prompt_id", pa.string()),
        ("sample", pa.int32()),
        ("case", pa.int8()),
        ("close_at", pa.int32()),
        ("cut_back", pa.int32()),  # where the thinking was closed (ANSWERS); null for sft
        ("budget", pa.int32()),  # the B its trace was cut at (a conditioned run's rows have several); null for sft
        ("span_start", pa.int32()),
        ("span_end", pa.int32()),  # input_ids[start:end] holds every trained token
    ]
)
"""Per stage-2 row, in the same order: where it came from."""


class RowSource(TypedDict):
    """Where a stage-2 row came from; None where an SFT row has no such thing."""

    kind: str
    prompt_id: str
    sample: int
    case: int
    close_at: int | None
    cut_back: int | None
    budget: int | None


class RowMeta(RowSource):
    """A META_SCHEMA record: the source and the trained span of the row (`splice.Row`, written as ROWS_SCHEMA's
    columns)."""

    span_start: int
    span_end: int


SAMPLES_SCHEMA = pa.schema(
    [
        ("benchmark", pa.string()),
        ("problem_id", pa.string()),
        ("sample", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("prompt_token_ids", IDS),
        ("output_token_ids", IDS),
        ("finish_reason", pa.string()),
        ("thinking_tokens", pa.int32()),  # output tokens before the close, or all of them when it never closed
        ("closed_think", pa.bool_()),
        ("overlong", pa.bool_()),
        ("extracted", pa.string()),
        ("correct", pa.bool_()),
        ("why", pa.string()),
    ]
)
"""One eval sample: what the model wrote and how it was graded."""


class SampleKey(TypedDict):
    """Which eval sample a record is about: the fields every eval record starts with."""

    benchmark: str
    problem_id: str
    sample: int


class SampleScore(SampleKey):
    """What the report and the calibration read of a sample: how long it thought and how it scored."""

    prompt_tokens: int
    thinking_tokens: int
    closed_think: bool
    overlong: bool
    correct: bool


class Sample(SampleScore):
    """A SAMPLES_SCHEMA record."""

    prompt_token_ids: TokenIds
    output_token_ids: TokenIds
    finish_reason: str
    extracted: str | None
    why: str


PROBE_SCHEMA = pa.schema(
    [
        ("benchmark", pa.string()),
        ("problem_id", pa.string()),
        ("sample", pa.int32()),
        ("close_nll", pa.float64()),
        ("greedy_close", pa.bool_()),
    ]
)
"""The termination probe on one held-out trace that ran past B."""


class ProbeRecord(SampleKey):
    """A PROBE_SCHEMA record."""

    close_nll: float
    greedy_close: bool


DRIFT_SCHEMA = pa.schema(
    [
        ("benchmark", pa.string()),
        ("problem_id", pa.string()),
        ("sample", pa.int32()),
        ("close", pa.string()),  # "forced": a forced-arm sample closed at B; "own": a before-arm sample closed within B
        ("answer_start", pa.int32()),  # where the answer starts in the sample's output (after the close)
        ("answer_nll", pa.float64()),
        ("greedy_token_ids", IDS),
        ("greedy_agrees", pa.bool_()),  # with the stage-1 model's greedy answer; null in the forced arm (the reference)
        # the stage-1 model's least likely token of its own greedy answer here: under DECIDED_P, a near tie
        ("stage1_greedy_min_p", pa.float64()),
    ]
)
"""The answer-drift probe on one sample closed at B by force, or within B on its own (`probes.answer_drift`)."""


class DriftRecord(SampleKey):
    """A DRIFT_SCHEMA record."""

    close: str
    answer_start: int
    answer_nll: float
    greedy_token_ids: TokenIds
    greedy_agrees: bool | None
    stage1_greedy_min_p: float | None


EARLY_CLOSE_SCHEMA = pa.schema(
    [
        ("benchmark", pa.string()),
        ("problem_id", pa.string()),
        ("sample", pa.int32()),
        ("positions", pa.int32()),
        ("close_p_mean", pa.float64()),
        ("close_p_max", pa.float64()),
    ]
)
"""The early-close probe on one held-out trace that closed on its own within B (`probes.early_close`)."""


class EarlyCloseRecord(SampleKey):
    """An EARLY_CLOSE_SCHEMA record."""

    positions: int
    close_p_mean: float
    close_p_max: float


PROBE_SCHEMAS = {PROBE: PROBE_SCHEMA, DRIFT: DRIFT_SCHEMA, EARLY_CLOSE: EARLY_CLOSE_SCHEMA}
"""An eval arm's probe files (those its arm runs), by name."""


class BenchmarkScores(TypedDict):
    """One benchmark's scores in an eval arm's `metrics.json` (`evaluate.summarize`): every arm has them."""

    problems: int
    samples: int
    score: float  # pass@1 over the samples, averaged over problems
    score_stderr: float  # over problems
    overlong_rate: float
    closed_accuracy: float | None  # over the samples that closed; None when none did
    mean_thinking_tokens: float


class BenchmarkMetrics(BenchmarkScores, total=False):
    """The scores, and the figures of the probes that ran (a key is there only when its probe ran)."""

    prompts_too_long: int  # dropped for filling the context (the eval's own file, not a report's re-summary)
    # the termination probe (PROBE)
    probe_traces: int
    close_nll: float
    greedy_close_rate: float
    # the answer-drift probe (DRIFT) after the forced close; the agreements and tipped ties in an after arm only
    drift_samples: int
    answer_nll: float
    split_samples: int
    greedy_answer_agreement: float
    decided_answer_agreement: float | None
    ties_tipped: int
    # the same after the policy's own close within B
    own_close_drift_samples: int
    own_close_answer_nll: float
    own_close_split_samples: int
    own_close_greedy_answer_agreement: float
    own_close_decided_answer_agreement: float | None
    own_close_ties_tipped: int
    # the early-close probe (EARLY_CLOSE)
    early_close_traces: int
    early_close_p: float
    early_close_p_max: float


class Metrics(TypedDict):
    """An eval arm's `metrics.json`."""

    context_limit: int
    benchmarks: dict[str, BenchmarkMetrics]


# ---------------------------------------------------------------- readers and writers


def schemas_fingerprint(*schemas: pa.Schema) -> str:
    """A short hash of record schemas, for a stage's manifest config: a run folder written before a
    column was added is redone, not read by code that expects the column."""
    return hashlib.sha256("\n\n".join(str(schema) for schema in schemas).encode()).hexdigest()[:16]


def write_records(path: Path, records: Sequence[Mapping[str, Any]], schema: pa.Schema) -> None:
    """One table, written atomically (a reader sees the old file or the whole new one)."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)


def read_records(path: Path, columns: list[str] | None = None, filters: list | None = None) -> list[dict[str, Any]]:
    """A table's records (`filters`: only the rows they keep, in pyarrow's form, in file order)."""
    return pq.read_table(path, columns=columns, filters=filters).to_pylist()


def shard_path(folder: Path, kind: str, index: int) -> Path:
    """Shard `index` of a file of shards: generate's "traces" or "answers", an eval arm's "samples" or probe files."""
    return Path(folder) / f"{kind}-{index:05d}.parquet"


def shards_made_for(plan_file: Path, expected: dict[str, Any]) -> bool:
    """Whether the shards beside `plan_file` were made for these settings and inputs (what it records)."""
    return plan_file.is_file() and json.loads(plan_file.read_text()) == expected


def reset_stale_shards(plan_file: Path, expected: dict[str, Any]) -> None:
    """Shards made for other settings or inputs are not resumed: their folder starts over, recording these."""
    if shards_made_for(plan_file, expected):
        return
    shutil.rmtree(plan_file.parent, ignore_errors=True)
    plan_file.parent.mkdir(parents=True)
    write_json_atomic(plan_file, expected)


def shard_pairs(folder: Path) -> Iterator[tuple[Path, Path]]:
    """(traces, answers) shard paths of a generate folder, in order."""
    for traces in sorted(Path(folder).glob("traces-*.parquet")):
        yield traces, traces.with_name(traces.name.replace("traces-", "answers-"))


def read_shards(folder: Path, kind: str) -> list[dict[str, Any]]:
    """All records of one kind ("traces" or "answers"), in shard order (small runs and tests)."""
    return [record for path in sorted(Path(folder).glob(f"{kind}-*.parquet")) for record in read_records(path)]


def write_termination(folder: Path, termination: Termination) -> None:
    write_json_atomic(Path(folder) / TERMINATION, asdict(termination))


def read_termination(folder: Path) -> Termination:
    """The ids stage 2 places the termination with, as the generate stage wrote them."""
    path = Path(folder) / TERMINATION
    if not path.is_file():
        raise MissingInput(
            f"{path} is missing: {folder} was written by an older length-control; "
            "redo it with `length-control run RECIPE --from generate`"
        )
    return Termination(**json.loads(path.read_text()))


def id_lists(column: pa.ListArray):
    """Row i of an Arrow list<int32> column as a numpy view (no copy, no Python ints)."""
    values = column.values.to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy()
    return lambda i: values[offsets[i] : offsets[i + 1]]


# ---------------------------------------------------------------- plans and manifests


@dataclass(frozen=True)
class StageInputs:
    """The upstream folders of a stage whose run depends on what each one is, by role: one field each, None
    where the plan reads none (`generate.GenerateInputs`, `splice.SpliceInputs`, `evaluate.EvalInputs`). The
    run reads the fields, never a name or a position."""

    def named(self) -> dict[str, Path]:
        """The folders by the names manifests record and dry runs print: each field's, spaced."""
        return {
            entry.name.replace("_", " "): getattr(self, entry.name)
            for entry in fields(self)
            if getattr(self, entry.name) is not None
        }


@dataclass
class Plan:
    """One stage of one run, decided before it runs.

    Every stage module has `plan(recipe, ...) -> Plan` and `run(plan) ->
    summary`; the pipeline runs plans and `run --dry-run` prints them, so
    what a dry run shows is what runs. `inputs` are the upstream stage
    folders it reads (their manifests), `steps` are for people (the engine
    processes, request settings, exact commands), `configs` the files the
    stage renders, by name (written into `folder` when it runs). A stage
    that tells its inputs apart gets them by role (`reads`), and `inputs`
    is their named view.
    """

    stage: str
    recipe: Recipe
    folder: Path
    inputs: dict[str, Path] = field(default_factory=dict)
    model: str = ""  # the model the stage runs or trains
    arm: str | None = None
    seed: int | None = None  # the stage-2 training seed (train, eval after)
    steps: list[str] = field(default_factory=list)
    configs: dict[str, str] = field(default_factory=dict)
    reads: StageInputs | None = None

    def __post_init__(self) -> None:
        if self.reads is not None:
            self.inputs = self.reads.named()

    @property
    def label(self) -> str:
        return self.stage + (f" seed {self.seed}" if self.seed is not None else "")

    def describe(self) -> str:
        lines = [f"[{self.label}] -> {self.folder}"]
        if self.model:
            lines.append(f"  model: {self.model}")
        lines += [f"  reads {name}: {folder}" for name, folder in self.inputs.items()]
        return "\n".join(lines + [f"  {step}" for step in self.steps])


def source_inputs(name: str, definitions: list[Path]) -> dict[str, Path]:
    """A stage's inputs for the sources it reads: each definition file and the local data file it names,
    so that editing a data file makes the stage stale. (A Hub dataset is named by id, config and split in
    its definition; its revision is not resolved offline.)"""
    inputs = {}
    for i, definition in enumerate(definitions):
        inputs[f"{name}{i}"] = Path(definition)
        data = load_source_spec(definition).dataset.path
        if data is not None and Path(data).is_file():
            inputs[f"{name}{i}_data"] = Path(data)
    return inputs


def settings_differ(
    manifest: dict[str, Any],
    expected: dict[str, Any],
    *,
    but_config: tuple[str, ...] = (),
    but_inputs: tuple[str, ...] = (),
) -> list[str]:
    """What differs between a finished stage's manifest and what another stage expects, bar the named
    config keys and inputs: a stage reuses another's output only when nothing else does."""
    ours, theirs = expected["config"], manifest["config"]
    differ = [key for key in sorted({*ours, *theirs}) if key not in but_config and ours.get(key) != theirs.get(key)]
    inputs = {name: value for name, value in expected["inputs"].items() if name not in but_inputs}
    theirs_inputs = {name: value for name, value in manifest["inputs"].items() if name not in but_inputs}
    return differ + [
        f"input {name}" for name in sorted({*inputs, *theirs_inputs}) if inputs.get(name) != theirs_inputs.get(name)
    ]


def is_finished(folder: Path) -> bool:
    try:
        finished_manifest(folder)
    except MissingInput:
        return False
    return True


def upstream(folder: Path) -> dict[str, Any]:
    """A finished stage's manifest (`output`, `summary`); MissingInput, naming the stage to run, if unfinished."""
    return finished_manifest(folder)
