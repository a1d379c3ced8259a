"""Stage 2 with Axolotl: render a template into a config.

A template in `axolotl_configs/` holds the training choices; rendering fills
what depends on the run: the base model, the pre-tokenized datasets, the
output folder, `sequence_len` (the longest row stage 2 can write), and a
`dataset_prepared_path` keyed by the datasets' content. Axolotl keys its
prepared-data cache by path and config, not content, and silently reuses
stale data when a file is rewritten at the same path; a content key makes a
rewrite a new cache. Rows longer than `sequence_len` raise instead of being
dropped silently (`excess_length_strategy: raise`).
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

import yaml

from length_control import contracts, disk, slurm_nodes
from length_control.artifacts import fingerprint
from length_control.contracts import AXOLOTL_CONFIG, ROWS, Plan, RunLayout
from length_control.policy import model_input, policy_path


def render_config(
    template: Path,
    *,
    base_model: str,
    datasets: list[Path],
    output_dir: Path,
    sequence_len: int,
    prepared_root: Path,
    overrides: dict[str, Any] | None = None,
    content_key: str | None = None,
) -> dict[str, Any]:
    """The Axolotl config for one training run (a plain dict, ready to dump as YAML).

    `content_key` stands in for the datasets' content hash when they do not
    exist yet (a dry run).
    """
    config = yaml.safe_load(Path(template).read_text(encoding="utf-8")) or {}
    if content_key is None:
        content_key = hashlib.sha256("".join(fingerprint(path) for path in datasets).encode()).hexdigest()[:16]
    config.update(
        base_model=str(base_model),
        datasets=[{"path": str(path), "ds_type": _ds_type(path), "split": "train"} for path in datasets],
        output_dir=str(output_dir),
        sequence_len=sequence_len,
        dataset_prepared_path=str(Path(prepared_root) / content_key),
        excess_length_strategy="raise",
    )
    config.update(overrides or {})
    if config["sequence_len"] < sequence_len:
        raise ValueError(
            f"train.overrides sets sequence_len = {config['sequence_len']}, shorter than the longest "
            f"stage-2 row ({sequence_len} tokens); raise it or cap the rows (splice.on_overlength)"
        )
    return config


def _ds_type(path: Path) -> str:
    return {".parquet": "parquet", ".jsonl": "json", ".json": "json"}[Path(path).suffix]


# ---------------------------------------------------------------- the stage


class TrainError(RuntimeError):
    """Axolotl failed; the message has its exit status and the log's tail."""


def launch_command(recipe, config_path: Path, verb: str = "train") -> list[str]:
    """The exact Axolotl command line; on several Slurm nodes (`cluster.slurm.nodes`), started by srun on each."""
    from length_control.envs import envs_dir

    command = [str(envs_dir() / "axolotl" / "bin" / "axolotl"), verb, str(config_path)]
    if verb == "train":
        command += ["--launcher", recipe.train.launcher]
        if recipe.train.launcher_args:
            command += ["--", *recipe.train.launcher_args]
        if recipe.cluster is not None and recipe.cluster.slurm.nodes > 1:  # torchrun on every node of the job
            command = [*slurm_nodes.on_every_node(recipe), *command]
    return command


def training_choices(recipe) -> dict[str, Any]:
    """The template's keys with the recipe's `train.overrides` over them: the rendered config's training choices
    (what `render_config` fills in for the run aside)."""
    template = yaml.safe_load(Path(recipe.train.template).read_text(encoding="utf-8")) or {}
    return {**template, **recipe.train.overrides}


def trained_model(recipe, seed: int) -> Path:
    """The Hugging Face folder training leaves for a seed: the merged model for LoRA (an `adapter` in the
    template or the overrides), else the output folder. Known before training: the after arm plans with it."""
    adapter = training_choices(recipe).get("adapter")
    return RunLayout(recipe.output_dir).train(seed) / "model" / ("merged" if adapter else "")


