"""Every stage of a run as a Slurm job, when the recipe has a `cluster.slurm` section.

    length-control run RECIPE            the preflight here, then the stages that are not up to date, submitted
                                         as a chain (each job after the one before, afterok); returns at once
    length-control run RECIPE --dry-run  also writes every stage's sbatch script and submit.sh (the chain, to
                                         submit by hand) to <run>/dry-run/slurm/
    length-control status RUN|RECIPE     each stage's job and its state
    length-control cancel RUN|RECIPE     cancels the run's queued and running jobs

Each job runs one stage with the toolkit's own command, `run RECIPE --stage NAME`, where RECIPE is the recipe
as submitted (`<run>/slurm/recipe.yaml`: overrides applied, paths absolute), so editing the recipe file while
jobs wait changes nothing. A job holds the run folder's lock (`runlock`) for its life, as any writer does; the
submitting `run` holds it only while it decides what to submit, and the jobs run one after another, so each
finds it free.

Generate runs as a job array over its shards: a task per shard not on disk yet (`--stage generate --shard N`),
each its own engine on its node's GPUs, `array_throttle` of them at once; the tasks of one array hold the run's
lock together (`runlock`'s groups). The stage's own job comes after the whole array and only writes its manifest.
So do eval-before and eval-forced with `eval.shard_problems` (`--stage eval-before --shard N`: a shard is a run of
whole problems, counted without tokenizing): the arm's own job, without an engine, merges the shards into its
files, metrics and manifest; the forced arm's array comes after the before arm's job, whose samples are its
first passes. The after arms stay one job for their seeds. A sample's tokens, and a probe's records, depend
only on their own seeded requests, so shards written by separate engines, in any order, are the bytes one
engine writes. Training on `nodes` > 1 is one job over those nodes: the stage runs on the
first, and Axolotl's torchrun launch is started on every node by srun through the node launcher
(`torchrun-node.sh`: the node's rank from SLURM_NODEID, the rendezvous at the first node's address).

Submission is resume: a stage whose manifests say it is up to date (asked of the stage itself,
`pipeline.why_it_runs`) gets no job, and every stage after the first one that runs gets one (its job skips the
stage if it turns out up to date); generate's array asks only for the shards still missing. The chain is
submitted held and released once all of it is queued, so a refused `sbatch` leaves no half chain. A job whose
predecessor failed is cancelled by Slurm (`--kill-on-invalid-dep=yes`), not left pending.

Without slurmdbd, Slurm forgets a job minutes after it ends (MinJobAge), so each job (each array task) writes
its exit status beside its log, and `status` reads Slurm's queue first, then that, then the stages' manifests.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from length_control import pipeline
from length_control.artifacts import MANIFEST, write_json_atomic, write_text_atomic
from length_control.contracts import AXOLOTL_CONFIG, RunLayout, is_finished
from length_control.engines.recipe_engine import runs_on_job_devices
from length_control.errors import UserError
from length_control.policy import policy_path
from length_control.recipe import Recipe, SlurmSpec
from length_control.slurm_nodes import NODE_LAUNCHER, node_launcher

JOBS = "jobs.json"  # the submitted chain: each job's stage, id, script, log and stage folders
RECIPE = "recipe.yaml"  # the recipe as submitted, which every job runs
SUBMIT = "submit.sh"  # the chain as a script, for a user who submits by hand
ENDED = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
LOG_TAIL = 5  # lines of a failed job's log that `status` shows


@dataclass(frozen=True)
class Job:
    """One sbatch script of a chain: it starts once the job before it ended with exit 0 (an array: every task)."""

    name: str
    script: str
    folders: tuple[str, ...] = ()  # the stage folders it finishes, each with a manifest (what `status` reads)
    array: tuple[int, ...] | None = None  # a job array's task ids: the shards it writes, one a task


@dataclass
class Chain:
    """What a submission queues: its jobs in order, in `folder` (`<run>/slurm/`), and the stages left out."""

    folder: Path
    jobs: list[Job]
    record: dict[str, Any] = field(default_factory=dict)  # kept in jobs.json beside the jobs (run, recipe)
    slurm: SlurmSpec | None = None  # the recipe's section, for the files beside the jobs (the node launcher)


# ---------------------------------------------------------------- scripts


def log_path(folder: Path, name: str, job_id: str = "%j") -> Path:
    """A job's log (sbatch's --output; `%j` is the job id, `%A_%a` an array task's)."""
    return folder / "logs" / f"{name}-{job_id}.log"


