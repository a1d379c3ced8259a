"""The recipe: one YAML file = one complete run.

A recipe names the policy model and its think tags, the budget B and where
a thinking that ran past it is cut, the eval context limit, the prompt
sources, the generation engine and sampling, how traces are spliced into
stage-2 rows, the Axolotl template and its overrides, the eval sets, and the
output folder. Paths resolve relative to the recipe file.
`length-control validate RECIPE [key=value ...]` checks one and prints every
problem at once, each naming the key, the value and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, field_validator, model_validator

from length_control._schema import (
    ConfigError,
    ExistingFile,
    FilePath,
    StrictModel,
    read_yaml,
    validate,
)
from length_control.sources import DatasetLocation, SourceSpec, load_source_spec

# ---------------------------------------------------------------- model


class ThinkTags(StrictModel):
    open: str = Field("<think>", description="text that opens the thinking")
    close: str = Field("</think>", description="text that closes the thinking")
    forced_close: str = Field(
        "\n</think>",
        description="text appended at the budget when the thinking never closed (case 1); must end with `close`",
    )

    @model_validator(mode="after")
    def _forced_close_ends_with_close(self) -> ThinkTags:
        if not self.forced_close.endswith(self.close):
            raise ValueError(f"forced_close {self.forced_close!r} must end with close {self.close!r}")
        return self


GPT_OSS_SWITCH = "<|end|><|start|>assistant<|channel|>final<|message|>"

# `model.think: NAME`: the tags of a model family, so a recipe need not spell them. The first three
# are the same text; what differs is how their tokenizers cut it, which the stages handle from the
# ids (think.ThinkTokens). gpt-oss thinks in its analysis channel: closing the thinking is switching
# to the final channel, a six-token "close" found and forced like any other.
THINK_PRESETS = {
    "qwen3": {},  # <think> and </think> are one added token each (Qwen3, Hermes 4 14B)
    "deepseek-r1": {},  # BPE pieces; R1's template opens "<think>\n" in the generation prompt
    "llama-think": {},  # BPE pieces written by the policy (Llama-3.1-based reasoners, Hermes 4 70B/405B)
    "gpt-oss": {"open": "<|channel|>analysis<|message|>", "close": GPT_OSS_SWITCH, "forced_close": GPT_OSS_SWITCH},
}


def preset_tags(name: str) -> ThinkTags:
    """The think tags of a `model.think` preset, for commands that take one without a recipe (`--think`)."""
    if name not in THINK_PRESETS:
        raise ConfigError(Path("--think"), [f"unknown think preset {name!r}; use one of {', '.join(THINK_PRESETS)}"])
    return ThinkTags(**THINK_PRESETS[name])


class StatedBudgets(StrictModel):
    """Stage-1 conversations that open with a system line stating a budget at random, which the response
    does not keep: a demo policy that has read budget lines but was never taught to obey them, the
    starting point of budget-conditioned stopping (a policy that never saw a system message writes
    nonsense after one)."""

    share: float = Field(0.5, gt=0, le=1, description="the share of stage-1 conversations with a line")
    instruction: str = Field(
        "Think for at most {budget} tokens.",
        description="the line; `{budget}` is replaced by a budget drawn uniformly from [low, high]",
    )
    low: int = Field(28, gt=0)
    high: int = Field(280, gt=0)


class DemoModelSpec(StrictModel):
    """Settings of the embedded demo policy that `length-control demo-model` builds."""

    variant: Literal["standard", "multi-token-close"] = Field(
        "standard", description="'multi-token-close': a tokenizer whose </think> is several BPE pieces"
    )
    seed: int = 0
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary, before the think tags")
    hidden_size: int = Field(64, ge=32, multiple_of=32, description="heads are 32 wide (vLLM CPU attention)")
    layers: int = Field(4, ge=1)
    max_position_embeddings: int = Field(1024, ge=128)
    train_problems: int = Field(3000, ge=10, description="stage-1 SFT conversations")
    # Trained to convergence, as a stage-1 model is: at 900 steps a build on an Intel Xeon with AMX answered
    # 13 after its own 14-line counts, and stage 2 (its SFT rows, and its rows cut at B that answer the last
    # line's number) mended them, so its answers after its own close moved (agreement 82.4 %). At 1350 every
    # build tried there (3 seeds, native and AVX2 kernels) answers every count it finishes (docs/RESULTS.md,
    # "A stage-1 policy trained to convergence").
    train_steps: int = Field(1350, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    interrupted_share: float = Field(
        0.5, ge=0, le=1, description="extra conversations closed early, training only the answer after </think>"
    )
    stated_budgets: StatedBudgets | None = Field(
        None, description="stage-1 conversations with a budget line the policy does not keep (for `conditioning`)"
    )


def _model_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ValueError(
            f"model folder {path} {what}; point `path` at a Hugging Face model folder, "
            "or use `hub: org/name` for a Hub model, or `demo: {}` for the embedded demo policy"
        )
    return path


class ModelSpec(StrictModel):
    """The policy: exactly one of a local folder, a Hub id, or the embedded demo policy."""

    path: Annotated[FilePath, AfterValidator(_model_folder)] | None = Field(
        None, description="Hugging Face model folder (config, weights, tokenizer)"
    )
    hub: str | None = Field(
        None,
        pattern=r"^[\w.-]+/[\w.-]+$",
        description="Hugging Face Hub model id (e.g. Qwen/Qwen3-14B), fetched by the engines on the cluster",
    )
    demo: DemoModelSpec | None = Field(None, description="build the embedded demo policy")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    think: ThinkTags = Field(ThinkTags(), description=f"the think tags, or a family preset: {', '.join(THINK_PRESETS)}")
    end_token: str | None = Field(
        None,
        description="the token that ends an answer: stage-2 rows end with it and train it as the stop, and the "
        "engine stops on it; default: the token the chat template ends an assistant turn with, else the "
        "tokenizer's eos_token (the preflight says which, and when the two differ)",
    )

    @field_validator("think", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in THINK_PRESETS:
                raise ValueError(
                    f"unknown think preset {value!r}; use one of {', '.join(THINK_PRESETS)}, "
                    "or give the tags: {open: ..., close: ..., forced_close: ...}"
                )
            return THINK_PRESETS[value]
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if sum(x is not None for x in (self.path, self.hub, self.demo)) != 1:
            raise ValueError("give exactly one of `path` (a model folder), `hub` (a Hub id) or `demo: {}`")
        return self


# ---------------------------------------------------------------- engines


class VLLMOptions(StrictModel):
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1, description="engine replicas, each with tensor_parallel_size devices")
    max_model_len: int | None = Field(None, gt=0, description="default: the recipe's context_limit")
    max_num_seqs: int | None = Field(None, gt=0)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enable_prefix_caching: bool = Field(True, description="the answer pass reuses the trace's KV cache")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments for vllm.LLM")
    env: dict[str, str] = Field(default_factory=dict, description="environment of the engine process")
    keep_during_training: bool = Field(
        False,
        description="keep the engine up while Axolotl trains, to evaluate the stage-2 models without "
        "another start; off by default: on GPUs training needs the engine's memory",
    )


class OpenAIOptions(StrictModel):
    endpoints: list[str] = Field(min_length=1, description="base URLs, e.g. http://10.0.0.1:8000/v1")
    model: str = Field(description="the served model name")
    max_concurrency: int = Field(64, ge=1, description="requests in flight, over all endpoints")
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(3600, gt=0)
    api_key_env: str | None = Field(None, description="environment variable holding the API key")

    @field_validator("endpoints")
    @classmethod
    def _http(cls, endpoints: list[str]) -> list[str]:
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {url!r} must start with http:// or https://")
        return endpoints


class EngineSpec(StrictModel):
    kind: Literal["vllm", "openai"] = Field("vllm", description="vllm: offline engine; openai: running servers")
    vllm: VLLMOptions = VLLMOptions()
    openai: OpenAIOptions | None = None

    @model_validator(mode="after")
    def _openai_needs_endpoints(self) -> EngineSpec:
        if self.kind == "openai" and self.openai is None:
            raise ValueError("kind 'openai' needs an `openai:` section with `endpoints` and `model`")
        return self


class Sampling(StrictModel):
    """The report's defaults: temperature 0.6, top-p 0.95, top-k 20."""

    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=-1, description="-1 disables")
    min_p: float = Field(0.0, ge=0, le=1)