def sequence_len(recipe) -> tuple[int, str]:
    """The training sequence_len, and why: the recipe's own (template or overrides) when it fixes one; else the
    longest row stage 2 can write, rounded up to 64. That is known before any row exists, so the dry run renders
    the config the run will use: a spliced row is a prompt and the policy's outputs, which the engine's context
    bounds; an SFT-mix row is one of the mix set's conversations, each measured."""
    from length_control.engines.recipe_engine import model_len
    from length_control.splice import longest_mix_row, max_len

    fixed = max_len(recipe)
    if fixed is not None:
        return fixed, "fixed by the recipe"
    context = model_len(recipe)
    why = f"the longest row stage 2 can write: spliced rows <= the engine's context ({context})"
    mix = longest_mix_row(recipe)
    if mix is not None:
        why += f", SFT-mix rows <= {mix} tokens"
    elif recipe.splice.sft_mix is not None and recipe.splice.sft_mix.share > 0:
        why += "; the SFT mix is not on this machine yet: the run measures its rows and may raise it"
    return _round_up(max(context, mix or 0), 64), why


def anchored_rows(recipe, content_key: str) -> Path:
    """The stage-2 rows with the stage-1 model's targets beside them (`train.kl_anchor`): one file for every seed
    (the targets do not depend on it), named by the content key of the rows and the anchor it was made from."""
    return RunLayout(recipe.output_dir).root / "train" / f"anchored-rows-{content_key}.parquet"


def anchor_config(anchor, plugins: list[str] | None = None) -> dict[str, Any]:
    """The Axolotl keys that turn on its knowledge-distillation loss for a `train.kl_anchor` (none without one),
    its plugin added to the template's `plugins` (the 14B templates' Liger plugin stays)."""
    if anchor is None:
        return {}
    kd = "axolotl.integrations.kd.KDPlugin"
    return {
        "plugins": [*(plugins or []), *([] if kd in (plugins or []) else [kd])],
        "kd_trainer": True,
        "kd_ce_alpha": 1.0,
        "kd_alpha": anchor.weight,
        "kd_temperature": 1.0,
    }


def plan(recipe, seed: int) -> Plan:
    """One stage-2 model: the config rendered from the recipe, before or after the stage-2 rows exist."""
    layout = RunLayout(recipe.output_dir)
    model = policy_path(recipe.model)
    folder = layout.train(seed)
    rows = layout.stage2 / ROWS
    length, why = sequence_len(recipe)
    anchor = recipe.train.kl_anchor
    content_key = None if rows.is_file() else "<content hash of stage2/rows.parquet>"
    if anchor is not None and content_key is None:  # the anchored rows follow from the rows and the anchor
        content_key = hashlib.sha256(f"{fingerprint(rows)} {anchor.model_dump_json()}".encode()).hexdigest()[:16]
    dataset = anchored_rows(recipe, content_key) if anchor else rows
    config = render_config(
        recipe.train.template,
        base_model=model,
        datasets=[dataset],
        output_dir=folder / "model",
        sequence_len=length,
        prepared_root=layout.prepared(seed),
        overrides={
            **recipe.train.overrides,
            **anchor_config(anchor, training_choices(recipe).get("plugins")),
            "seed": seed,
        },
        content_key=content_key,
    )
    config_path = folder / AXOLOTL_CONFIG
    commands = [launch_command(recipe, config_path)]
    if config.get("adapter"):
        commands.append(launch_command(recipe, config_path, "merge-lora"))
    anchoring = (
        [f"{shlex.join(anchor_command(recipe, dataset))} (the first seed to start; the others read it)"]
        if anchor is not None
        else []
    )
    return Plan(
        "train",
        recipe,
        folder,
        inputs={"stage2": layout.stage2},
        model=model,
        seed=seed,
        steps=[f"sequence_len {config['sequence_len']}: {why}"]
        + anchoring
        + [shlex.join(command) for command in commands]
        + [f"leaves {trained_model(recipe, seed)}"],
        configs={AXOLOTL_CONFIG: yaml.safe_dump(config, sort_keys=False)},
    )


