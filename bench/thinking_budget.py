"""Can vLLM's thinking budget close case 1 in one pass, exactly, and faster?

    .envs/cpu/vllm/bin/python bench/thinking_budget.py [--rounds 3]
    .envs/cpu/vllm/bin/python bench/thinking_budget.py --smoke   # one round at smoke size (the engine tests)

Case 1 of the recipe: cut the thinking at exactly B thinking tokens, append
`forced_close`, let the policy answer. Two ways, on the demo policy's 240
prompts, in one engine, alternating rounds:

- two passes (what `generate` does): max_tokens = B + 1 (the policy's
  `<think>` and B thinking tokens), then an answer pass on prompt + those
  tokens + the close for the traces that ran into B;
- one pass: `SamplingParams(thinking_token_budget=...)` with a
  `ReasoningConfig(reasoning_start_str="<think>", reasoning_end_str=forced_close)`.

vLLM counts the budget in tokens after `<think>`, as B is counted, so the
one-pass budget is B. Prints
how often the one-pass close sits where the two-pass rule puts it, then the
time ratio one-pass / two-pass last.

`--smoke`: one round of the demo recipe at smoke size (bench/smoke.py: a
tiny policy, 8 prompts): the same code; the engine start is most of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smoke import RECIPE_OVERRIDES  # noqa: E402  (bench/smoke.py)

from length_control.envs import engine_bin, engine_environ  # noqa: E402

SCRIPT = r"""
import json, sys, time

from length_control.cut import CutPolicy  # the toolkit's one rule
from length_control.recipe import ThinkTags
from length_control.think import ThinkTokens


def main():
    job = json.load(open(sys.argv[1]))
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config.reasoning import ReasoningConfig

    tags = ThinkTags(**job["think"])
    llm = LLM(model=job["model"], max_model_len=job["max_model_len"], seed=0, enable_chunked_prefill=False,
              reasoning_config=ReasoningConfig(reasoning_start_str=tags.open, reasoning_end_str=tags.forced_close))
    prompts, B = job["prompts"], job["budget"]
    rule = CutPolicy(ThinkTokens(AutoTokenizer.from_pretrained(job["model"]), tags), B)  # exact, as vLLM's budget
    first, forced = rule.first_pass_tokens, rule.think.forced_close_ids

    def params(seed, max_tokens, budget=None):
        return SamplingParams(max_tokens=max_tokens, seed=seed, temperature=0.6, top_p=0.95, top_k=20,
                              detokenize=False, thinking_token_budget=budget)

    def two_pass():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [params(i, first) for i in range(len(prompts))],
                            use_tqdm=False)
        closed = [(p, rule.close(list(o.outputs[0].token_ids)), i) for i, (p, o) in enumerate(zip(prompts, outs))
                  if o.outputs[0].finish_reason == "length"]
        cut = [(p, c, i) for p, c, i in closed if c.case == 1]
        llm.generate([{"prompt_token_ids": p + c.prefix()} for p, c, _ in cut],
                     [params(10_000 + i, job["answer_max_tokens"]) for _, _, i in cut], use_tqdm=False)
        return {i: c.prefix() for _, c, i in cut}  # the spliced outputs, up to their close

    def one_pass():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [params(i, first + len(forced) + job["answer_max_tokens"], budget=B)
                             for i in range(len(prompts))], use_tqdm=False)
        return {i: list(o.outputs[0].token_ids) for i, o in enumerate(outs)}

    times = {"two": [], "one": []}
    for _ in range(job["rounds"]):
        for name, fn in (("two", two_pass), ("one", one_pass)):
            started = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - started)
            if name == "two":
                expected = result
            else:
                got = result
    find_close = rule.think.find_close  # (start, end) of the first close tag
    exact = sum(find_close(got[i]) == find_close(spliced) for i, spliced in expected.items())
    print(json.dumps({"times": times, "case1": len(expected), "exact": exact}))


if __name__ == "__main__":
    main()
"""


def main() -> None:
    from length_control import demo, generate
    from length_control.policy import load_tokenizer, policy_path
    from length_control.recipe import load_recipe
    from length_control.think import ThinkTokens

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one round at smoke size (bench/smoke.py)")
    args = parser.parse_args()
    rounds = 1 if args.smoke else args.rounds
    recipe = demo.resolve(load_recipe(REPO / "recipes" / "demo-cpu.yaml", RECIPE_OVERRIDES if args.smoke else []))
    model = policy_path(recipe.model)
    tokenizer = load_tokenizer(model)
    think = ThinkTokens(tokenizer, recipe.model.think)
    requests, _ = generate.trace_requests(recipe, tokenizer, think, generate.load_prompts(recipe))
    job = {
        "model": model,
        "max_model_len": recipe.context_limit,
        "budget": recipe.budget,
        "rounds": rounds,
        "prompts": [r["prompt_token_ids"] for r in requests],
        "think": recipe.model.think.model_dump(),
        "answer_max_tokens": recipe.generation.answer_max_tokens,
    }
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        Path(scratch, "job.json").write_text(json.dumps(job))
        Path(scratch, "run.py").write_text(SCRIPT)
        result = subprocess.run(
            [str(engine_bin("vllm")), str(Path(scratch, "run.py")), str(Path(scratch, "job.json"))],
            capture_output=True,
            text=True,
            env=engine_environ(),
        )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    figures = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"times"')))
    two, one = (statistics.median(figures["times"][k]) for k in ("two", "one"))
    print(f"{len(requests)} prompts, budget {recipe.budget}, {figures['case1']} case-1 traces per round")
    print(f"one-pass close where the two-pass rule puts it: {figures['exact']}/{figures['case1']}")
    print(f"two passes {two:.2f} s, one pass {one:.2f} s (median of {rounds} rounds)")
    print(f"one pass / two passes: {one / two:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
