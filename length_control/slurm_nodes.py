"""How a multi-node training job starts torchrun on every node it holds (`cluster.slurm.nodes` above 1).

Apart from `slurm.py`, which plans and submits the whole run and so imports every stage: training (`train.py`)
asks only for this launch prefix, and must not import the pipeline it is a stage of.
"""

from __future__ import annotations

from length_control.artifacts import write_text_atomic
from length_control.contracts import RunLayout
from length_control.recipe import Recipe, SlurmSpec

NODE_LAUNCHER = "torchrun-node.sh"  # what srun starts on every node of a multi-node training job


def on_every_node(recipe: Recipe) -> list[str]:
    """The prefix that starts a command on every node of a multi-node training job, one task a node: srun and
    the node launcher, which hands torchrun this node's rank and the job's rendezvous (`node_launcher`). Axolotl's
    `train --launcher torchrun` goes after it; the 2-node test runs a torch.distributed step after the same."""
    nodes = recipe.cluster.slurm.nodes
    launcher = RunLayout(recipe.output_dir).slurm / NODE_LAUNCHER
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", str(launcher)]


def write_node_launcher(recipe: Recipe) -> None:
    """The node launcher where `on_every_node` starts it (training writes it too: a chain submitted by hand from
    the dry run's scripts has none)."""
    path = RunLayout(recipe.output_dir).slurm / NODE_LAUNCHER
    write_text_atomic(path, node_launcher(recipe.cluster.slurm))
    path.chmod(0o755)


def node_launcher(slurm: SlurmSpec) -> str:
    """The script srun starts on every node of a multi-node job: the command after it, with torchrun's settings
    for this node in the environment, where torchrun reads them (PET_<OPTION>): the job's nodes, this node's rank
    (SLURM_NODEID), the processes a node (one a GPU), and the rendezvous at the job's first node by its address
    (`scontrol show node`: node names need not resolve), on a port of the job's own."""
    return (
        "\n".join(
            [
                "#!/bin/bash",
                "# Started by srun once on every node of a multi-node training job: runs its arguments with torchrun's",
                "# settings for this node (torchrun reads PET_<OPTION> for --<option>).",
                "set -euo pipefail",
                'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                'export PET_NNODES="$SLURM_NNODES"',
                'export PET_NODE_RANK="$SLURM_NODEID"',
                f"export PET_NPROC_PER_NODE={slurm.gpus_per_node or 1}",
                'export PET_MASTER_ADDR="$(scontrol show node "$first" | grep -o \'NodeAddr=[^ ]*\' | cut -d= -f2)"',
                "export PET_MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
                'echo "[slurm] node $SLURM_NODEID of $SLURM_NNODES ($SLURMD_NODENAME),"'
                ' "rendezvous at $PET_MASTER_ADDR:$PET_MASTER_PORT"',
                'exec "$@"',
            ]
        )
        + "\n"
    )