def array_spec(tasks: tuple[int, ...], throttle: int | None) -> str:
    """sbatch's --array value: the task ids as ranges (0-3,7), at most `throttle` running at once (%N)."""
    ranges: list[list[int]] = []
    for task in sorted(tasks):
        if ranges and task == ranges[-1][1] + 1:
            ranges[-1][1] = task
        else:
            ranges.append([task, task])
    text = ",".join(str(first) if first == last else f"{first}-{last}" for first, last in ranges)
    return text + (f"%{throttle}" if throttle else "")


def job(
    name: str,
    folder: Path,
    options: list[str],
    commands: list[str],
    *,
    title: str = "",
    folders: tuple[str, ...] = (),
    array: tuple[int, ...] | None = None,
    throttle: int | None = None,
) -> Job:
    """A job that runs `commands` (shell lines, stopping at the first that fails) with these sbatch options, its
    log under `folder`/logs/ and its exit status beside the log: without slurmdbd that is the only record of
    how a job ended once Slurm forgets it. With `array`, a job array: each task runs `commands` with its id in
    $SLURM_ARRAY_TASK_ID, its own log and exit status (`<job>_<task>`)."""
    exit_file = shlex.quote(str(folder / "logs" / f"{name}-")) + '"$job.exit"'
    this = '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' if array is not None else '"$SLURM_JOB_ID"'
    lines = [
        "#!/bin/bash",
        *([f"# {title}"] if title else []),
        *(f"#SBATCH {option}" for option in options),
        *([f"#SBATCH --array={array_spec(array, throttle)}"] if array is not None else []),
        f"#SBATCH --output={log_path(folder, name, '%A_%a' if array is not None else '%j')}",
        f"job={this}",
        f"trap 'echo $? > {exit_file}' EXIT",
        "trap 'exit 143' TERM  # cancelled or out of time: recorded as 128 + SIGTERM, not as the last command's status",
        'echo "[slurm] job $job on node $SLURMD_NODENAME"',
        "set -e",
        *commands,
    ]
    return Job(name, "\n".join(lines) + "\n", folders, array)


def sbatch_options(slurm: SlurmSpec, stage: str, *, gpus: bool) -> list[str]:
    """The #SBATCH options of one stage's job: one node, one task (the stage), the GPUs if it runs a model."""
    named = {"partition": slurm.partition, "account": slurm.account, "qos": slurm.qos}
    return [
        *(f"--{key}={value}" for key, value in named.items() if value is not None),
        f"--time={slurm.stage_time.get(stage, slurm.time)}",
        f"--nodes={slurm.nodes if stage == 'train' else 1}",
        "--ntasks-per-node=1",
        *([f"--cpus-per-task={slurm.cpus_per_task}"] if slurm.cpus_per_task is not None else []),
        *([f"--gpus-per-node={slurm.gpus_per_node}"] if gpus and slurm.gpus_per_node else []),
        *([f"--mem={slurm.mem}"] if slurm.mem is not None else []),
        *slurm.sbatch_lines,
    ]


def stage_job(
    recipe: Recipe,
    stage: pipeline.PipelineStage,
    plans: list,
    *,
    snapshot: Path,
    folder: Path,
    shards: tuple[int, ...] | None = None,
) -> Job:
    """The job of one stage: the toolkit's own `run SNAPSHOT --stage NAME`, with `cluster.slurm.command` (as
    written: it may name shell variables the setup line sets), else with the Python that submits it.

    With `shards`, the job array of a stage that writes shards (`shards_of`): a task per shard, each its own
    engine on its node's GPUs, running `--stage NAME --shard $SLURM_ARRAY_TASK_ID`; the stage's own job then
    only finishes it (every shard on disk: no engine, no GPU): generate's manifest, an eval arm's shards merged
    into its files, its metrics and manifest."""
    slurm = recipe.cluster.slurm
    runs_model = stage.name == "train" or (stage.engine and runs_on_job_devices(recipe))  # servers bring their own
    toolkit = slurm.command or shlex.join([sys.executable, "-m", "length_control.cli"])
    command = f"{toolkit} run {shlex.quote(str(snapshot))} --stage {stage.name}"
    name, what = stage.name, f"The {stage.name} stage"
    if shards is not None:
        command += " --shard $SLURM_ARRAY_TASK_ID"
        name, what = f"{stage.name}-shards", f"One shard of the {stage.name} stage per array task"
    elif shards_of(stage, plans):
        runs_model = False
        what = f"The {stage.name} stage, once every shard of its array is written (no engine)"
    launch = []
    if stage.name == "train" and slurm.nodes > 1:
        from length_control import train

        seed = recipe.train.seeds[0]
        line = shlex.join(train.launch_command(recipe, RunLayout(recipe.output_dir).train(seed) / AXOLOTL_CONFIG))
        launch = [f"# each seed trains on all {slurm.nodes} nodes: the stage runs, from the first node (seed {seed}):"]
        launch.append(f"#   {line}")
    return job(
        name,
        folder,
        [f"--job-name={recipe.name}.{name}", *sbatch_options(slurm, stage.name, gpus=runs_model)],
        [*([slurm.setup] if slurm.setup else []), *launch, command],
        title=f"{what} of {recipe.name} ({recipe.output_dir}), with the recipe as submitted.",
        folders=tuple(str(plan.folder) for plan in plans) if stage.manifest and shards is None else (),
        array=shards,
        throttle=slurm.array_throttle,
    )