# ---------------------------------------------------------------- stages


class SourceRef(StrictModel):
    source: ExistingFile = Field(description="a source definition in prompts_sources/")
    sample: int | None = Field(None, gt=0, description="overrides the source's own `sample`")


def _source_shorthand(value: Any) -> Any:
    """Allow `- ../prompts_sources/x.yaml` for `- {source: ...}`."""
    if isinstance(value, list):
        return [{"source": item} if isinstance(item, str) else item for item in value]
    return value


class PromptsSpec(StrictModel):
    sources: list[SourceRef] = Field(min_length=1)

    _shorthand = field_validator("sources", mode="before")(_source_shorthand)


class GenerationSpec(StrictModel):
    samples_per_prompt: int = Field(1, ge=1)
    sampling: Sampling = Sampling()
    answer_max_tokens: int = Field(4096, gt=0, description="max tokens of the answer pass after the thinking closed")
    answer_sampling: Sampling | None = Field(
        None,
        description="the answer pass's sampling, where it differs from `sampling` (temperature 0: the answer "
        "the policy gives most often)",
    )
    shard_size: int = Field(256, ge=1, description="requests per output shard; a killed run resumes by shard")
    on_long_prompt: Literal["drop", "error"] = Field(
        "drop",
        description="a prompt with no room for B thinking tokens, the forced close and an answer within "
        "the engine's max_model_len: dropped and counted, or an error",
    )


