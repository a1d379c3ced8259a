"""The demo task: a gradable problem whose natural thinking length grows with it.

"Count down from 303 to 300: how many numbers do you say?": the thinking
counts, one numbered line per number, and the answer is the last line's
number:

    Count down from 303 to 300. How many numbers do you say?
    <think>
    01:303
    02:302
    03:301
    04:300
    </think>

    The answer is 4.

Every line is 7 tokens (digits are single tokens in a Qwen2-style
tokenizer), and the prompt is the same length for every problem, so the
distance counted alone sets how long the policy thinks: a long count runs
past any context limit, as the report's 14B model did on hard problems. Each
line needs only the line before it (one up on the left, one down on the
right, stop at a round hundred), which a model of a few hundred thousand
parameters learns in minutes on a CPU: the arithmetic is easy on purpose,
since all the demo needs is thinking whose length grows with the problem and
an answer that comes after it. The line number stands in for a large model's
sense of how long it has been thinking: it is what lets a tiny model learn,
in stage 2, where its budget ends.

Problem sizes come in two bands: counts short enough to finish well inside
the demo's context limit, and counts too long for it. Real traces vary in
length for the same problem; these do not, so a band of sizes whose thinking
lies between the budget and the limit would turn into a wall of lost answers
after stage 2, an artefact of the toy. The gap between the bands keeps the
demo about what the report measured.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from length_control.artifacts import write_text_atomic

SHORT_LINES = range(3, 23)  # finish well inside the demo's context limit
LONG_LINES = range(34, 49)  # run past it
LONG_SHARE = 0.45
ANSWER_PREFIX = "The answer is "


@dataclass(frozen=True)
class Problem:
    id: str
    start: int  # the count runs down to the round hundred below: 347 -> 300

    @property
    def stop(self) -> int:
        return self.start // 100 * 100

    @property
    def question(self) -> str:
        return f"Count down from {self.start} to {self.stop}. How many numbers do you say?"

    @property
    def answer(self) -> str:
        return str(self.lines)

    @property
    def lines(self) -> int:
        return self.start - self.stop + 1

    def thinking(self) -> str:
        """The full reasoning, one numbered line per number (without the think tags)."""
        values = range(self.start, self.stop - 1, -1)
        return "\n".join(f"{i:02d}:{value:03d}" for i, value in enumerate(values, start=1))

    def response(self, think_open: str = "<think>", think_close: str = "</think>") -> str:
        """The assistant message of the stage-1 SFT data: thinking, then the answer."""
        return f"{think_open}\n{self.thinking()}\n{think_close}\n\n{ANSWER_PREFIX}{self.answer}."

    def interrupted(self, lines: int, think_open: str = "<think>", think_close: str = "</think>") -> str:
        """The thinking closed after `lines` lines, answered with the count so far (a best guess).

        Stage 1 trains only the answer of these (the close is given, never
        learned), as a large model learns to answer after a `</think>`
        wherever it comes: what the forced close of stage 2 relies on.
        """
        partial = "\n".join(self.thinking().split("\n")[:lines])
        return f"{think_open}\n{partial}\n{think_close}\n\n{ANSWER_PREFIX}{lines}."

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "answer": self.answer, "lines": self.lines}


def make_problems(count: int, seed: int, prefix: str, long_share: float = LONG_SHARE) -> list[Problem]:
    """`count` problems, deterministic for (`seed`, `prefix`); line counts from the two bands."""
    rng = random.Random(f"{prefix}:{seed}")
    problems = []
    for i in range(count):
        lines = rng.choice(LONG_LINES if rng.random() < long_share else SHORT_LINES)
        problems.append(Problem(f"{prefix}-{i:05d}", start=100 * rng.randint(1, 9) + lines - 1))
    return problems


def sft_conversation(problem: Problem, think_open: str, think_close: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "content": problem.response(think_open, think_close)},
    ]


# Shipped prompt sets (prompts_sources/data/), regenerated with
#   python -m length_control.demo_task prompts_sources/data
# Seeds differ from the stage-1 SFT set's, so no eval problem is a training one by construction.
SHIPPED = {"demo_train.jsonl": (240, 1001, "train"), "demo_eval.jsonl": (60, 2002, "eval")}


def shipped_records(name: str) -> list[dict[str, Any]]:
    count, seed, prefix = SHIPPED[name]
    return [problem.record() for problem in make_problems(count, seed, prefix)]


def write_prompt_files(folder: Path) -> None:
    for name in SHIPPED:
        lines = "".join(json.dumps(record) + "\n" for record in shipped_records(name))
        write_text_atomic(Path(folder) / name, lines)


if __name__ == "__main__":
    write_prompt_files(Path(sys.argv[1]))