SHARDED = ("eval-before", "eval-forced", "generate")  # the stages that can write their output in shards


def unsharded(stage: pipeline.PipelineStage, plans: list) -> str | None:
    """Why the stage does not run as a job array over its shards, or None when it does: generate, and the before
    and forced arms with `eval.shard_problems`, for one recipe (a budget-conditioned run's budgets run as one
    job a stage; an after arm is one job for its seeds)."""
    from length_control import evaluate

    if stage.name not in SHARDED:
        return f"{stage.name} writes no shards"
    if len(plans) != 1:
        return f"this recipe runs {len(plans)} {stage.name} stages (not in eval.arms, or one a budget)"
    if stage.name != "generate" and evaluate.shard_problems(plans[0]) is None:
        return "eval.shard_problems is not set: the arm runs in one piece"
    return None


def shards_of(stage: pipeline.PipelineStage, plans: list) -> bool:
    """Whether the stage runs as a job array over its shards (`unsharded`)."""
    return unsharded(stage, plans) is None


def sharding(stage: pipeline.PipelineStage):
    """The module of a sharded stage, whose `shard_count`, `missing_shards` and `run_shards` its array uses."""
    from length_control import evaluate, generate

    return generate if stage.name == "generate" else evaluate


def missing_shards(stage: pipeline.PipelineStage, plan) -> tuple[int, list[int]]:
    """How many shards a sharded stage writes and which are not on disk yet (its module's `missing_shards`:
    stale ones removed first, so call it holding the run folder's lock)."""
    return sharding(stage).missing_shards(plan)


def stage_jobs(
    recipe: Recipe, stage: pipeline.PipelineStage, plans: list, *, snapshot: Path, folder: Path, shards: list[int]
) -> list[Job]:
    """A stage's jobs: the array over its missing `shards` (none when all are there), then the stage's own."""
    array = [stage_job(recipe, stage, plans, snapshot=snapshot, folder=folder, shards=tuple(shards))] if shards else []
    return [*array, stage_job(recipe, stage, plans, snapshot=snapshot, folder=folder)]


