"""Do the stage-2 build and generate's bookkeeping stream? Peak memory at two sizes of long traces.

    .envs/cpu/vllm/bin/python bench/splice_memory.py [--small 200] [--large 2000] [--tokens 30000]
    .envs/cpu/vllm/bin/python bench/splice_memory.py --smoke   # seconds (the unit tests run it)

Writes synthetic generate shards (256 traces each, as the generate stage
does) of case-1 traces with `--tokens` output tokens drawn from a
Qwen3-sized vocabulary (151,669 ids; `</think>` = 151668, `<|im_end|>` =
151645, as in Qwen3's tokenizer), then, each in a fresh process, splices
each set and computes the generate stage's summary of it (the counts its
manifest holds), and reports that process's peak resident memory (its
VmHWM). Flat means the large/small ratio stays near 1 while the data grows
10x; printed last.

`--smoke`: 3 and 6 traces of 200 tokens: the same code, in seconds; at that
size the ratio measures the interpreter, not the build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THINK_CLOSE, NEWLINE, EOS = 151668, 198, 151645

WORKER = r"""
import json, sys, time
from collections import Counter
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from length_control import contracts, splice
from length_control.recipe import SpliceSpec


class Recipe:  # the settings the row builder reads (no sequence_len: nothing is cut)
    budget = int(sys.argv[2])
    splice = SpliceSpec()
    conditioning = None


started = time.perf_counter()
stats = Counter()
folder = Path(sys.argv[1])
if sys.argv[4] == "summary":
    from length_control import generate

    summary = {"rows": generate.summarize(folder)["traces"]}
else:
    rows = splice.length_rows(folder, Recipe, contracts.read_termination(folder), None, stats)
    summary = splice.write_dataset(folder / "stage2", rows, mix_rows=lambda n: iter(()), stats=stats)
# VmHWM, not ru_maxrss: ru_maxrss survives exec and starts at the parent's size at fork.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rows": summary["rows"], "seconds": time.perf_counter() - started, "peak_mb": peak_kb / 1024}))
"""


def write_shards(folder: Path, traces: int, tokens: int, seed: int = 0) -> None:
    """A finished generate folder of `traces` case-1 traces, each cut after `tokens` thinking tokens (its
    manifest is a stage's own: splice reads from it the budget the traces were cut at)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from length_control import contracts
    from length_control.artifacts import Stage
    from length_control.think import Termination

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, traces, 256)):
        count = min(256, traces - start)
        prompts = [rng.integers(0, 150_000, 200, dtype=np.int32).tolist() for _ in range(count)]
        outputs = [rng.integers(0, 150_000, tokens, dtype=np.int32).tolist() for _ in range(count)]
        ids = [f"p{start + i}" for i in range(count)]
        traces_table = pa.Table.from_pylist(
            [
                {
                    "prompt_id": i,
                    "sample": 0,
                    "prompt_token_ids": p,
                    "output_token_ids": o,
                    "finish_reason": "length",
                    "think_close": None,
                    "seed": 0,
                }
                for i, p, o in zip(ids, prompts, outputs)
            ],
            schema=contracts.TRACES,
        )
        answers_table = pa.Table.from_pylist(
            [
                {
                    "prompt_id": i,
                    "sample": 0,
                    "case": 1,
                    "close_at": tokens,
                    "cut_back": 0,
                    "thinking_start": 0,
                    "close_token_ids": [NEWLINE, THINK_CLOSE],
                    "answer_token_ids": rng.integers(0, 150_000, 300, dtype=np.int32).tolist() + [EOS],
                    "finish_reason": "stop",
                }
                for i in ids
            ],
            schema=contracts.ANSWERS,
        )
        pq.write_table(answers_table, folder / f"answers-{shard:05d}.parquet")
        pq.write_table(traces_table, folder / f"traces-{shard:05d}.parquet")
    termination = Termination(eos_id=EOS, forced_close_ids=[NEWLINE, THINK_CLOSE], forced_close_tag_start=1)
    contracts.write_termination(folder, termination)
    Stage(folder, inputs={}, config={"budget": tokens}, versions={}).finish(traces=traces, ended_within_budget=0)


def measure(folder: Path, budget: int, scratch: Path, job: str) -> dict:
    script = scratch / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(budget), str(REPO), job], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=30000)
    parser.add_argument("--smoke", action="store_true", help="3 and 6 traces of 200 tokens: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.small, args.large, args.tokens = 3, 6, 200
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        results = {}
        for name, traces in (("small", args.small), ("large", args.large)):
            folder = Path(scratch) / name
            write_shards(folder, traces, args.tokens)
            for job in ("splice", "summary"):
                results[name, job] = r = measure(folder, args.tokens, Path(scratch), job)
                print(
                    f"{job}: {traces} traces x {args.tokens} tokens: {r['rows']} rows in {r['seconds']:.1f} s, "
                    f"peak {r['peak_mb']:.0f} MB"
                )
    for job, what in (("splice", "the stage-2 build"), ("summary", "generate's bookkeeping")):
        ratio = results["large", job]["peak_mb"] / results["small", job]["peak_mb"]
        print(
            f"peak memory of {what}, {args.large} / {args.small} traces: {ratio:.2f} "
            f"(flat = near 1, for {args.large / args.small:.0f}x the data)"
        )


if __name__ == "__main__":
    main()