def run(plan: Plan, position: int | None = None) -> dict[str, Any]:
    """Train with Axolotl (and merge a LoRA); skip when up to date. `position`: the line of its progress bar."""
    from length_control.artifacts import Stage, tool_versions, write_text_atomic

    recipe, folder = plan.recipe, plan.folder
    stage = Stage(
        folder,
        inputs={
            "stage2": contracts.upstream(plan.inputs["stage2"])["output"],
            "model": model_input(plan.model),
            "template": recipe.train.template,
        },
        config={"train": recipe.section("train") | {"seeds": None}, "seed": plan.seed},
        versions=tool_versions(),
    )
    if stage.is_up_to_date():
        return stage.read_manifest()["summary"]
    config_path = folder / AXOLOTL_CONFIG
    write_text_atomic(config_path, plan.configs[AXOLOTL_CONFIG])
    config = yaml.safe_load(plan.configs[AXOLOTL_CONFIG])
    env = _thread_share(recipe) | _eager_on_cpu()
    online = not Path(plan.model).is_dir()  # a base model named by its Hub id
    if recipe.cluster is not None and recipe.cluster.slurm.nodes > 1:
        slurm_nodes.write_node_launcher(recipe)
    if recipe.train.kl_anchor is not None:
        _write_anchored_rows(plan, env)
    steps = _run_logged(
        launch_command(recipe, config_path),
        folder / "train.log",
        desc=f"train seed {plan.seed}",
        env=env,
        online=online,
        position=position,
    )
    if config.get("adapter"):
        _run_logged(
            launch_command(recipe, config_path, "merge-lora"),
            folder / "merge.log",
            desc="merge-lora",
            env=env,
            online=online,
            position=position,
        )
    summary = {
        "steps": len(steps),
        "first_loss": steps[0] if steps else None,
        "last_loss": steps[-1] if steps else None,
        "model": str(trained_model(recipe, plan.seed)),
    }
    stage.finish(**summary)
    return summary


def anchor_command(recipe, out: Path) -> list[str]:
    """The command that writes the anchored rows to `out` (`length_control.anchor`), in Axolotl's environment: the
    stage-1 model (the policy) is the teacher."""
    from length_control.envs import engine_bin

    layout = RunLayout(recipe.output_dir)
    return [
        str(engine_bin("axolotl")),
        "-m",
        "length_control.anchor",
        str(policy_path(recipe.model)),
        str(layout.stage2 / ROWS),
        str(layout.stage2 / contracts.META),
        str(out),
        str(recipe.train.kl_anchor.top_k),
    ]


def _write_anchored_rows(plan: Plan, env: dict[str, str]) -> None:
    """The rows with the stage-1 model's targets beside them, before Axolotl reads them, once for every seed: the
    first seed to get here writes them (its output to `train/anchor.log`) while the others wait on the lock, and
    anchored rows of other rows or settings go. Seeds run side by side (`train.parallel`) or as Slurm jobs."""
    import subprocess

    from filelock import FileLock

    from length_control.envs import engine_environ

    out = Path(yaml.safe_load(plan.configs[AXOLOTL_CONFIG])["datasets"][0]["path"])
    with FileLock(out.parent / "anchored-rows.lock"):
        if out.is_file():
            return
        for stale in out.parent.glob("anchored-rows-*.parquet"):
            stale.unlink()
        log = out.parent / "anchor.log"
        with disk.writing(log), open(log, "w", encoding="utf-8") as sink:
            command = anchor_command(plan.recipe, out)
            status = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=engine_environ(**env))
        if status.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise TrainError(
                f"the KL anchor failed with exit status {status.returncode}; the log is {log}; its tail:\n{tail}"
            )