def write_recipe(recipe: Recipe, path: Path) -> None:
    """The recipe as it was read (overrides applied, every path absolute), for the jobs to run."""
    header = f"# {recipe.name} as submitted to Slurm, every job runs it: overrides applied, paths absolute.\n"
    write_text_atomic(path, header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def submit_script(jobs: list[Job]) -> str:
    """The chain as a shell script: each job after the one before, one whose predecessor failed cancelled."""
    lines = [
        "#!/bin/bash",
        "# Submits the chain by hand: each job starts once the one before it ended with exit 0, and one whose",
        "# predecessor failed is cancelled. (`length-control run` submits the same; only then do",
        "# `length-control status` and `cancel` know the jobs.)",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
    previous = None
    for item in jobs:
        variable = item.name.replace("-", "_").replace(".", "_")
        after = f"--dependency=afterok:${{{previous}%%;*}} --kill-on-invalid-dep=yes " if previous else ""
        lines.append(f"{variable}=$(sbatch --parsable {after}{shlex.quote(item.name + '.sbatch')})")
        lines.append(f'echo "{item.name}: job ${{{variable}%%;*}}"')
        previous = variable
    return "\n".join(lines) + "\n"


def write_chain(folder: Path, jobs: list[Job], slurm: SlurmSpec | None = None) -> None:
    """Every job's script and submit.sh in `folder`, the node launcher of multi-node training (`slurm.nodes` > 1),
    and the folder of their logs (Slurm does not create it)."""
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    for item in jobs:
        write_text_atomic(folder / f"{item.name}.sbatch", item.script)
    scripts = {SUBMIT: submit_script(jobs)}
    if slurm is not None and slurm.nodes > 1:
        scripts[NODE_LAUNCHER] = node_launcher(slurm)
    for name, text in scripts.items():
        write_text_atomic(folder / name, text)
        (folder / name).chmod(0o755)


# ---------------------------------------------------------------- a run's chain


def staged_plans(recipe: Recipe) -> list[tuple[pipeline.PipelineStage, list]]:
    """Every stage that runs for this recipe, with its plans, in order."""
    plans_of = pipeline.plans_of(recipe)
    return [(stage, plans) for stage in pipeline.STAGES if (plans := plans_of(stage))]


def dry_run(written: Recipe, recipe: Recipe) -> str:
    """Every stage's job script and submit.sh in `<run>/dry-run/slurm/`, nothing submitted. `written` is the
    recipe as read (what the jobs run), `recipe` the same with its policy resolved."""
    folder = RunLayout(recipe.output_dir).dry_run / "slurm"
    snapshot = folder / RECIPE
    jobs, notes = [], []
    for stage, plans in staged_plans(recipe):
        shards = []
        if shards_of(stage, plans):
            count = _shard_count(stage, plans[0])
            if count is None:
                notes.append(
                    f"  {stage.name}: one job here; its array over the shards is counted once the policy's "
                    "tokenizer and the prompts are on this machine (as `run` submits it)"
                )
            shards = list(range(count or 0))
        jobs += stage_jobs(recipe, stage, plans, snapshot=snapshot, folder=folder, shards=shards)
    write_recipe(written, snapshot)
    write_chain(folder, jobs, recipe.cluster.slurm)
    return "\n".join(
        [f"[slurm] {len(jobs)} jobs, each after the one before (afterok): {' -> '.join(j.name for j in jobs)}"]
        + [f"  {item.name}: {folder / (item.name + '.sbatch')}" for item in jobs]
        + notes
        + [f"  submit by hand: {folder / SUBMIT}; logs in {folder / 'logs'}/"]
    )


def _shard_count(stage: pipeline.PipelineStage, plan) -> int | None:
    """How many shards a sharded stage writes, or None where that cannot be known here (a policy on the Hub,
    prompts not downloaded): generate counts them by tokenizing the prompts, an eval arm by counting its
    problems."""
    if stage.name == "generate" and not Path(plan.model).is_dir():
        return None
    try:
        return sharding(stage).shard_count(plan)
    except (UserError, OSError):
        return None


def prepare(written: Recipe, recipe: Recipe, *, start: str | None = None, echo: Callable[[str], None] = print) -> Chain:
    """The chain `run` submits for a recipe (`written` as read, `recipe` with its policy resolved): the preflight,
    then the stages that would run, from the first one that is not up to date (`--from STAGE`: from that one, its
    manifests removed). Run it holding the run folder's lock; submit the chain once the lock is released."""
    if start is not None and start not in pipeline.STAGE_NAMES:
        raise UserError(f"--from {start}: no such stage; use one of {', '.join(pipeline.STAGE_NAMES)}")
    folder = RunLayout(recipe.output_dir).slurm
    still = active_jobs(folder)
    if still:
        raise UserError(
            f"jobs {', '.join(still)} of this run are still queued or running: wait for them "
            f"(length-control status {recipe.output_dir}) or cancel them (length-control cancel {recipe.output_dir})"
        )
    echo(f"policy: {policy_path(recipe.model)}")
    echo("[preflight]")
    echo(pipeline.preflight_of(recipe).text())
    snapshot = folder / RECIPE
    jobs, fresh, redo = [], [], False
    for stage, plans in staged_plans(recipe):
        redo = redo or stage.name == start
        if redo:
            for plan in plans:
                (plan.folder / MANIFEST).unlink(missing_ok=True)
        if not jobs:
            why = pipeline.why_it_runs(stage, plans)
            if why is None:
                fresh.append(stage.name)
                continue
            if fresh:
                echo(f"[slurm] up to date, no job: {', '.join(fresh)}")
            echo(f"[slurm] {stage.name} runs ({why}), and every stage after it")
        shards = []
        if shards_of(stage, plans):
            count, shards = missing_shards(stage, plans[0])
            echo(f"[slurm] {stage.name}: {len(shards)} of its {count} shards to write, a job array task each")
        jobs += stage_jobs(recipe, stage, plans, snapshot=snapshot, folder=folder, shards=shards)
    write_recipe(written, snapshot)
    record = {"run": recipe.name, "output_dir": str(recipe.output_dir), "up_to_date": fresh}
    return Chain(folder, jobs, record, recipe.cluster.slurm)


def array_group() -> str | None:
    """The lock group of this process: inside a Slurm job array, its array (whose tasks write their own shards of
    one run side by side); else None, a writer alone."""
    import os

    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"Slurm job array {array}" if array else None


# ---------------------------------------------------------------- Slurm's commands


def slurm_command(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A Slurm client command; a missing client or a refusal is the user's to fix (UserError)."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(
            f"{args[0]} is not on PATH: run on a machine with Slurm's client commands (a login node), "
            "or remove the recipe's cluster section to run here"
        ) from None
    if check and done.returncode != 0:
        raise UserError(f"`{shlex.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def submit(chain: Chain) -> list[dict[str, Any]]:
    """Queue the chain held, record it in `jobs.json`, then release it: all of it runs, or none of it (a refused
    sbatch cancels the jobs queued before it). Returns the records, in order."""
    write_chain(chain.folder, chain.jobs, chain.slurm)
    records: list[dict[str, Any]] = []
    try:
        for item in chain.jobs:
            after = records[-1]["id"] if records else None
            dependency = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
            script = chain.folder / f"{item.name}.sbatch"
            out = slurm_command("sbatch", "--parsable", "--hold", *dependency, str(script)).stdout
            job_id = out.strip().split(";")[0]
            records.append(
                {
                    "stage": item.name,
                    "id": job_id,
                    "after": after,
                    "script": str(script),
                    "log": str(log_path(chain.folder, item.name, job_id if item.array is None else f"{job_id}_%a")),
                    "folders": list(item.folders),
                    **({"array": list(item.array)} if item.array is not None else {}),
                }
            )
    except UserError:
        if records:
            slurm_command("scancel", *(record["id"] for record in records), check=False)
        raise
    submitted = datetime.now().astimezone().isoformat(timespec="seconds")
    write_json_atomic(chain.folder / JOBS, {**chain.record, "submitted": submitted, "jobs": records})
    if records:
        slurm_command("scontrol", "release", ",".join(record["id"] for record in records))
    return records


def submitted_text(chain: Chain, records: list[dict[str, Any]]) -> str:
    """What `run` prints once the chain is queued."""
    where = chain.record.get("output_dir", str(chain.folder))
    return "\n".join(
        [f"[slurm] submitted {len(records)} jobs, each after the one before (afterok):"]
        + [
            f"  {record['stage']:<12} job {record['id']}"
            + (f" (array: {array_spec(tuple(record['array']), None)})" if "array" in record else "")
            for record in records
        ]
        + [
            f"length-control status {where}: their states; length-control cancel {where}: cancel them; "
            f"logs in {chain.folder / 'logs'}/"
        ]
    )


@dataclass(frozen=True)
class QueueState:
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...
    reason: str  # why it pends or ended (Dependency, DependencyNeverSatisfied, NonZeroExitCode), or None


def queue_states(ids: list[str]) -> dict[str, QueueState]:
    """What Slurm's queue knows of these jobs (it forgets ended ones after MinJobAge), by job id, an array's
    tasks by `<array>_<task>`; UserError if unreadable."""
    if not ids:
        return {}
    done = slurm_command(
        "squeue",
        "--noheader",
        "--states=all",
        "--array",
        f"--jobs={','.join(ids)}",
        "--Format=JobArrayID:|,State:|,Reason:|",
        check=False,
    )
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:  # every one of them forgotten
            return {}
        raise UserError(f"squeue failed (exit {done.returncode}): {done.stderr.strip()}")
    states = {}
    for line in done.stdout.splitlines():
        job_id, state, reason, *_ = [*line.split("|"), "", ""]
        states[job_id.strip()] = QueueState(state.strip(), reason.strip())
    return states


# ---------------------------------------------------------------- status and cancel


def read_jobs(folder: Path) -> dict[str, Any]:
    """The chain recorded in a run's `slurm/` folder."""
    try:
        return json.loads((Path(folder) / JOBS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{folder} has no {JOBS}: no chain was submitted for this run; submit one with `length-control run "
            "RECIPE` and a cluster.slurm section in the recipe"
        ) from None


def tasks(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A job array's tasks as records of their own (id `<array>_<task>`, their own log); a job alone: itself."""
    if "array" not in record:
        return [record]
    return [
        {"id": f"{record['id']}_{task}", "log": record["log"].replace("%a", str(task)), "folders": []}
        for task in record["array"]
    ]


def active_jobs(folder: Path) -> list[str]:
    """The recorded jobs of a run that are still queued or running, an array while one of its tasks is (none when
    nothing was submitted)."""
    if not (Path(folder) / JOBS).is_file():
        return []
    records = read_jobs(folder)["jobs"]
    states = queue_states([record["id"] for record in records])
    return [
        record["id"]
        for record in records
        if any(task["id"] in states and states[task["id"]].state not in ENDED for task in tasks(record))
    ]


def exit_status(record: dict[str, Any]) -> int | None:
    """The exit status a job wrote beside its log, or None (not ended, or killed before it could write it)."""
    try:
        return int(Path(record["log"]).with_suffix(".exit").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def job_state(record: dict[str, Any], queue: dict[str, QueueState] | None) -> tuple[str, bool]:
    """A job's state for people, and whether it ended badly (its log's tail is worth showing): Slurm's queue
    first, then the exit status the job wrote, then its stage's manifests."""
    known = (queue or {}).get(record["id"])
    code = exit_status(record)
    if known is not None:
        reason = known.reason if known.reason not in ("", "None") else None
        details = [part for part in (reason, f"exit {code}" if code is not None else None) if part]
        text = known.state + (f" ({', '.join(details)})" if details else "")
        return text, known.state in ENDED and known.state != "COMPLETED"
    if code is not None and code > 128:
        return f"ended by {signal.Signals(code - 128).name} (cancelled or out of time; exit {code})", True
    if code is not None:
        return ("COMPLETED", False) if code == 0 else (f"FAILED (exit {code})", True)
    if record["folders"] and all(is_finished(Path(folder)) for folder in record["folders"]):
        return "finished (its manifests are there)", False
    if Path(record["log"]).is_file():
        return "ended without an exit status (cancelled, out of time, or its node failed)", True
    return "never ran" + (" (no longer in Slurm's queue: cancelled)" if queue is not None else ""), False


def log_tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    return Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]


def status(folder: Path) -> str:
    """Each stage's job and state, and the last lines of the log of one that ended badly."""
    chain = read_jobs(folder)
    try:
        queue: dict[str, QueueState] | None = queue_states([record["id"] for record in chain["jobs"]])
        note = []
    except UserError as unreadable:
        queue, note = None, [f"  (Slurm's queue is unreadable here, states from the run folder: {unreadable})"]
    lines = [f"run {chain['run']} -> {chain['output_dir']}: submitted {chain['submitted']}", *note]
    lines += [f"  {stage:<12} up to date at submission, no job" for stage in chain["up_to_date"]]
    for record in chain["jobs"]:
        states = [(task, *job_state(task, queue)) for task in tasks(record)]
        if "array" in record:
            counts = Counter(state for _, state, _ in states)
            state = f"array of {len(states)}: " + ", ".join(f"{count} {state}" for state, count in counts.items())
        else:
            state = states[0][1]
        lines.append(f"  {record['stage']:<12} job {record['id']:<8} {state}")
        for task, task_state, bad in states:
            if bad and Path(task["log"]).is_file():
                head = f"      {task['log']}" + (f" (task {task['id']}: {task_state})" if "array" in record else "")
                lines += [f"{head}:"] + [f"      | {line}" for line in log_tail(Path(task["log"]))]
    return "\n".join(lines)


def cancel(folder: Path) -> str:
    """Cancel every job of the chain that is still queued or running."""
    chain = read_jobs(folder)
    active = set(active_jobs(folder))
    cancelled = [record for record in chain["jobs"] if record["id"] in active]
    if not cancelled:
        return f"no job of {chain['run']} is queued or running"
    slurm_command("scancel", *(record["id"] for record in cancelled))
    return f"cancelled {len(cancelled)} jobs of {chain['run']}: " + ", ".join(
        f"{record['stage']} {record['id']}" for record in cancelled
    )
