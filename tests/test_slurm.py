"""Runs through Slurm (`slurm.py`): the job scripts as written, and chains submitted to a real one-host cluster.

The cluster fixture starts Debian's Slurm (slurmctld, two slurmd as the fake nodes n1 and n2, and munged) in a
temporary folder, on free ports, and stops each daemon by its pid at the end; it skips with the install line
where Slurm is absent. The stage-level tests run the toolkit's own stage commands as jobs on the scripted
policy: generate is done here by the scripted engine, splice runs as a job, and training fails at once for want
of the Axolotl environment (the jobs' LC_ENVS_DIR is empty), so a chain's failure path costs seconds. The
engine test runs the demo through Slurm with the real engines and compares its report with a run here.
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from length_control import cli, doctor, evaluate, generate, pipeline, runlock, slurm, slurm_nodes, train
from length_control.contracts import RunLayout, is_finished, read_records, shard_path
from length_control.engines.fake import ScriptedEngine, transcripts
from length_control.envs import envs_dir, profile
from length_control.errors import UserError
from length_control.recipe import load_recipe

from conftest import REPO, demo_recipe
from test_stages_fake import CUT, LONG, SHORT, Ids, make_recipe

INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
NODES = ("n1", "n2")


# ---------------------------------------------------------------- a one-host cluster


@dataclass(frozen=True)
class Cluster:
    folder: Path
    conf: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _slurm_conf(folder: Path, ports: list[int]) -> str:
    """One host as two nodes of one CPU each; the settings a one-host cluster needs (docs: the Slurm notes)."""
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=1 RealMemory=1000"
        for name, port in zip(NODES, ports[2:])
    )
    return f"""ClusterName=lctest