def run_all(plans: list[Plan]) -> list[dict[str, Any]]:
    """Every seed's training, `train.parallel` of them at once (each a process of its own); in the order of `plans`.

    On a CPU, Axolotl's start-up (~30 s of imports) runs on one core and a tiny model's steps barely use two,
    so seeds side by side finish sooner than one after another.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not plans:
        return []
    parallel = min(plans[0].recipe.train.parallel, len(plans))
    if parallel == 1:
        return [run(plan) for plan in plans]
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(run, plans, range(len(plans))))


def _thread_share(recipe) -> dict[str, str]:
    """The threads of one training process when seeds train side by side: its share of the cores.

    Set from the recipe alone, never from how many seeds happen to run, so a seed trained again alone
    computes exactly what it computed beside the others.
    """
    import os

    if recipe.train.parallel == 1 or "OMP_NUM_THREADS" in os.environ:  # the user's setting wins
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // recipe.train.parallel))}


def _eager_on_cpu() -> dict[str, str]:
    """Training on a machine without a GPU runs eager (`TORCHDYNAMO_DISABLE=1`).

    The KL anchor's loss (Axolotl's KD trainer: Liger's fused top-k KL) is a `torch.compile`d function, and on an
    Intel Xeon with AMX (family 6 model 207, a 2-core KVM guest) inductor's AVX-512 code for it corrupted the
    heap on the first step ("double free or corruption", SIGABRT); with inductor held to AVX2, or eager, it
    trains, to the same report, and eager skips the compile (~5 s a process, alone). Where a GPU is
    listed the compiled loss stays: it keeps a large vocabulary's full logits out of memory. A user's own
    TORCHDYNAMO_DISABLE wins.
    """
    import os

    from length_control.envs import gpus_listed

    if "TORCHDYNAMO_DISABLE" in os.environ or gpus_listed():
        return {}
    return {"TORCHDYNAMO_DISABLE": "1"}


def check_configs(configs: list[Path]) -> dict[Path, str]:
    """Axolotl's own schema on rendered configs, in its environment: {config: error} for the invalid ones.

    Unknown keys count as errors (Axolotl would drop them and train with its default), and so do kernels the
    environment lacks. A failure of the check itself raises TrainError: it is never the config's fault.
    """
    import subprocess

    from length_control.envs import engine_bin, engine_environ

    command = [str(engine_bin("axolotl")), "-m", "length_control.axolotl_check", *map(str, configs)]
    result = subprocess.run(command, capture_output=True, text=True, env=engine_environ(), timeout=600)
    verdicts = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    missing = [path for path in configs if str(path) not in verdicts]
    if missing:
        raise TrainError(
            f"the Axolotl check gave no verdict on {missing[0]}; its output:\n"
            + (result.stdout + result.stderr)[-3000:]
        )
    internal = [f"{path}: {verdicts[str(path)]}" for path in configs if verdicts[str(path)].startswith("internal: ")]
    if internal:
        raise TrainError(
            "length-control's Axolotl check failed on its own, not on the config (a bug: report it "
            "with these versions):\n" + "\n".join(internal)
        )
    return {path: verdicts[str(path)].removeprefix("invalid: ") for path in configs if verdicts[str(path)] != "ok"}


def model_of(folder: Path) -> Path:
    """The model a finished training folder left (from its manifest)."""
    return Path(contracts.upstream(folder)["summary"]["model"])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _run_logged(
    command: list[str],
    log: Path,
    desc: str,
    env: dict[str, str] | None = None,
    online: bool = False,
    position: int | None = None,
) -> list[float]:
    """Run an Axolotl command, log everything, show a progress bar of the steps; return the losses.

    A step whose loss is not finite or whose gradient norm is NaN fails the stage: the trainer logs a NaN loss
    as 0, so a diverged run would otherwise finish with a model and a last loss of 0.0 that look perfect. A log
    that cannot be written, or an Axolotl that failed for lack of space (its output says so, or the disk is
    full), raises `disk.DiskFull`.
    """
    import ast
    import math
    import subprocess

    from length_control.envs import engine_environ
    from length_control.progress import ticking

    losses: list[float] = []
    diverged = None
    log.parent.mkdir(parents=True, exist_ok=True)
    with disk.writing(log), open(log, "w", encoding="utf-8") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=engine_environ(online, **(env or {})),
            cwd=log.parent,
        )
        try:
            with ticking(desc, unit="step", position=position) as bar:
                for line in process.stdout:
                    sink.write(line)
                    start = line.find("{'loss'")
                    if start < 0:
                        continue
                    try:  # the trainer's log line; Axolotl formats the values as strings
                        record = ast.literal_eval(line[start : line.rindex("}") + 1])
                        loss = float(record["loss"])
                    except (ValueError, SyntaxError, KeyError):
                        continue
                    losses.append(loss)
                    norm = float(record.get("grad_norm", 0.0))  # inf alone is fp16's loss scaler skipping a step
                    if (not math.isfinite(loss) or math.isnan(norm)) and diverged is None:
                        diverged = (
                            f"step {len(losses)} logged loss {record['loss']}, grad_norm {record.get('grad_norm')}"
                        )
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=f"{float(record.get('epoch', 0)):.2f}")
            status = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if status != 0:
        lines = log.read_text(errors="replace").splitlines()
        if disk.failed_for_space("\n".join(lines[-200:]), log.parent):
            raise disk.DiskFull(log.parent)
        tail = "\n".join(lines[-30:])
        raise TrainError(f"{command[1]} failed with exit status {status}; the log is {log}; its tail:\n{tail}")
    if diverged:
        raise TrainError(
            f"{command[1]} diverged: {diverged} (the log is {log}); its model is not used: lower "
            "the learning rate (train.overrides) or check the rows, then run again"
        )
    return losses
