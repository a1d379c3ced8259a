"""The disk: what a run will write, sized before it starts; a write that fails for lack of space, one message.

The preflight sizes every part of a run folder (`estimate`) and refuses a run the free space of its filesystem
cannot hold. Each figure is an upper bound of what its stage writes, from the recipe, the measured prompts, the
model's weights and the Axolotl template; `DiskNeed.text` says what each part counts.

A write that fails anyway (another process filled the disk, an estimate missed) raises `DiskFull`: one message
with the path, the free space and what the run needs, exit 2. Atomic writes turn ENOSPC into it where they know
the path (`artifacts.atomic_path`, which also removes its temporary file), the train stage for its log and for
Axolotl's own failure (`failed_for_space`), and the CLI for any other write (`cli.main`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from length_control.errors import UserError

BYTES_PER_ID = 6
"""A token id in a Parquet file at most: its int32 value, its list's levels (under a byte) and Snappy's worst
case on data it cannot compress (a sixth more)."""
RECORD_BYTES = 1024
"""A record's other columns at most: ids, sample numbers, finish reasons, grades (short strings and scalars)."""
FILE_BYTES = 64 * 1024
"""One Parquet file's footer and schema, at most."""
PREPARED_BYTES_PER_TOKEN = 3 * 4 + 8
"""Axolotl's prepared copy of a row, per token: input_ids, attention_mask, labels as int32 and the int64
position_ids it adds for sample packing (Arrow, uncompressed: measured 12 bytes a token on the demo, unpacked)."""
PREPARED_BYTES_PER_ROW = 64
"""The prepared copy's offsets and its `length` column, per row."""
ANCHOR_BYTES_PER_TARGET = 10
"""One of a token's top-k KL-anchor targets (`train.kl_anchor`): an int32 id, a float32 log-probability, an int8
mask flag and their lists' offsets (Axolotl's Arrow copy measured 9.8 bytes on the demo; the Parquet file less)."""
OPTIMIZER_BYTES_PER_PARAMETER = 12
"""A checkpoint's optimizer state per trained parameter: Adam's two float32 moments and a float32 master copy
(DeepSpeed's); an optimizer that keeps more is not covered."""
CHECKPOINT_EXTRA_BYTES = 16 * 1024 * 1024
"""A checkpoint's scheduler, RNG and trainer state, its config and tokenizer files."""
LOG_BYTES = 16 * 1024 * 1024
"""Logs (the engine's, Axolotl's), manifests, the report and its plot: an allowance, not a bound."""
LOG_BYTES_PER_STEP = 2 * 1024
"""A training step's lines in train.log and Axolotl's debug.log (measured: under 500 bytes each)."""
TRAINING_DEFAULT_CHECKPOINTS = 4
"""Axolotl's `save_total_limit` when a config sets none."""