SlurmctldHost=localhost
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
SlurmUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=200
SchedulerParameters=batch_sched_delay=0
# TERM to KILL: time for a cancelled job's trap to record its exit status on a loaded machine
KillWait=10
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path) -> None:
    """Stop a daemon by the pid it wrote: TERM, then KILL if it lingers."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} missing): {INSTALL}")
    if os.geteuid() != 0:
        pytest.skip("a one-host Slurm cluster starts its slurmd as root (as CI runs)")
    # munged wants every folder above its socket searchable by all: not pytest's tmp_path (mode 700)
    folder = Path(tempfile.mkdtemp(prefix="lc-slurm-"))
    folder.chmod(0o755)
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder, [_free_port() for _ in range(2 + len(NODES))]))
    daemons = [folder / "slurmctld.pid", *(folder / f"slurmd-{name}.pid" for name in NODES), folder / "munged.pid"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(conf))
        try:
            subprocess.run(["mungekey", "--create", f"--keyfile={folder}/munge.key"], check=True)
            munged = ["munged", f"--socket={folder}/munge.socket", f"--key-file={folder}/munge.key"]
            munged += [f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log"]
            subprocess.run([*munged, f"--seed-file={folder}/munged.seed"], check=True)
            subprocess.run(["slurmctld", "-f", str(conf)], check=True)
            for name in NODES:
                subprocess.run(["slurmd", "-f", str(conf), "-N", name], check=True)
            _wait_for(lambda: _idle_nodes() == len(NODES), 30, f"two idle nodes (logs in {folder})")
            yield Cluster(folder, conf)
        finally:
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
            for pid_file in daemons:
                _stop(pid_file)
            shutil.rmtree(folder, ignore_errors=True)


def _idle_nodes() -> int:
    done = subprocess.run(["sinfo", "--noheader", "--states=idle", "--format=%D"], capture_output=True, text=True)
    return sum(int(count) for count in done.stdout.split()) if done.returncode == 0 else 0


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds} s for {what}")
        time.sleep(0.25)


def _wait_until_ended(folder: Path, seconds: float = 120) -> None:
    """Until no job of the chain recorded in `folder` is queued or running."""
    _wait_for(lambda: not slurm.active_jobs(folder), seconds, f"the jobs of {folder} to end")


# ---------------------------------------------------------------- chains of trivial jobs


def _chain(folder: Path, jobs: list[slurm.Job]) -> slurm.Chain:
    return slurm.Chain(folder, jobs, {"run": "trivial", "output_dir": str(folder), "up_to_date": []})


def _appending(folder: Path, name: str, *commands: str) -> slurm.Job:
    """A job that runs `commands`, then appends its name to order.txt."""
    return slurm.job(name, folder, ["--time=1:00"], [*commands, f"echo {name} >> {folder}/order.txt"])


def test_a_chain_runs_in_its_order_and_status_reads_it(cluster: Cluster, tmp_path: Path) -> None:
    # each job sleeps less than the one before: without the dependencies they would end in reverse
    jobs = [_appending(tmp_path, name, f"sleep {pause}") for name, pause in (("a", 2), ("b", 1), ("c", 0))]
    records = slurm.submit(_chain(tmp_path, jobs))
    assert [record["after"] for record in records] == [None, records[0]["id"], records[1]["id"]]
    _wait_until_ended(tmp_path)
    assert (tmp_path / "order.txt").read_text().split() == ["a", "b", "c"]
    text = slurm.status(tmp_path)
    for record in records:
        assert f"{record['stage']:<12} job {record['id']:<8} COMPLETED" in text
    assert slurm.exit_status(records[2]) == 0


def test_a_failed_job_cancels_the_rest_and_status_shows_its_exit_and_log(cluster: Cluster, tmp_path: Path) -> None:
    jobs = [_appending(tmp_path, "a", "echo 'the stage broke here'", "exit 3"), _appending(tmp_path, "b")]
    records = slurm.submit(_chain(tmp_path, jobs))
    _wait_until_ended(tmp_path)
    text = slurm.status(tmp_path)
    assert f"job {records[0]['id']:<8} FAILED (NonZeroExitCode, exit 3)" in text
    assert "| the stage broke here" in text
    assert f"job {records[1]['id']:<8} CANCELLED (DependencyNeverSatisfied)" in text  # not pending forever
    assert not (tmp_path / "order.txt").exists()


def test_cancel_ends_a_running_job_and_the_queued_ones(cluster: Cluster, tmp_path: Path) -> None:
    jobs = [_appending(tmp_path, "a", "sleep 120"), _appending(tmp_path, "b")]
    records = slurm.submit(_chain(tmp_path, jobs))
    _wait_for(lambda: slurm.queue_states([records[0]["id"]])[records[0]["id"]].state == "RUNNING", 30, "a to run")
    assert slurm.active_jobs(tmp_path) == [records[0]["id"], records[1]["id"]]
    assert slurm.cancel(tmp_path) == f"cancelled 2 jobs of trivial: a {records[0]['id']}, b {records[1]['id']}"
    _wait_until_ended(tmp_path, 30)
    assert "CANCELLED (exit 143)" in slurm.status(tmp_path).splitlines()[1]  # its exit status: 128 + SIGTERM
    assert slurm.cancel(tmp_path) == "no job of trivial is queued or running"


def test_a_refused_sbatch_leaves_no_half_chain(cluster: Cluster, tmp_path: Path) -> None:
    jobs = [_appending(tmp_path, "a"), slurm.job("b", tmp_path, ["--partition=nosuchpartition"], ["true"])]
    with pytest.raises(UserError, match="Invalid partition name"):
        slurm.submit(_chain(tmp_path, jobs))
    time.sleep(1)
    assert not (tmp_path / "order.txt").exists()  # a was queued held, then cancelled
    assert not (tmp_path / slurm.JOBS).exists()


def test_the_tasks_of_an_array_share_the_run_lock_on_both_nodes_and_keep_other_writers_out(
    cluster: Cluster, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    hold = (  # what an array task's `run --stage generate --shard N` does around its shard: the group's lock
        "import os, sys, time; from pathlib import Path; from length_control import runlock, slurm\n"
        f"with runlock.holding(Path({str(run)!r}), group=slurm.array_group()):\n"
        "    Path(sys.argv[1]).write_text(os.environ['SLURMD_NODENAME']); time.sleep(6)"
    )
    shard = f'{tmp_path}/shard-"$SLURM_ARRAY_TASK_ID"'
    command = f"PYTHONPATH={REPO} {shlex.quote(sys.executable)} -c {shlex.quote(hold)} {shard}"
    tasks = (0, 1, 2, 3)
    records = slurm.submit(_chain(tmp_path, [slurm.job("shards", tmp_path, ["--time=1:00"], [command], array=tasks)]))
    assert records[0]["array"] == list(tasks) and records[0]["log"].endswith(f"shards-{records[0]['id']}_%a.log")
    _wait_for(lambda: len(list(tmp_path.glob("shard-*"))) >= 2, 60, "two tasks to hold the lock at once")
    with pytest.raises(runlock.RunLocked, match="; with the rest of Slurm job array"):  # a writer alone
        with runlock.holding(run):
            pass
    _wait_until_ended(tmp_path)
    assert f"shards       job {records[0]['id']:<8} array of 4: 4 COMPLETED" in slurm.status(tmp_path)
    assert {(tmp_path / f"shard-{task}").read_text() for task in tasks} == set(NODES)  # side by side on n1 and n2
    assert not (run / runlock.HOLDER).exists()  # the last task took the record with it


ALL_REDUCE = """import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
seen = {"world": dist.get_world_size(), "sum": total.item(), "node": os.environ["SLURMD_NODENAME"]}
with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w") as out:
    json.dump(seen | {"master": os.environ["MASTER_ADDR"]}, out)
