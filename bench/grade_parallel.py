"""Grading on all cores: the same code samples graded serially and in the process pool.

    .envs/cpu/vllm/bin/python bench/grade_parallel.py [--samples 96] [--tests 12] [--rounds 3]
    .envs/cpu/vllm/bin/python bench/grade_parallel.py --smoke   # seconds (the unit tests run it)

LiveCodeBench-shaped samples (stdin problems with `--tests` tests each, a few
thousand numbers a test; two in three right, the rest wrong from the first test),
graded through `grading.grade_many` in the sandbox: `workers=1` (one process,
one sample after the other) and the default (one process per core), in
alternating rounds. Each round also times a pure-CPU reference (Python loops,
one after the other and one per core at once): its ratio is what the machine
could give at that moment, as other work on the cores lowers both. Prints each
side's median, the cost per test case run, and the two ratios last.

`--smoke`: 3 samples of 2 tests, one round, a reference loop a fifteenth as
long: the same code, in seconds; its ratios say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from length_control.grading import grade_many  # noqa: E402

RIGHT = """
n = int(input())
values = list(map(int, input().split()))
values.sort()
print(sum(v * v for v in values[: n // 2]) % 1_000_000_007)
"""
WRONG = RIGHT.replace("values.sort()", "values.sort(reverse=True)")


def samples(count: int, tests: int, seed: int = 0) -> tuple[list[tuple[str, str, str]], int]:
    """(grader, answer, reference) jobs, and how many test cases grading them runs (stops at a failure)."""
    rng = random.Random(seed)
    jobs, runs = [], 0
    for number in range(count):
        cases = []
        for _ in range(tests):
            n = rng.randrange(2000, 6000)
            values = [rng.randrange(-(10**6), 10**6) for _ in range(n)]
            answer = sum(v * v for v in sorted(values)[: n // 2]) % 1_000_000_007
            cases.append(
                {"input": f"{n}\n{' '.join(map(str, values))}\n", "output": f"{answer}\n", "testtype": "stdin"}
            )
        right = number % 3 != 2
        program = RIGHT if right else WRONG
        runs += tests if right else 1  # a wrong program fails its first test
        reference = json.dumps({"tests": cases, "func_name": None})
        jobs.append(("code", f"Sort, then sum.\n```python\n{program}\n```\n", reference))
    return jobs, runs


def cpu_reference(cores: int, iterations: int = 3_000_000) -> tuple[float, float]:
    """Seconds for 2 x `cores` CPU-bound Python processes one after the other, then `cores` at a time."""
    loop = [sys.executable, "-c", f"total = 0\nfor i in range({iterations}): total += i"]
    started = time.perf_counter()
    for _ in range(2 * cores):
        subprocess.run(loop, check=True)
    serial = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(2):
        for process in [subprocess.Popen(loop) for _ in range(cores)]:
            process.wait()
    return serial, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--tests", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="3 samples of 2 tests, one round: seconds")
    args = parser.parse_args()
    iterations = 3_000_000
    if args.smoke:
        args.samples, args.tests, args.rounds, iterations = 3, 2, 1, 200_000
    jobs, runs = samples(args.samples, args.tests)
    load = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    times: dict[str, list[float]] = {"serial": [], "parallel": []}
    verdicts, references = {}, []
    for _ in range(args.rounds):
        serial, parallel = cpu_reference(cores, iterations)
        references.append(serial / parallel)
        for name, workers in (("serial", 1), ("parallel", None)):
            started = time.perf_counter()
            grades = grade_many(jobs, workers=workers)
            times[name].append(time.perf_counter() - started)
            verdicts[name] = [g.correct for g in grades]
    assert verdicts["serial"] == verdicts["parallel"], "the two sides disagree"
    serial, parallel = statistics.median(times["serial"]), statistics.median(times["parallel"])
    print(
        f"{args.samples} samples, {runs} test cases run, {sum(verdicts['serial'])} right; {cores} cores, "
        f"load average {load:.1f} at the start"
    )
    print(
        f"serial   {serial:6.2f} s  ({serial / runs * 1000:.1f} ms per test case, "
        f"{serial / args.samples * 1000:.0f} ms per sample)"
    )
    print(f"parallel {parallel:6.2f} s  ({cores} processes)")
    print(
        f"serial / parallel: {serial / parallel:.2f}x (median of {args.rounds} alternating rounds); "
        f"pure-CPU reference: {statistics.median(references):.2f}x"
    )


if __name__ == "__main__":
    main()