def size_text(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def existing_parent(folder: Path) -> Path:
    """`folder`, or its nearest parent that exists: where the run's files will land."""
    folder = Path(folder).absolute()
    return next(parent for parent in (folder, *folder.parents) if parent.exists())


def free_bytes(path: Path) -> int:
    """The free space of the filesystem `path` is (or will be) on."""
    return shutil.disk_usage(existing_parent(path)).free


def used_bytes(folder: Path) -> int:
    """What the files under `folder` hold now (0 when it does not exist)."""
    folder = Path(folder)
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


# ---------------------------------------------------------------- a full disk


_planned: dict[Path, int] = {}  # run folder -> what the preflight said the run still needs there


def plan(folder: Path, needed: int) -> None:
    """Remember what the preflight sized for a run folder: a `DiskFull` under it names that need."""
    _planned[Path(folder).absolute()] = needed


def _planned_need(path: Path) -> tuple[Path, int] | None:
    """The innermost planned run folder that holds `path`, and its need."""
    path = Path(path).absolute()
    folders = [folder for folder in _planned if path == folder or folder in path.parents]
    if not folders:
        return None
    folder = max(folders, key=lambda f: len(f.parts))
    return folder, _planned[folder]


class DiskFull(UserError, OSError):
    """A write failed for lack of space (ENOSPC): the path, the free space, what the run needs, the fix."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = path
        if path is None and _planned:
            path = next(iter(_planned))
        where = f"{path}: " if path is not None else ""
        free = f" ({size_text(free_bytes(Path(path)))} free there now)" if path is not None else ""
        planned = _planned_need(Path(path)) if path is not None else None
        need = (
            f"the preflight sized what the run still writes into {planned[0]} at {size_text(planned[1])} at most"
            if planned is not None
            else "`length-control validate RECIPE --deep` sizes what a run writes"
        )
        super().__init__(
            f"{where}no space left on the device{free}; {need}: free space on that filesystem or point output_dir "
            "at one with room, then run again (finished stages are kept; the unfinished one is redone and left "
            "no partial file)"
        )


def is_no_space(error: BaseException) -> bool:
    """An OSError for lack of space, including Arrow's (which keeps the errno in its message only)."""
    return (
        isinstance(error, OSError)
        and not isinstance(error, DiskFull)
        and (error.errno == errno.ENOSPC or "No space left on device" in str(error))
    )


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Raise `DiskFull` naming `path` where the block fails for lack of space."""
    try:
        yield
    except OSError as error:
        if is_no_space(error):
            raise DiskFull(path) from error
        raise


NO_SPACE_SIGNS = ("No space left on device", "[Errno 28]", "os error 28", "file write failed")
"""How a subprocess's output says a write failed for lack of space: Python, Rust (safetensors) and torch.save
(whose PytorchStreamWriter says only "file write failed")."""


def failed_for_space(output: str, folder: Path) -> bool:
    """Whether a subprocess that wrote into `folder` and failed with `output` ran out of space there: its output
    says so, or the filesystem has less than a megabyte left."""
    return any(sign in output for sign in NO_SPACE_SIGNS) or free_bytes(folder) < 1024 * 1024


# ---------------------------------------------------------------- what a run writes


@dataclass
class DiskNeed:
    """What each part of a run writes at most, in bytes, and what is not counted (and why)."""

    parts: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def text(self) -> str:
        parts = ", ".join(f"{name} {size_text(size)}" for name, size in self.parts.items())
        missed = "".join(f"; not counted: {line}" for line in self.uncounted)
        return f"the run writes at most {size_text(self.total)} ({parts}){missed}"


@dataclass(frozen=True)
class RunShape:
    """What the run's size follows from, measured by the preflight.

    `prompt_tokens`: each prompt's chat-templated length (all of them: dropped ones counted too);
    `room`: the tokens a trace adds to its prompt at most (first pass, forced close, answer pass);
    `eval_samples`: samples per eval set (problems x samples_per_problem), the sets on this machine.
    """

    prompt_tokens: list[int]
    samples_per_prompt: int
    room: int
    sequence_len: int
    eval_samples: list[int]
    context_limit: int


def estimate(recipe: Any, shape: RunShape, train_config: dict[str, Any], model_folder: Path | None) -> DiskNeed:
    """Every part a run writes into its folder, each an upper bound:

    - traces: per trace its prompt and `room` more ids (the first pass, the close, the answer) at
      `BYTES_PER_ID`, two records (trace and answer) and a file footer per shard;
    - stage-2 rows: a spliced row per trace (its prompt and `room` ids and a few end tokens, at most
      `sequence_len`), the SFT mix's share more rows at `sequence_len`, each in three id columns, a meta record;
    - prepared data: Axolotl's Arrow copy of those rows, once per seed (`PREPARED_BYTES_PER_TOKEN`);
    - anchor targets (`train.kl_anchor`): top_k targets a row token (`ANCHOR_BYTES_PER_TARGET`) in the anchored
      rows' file, once, and again in each seed's prepared copy of it;
    - models: per seed, the weights' parameters (their safetensors headers) at the training dtype (2 bytes with
      bf16/fp16 in the Axolotl config, else 4), and with LoRA the adapter (`lora_r` x (rows + columns) of every
      matrix, float32) beside the merged model;
    - checkpoints: per seed, the checkpoints Axolotl keeps (`checkpoints_kept`), each the trained weights and,
      unless `save_only_model`, `OPTIMIZER_BYTES_PER_PARAMETER` per trained parameter;
    - eval samples: per arm run (before, forced, after per seed) and sample, the context limit's ids twice (the
      sample's, and a probe's greedy ids or its graded text) and four records (the sample, its probes);
    - logs and report: `LOG_BYTES` and `LOG_BYTES_PER_STEP` per training step;
    a closed loop's rounds 2..max_rounds repeat generate, splice (the rows of every earlier round too), train
    and the after arm.
    """
    need = DiskNeed()
    seeds = len(recipe.train.seeds)
    traces = len(shape.prompt_tokens) * shape.samples_per_prompt
    trace_ids = sum(shape.prompt_tokens) * shape.samples_per_prompt + traces * shape.room
    shards = 2 * max(1, math.ceil(traces / recipe.generation.shard_size))
    generate = trace_ids * BYTES_PER_ID + 2 * traces * RECORD_BYTES + shards * FILE_BYTES

    row_tokens = (
        sum(min(tokens + shape.room + 8, shape.sequence_len) for tokens in shape.prompt_tokens)
        * shape.samples_per_prompt
    )
    mix = recipe.splice.sft_mix
    mix_rows = math.ceil(traces * mix.share / (1 - mix.share)) if mix is not None and mix.share > 0 else 0
    row_tokens += mix_rows * shape.sequence_len
    rows = traces + mix_rows
    stage2 = 3 * row_tokens * BYTES_PER_ID + rows * RECORD_BYTES + 2 * FILE_BYTES
    prepared = seeds * (row_tokens * PREPARED_BYTES_PER_TOKEN + rows * PREPARED_BYTES_PER_ROW)
    anchor = recipe.train.kl_anchor
    anchor_targets = (1 + seeds) * row_tokens * anchor.top_k * ANCHOR_BYTES_PER_TARGET if anchor else 0

    weights = model_weights(model_folder) if model_folder is not None else None
    epochs = float(train_config.get("num_epochs", 1))
    steps = math.ceil(rows / int(train_config.get("micro_batch_size", 1))) * math.ceil(epochs)
    if train_config.get("max_steps"):
        steps = min(steps, int(train_config["max_steps"]))
    models = checkpoints = 0
    if weights is None:
        need.uncounted.append(
            f"the trained models and checkpoints (no safetensors weights of the policy on this machine: "
            f"{model_folder or recipe.model.hub})"
        )
    else:
        dtype = 2 if any(train_config.get(key) is True for key in ("bf16", "fp16", "float16", "bfloat16")) else 4
        trained = weights.lora(train_config) if train_config.get("adapter") else weights.parameters
        per_model = weights.parameters * dtype + (trained * 4 if train_config.get("adapter") else 0)
        per_checkpoint = (
            trained * (4 if train_config.get("adapter") else dtype)
            + (0 if train_config.get("save_only_model") else trained * OPTIMIZER_BYTES_PER_PARAMETER)
            + CHECKPOINT_EXTRA_BYTES
        )
        models = seeds * per_model
        checkpoints = seeds * checkpoints_kept(train_config, steps) * per_checkpoint

    eval_runs = sum({"before": 1, "forced": 1, "after": seeds}[arm] for arm in recipe.eval.arms)
    samples = sum(shape.eval_samples)
    per_run = samples * (2 * shape.context_limit * BYTES_PER_ID + 4 * RECORD_BYTES) + 4 * FILE_BYTES
    evals = eval_runs * per_run
    logs = LOG_BYTES + seeds * steps * LOG_BYTES_PER_STEP

    need.parts = {
        "traces": generate,
        "stage-2 rows": stage2,
        "prepared data": prepared,
        **({"anchor targets": anchor_targets} if anchor else {}),
        "models": models,
        "checkpoints": checkpoints,
        "eval samples": evals,
        "logs and report": logs,
    }
    if recipe.loop.until_overlong is not None and recipe.loop.max_rounds > 1:
        rounds = range(2, recipe.loop.max_rounds + 1)
        after = per_run * seeds if "after" in recipe.eval.arms else 0
        need.parts["later rounds"] = sum(
            generate + n * (stage2 + prepared + anchor_targets) + models + checkpoints + after + logs for n in rounds
        )
    return need


def checkpoints_kept(config: dict[str, Any], steps: int) -> int:
    """The checkpoints Axolotl keeps at most: none with `save_strategy: "no"`; else as many as it saves (every
    `save_steps`, `saves_per_epoch` a epoch, else each epoch, and one at the end) up to `save_total_limit`
    (Axolotl's default 4), and the best one besides with `load_best_model_at_end`."""
    epochs = math.ceil(float(config.get("num_epochs", 1)))
    save_steps = config.get("save_steps")
    if save_steps:
        saves = math.ceil(1 / save_steps) if save_steps < 1 else math.ceil(steps / save_steps)
    elif str(config.get("save_strategy")).lower() in ("no", "false"):
        return 0
    elif config.get("saves_per_epoch"):
        saves = int(config["saves_per_epoch"]) * epochs
    else:
        saves = epochs if config.get("save_strategy") in (None, "epoch") else steps
    limit = int(config.get("save_total_limit") or TRAINING_DEFAULT_CHECKPOINTS)
    return min(saves + 1, limit) + bool(config.get("load_best_model_at_end"))


@dataclass(frozen=True)
class Weights:
    """The shapes of a model's tensors, from its safetensors headers (no tensor is loaded)."""

    shapes: dict[str, tuple[int, ...]]

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def lora(self, config: dict[str, Any]) -> int:
        """A LoRA adapter's parameters at most: `lora_r` x (rows + columns) of every matrix (whichever the
        config targets), and the tensors of `lora_modules_to_save` whole."""
        rank = int(config.get("lora_r", 8))
        whole = config.get("lora_modules_to_save") or []
        return sum(rank * sum(shape) for shape in self.shapes.values() if len(shape) == 2) + sum(
            math.prod(shape) for name, shape in self.shapes.items() if any(module in name for module in whole)
        )


def model_weights(folder: Path) -> Weights | None:
    """The tensor shapes of the model in `folder` (its *.safetensors files), None where it has none."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    shapes = {}
    for file in files:
        with safe_open(file, framework="numpy") as weights:
            for name in weights.keys():  # noqa: SIM118  safe_open is not a mapping
                shapes[name] = tuple(weights.get_slice(name).get_shape())
    return Weights(shapes)


def local_model(model: str) -> Path | None:
    """The folder of a model on this machine: a path, or a Hub id's snapshot in the local cache; else None."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except (OSError, ValueError):  # not in the cache, or not a Hub id: not counted, and said so
        return None


def check_room(folder: Path, need: DiskNeed) -> tuple[str, bool]:
    """The preflight's disk line for a run folder, and whether the free space holds what it still needs (what is
    already in the folder is taken off the total). Remembers the need for `DiskFull`."""
    there = used_bytes(folder)
    remaining = max(0, need.total - there)
    free = free_bytes(folder)
    plan(folder, remaining)
    already = f"; {size_text(there)} already in {folder}" if there else ""
    line = f"disk: {need.text()}{already}; {size_text(free)} free on its filesystem"
    if remaining > free:
        return (
            f"{line}: {size_text(remaining)} needed; free {size_text(remaining - free)} there or point "
            "output_dir at a filesystem with room",
            False,
        )
    return line, True
