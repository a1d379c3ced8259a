"""The demo policy's stage-1 rows as it was trained on them, for an SFT mix that holds what stage 1 held.

    .envs/cpu/vllm/bin/python bench/stage1_rows.py OUT.parquet [--seed 0]
    ./run.sh run recipes/demo-cpu.yaml 'splice.sft_mix.dataset={path: OUT.parquet}' ...
    .envs/cpu/vllm/bin/python bench/stage1_rows.py OUT.parquet --smoke   # seconds (the unit tests run it)

The demo's `stage1_sft.parquet` holds the full conversations only. Stage 1
also trained "interrupted" ones (the thinking closed after a random line,
only the answer after `</think>` trained), which is where the policy learned
to answer after a close it did not write. This writes both kinds as
pre-tokenized rows (`input_ids`, `labels`: the full ones trained on the
assistant turn, the interrupted ones on what follows the close), drawn as
the build draws them, so that stage 2's mix can hold exactly what stage 1
trained; the README's "Stage 2 changes the stop and nothing else" compares
it with the shipped mix.

`--smoke`: the rows of a demo policy built on 12 conversations in 2 steps
(`smoke.TINY_DEMO`, seconds to build, cached like any build): the same code,
in seconds.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smoke import TINY_DEMO  # noqa: E402  (bench/smoke.py)

from length_control.chat import assistant_only_row  # noqa: E402
from length_control.contracts import IGNORE  # noqa: E402
from length_control.demo import task as demo_task  # noqa: E402
from length_control.demo.cache import cached_build  # noqa: E402
from length_control.demo.model import THINK_CLOSE, THINK_OPEN  # noqa: E402
from length_control.policy import load_tokenizer  # noqa: E402
from length_control.recipe import DemoModelSpec, ThinkTags  # noqa: E402
from length_control.think import ThinkTokens  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the demo policy's build seed (model.demo.seed)")
    parser.add_argument("--smoke", action="store_true", help="a demo policy of 12 conversations: seconds")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = DemoModelSpec(seed=args.seed, **(TINY_DEMO if args.smoke else {}))
    tokenizer = load_tokenizer(str(cached_build(spec) / "model"))
    think = ThinkTokens(tokenizer, ThinkTags())
    problems = demo_task.make_problems(spec.train_problems, spec.seed, prefix="sft")
    rows = [assistant_only_row(tokenizer, demo_task.sft_conversation(p, THINK_OPEN, THINK_CLOSE)) for p in problems]
    full = len(rows)
    rng = random.Random(spec.seed)  # the build's draws, in the build's order
    first = demo_task.SHORT_LINES.start
    for p in problems:
        if p.lines > first and rng.random() < spec.interrupted_share:
            conversation = [
                *demo_task.sft_conversation(p, THINK_OPEN, THINK_CLOSE)[:-1],
                {"role": "assistant", "content": p.interrupted(rng.randint(first, p.lines - 1))},
            ]
            ids, labels = assistant_only_row(tokenizer, conversation)
            start = next(i for i, label in enumerate(labels) if label != IGNORE)
            answer = start + think.find_close(ids[start:])[1]  # the close is context, the answer is trained
            rows.append((ids, [IGNORE] * answer + labels[answer:]))
    pq.write_table(
        pa.table({"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows]}), args.out
    )
    print(f"{args.out}: {full} full conversations, {len(rows) - full} interrupted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
