"""Our stage-2 build vs Axolotl's own chat-template + character-span preprocessing.

    .envs/cpu/vllm/bin/python bench/build_dataset.py [--copies 300] [--long-copies 10] [--long-tokens 30000]
    .envs/cpu/vllm/bin/python bench/build_dataset.py --recipe YOUR_RECIPE.yaml   # a finished run of your own
    .envs/cpu/vllm/bin/python bench/build_dataset.py --recipe A_SMALL_RUN.yaml --smoke   # seconds (the tests)

The samples are a finished run's case-1 traces (by default the demo's: run
`./run.sh demo` first). The demo's are taken at two lengths: as the demo
policy wrote them (B = 126 thinking tokens), repeated --copies times, and
stretched to --long-tokens thinking tokens (the report's B = 30,000) by
repeating each trace's own numbered lines, repeated --long-copies times.
Our side: `length-control splice` as a command (token ids in, token ids
out). Axolotl's side, what a user would otherwise hand-roll: decode every
sample to text, write chat `messages` whose assistant turn carries a
`training_detail` character span on `</think>`, and run `axolotl preprocess`
with `type: chat_template`, `train_on_eos: turn` (so `</think>` and the EOS
are trained, as ours). Both are timed as whole commands, alternately. Also
printed: the share of samples whose text round trip (decode, then encode
again) does not give back the policy's tokens, i.e. rows the text path
would silently change, on the demo's tokenizer and then, on generated math
and code thinking, on each real tokenizer (`bench/text_round_trip.py`).
The ratios are printed last.

`--smoke` (seconds; the unit tests run it on a scripted run of a few
traces) takes the run's samples once, and once stretched, times one round
of our command only, and prints the text round trip of two samples:
`axolotl preprocess` is not started (its start alone takes ~30 s), so no
ratio is printed; its chat rows and config are built all the same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from length_control import contracts, demo, generate  # noqa: E402
from length_control.artifacts import Stage  # noqa: E402
from length_control.envs import engine_bin, engine_environ  # noqa: E402
from length_control.policy import load_tokenizer, policy_path  # noqa: E402
from length_control.recipe import load_recipe  # noqa: E402
from length_control.train import render_config  # noqa: E402

import text_round_trip  # noqa: E402

DEMO = REPO / "recipes" / "demo-cpu.yaml"


def case1_samples(generate_dir: Path, budget: int, thinking_tokens: int) -> list[tuple[dict, dict]]:
    """The run's finished case-1 (trace, answer) pairs, the thinking stretched to `thinking_tokens`.

    A demo trace is "<think>", "\\n", then numbered lines; a longer one
    repeats those lines, so the text stays what the policy writes.
    """
    traces = {(t["prompt_id"], t["sample"]): t for t in contracts.read_shards(generate_dir, "traces")}
    pairs = []
    for answer in contracts.read_shards(generate_dir, "answers"):
        if answer["case"] != 1 or answer["finish_reason"] != "stop":
            continue
        trace = dict(traces[(answer["prompt_id"], answer["sample"])])
        thinking = trace["output_token_ids"][: answer["close_at"]]  # "<think>" and B thinking tokens
        if thinking_tokens > budget:
            lines = thinking[2:] + answer["close_token_ids"][:1]  # the forced close starts with the line's "\n"
            thinking = thinking[:2] + [lines[i % len(lines)] for i in range(thinking_tokens - 1)]
        trace["output_token_ids"] = thinking
        pairs.append((trace, {**answer, "close_at": len(thinking)}))
    return pairs


def write_shards(pairs: list[tuple[dict, dict]], target: Path, copies: int, termination: Path, budget: int) -> None:
    """A finished generate folder holding the pairs `copies` times (prompt ids made unique), one shard per copy.

    Its manifest is a stage's own (`Stage.finish`): splice reads the folder's output fingerprint, and from its
    config the budget its traces were cut at.
    """

    def tag(record: dict, copy: int) -> dict:
        return {**record, "prompt_id": f"{record['prompt_id']}/{copy}"}

    target.mkdir(parents=True)
    for copy in range(copies):
        contracts.write_records(
            contracts.shard_path(target, "answers", copy), [tag(a, copy) for _, a in pairs], contracts.ANSWERS
        )
        contracts.write_records(
            contracts.shard_path(target, "traces", copy), [tag(t, copy) for t, _ in pairs], contracts.TRACES
        )
    shutil.copy(termination, target / contracts.TERMINATION)
    Stage(target, inputs={}, config={"budget": budget}, versions={}).finish(
        traces=len(pairs) * copies, ended_within_budget=0
    )


def chat_rows(pairs: list[tuple[dict, dict]], recipe, tokenizer) -> tuple[list[dict], int]:
    """Chat rows with a `</think>` character span, and how many samples do not survive a text round trip."""
    prompts = {p["id"]: p for p in generate.load_prompts(recipe)}
    close = recipe.model.think.close
    rows, inexact = [], 0
    for trace, answer in pairs:
        thinking = tokenizer.decode(trace["output_token_ids"])
        ids = trace["output_token_ids"] + answer["close_token_ids"] + answer["answer_token_ids"][:-1]
        text = tokenizer.decode(ids)
        full = trace["prompt_token_ids"] + ids + answer["answer_token_ids"][-1:]
        inexact += tokenizer.encode(tokenizer.decode(full), add_special_tokens=False, verbose=False) != full
        start = text.index(close, len(thinking))
        rows.append(
            {
                "messages": prompts[answer["prompt_id"]]["messages"]
                + [
                    {
                        "role": "assistant",
                        "content": text,
                        "training_detail": [
                            {"begin_offset": start, "end_offset": start + len(close) - 1, "train": True}
                        ],
                    }
                ]
            }
        )
    return rows, inexact


def compare(
    pairs, chat, *, copies: int, recipe: Path, model: str, generate_dir: Path, rounds: int, axolotl: bool = True
) -> dict:
    """Median seconds of both whole commands on the same samples, run alternately (ours alone without
    `axolotl`)."""
    longest = max(
        len(t["prompt_token_ids"]) + len(t["output_token_ids"]) + len(a["close_token_ids"]) + len(a["answer_token_ids"])
        for t, a in pairs
    )
    sequence_len = longest + 8  # room for what the chat template adds after the EOS ("\n")
    budget = len(pairs[0][0]["output_token_ids"])
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        scratch = Path(scratch)
        run = scratch / "run"
        write_shards(pairs, run / "generate", copies, generate_dir / contracts.TERMINATION, budget)
        chat_path = scratch / "chat.jsonl"
        with chat_path.open("w") as out:
            for _ in range(copies):
                out.writelines(json.dumps(row) + "\n" for row in chat)
        config = render_config(
            REPO / "axolotl_configs" / "cpu-tiny.yaml",
            base_model=model,
            datasets=[chat_path],
            output_dir=scratch / "out",
            sequence_len=sequence_len,
            prepared_root=scratch / "prepared",
        )
        config["datasets"] = [
            {
                "path": str(chat_path),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "message_field_training_detail": "training_detail",
                "roles_to_train": [],
                "train_on_eos": "turn",
            }
        ]
        (scratch / "axolotl.yaml").write_text(yaml.safe_dump(config))
        commands = {
            "ours": [
                str(engine_bin("vllm", "length-control")),
                "splice",
                str(recipe),
                f"output_dir={run}",
                f"budget={budget}",
                f"context_limit={sequence_len + 1}",
                f"train.overrides.sequence_len={sequence_len}",
                f"splice.max_answer_tokens={sequence_len}",
                "splice.sft_mix=null",
            ],  # every sample kept, as on Axolotl's side
            "axolotl": [str(engine_bin("axolotl", "axolotl")), "preprocess", str(scratch / "axolotl.yaml")],
        }
        if not axolotl:
            del commands["axolotl"]
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, command in commands.items():
                shutil.rmtree(run / "stage2", ignore_errors=True)
                shutil.rmtree(scratch / "prepared", ignore_errors=True)
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env=engine_environ(), cwd=scratch)
                times[name].append(time.perf_counter() - started)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
                if name == "ours" and f"rows {len(pairs) * copies}," not in done.stdout:
                    raise SystemExit(f"ours did not keep every sample: {done.stdout}")
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=DEMO, help="a finished run's recipe (default: the demo's)")
    parser.add_argument("--copies", type=int, help="repeats of the run's samples (default: 300 for the demo, else 1)")
    parser.add_argument("--long-copies", type=int, default=10, help="repeats of the stretched demo samples")
    parser.add_argument("--long-tokens", type=int, default=30000, help="thinking tokens of a stretched demo sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: the samples once (and once stretched), one round, ours alone, a tiny text "
        "round trip (for the tests)",
    )
    args = parser.parse_args()
    is_demo = args.recipe.resolve() == DEMO
    if args.smoke:
        args.copies, args.long_copies, args.rounds = 1, 1, 1
    recipe = demo.resolve(load_recipe(args.recipe))
    source = recipe.output_dir / "generate"
    if not (source / "manifest.json").is_file():
        raise SystemExit(f"{source} is not a finished generate stage: run `./run.sh run {args.recipe}` first")
    model = policy_path(recipe.model)
    tokenizer = load_tokenizer(model)

    settings = [(recipe.budget, args.copies or (300 if is_demo else 1))]
    if is_demo or args.smoke:  # stretching repeats the demo's numbered lines; a real run's traces are long already
        settings.append((args.long_tokens, args.long_copies))
    results = []
    for thinking, copies in settings:
        pairs = case1_samples(source, recipe.budget, thinking)
        if not pairs:
            raise SystemExit(f"{source} has no finished case-1 sample to compare")
        chat, inexact = chat_rows(pairs, recipe, tokenizer)
        seconds = compare(
            pairs,
            chat,
            copies=copies,
            recipe=args.recipe.resolve(),
            model=model,
            generate_dir=source,
            rounds=args.rounds,
            axolotl=not args.smoke,
        )
        tokens = copies * sum(len(t["output_token_ids"]) for t, _ in pairs)
        axolotl = (
            f"axolotl {seconds['axolotl']:.1f} s" if "axolotl" in seconds else "axolotl preprocess not run (--smoke)"
        )
        print(
            f"{len(pairs) * copies} samples of {thinking:,} thinking tokens ({len(pairs)} case-1 traces "
            f"x {copies}, {tokens / 1e6:.1f}M thinking tokens): ours {seconds['ours']:.1f} s, {axolotl} "
            f"(medians of {args.rounds}, whole commands); text round trip not "
            f"token-exact: {inexact}/{len(pairs)} ({100 * inexact / len(pairs):.1f} %)"
        )
        if "axolotl" in seconds:
            results.append((thinking, seconds["axolotl"] / seconds["ours"]))
    print("\nThe same on real tokenizers (bench/text_round_trip.py), on math and code thinking text:")
    settings = (
        dict(samples=2, budget=64, chunk_chars=16, chars=600, seed=0)
        if args.smoke
        else dict(samples=200, budget=512, chunk_chars=16, chars=4000, seed=0)
    )
    text_round_trip.print_table(text_round_trip.damage(**settings), **settings)
    for thinking, ratio in results:
        print(
            f"axolotl chat_template + train_detail / ours at {thinking:,} thinking tokens: {ratio:.1f}x "
            f"(target >= 20x: {'met' if ratio >= 20 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