dist.destroy_process_group()
"""


def test_a_two_node_job_starts_torchrun_on_each_node_as_training_does_and_they_all_reduce(
    cluster: Cluster, tmp_path: Path, policy: Path
) -> None:
    """Axolotl does not train multi-process on this CPU, so the demo trains on one node; the 2-node launch is
    proven here: the training job's options and launch prefix (srun, the node launcher, torchrun), with a
    gloo all-reduce where Axolotl's `train --launcher torchrun` goes."""
    make_recipe(tmp_path, policy, [SHORT])
    recipe = load_recipe(tmp_path / "recipe.yaml", ["cluster={slurm: {nodes: 2}}", "train.launcher=torchrun"])
    prefix = slurm_nodes.on_every_node(recipe)
    assert train.launch_command(recipe, tmp_path / "axolotl.yaml")[: len(prefix)] == prefix  # training's own
    slurm_nodes.write_node_launcher(recipe)
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE)
    step = [*prefix, str(Path(sys.executable).parent / "torchrun"), str(tmp_path / "all_reduce.py"), str(tmp_path)]
    options = slurm.sbatch_options(recipe.cluster.slurm, "train", gpus=True)
    assert "--nodes=2" in options and "--ntasks-per-node=1" in options
    records = slurm.submit(_chain(tmp_path, [slurm.job("train", tmp_path, options, [shlex.join(step)])]))
    _wait_until_ended(tmp_path)
    assert f"train        job {records[0]['id']:<8} COMPLETED" in slurm.status(tmp_path), slurm.status(tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world"] for rank in ranks] == [2, 2] and [rank["sum"] for rank in ranks] == [3.0, 3.0]
    assert {rank["node"] for rank in ranks} == set(NODES)  # a process on each node, rank 0 on the first
    assert ranks[0]["master"] == "127.0.0.1"  # the first node's NodeAddr: the name n1 does not resolve


# ---------------------------------------------------------------- the stages as jobs


def _recipe_file(folder: Path, policy: Path, ids: Ids) -> Path:
    """A run on the scripted policy with its traces generated here (the scripted engine), and only the after arm."""
    recipe = make_recipe(folder, policy, [LONG, CUT, SHORT])
    generate.run(generate.plan(recipe), engine=ScriptedEngine(transcripts(ids.script())))
    return folder / "recipe.yaml"


def _cluster_override(folder: Path, envs: Path | None = None, **slurm_keys) -> str:
    """The recipe's cluster section: jobs run this checkout, with no engine environment (training fails at once),
    or with those in `envs`."""
    setup = f"export PYTHONPATH={REPO}; export LC_ENVS_DIR={envs or folder / 'no-envs'}"
    return "cluster=" + json.dumps({"slurm": {"setup": setup, "time": "10:00", **slurm_keys}})


def _vllm_only(folder: Path) -> Path:
    """Engine environments with vLLM's and without Axolotl's: a stage plans, training fails at once."""
    envs = folder / "envs" / profile()
    envs.mkdir(parents=True)
    (envs / "vllm").symlink_to(envs_dir() / "vllm")
    return envs.parent


@pytest.fixture(scope="module")
def policy(tokenizer_policy: Path) -> Path:
    return tokenizer_policy


@pytest.fixture(scope="module")
def ids(policy: Path) -> Ids:
    return Ids(policy)


def test_a_run_submits_the_stages_not_up_to_date_and_a_resubmission_resumes(
    cluster: Cluster, tmp_path: Path, policy: Path, ids: Ids, capsys
) -> None:
    recipe_file = _recipe_file(tmp_path, policy, ids)
    args = [str(recipe_file), "eval.arms=[after]", _cluster_override(tmp_path)]
    run = RunLayout(tmp_path / "run")

    assert cli.main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "[slurm] up to date, no job: generate" in out and "[slurm] splice runs (" in out
    chain = slurm.read_jobs(run.slurm)
    assert [job["stage"] for job in chain["jobs"]] == ["splice", "train", "eval-after", "report"]
    assert chain["jobs"][0]["folders"] == [str(run.stage2)] and chain["jobs"][-1]["folders"] == []
    assert load_recipe(run.slurm / slurm.RECIPE) == load_recipe(recipe_file, args[1:])
    _wait_until_ended(run.slurm)

    assert is_finished(run.stage2)  # the splice job's work, through the toolkit's own command and lock
    text = slurm.status(run.slurm)
    assert f"splice       job {chain['jobs'][0]['id']:<8} COMPLETED" in text
    assert f"train        job {chain['jobs'][1]['id']:<8} FAILED (NonZeroExitCode, exit 1)" in text
    assert "eval-after" in text and "CANCELLED (DependencyNeverSatisfied)" in text
    assert not (run.root / ".lock.json").exists()  # every job let go of the run folder

    assert cli.main(["run", *args]) == 0  # the same command again: only what is not finished
    out = capsys.readouterr().out
    assert "[slurm] up to date, no job: generate, splice" in out and "[slurm] train runs (" in out
    assert [job["stage"] for job in slurm.read_jobs(run.slurm)["jobs"]] == ["train", "eval-after", "report"]
    _wait_until_ended(run.slurm)


def _resubmitted_with_every_shard_there(args: list[str], stage: str, run: RunLayout, capsys) -> list[dict]:
    """`run` again once every one of the stage's 2 shards is on disk: its own job, no array; the chain."""
    assert cli.main(["run", *args]) == 0
    assert f"[slurm] {stage}: 0 of its 2 shards to write" in capsys.readouterr().out
    chain = slurm.read_jobs(run.slurm)["jobs"]
    assert chain[0]["stage"] == stage and "array" not in chain[0]
    return chain


def test_generate_runs_as_an_array_over_its_missing_shards_then_a_job_that_finishes_it(
    cluster: Cluster, tmp_path: Path, policy: Path, ids: Ids, capsys
) -> None:
    recipe_file = _recipe_file(tmp_path, policy, ids)  # 3 prompts in shards of 2: shards 0 and 1
    args = [str(recipe_file), "eval.arms=[after]", _cluster_override(tmp_path)]
    run = RunLayout(tmp_path / "run")
    manifest = json.loads((run.generate / "manifest.json").read_text())
    kept = shard_path(run.generate, "traces", 1).read_bytes()
    (run.generate / "manifest.json").unlink()
    shard_path(run.generate, "traces", 1).unlink()  # as a cancelled task leaves it

    assert cli.main(["run", *args]) == 0
    assert "[slurm] generate: 1 of its 2 shards to write, a job array task each" in capsys.readouterr().out
    chain = slurm.read_jobs(run.slurm)["jobs"]
    assert [(job["stage"], job.get("array")) for job in chain[:3]] == [
        ("generate-shards", [1]),
        ("generate", None),
        ("splice", None),
    ]
    _wait_until_ended(run.slurm)
    text = slurm.status(run.slurm)  # the task ran the toolkit's shard command: here it has no engine to run
    assert f"generate-shards job {chain[0]['id']:<8} array of 1: 1 FAILED (NonZeroExitCode, exit 1)" in text
    assert f"generate-shards-{chain[0]['id']}_1.log (task {chain[0]['id']}_1: FAILED" in text
    assert f"generate     job {chain[1]['id']:<8} CANCELLED (DependencyNeverSatisfied)" in text

    shard_path(run.generate, "traces", 1).write_bytes(kept)  # every shard there: the stage's job only finishes it
    args[-1] = _cluster_override(tmp_path, _vllm_only(tmp_path))
    chain = _resubmitted_with_every_shard_there(args, "generate", run, capsys)
    _wait_until_ended(run.slurm)
    assert f"generate     job {chain[0]['id']:<8} COMPLETED" in slurm.status(run.slurm)
    assert json.loads((run.generate / "manifest.json").read_text())["summary"] == manifest["summary"]


def test_the_eval_arms_run_as_arrays_over_their_missing_shards_then_jobs_that_merge_them(
    cluster: Cluster, tmp_path: Path, policy: Path, ids: Ids, capsys
) -> None:
    recipe_file = _recipe_file(tmp_path, policy, ids)  # 3 problems in shards of 2: shards 0 and 1
    arms = ["eval.arms=[before, forced]", "eval.shard_problems=2"]
    whole = load_recipe(recipe_file, [*arms, f"output_dir={tmp_path / 'whole'}"])
    for arm in ("before", "forced"):
        evaluate.run(evaluate.plan(whole, arm), engine=ScriptedEngine(transcripts(ids.script())))
    args = [str(recipe_file), *arms, _cluster_override(tmp_path)]
    recipe, run = load_recipe(recipe_file, arms), RunLayout(tmp_path / "run")
    evaluate.run_shards(evaluate.plan(recipe, "before"), [0], ScriptedEngine(transcripts(ids.script())))

    assert cli.main(["run", *args]) == 0  # shard 1's task has no engine to run here: it fails, the rest cancelled
    out = capsys.readouterr().out
    assert "[slurm] eval-before: 1 of its 2 shards to write" in out
    assert "[slurm] eval-forced: 2 of its 2 shards to write" in out  # its before arm runs first
    chain = slurm.read_jobs(run.slurm)["jobs"]
    assert [(job["stage"], job.get("array")) for job in chain[:5]] == [
        ("eval-before-shards", [1]),
        ("eval-before", None),
        ("eval-forced-shards", [0, 1]),
        ("eval-forced", None),
        ("generate", None),
    ]
    _wait_until_ended(run.slurm)
    text = slurm.status(run.slurm)
    assert f"eval-before-shards job {chain[0]['id']:<8} array of 1: 1 FAILED (NonZeroExitCode, exit 1)" in text
    assert f"eval-before  job {chain[1]['id']:<8} CANCELLED (DependencyNeverSatisfied)" in text

    evaluate.run_shards(evaluate.plan(recipe, "before"), [1], ScriptedEngine(transcripts(ids.script())))
    args[-1] = _cluster_override(tmp_path, _vllm_only(tmp_path))  # every shard there: the arm's job merges them
    chain = _resubmitted_with_every_shard_there(args, "eval-before", run, capsys)
    _wait_for(lambda: is_finished(run.eval("before")), 120, "the eval-before job")
    assert cli.main(["cancel", str(run.root)]) == 0  # the forced arm's tasks would start vLLM: its shards come here
    _wait_until_ended(run.slurm)
    capsys.readouterr()

    evaluate.run_shards(evaluate.plan(recipe, "forced"), [0, 1], ScriptedEngine(transcripts(ids.script())))
    chain = _resubmitted_with_every_shard_there(args, "eval-forced", run, capsys)
    _wait_until_ended(run.slurm)
    assert f"eval-forced  job {chain[0]['id']:<8} COMPLETED" in slurm.status(run.slurm)
    for arm in ("before", "forced"):
        assert _arm_files(run.eval(arm)) == _arm_files(RunLayout(tmp_path / "whole").eval(arm)), arm


def test_waiting_jobs_refuse_a_second_submission_and_cancel_ends_them(
    cluster: Cluster, tmp_path: Path, policy: Path, ids: Ids, capsys
) -> None:
    recipe_file = _recipe_file(tmp_path, policy, ids)
    later = _cluster_override(tmp_path, sbatch_lines=["--begin=now+3600"])  # queued, not started for an hour
    assert cli.main(["run", str(recipe_file), "eval.arms=[after]", later]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(recipe_file), "eval.arms=[after]", later]) == 2
    assert "are still queued or running" in capsys.readouterr().err

    assert cli.main(["status", str(recipe_file), "eval.arms=[after]", later]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "generate     up to date at submission, no job" in lines[1]
    assert all(" PENDING" in line for line in lines[2:6]), lines  # the reason comes once the scheduler looked

    assert cli.main(["cancel", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.startswith("cancelled 4 jobs of fake: splice ")
    _wait_until_ended(tmp_path / "run" / "slurm", 30)
    assert cli.main(["status", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.count("CANCELLED") == 4


@pytest.mark.engine
def test_the_demo_cancelled_mid_generation_and_resubmitted_reports_what_a_run_here_does(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The demo recipe as Slurm jobs on the CPU (one seed, to keep it to minutes), the before and forced arms
    arrays of 3 shards (30 of the 80 problems each: one spans both eval sets) and generate one of 4 shards,
    2 tasks at a time: cancelled once a generate shard is written on each node, then submitted again, which
    writes only the missing shards. Every generate shard and each eval arm's samples are the bytes a run here
    (the arms in one piece) writes; the probes' records, the arms' metrics and the report's figures agree with
    a run here to `PROBE_REL_TOL` on floats and exactly on the rest. The probes are log-probabilities under
    vLLM, which on a CPU does not promise the same floats whatever else shares a step (its batch invariance is
    GPU-only), and the worker adds requests as they arrive, so what shares a step can depend on timing: once, on
    an Intel Xeon with AMX, in a CI run (alone, this test wrote the same bytes), one shard's probe floats came
    out up to 1.1e-3 apart relative (an answer NLL of 0.0198 in its fifth digit), its samples to the byte."""
    overrides = ["train.seeds=[0]", "generation.shard_size=120"]  # 240 prompts x 2 samples: 4 shards
    pipeline.run(demo_recipe([f"output_dir={tmp_path / 'here'}", *overrides]), echo=lambda line: None)
    section = {"slurm": {"setup": f"export PYTHONPATH={REPO}", "time": "60:00", "array_throttle": 2}}
    submit = ["run", str(REPO / "recipes" / "demo-cpu.yaml"), f"output_dir={tmp_path / 'jobs'}", *overrides]
    submit += [f"cluster={json.dumps(section)}", "eval.shard_problems=30"]
    run = RunLayout(tmp_path / "jobs")

    assert cli.main(submit) == 0
    arrays = {job["stage"]: job.get("array") for job in slurm.read_jobs(run.slurm)["jobs"] if "array" in job}
    assert arrays == {"eval-before-shards": [0, 1, 2], "eval-forced-shards": [0, 1, 2], "generate-shards": [0, 1, 2, 3]}
    shards = next(job for job in slurm.read_jobs(run.slurm)["jobs"] if job["stage"] == "generate-shards")

    def written_on() -> set[str]:
        """The nodes whose array tasks wrote their shard, from the first line of each task's log."""
        return {
            task_log.read_text().split(" on node ")[1].split()[0]
            for task in shards["array"]
            if shard_path(run.generate, "traces", task).is_file()
            for task_log in [Path(shards["log"].replace("%a", str(task)))]
        }

    _wait_for(lambda: written_on() == set(NODES), 1800, "a shard written on each node")
    assert cli.main(["cancel", str(run.root)]) == 0
    _wait_until_ended(run.slurm, 120)
    missing = [task for task in shards["array"] if not shard_path(run.generate, "traces", task).is_file()]
    assert missing and not is_finished(run.generate), "cancelled after generate ended"

    assert cli.main(submit) == 0  # the same command again: only the missing shards, then the rest
    again = slurm.read_jobs(run.slurm)["jobs"]
    assert [job["stage"] for job in again][:2] == ["generate-shards", "generate"] and again[0]["array"] == missing
    _wait_until_ended(run.slurm, 3600)
    text = slurm.status(run.slurm)
    assert f"array of {len(missing)}: {len(missing)} COMPLETED" in text, text
    assert text.count(" COMPLETED") == len(again), text
    for kind in ("traces", "answers"):
        for task in shards["array"]:
            here = shard_path(RunLayout(tmp_path / "here").generate, kind, task)
            assert shard_path(run.generate, kind, task).read_bytes() == here.read_bytes(), (kind, task)
    for arm in ("before", "forced"):
        here, there = _arm_contents(RunLayout(tmp_path / "here").eval(arm)), _arm_contents(run.eval(arm))
        assert not (differences := _differences(here, there, arm)), differences[:5]
    here, there = (json.loads((tmp_path / name / "report" / "report.json").read_text()) for name in ("here", "jobs"))
    differences = _differences(
        {k: here[k] for k in ("arms", "benchmarks")}, {k: there[k] for k in ("arms", "benchmarks")}, ""
    )
    assert not differences, differences[:5]


def test_the_doctor_checks_slurm_and_the_partition_where_the_recipe_has_a_cluster(
    cluster: Cluster, tmp_path: Path, policy: Path, monkeypatch
) -> None:
    make_recipe(tmp_path, policy, [SHORT])
    written = yaml.safe_load((tmp_path / "recipe.yaml").read_text())

    def doctor_on(section: dict | None) -> doctor.Findings:
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(written | {"cluster": section}))
        found = doctor.Findings()
        doctor.check_cluster(tmp_path / "cluster.yaml", found)
        return found

    assert doctor_on(None).lines[1:] == ["  none: the stages run on this machine"]
    found = doctor_on({"slurm": {"partition": "debug"}})
    assert not found.problems and found.lines[1] == f"  Slurm: {shutil.which('sbatch')}, partition debug (of debug)"
    assert doctor_on({"slurm": {}}).lines[1].endswith("partition debug (of debug)")  # the cluster's default
    assert doctor_on({"slurm": {"partition": "h100"}}).problems == [
        "cluster.slurm.partition = h100: not a partition of this cluster (debug): set it to one of them"
    ]
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Slurm's commands
    assert doctor_on({"slurm": {}}).problems == [
        "cluster.slurm: Slurm's sbatch, squeue, scancel, scontrol, sinfo not on PATH: run on a login node of the "
        "cluster, or remove the recipe's cluster section to run here"
    ]


# ---------------------------------------------------------------- the scripts as written (no cluster)


def test_the_dry_run_writes_a_script_per_stage_that_sbatch_reads_as_written(
    tmp_path: Path, policy: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("LC_ENVS_DIR", str(_vllm_only(tmp_path)))  # no Axolotl: no check of the rendered configs
    make_recipe(tmp_path, policy, [LONG, CUT, SHORT])
    section = {
        "partition": "gpu",
        "account": "lc",
        "qos": "high",
        "time": "04:00:00",
        "stage_time": {"train": "2-00:00:00"},
        "gpus_per_node": 8,
        "cpus_per_task": 32,
        "mem": "200G",
        "sbatch_lines": ["--exclusive", "--constraint=h100"],
        "setup": "module load cuda/12.4",
        "nodes": 2,
        "array_throttle": 4,
    }
    cluster = [f"cluster={json.dumps({'slurm': section})}", "train.launcher=torchrun"]
    assert cli.main(["run", str(tmp_path / "recipe.yaml"), "--dry-run", *cluster]) == 0
    folder = tmp_path / "run" / "dry-run" / "slurm"
    assert (
        "[slurm] 8 jobs, each after the one before (afterok): eval-before -> eval-forced -> generate-shards -> "
        "generate -> splice -> train" in capsys.readouterr().out
    )

    train = (folder / "train.sbatch").read_text().splitlines()
    assert train[0] == "#!/bin/bash" and train[1].startswith("# The train stage of fake (")
    assert train[2:14] == [
        "#SBATCH --job-name=fake.train",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lc",
        "#SBATCH --qos=high",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --mem=200G",
        "#SBATCH --exclusive",
        "#SBATCH --constraint=h100",
    ]
    assert train[14] == f"#SBATCH --output={folder}/logs/train-%j.log"
    assert train[-4] == "module load cuda/12.4"
    assert train[-3] == "# each seed trains on all 2 nodes: the stage runs, from the first node (seed 0):"
    launcher = tmp_path / "run" / "slurm" / slurm_nodes.NODE_LAUNCHER
    assert train[-2].startswith(f"#   srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 {launcher} ")
    assert train[-2].endswith(f"train {tmp_path}/run/train/seed-0/axolotl.yaml --launcher torchrun")
    assert train[-1] == f"{sys.executable} -m length_control.cli run {folder}/recipe.yaml --stage train"
    node = (folder / slurm_nodes.NODE_LAUNCHER).read_text()  # the same script, beside the jobs: what srun starts
    assert "export PET_NPROC_PER_NODE=8" in node and 'export PET_NODE_RANK="$SLURM_NODEID"' in node
    assert subprocess.run(["bash", "-n", str(folder / slurm_nodes.NODE_LAUNCHER)]).returncode == 0
    assert (
        cli.main(
            [
                "run",
                str(tmp_path / "recipe.yaml"),
                "--dry-run",
                *cluster,
                "cluster.slurm.command=/shared/lc/run.sh",
            ]
        )
        == 0
    )
    assert (folder / "report.sbatch").read_text().splitlines()[-1] == (
        f"/shared/lc/run.sh run {folder}/recipe.yaml --stage report"
    )
    splice = (folder / "splice.sbatch").read_text()
    assert "--time=04:00:00" in splice and "--gpus-per-node" not in splice  # splice and report need no GPU
    shards = (folder / "generate-shards.sbatch").read_text().splitlines()  # 3 prompts in shards of 2: a task each
    assert "#SBATCH --gpus-per-node=8" in shards and "#SBATCH --array=0-1%4" in shards and "#SBATCH --nodes=1" in shards
    assert f"#SBATCH --output={folder}/logs/generate-shards-%A_%a.log" in shards
    assert shards[-1].endswith(f"run {folder}/recipe.yaml --stage generate --shard $SLURM_ARRAY_TASK_ID")
    assert "--gpus-per-node" not in (folder / "generate.sbatch").read_text()  # it only writes the manifest

    submit = (folder / slurm.SUBMIT).read_text()
    assert "eval_before=$(sbatch --parsable eval-before.sbatch)" in submit
    assert "report=$(sbatch --parsable --dependency=afterok:${eval_after%%;*} --kill-on-invalid-dep=yes" in submit
    assert subprocess.run(["bash", "-n", str(folder / slurm.SUBMIT)]).returncode == 0
    recipe = yaml.safe_load((folder / slurm.RECIPE).read_text())
    assert recipe["cluster"]["slurm"]["partition"] == "gpu" and Path(recipe["output_dir"]).is_absolute()
    assert (folder / "logs").is_dir()  # Slurm does not make the log folder
    assert not (folder / "eval-before-shards.sbatch").exists()  # no eval.shard_problems: the arms in one piece

    assert cli.main(["run", str(tmp_path / "recipe.yaml"), "--dry-run", *cluster, "eval.shard_problems=2"]) == 0
    assert "eval-before-shards -> eval-before -> eval-forced-shards -> eval-forced -> generate-shards" in (
        capsys.readouterr().out
    )
    for arm in ("before", "forced"):  # 3 problems in shards of 2
        shards = (folder / f"eval-{arm}-shards.sbatch").read_text().splitlines()
        assert "#SBATCH --gpus-per-node=8" in shards and "#SBATCH --array=0-1%4" in shards
        assert shards[-1].endswith(f"run {folder}/recipe.yaml --stage eval-{arm} --shard $SLURM_ARRAY_TASK_ID")
        assert "--gpus-per-node" not in (folder / f"eval-{arm}.sbatch").read_text()  # it merges the shards


def test_a_job_that_slurm_forgot_is_read_from_its_exit_status_and_manifests(tmp_path: Path) -> None:
    record = {"id": "7", "log": str(tmp_path / "generate-7.log"), "folders": [str(tmp_path / "generate")]}
    assert slurm.job_state(record, {}) == ("never ran (no longer in Slurm's queue: cancelled)", False)
    Path(record["log"]).write_text("started\nKilled\n")
    assert slurm.job_state(record, {}) == (
        "ended without an exit status (cancelled, out of time, or its node failed)",
        True,
    )
    Path(record["log"]).with_suffix(".exit").write_text("143\n")
    assert slurm.job_state(record, {}) == ("ended by SIGTERM (cancelled or out of time; exit 143)", True)
    Path(record["log"]).with_suffix(".exit").write_text("0\n")
    assert slurm.job_state(record, {}) == ("COMPLETED", False)
    assert slurm.job_state(record, {"7": slurm.QueueState("RUNNING", "None")}) == ("RUNNING (exit 0)", False)


def test_an_array_task_writes_its_shard_to_the_bytes_of_a_whole_run_and_nothing_else(
    tmp_path: Path, policy: Path, ids: Ids
) -> None:
    recipe = load_recipe(_recipe_file(tmp_path, policy, ids))  # generated whole: shards 0 and 1, a manifest
    plan = generate.plan(recipe)
    whole = {kind: shard_path(plan.folder, kind, 1).read_bytes() for kind in ("traces", "answers")}
    (plan.folder / "manifest.json").unlink()
    for kind in whole:
        shard_path(plan.folder, kind, 1).unlink()
    engine = ScriptedEngine(transcripts(ids.script()))
    assert generate.run_shards(plan, [1], engine) == "shards [1] of 2: written [1]"
    assert {kind: shard_path(plan.folder, kind, 1).read_bytes() for kind in whole} == whole
    assert not (plan.folder / "manifest.json").exists()  # the stage's own job writes it, once every shard is there
    assert generate.run_shards(plan, [0, 1], engine) == "shards [0, 1] of 2: written [], already there [0, 1]"
    with pytest.raises(UserError, match=r"shards \[2\]: the stage has 2 \(0 to 1\)"):
        generate.run_shards(plan, [2], engine)
    stale = load_recipe(tmp_path / "recipe.yaml", ["seed=1"])  # other settings: only a submission starts over
    with pytest.raises(UserError, match="holds no shards of this run's settings"):
        generate.run_shards(generate.plan(stale), [0], engine)
    assert generate.missing_shards(generate.plan(stale)) == (2, [0, 1])  # the submitter starts the folder over


PROBE_REL_TOL = 1e-2  # the probes' floats in two runs of the same weights; a wrong prefix moves them by far more


def _differences(here, there, where: str) -> list[str]:
    """Where two records (or reports) differ: floats beyond `PROBE_REL_TOL` (or 1e-6 apart near 0), anything else
    at all."""
    if isinstance(here, dict) and isinstance(there, dict) and here.keys() == there.keys():
        return [found for key in here for found in _differences(here[key], there[key], f"{where}.{key}")]
    if isinstance(here, list) and isinstance(there, list) and len(here) == len(there):
        return [found for i, (a, b) in enumerate(zip(here, there)) for found in _differences(a, b, f"{where}[{i}]")]
    if isinstance(here, float) and isinstance(there, float):
        return [] if math.isclose(here, there, rel_tol=PROBE_REL_TOL, abs_tol=1e-6) else [f"{where}: {here} != {there}"]
    return [] if here == there else [f"{where}: {here!r} != {there!r}"]


def _arm_files(folder: Path) -> dict[str, bytes]:
    """An eval arm's files but its manifest: what the report reads."""
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != "manifest.json"
    }


def _arm_contents(folder: Path) -> dict:
    """`_arm_files` as what each holds, for `_differences`: the samples as bytes (they compare exactly), the
    probes' tables as records and the metrics as JSON (their floats to `PROBE_REL_TOL`)."""
    return {name: _file_contents(name, data) for name, data in _arm_files(folder).items()}


def _file_contents(name: str, data: bytes) -> bytes | dict | list[dict]:
    """One arm file's bytes, parsed where it is compared by value (read once, from those bytes)."""
    if name == "samples.parquet":
        return data
    if name.endswith(".json"):
        return json.loads(data)
    return read_records(io.BytesIO(data))


def test_the_eval_arms_shards_merge_to_the_bytes_of_the_arm_in_one_piece(
    tmp_path: Path, policy: Path, ids: Ids
) -> None:
    """Before and forced, each in shards of one problem written by array tasks (here, on the scripted engine),
    then finished without an engine: every file the arm in one piece writes, to the byte."""
    make_recipe(tmp_path, policy, [LONG, CUT, SHORT])
    whole = load_recipe(tmp_path / "recipe.yaml", [f"output_dir={tmp_path / 'whole'}"])
    for arm in ("before", "forced"):
        evaluate.run(evaluate.plan(whole, arm), engine=ScriptedEngine(transcripts(ids.script())))
    recipe = load_recipe(tmp_path / "recipe.yaml", ["eval.shard_problems=1"])  # 3 problems: 3 shards
    before, forced = evaluate.plan(recipe, "before"), evaluate.plan(recipe, "forced")
    assert evaluate.missing_shards(before) == (3, [0, 1, 2])
    assert evaluate.missing_shards(forced) == (3, [0, 1, 2])  # its before arm runs first, in the same chain
    assert not (forced.folder / evaluate.SHARDS).exists()  # its tasks record what their shards are made for
    engine = ScriptedEngine(transcripts(ids.script()))
    assert evaluate.run_shards(before, [2, 0], engine) == "shards [2, 0] of 3: written [2, 0]"
    assert evaluate.run_shards(before, [0, 1], engine) == "shards [0, 1] of 3: written [1], already there [0]"
    with pytest.raises(UserError, match=r"shards \[3\]: the arm has 3 \(0 to 2\)"):
        evaluate.run_shards(before, [3], engine)
    assert not (before.folder / "manifest.json").exists()  # the arm's own job merges them
    unused = ScriptedEngine(lambda context: pytest.fail("the merge ran the engine"))
    evaluate.run(before, engine=unused)
    assert _arm_files(before.folder) == _arm_files(RunLayout(tmp_path / "whole").eval("before"))
    assert not (before.folder / evaluate.SHARDS).exists()  # merged, then removed

    for shard in (1, 0, 2):  # a forced task cuts its first passes from the before arm, and asks only of its own
        engine = ScriptedEngine(transcripts(ids.script()))
        evaluate.run_shards(forced, [shard], engine)
        asked = {request["key"].split(":")[-1].split("#")[0] for request in engine.requests}  # probes' too
        assert asked <= {f"evals/{[LONG, CUT, SHORT][shard][0]}"}, asked
    evaluate.run(forced, engine=unused)
    assert _arm_files(forced.folder) == _arm_files(RunLayout(tmp_path / "whole").eval("forced"))
    assert (
        json.loads((forced.folder / "manifest.json").read_text())["output"]
        == json.loads((RunLayout(tmp_path / "whole").eval("forced") / "manifest.json").read_text())["output"]
    )  # the same output for the stages after it

    stale = evaluate.plan(load_recipe(tmp_path / "recipe.yaml", ["eval.shard_problems=1", "seed=1"]), "before")
    evaluate.run_shards(before, [0], ScriptedEngine(transcripts(ids.script())))  # shards of the old settings
    with pytest.raises(UserError, match="holds no shards of this run's settings"):
        evaluate.run_shards(stale, [0], engine)
    assert evaluate.missing_shards(stale) == (3, [0, 1, 2])  # the submitter starts them over


def test_the_cluster_section_is_checked_with_the_fix(tmp_path: Path, policy: Path, capsys) -> None:
    make_recipe(tmp_path, policy, [SHORT])
    bad = {"time": "4 hours", "stage_time": {"trian": "1:00"}, "mem": "lots", "sbatch_lines": ["-x"]}
    assert cli.main(["validate", str(tmp_path / "recipe.yaml"), f"cluster={json.dumps({'slurm': bad})}"]) == 2
    err = capsys.readouterr().err
    assert "cluster.slurm.time = '4 hours': '4 hours' is not a Slurm time limit; write HH:MM:SS" in err
    assert "cluster.slurm.stage_time.trian" in err and "'eval-before'" in err
    assert "cluster.slurm.mem = 'lots'" in err and "cluster.slurm.sbatch_lines[0] = '-x'" in err
    loop = ["cluster={slurm: {}}", "loop.until_overlong=0.01"]
    assert cli.main(["validate", str(tmp_path / "recipe.yaml"), *loop]) == 2
    assert "the closed loop does not run through Slurm yet" in capsys.readouterr().err
    assert cli.main(["validate", str(tmp_path / "recipe.yaml"), "cluster={slurm: {nodes: 2}}"]) == 2
    assert "cluster.slurm.nodes = 2: training on several nodes runs torchrun on each (srun); set" in (
        capsys.readouterr().err
    )


def test_the_recipe_names_the_pipelines_stages() -> None:
    from length_control import pipeline
    from length_control.recipe import STAGE_NAMES

    assert list(STAGE_NAMES) == pipeline.STAGE_NAMES