class SFTMix(StrictModel):
    dataset: DatasetLocation | None = Field(
        None,
        description="stage-1 SFT rows: a chat `messages` column, or pre-tokenized `input_ids` and `labels` "
        "(taken as they are, masks included); default: the demo policy's own",
    )
    messages_field: str = "messages"
    share: float = Field(ge=0, lt=1, description="fraction of the stage-2 rows that are stage-1 SFT rows")


class SpliceSpec(StrictModel):
    termination_span: Literal[
        "think_close", "think_close_eos", "think_close_answer_eos", "think_close_decided_answer_eos"
    ] = Field(
        "think_close_eos",
        description="the tokens that carry loss; the report trained </think> and EOS. think_close_answer_eos: "
        "the policy's answer after the close too; think_close_decided_answer_eos: the answer only where the "
        "policy had decided it (each of its tokens at least decided_answer_p, scored by generate), else "
        "</think> and EOS",
    )
    decided_answer_p: float = Field(
        0.6,  # contracts.DECIDED_P (contracts imports this module's think tags)
        gt=0,
        le=1,
        description="with think_close_decided_answer_eos: the least probability the policy gave every token of "
        "an answer for that answer to carry loss (the probes judge agreement where it gave at least "
        "contracts.DECIDED_P, whatever this is)",
    )

    def scores_answers(self) -> bool:
        """Whether generate scores each answer under the policy (the span trains decided answers only)."""
        return self.termination_span == "think_close_decided_answer_eos"

    max_answer_tokens: int = Field(4096, gt=0, description="cap on answer tokens")
    on_long_answer: Literal["drop", "truncate"] = "drop"
    on_overlength: Literal["drop", "truncate"] = Field("drop", description="rows longer than the training sequence_len")
    sft_mix: SFTMix | None = None

    @model_validator(mode="before")
    @classmethod
    def _cut_has_its_own_section(cls, data: Any) -> Any:
        """`splice.cut` and `splice.cut_grace` were here until generation and the forced arm obeyed them too."""
        moved = [
            f"splice.{old} ({data[old]}) to cut.{new}"
            for old, new in (("cut", "at"), ("cut_grace", "grace"))
            if isinstance(data, dict) and old in data
        ]
        if moved:
            raise ValueError(
                f"the cut has its own top-level section now: move {' and '.join(moved)}, e.g. "
                "cut: {at: line_end, grace: 0.05}"
            )
        return data


class CutSpec(StrictModel):
    """Where a thinking that ran past B without closing is cut before the forced close, in generate's case 1
    and in the forced eval arm alike (`cut.CutPolicy` applies it)."""

    at: Literal["exact", "line_end"] = Field(
        "exact",
        description="exact: after B thinking tokens; line_end: after the last whole line within `grace` "
        "before B, as the policy's own closes follow a line",
    )
    grace: float = Field(
        0.05, ge=0, lt=1, description="with at: line_end, how far before B the cut may move: a fraction of B"
    )

    def manifest_config(self) -> dict[str, Any]:
        """These settings as the manifests of the stages that cut record them: under their names from when they
        were `splice.cut` and `splice.cut_grace`, so that run folders made before the move stay valid."""
        return {"cut": self.at, "cut_grace": self.grace}


