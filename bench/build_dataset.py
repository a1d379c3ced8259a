"""Our stage-2 build vs Axolotl's own chat-template + character-span preprocessing.

    .envs/vllm/bin/python bench/build_dataset.py [--copies 40]

The samples are the demo run's own case-1 traces (run `./run.sh demo` first),
each repeated --copies times. Our side: `length-control splice` as a command
(token ids in, token ids out). Axolotl's side, what a user would otherwise
hand-roll: decode every sample to text, write chat `messages` whose assistant
turn carries a `training_detail` character span on `</think>`, and run
`axolotl preprocess` with `type: chat_template`, `train_on_eos: turn` (so
`</think>` and the EOS are trained, as ours). Both are timed as whole
commands, alternately. Also printed: the share of samples whose text round
trip (decode, then encode again) does not give back the policy's tokens,
i.e. rows the text path would silently change. The ratio is printed last.
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

from length_control import generate  # noqa: E402
from length_control.envs import engine_bin, engine_environ  # noqa: E402
from length_control.policy import load_tokenizer, policy_path  # noqa: E402
from length_control.recipe import load_recipe  # noqa: E402
from length_control.think import ThinkTokens  # noqa: E402
from length_control.train import render_config  # noqa: E402


def replicate(source: Path, target: Path, copies: int) -> None:
    """The run's generate shards, each written `copies` times (prompt ids made unique)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.mkdir(parents=True)
    traces, answers = generate.read_shards(source, "traces"), generate.read_shards(source, "answers")
    for copy in range(copies):
        tag = lambda rows: [{**r, "prompt_id": f"{r['prompt_id']}/{copy}"} for r in rows]  # noqa: E731
        pq.write_table(pa.Table.from_pylist(tag(answers), schema=generate._schema("answers")),
                       target / f"answers-{copy:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(tag(traces), schema=generate._schema("traces")),
                       target / f"traces-{copy:05d}.parquet")
    for name in ("manifest.json", generate.TERMINATION):
        shutil.copy(source / name, target / name)


def chat_samples(recipe, tokenizer, think: ThinkTokens, generate_dir: Path) -> tuple[list[dict], int]:
    """Chat rows with a `</think>` character span, and how many samples do not survive a text round trip."""
    traces = {(t["prompt_id"], t["sample"]): t for t in generate.read_shards(generate_dir, "traces")}
    prompts = {p["id"]: p for p in generate.load_prompts(recipe)}
    rows, inexact = [], 0
    for answer in generate.read_shards(generate_dir, "answers"):
        if answer["case"] != 1 or answer["finish_reason"] != "stop":
            continue
        trace = traces[(answer["prompt_id"], answer["sample"])]
        ids = trace["output_token_ids"][: recipe.budget] + answer["close_token_ids"] + answer["answer_token_ids"][:-1]
        text = tokenizer.decode(ids)
        full = trace["prompt_token_ids"] + ids + [think.eos_id]
        inexact += tokenizer.encode(tokenizer.decode(full), add_special_tokens=False) != full
        start = text.index(recipe.model.think.close, len(tokenizer.decode(trace["output_token_ids"][: recipe.budget])))
        rows.append({"messages": prompts[answer["prompt_id"]]["messages"] + [
            {"role": "assistant", "content": text,
             "training_detail": [{"begin_offset": start, "end_offset": start + len(recipe.model.think.close) - 1,
                                  "train": True}]}]})
    return rows, inexact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    demo = load_recipe(REPO / "recipes" / "demo-cpu.yaml")
    source = demo.output_dir / "generate"
    if not (source / "manifest.json").is_file():
        raise SystemExit("run ./run.sh demo first: the bench uses the demo run's traces")
    model = policy_path(demo.model)
    tokenizer = load_tokenizer(model)
    think = ThinkTokens(tokenizer, demo.model.think)
    rows, inexact = chat_samples(demo, tokenizer, think, source)

    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        run = Path(scratch) / "run"
        replicate(source, run / "generate", args.copies)
        chat = Path(scratch) / "chat.jsonl"
        chat.write_text("".join(json.dumps(r) + "\n" for r in rows * args.copies))
        config = render_config(REPO / "axolotl_configs" / "cpu-tiny.yaml", base_model=model, datasets=[chat],
                               output_dir=Path(scratch) / "out", sequence_len=512,
                               prepared_root=Path(scratch) / "prepared")
        config["datasets"] = [{"path": str(chat), "ds_type": "json", "type": "chat_template", "field_messages": "messages",
                               "message_field_training_detail": "training_detail", "roles_to_train": [],
                               "train_on_eos": "turn"}]
        (Path(scratch) / "axolotl.yaml").write_text(yaml.safe_dump(config))
        # The toolkit's splice on the replicated shards (the generate manifest is copied, so it is "finished").
        ours_cmd = [str(engine_bin("vllm", "length-control")), "splice", str(REPO / "recipes" / "demo-cpu.yaml"),
                    f"output_dir={run}", "splice.sft_mix=null"]
        theirs_cmd = [str(engine_bin("axolotl", "axolotl")), "preprocess", str(Path(scratch) / "axolotl.yaml")]
        times = {"ours": [], "axolotl": []}
        for _ in range(args.rounds):
            for name, command in (("ours", ours_cmd), ("axolotl", theirs_cmd)):
                shutil.rmtree(run / "stage2", ignore_errors=True)
                shutil.rmtree(Path(scratch) / "prepared", ignore_errors=True)
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env=engine_environ(), cwd=scratch)
                times[name].append(time.perf_counter() - started)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["axolotl"])
    print(f"{len(rows) * args.copies} samples ({len(rows)} case-1 demo traces x {args.copies})")
    print(f"text round trip not token-exact: {inexact}/{len(rows)} samples ({100 * inexact / max(1, len(rows)):.1f} %)")
    print(f"ours {ours:.1f} s, axolotl chat_template + train_detail {theirs:.1f} s (medians of {args.rounds}, whole commands)")
    print(f"axolotl / ours: {theirs / ours:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