class KLAnchor(StrictModel):
    """Hold the untrained tokens where the stage-1 model had them: Axolotl's knowledge-distillation loss with the
    stage-1 model as its own teacher (`length_control.anchor`)."""

    weight: float = Field(gt=0, le=1, description="kd_alpha: the KL term's weight beside the span's cross-entropy")
    top_k: int = Field(16, gt=0, description="the stage-1 model's most likely next tokens the KL is taken over")


class TrainSpec(StrictModel):
    template: ExistingFile = Field(description="an Axolotl YAML template in axolotl_configs/")
    seeds: list[int] = Field(
        [0],
        min_length=1,
        description="stage-2 training seeds: each trains its own model and gets its own after arm; the report "
        "shows the mean and the range over them (generation and the before/forced arms are shared)",
    )
    parallel: int = Field(
        1,
        ge=1,
        description="seeds trained at once, each with its share of the CPU cores (OMP_NUM_THREADS); 1 on GPUs, "
        "where one seed takes every device",
    )
    launcher: Literal["python", "accelerate", "torchrun"] = "python"
    launcher_args: list[str] = Field(default_factory=list, description="e.g. ['--num_processes', '8']")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Axolotl keys set over the template")
    kl_anchor: KLAnchor | None = Field(
        None,
        description="a KL term to the stage-1 model on every untrained output token of a spliced row: "
        "the thinking and any answer that carries no loss",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a seed; each seed trains one model, list each once")
        return seeds


class EvalSet(StrictModel):
    source: ExistingFile
    samples_per_problem: int = Field(1, ge=1)


class EvalSpec(StrictModel):
    sets: list[EvalSet] = Field(min_length=1)
    sampling: Sampling = Sampling()
    on_long_prompt: Literal["drop", "error"] = Field(
        "drop", description="a prompt that fills the context limit: dropped and counted per benchmark, or an error"
    )
    arms: list[Literal["before", "after", "forced"]] = Field(
        ["before", "after", "forced"],
        description="before/after training, and the stage-1 model forced to close at the budget",
    )
    early_close_positions: int = Field(
        16,
        gt=0,
        description="the early-close probe: places per held-out trace where p(close) is measured, "
        "spread over the thinking before its own close (a 30k-token trace has hundreds of line ends)",
    )
    shard_problems: int | None = Field(
        None,
        gt=0,
        description="the before and forced arms in shards of this many problems (every sample of a problem in "
        "one), each written as it is done, a killed arm resuming at the missing ones; on Slurm a job array, a "
        "task (an engine) a shard. None: the arm in one piece. The arm's files are the same bytes either way",
    )

    _shorthand = field_validator("sets", mode="before")(_source_shorthand)


class LoopSpec(StrictModel):
    """Stage 2 in rounds until the overlong rate meets a target (`run --until-overlong`)."""

    until_overlong: float | None = Field(
        None,
        ge=0,
        le=1,
        description="target overlong rate of the after arm (every benchmark, mean over seeds); None runs one round",
    )
    max_rounds: int = Field(3, ge=1, description="rounds at most, the first included")
    score_guard: float = Field(
        -0.039,
        le=0,
        description="stop when a round's relative score change (any benchmark, mean over seeds) is worse "
        "than this: the report's worst cost was -3.9 %",
    )


class EvalRecipe(StrictModel):
    """What evaluating a model needs, and no more: `length-control evaluate --model PATH --set SOURCE` runs one,
    for a checkpoint trained anywhere. `budget` is optional here: with one, the termination probe runs at it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name (letters, digits, . _ -)")
    seed: int = 0
    output_dir: FilePath = Field(description="the run folder; every stage writes under it")
    model: ModelSpec
    budget: int | None = Field(None, gt=0, description="B: thinking tokens before the thinking is closed")
    context_limit: int = Field(gt=0, description="input+output token limit of the eval (40,960 in the report)")
    engine: EngineSpec = EngineSpec()
    splice: SpliceSpec = SpliceSpec()
    cut: CutSpec = Field(CutSpec(), description="where a thinking that never closed within B is cut")
    eval: EvalSpec
    instruction: str | None = Field(
        None,
        description="a system line put in every prompt the run samples, `{budget}` replaced by B: how a "
        "run states its budget to a model that reads it (`conditioning` trains one)",
    )

    def section(self, name: str) -> Any:
        """A recipe section as plain JSON data, for manifests."""
        return self.model_dump(mode="json")[name]

    def stated_budget(self) -> str | None:
        """The system line this run adds to its prompts, the budget filled in; None without one."""
        if self.instruction is None:
            return None
        return self.instruction.replace("{budget}", str(self.budget))


class ConditioningSpec(StrictModel):
    """Budget-conditioned stopping: one model that closes its thinking at the budget its prompt asks for.

    Each requested budget is a run of its own in `budgets/<B>/` (the recipe at that budget, every prompt
    stating it with `instruction`): its traces, cut at its B, and its eval arms. Stage 2 trains once on the
    rows of every budget together, and the report says, per requested budget, how long the model thought
    (requested against reached) and how often it went past."""

    budgets: list[Annotated[int, Field(gt=0)]] = Field(
        min_length=2, description="the budgets a prompt may ask for; `budget` is the largest"
    )
    instruction: str = Field(
        "Think for at most {budget} tokens.",
        description="the system line that states the budget; `{budget}` is replaced by it",
    )
    tolerance: int = Field(
        0,
        ge=0,
        description="thinking tokens either side of the budget a sample may close at and still count "
        "as stopping at it (the demo's: one line, 7 tokens)",
    )
    train_thinking: bool = Field(
        True,
        description="a row also trains the policy's own thinking before its close, so that under a "
        "budget line the thinking goes on to the budget asked for; off, every row under a line trains a close "
        "and nothing else, and the policy learns to close soon after any line (on the demo: 65-93 % of samples "
        "closed early even with the smaller budgets' close positions trained as thinking)",
    )

    @field_validator("budgets")
    @classmethod
    def _distinct(cls, budgets: list[int]) -> list[int]:
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"budgets {budgets} repeat a budget; list each once")
        return sorted(budgets)

    @field_validator("instruction")
    @classmethod
    def _states_the_budget(cls, instruction: str) -> str:
        if "{budget}" not in instruction:
            raise ValueError(f"instruction {instruction!r} does not state the budget: put {{budget}} where it goes")
        return instruction


# ---------------------------------------------------------------- cluster

STAGE_NAMES = ("eval-before", "eval-forced", "generate", "splice", "train", "eval-after", "report")
"""The pipeline's stages in order (`pipeline.STAGES` is the truth; a test keeps the two equal)."""


def _slurm_time(value: str) -> str:
    """sbatch's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]."""
    if not re.fullmatch(r"\d+-\d+(:\d{2}){0,2}|\d+(:\d{2}){0,2}", value):
        raise ValueError(
            f"{value!r} is not a Slurm time limit; write HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00 or 2-00:00:00"
        )
    return value


def _slurm_memory(value: str) -> str:
    if not re.fullmatch(r"\d+[KMGT]?", value):
        raise ValueError(f"{value!r} is not a Slurm memory size; write a number and K, M, G or T, e.g. 200G")
    return value


def _sbatch_option(line: str) -> str:
    if not line.startswith("--") or "\n" in line:
        raise ValueError(
            f"{line!r} is not one sbatch option; write each as its long form, e.g. --constraint=h100 or --exclusive"
        )
    return line


SlurmTime = Annotated[str, AfterValidator(_slurm_time)]


class SlurmSpec(StrictModel):
    """Every stage a Slurm job, chained with afterok dependencies (`run RECIPE` submits them and returns)."""

    partition: str | None = Field(None, description="--partition; default: the cluster's default partition")
    account: str | None = Field(None, description="--account")
    qos: str | None = Field(None, description="--qos")
    time: SlurmTime = Field("24:00:00", description="--time of every job, e.g. 04:00:00 or 2-00:00:00")
    stage_time: dict[Literal[STAGE_NAMES], SlurmTime] = Field(
        default_factory=dict, description="--time per stage, over `time`, e.g. {train: 3-00:00:00}"
    )
    gpus_per_node: int = Field(
        0, ge=0, description="--gpus-per-node of the jobs that run a model (vLLM) or train; splice and report take none"
    )
    cpus_per_task: int | None = Field(None, gt=0, description="--cpus-per-task (one task per job: the stage)")
    nodes: int = Field(
        1,
        ge=1,
        description="--nodes of the training job: above 1, srun starts torchrun on every node (train.launcher: "
        "torchrun), its rank from SLURM_NODEID, the rendezvous at the job's first node",
    )
    array_throttle: int | None = Field(
        None,
        gt=0,
        description="array tasks (one shard and one engine each: generate's, the eval arms') running at once: "
        "--array=...%N",
    )
    mem: Annotated[str, AfterValidator(_slurm_memory)] | None = Field(None, description="--mem per node, e.g. 200G")
    sbatch_lines: list[Annotated[str, AfterValidator(_sbatch_option)]] = Field(
        default_factory=list, description="more #SBATCH options for every job, e.g. [--constraint=h100, --exclusive]"
    )
    setup: str = Field("", description="shell lines each job runs before its stage (modules, conda, PYTHONPATH)")
    command: str | None = Field(
        None,
        description="the toolkit's command in each job, e.g. /shared/length-control/run.sh (which picks the gpu "
        "profile on a GPU node); default: the submitting Python's `-m length_control.cli`, whose path the nodes "
        "must see",
    )


class ClusterSpec(StrictModel):
    slurm: SlurmSpec


class Recipe(EvalRecipe):
    budget: int = Field(gt=0, description="B: thinking tokens before the thinking is closed (30,000 in the report)")
    prompts: PromptsSpec
    generation: GenerationSpec = GenerationSpec()
    train: TrainSpec
    loop: LoopSpec = LoopSpec()
    conditioning: ConditioningSpec | None = Field(
        None, description="train one model on several budgets, each stated in the prompt (budget-conditioned stopping)"
    )
    cluster: ClusterSpec | None = Field(None, description="where the stages run: absent, here; `slurm:`, as Slurm jobs")


# ---------------------------------------------------------------- loading


def load_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (`key=value`, dotted keys) and validate a recipe.

    Raises ConfigError listing every problem: schema errors first, then the
    checks that span sections and the source files the recipe names.
    """
    path = Path(path).resolve()
    data = read_yaml(path)
    for override in overrides:
        _apply_override(data, override, path)
    recipe = validate(Recipe, data, path, path.parent)
    problems = _cross_checks(recipe)
    if problems:
        raise ConfigError(path, problems)
    return recipe


def eval_recipe(
    model: str,
    sets: list[Path],
    *,
    context_limit: int,
    samples_per_problem: int = 1,
    budget: int | None = None,
    think: str | None = None,
    output_dir: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> EvalRecipe:
    """The eval of any model without a recipe file (`length-control evaluate --model PATH --set SOURCE`):
    a local folder or a Hub id, each set sampled `samples_per_problem` times at the context limit, its
    samples in `output_dir/eval/before/` (default runs/evaluate-<model>/)."""
    where = Path("evaluate --model")
    folder = Path(model).expanduser()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name or model).strip("-.") or "model"
    data: dict[str, Any] = {
        "name": f"evaluate-{name}",
        "output_dir": str((output_dir or Path("runs") / f"evaluate-{name}").resolve()),
        "model": {"path": str(folder.resolve())} if folder.exists() else {"hub": model},
        "budget": budget,
        "context_limit": context_limit,
        "eval": {
            "sets": [
                {"source": str(Path(source).resolve()), "samples_per_problem": samples_per_problem} for source in sets
            ],
            "arms": ["before"],
        },
    }
    if think is not None:
        data["model"]["think"] = think
    for override in overrides:
        _apply_override(data, override, where)
    recipe = validate(EvalRecipe, data, where, Path.cwd())
    problems = [problem for s in recipe.eval.sets for problem in _source_problems(s.source, "--set", needs_grader=True)]
    if recipe.budget is not None and recipe.budget >= recipe.context_limit:
        problems.append(f"--budget {recipe.budget}: must be smaller than --context-limit ({recipe.context_limit})")
    if "after" in recipe.eval.arms:
        problems.append(
            "eval.arms: a model evaluated on its own has no after arm; evaluate each checkpoint with its own --model"
        )
    if recipe.instruction is not None and "{budget}" in recipe.instruction and recipe.budget is None:
        problems.append(f"instruction {recipe.instruction!r} states the budget; give --budget")
    if "forced" in recipe.eval.arms and recipe.budget is None:
        problems.append("eval.arms: the forced arm closes the thinking at the budget; give --budget")
    if problems:
        raise ConfigError(where, problems)
    return recipe


def _apply_override(data: dict[str, Any], override: str, file: Path) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(file, [f"override {override!r}: write it as key=value, e.g. budget=1024"])
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(file, [f"override {override!r}: '{part}' is not a section"])
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw else ""


def _cross_checks(recipe: Recipe) -> list[str]:
    problems = []
    if recipe.budget >= recipe.context_limit:
        problems.append(
            f"budget = {recipe.budget}: must be smaller than context_limit ({recipe.context_limit}), "
            "which must also hold the prompt and the answer; lower budget or raise context_limit"
        )
    max_model_len = recipe.engine.vllm.max_model_len
    if max_model_len is not None and max_model_len < recipe.context_limit:
        problems.append(
            f"engine.vllm.max_model_len = {max_model_len}: smaller than context_limit ({recipe.context_limit}); "
            "raise it or remove it (it defaults to context_limit)"
        )
    if "seed" in recipe.train.overrides:
        problems.append(
            f"train.overrides.seed = {recipe.train.overrides['seed']}: stage 2's seeds are train.seeds "
            "(one model each); remove it and list the seeds there, e.g. train.seeds=[0,1,2]"
        )
    problems += _conditioning_problems(recipe)
    if recipe.cluster is not None and recipe.loop.until_overlong is not None:
        problems.append(
            "loop.until_overlong: the closed loop does not run through Slurm yet; set loop.until_overlong=null, "
            "or run it here with cluster=null"
        )
    nodes = recipe.cluster.slurm.nodes if recipe.cluster is not None else 1
    if nodes > 1 and recipe.train.launcher != "torchrun":
        problems.append(
            f"cluster.slurm.nodes = {nodes}: training on several nodes runs torchrun on each (srun); set "
            "train.launcher: torchrun (the nodes' ranks and rendezvous come from Slurm; launcher_args go after them)"
        )
    mix = recipe.splice.sft_mix
    if mix is not None and mix.dataset is None and recipe.model.demo is None:
        problems.append(
            "splice.sft_mix.dataset: required unless the model is the demo policy; "
            "name the stage-1 SFT data, e.g. {hf: org/name, split: train}"
        )
    for i, ref in enumerate(recipe.prompts.sources):
        problems += _source_problems(ref.source, f"prompts.sources[{i}]", needs_grader=False)
    for i, eval_set in enumerate(recipe.eval.sets):
        problems += _source_problems(eval_set.source, f"eval.sets[{i}]", needs_grader=True)
    return problems


def _conditioning_problems(recipe: Recipe) -> list[str]:
    conditioning = recipe.conditioning
    if conditioning is None:
        return []
    problems = []
    if recipe.budget != max(conditioning.budgets):
        problems.append(
            f"budget = {recipe.budget}: with conditioning, budget is the largest requested budget; "
            f"set budget={max(conditioning.budgets)}"
        )
    if recipe.instruction is not None:
        problems.append(
            "instruction: with conditioning, each budget's run states its budget with "
            "conditioning.instruction; remove instruction"
        )
    if recipe.loop.until_overlong is not None:
        problems.append("loop.until_overlong: a budget-conditioned run trains one round; set loop.until_overlong=null")
    if "after" not in recipe.eval.arms:
        problems.append("eval.arms: a budget-conditioned run is measured on its after arm; add after")
    demo = recipe.model.demo
    if demo is not None and (
        demo.stated_budgets is None or demo.stated_budgets.instruction != conditioning.instruction
    ):
        problems.append(
            f"model.demo.stated_budgets: the demo policy has never read the line "
            f"{conditioning.instruction!r} and writes nonsense after it; set model.demo.stated_budgets="
            f"{{instruction: {conditioning.instruction!r}}}"
        )
    return problems


def _source_problems(path: Path, key: str, *, needs_grader: bool) -> list[str]:
    try:
        spec: SourceSpec = load_source_spec(path)
    except ConfigError as error:
        return [f"{key}.source: {path.name}: {problem}" for problem in error.problems]
    if needs_grader and (spec.grader is None or spec.reference is None):
        return [f"{key}.source: {path.name} has no `grader` and `reference`; an eval set needs both"]
    return []
