"""The demo task: a gradable problem whose natural thinking length grows with it.

"Count down from 311 to 300: how many numbers do you say?": the thinking
counts, one numbered line per number, and the answer is the last line's
number:

    Count down from 311 to 300. How many numbers do you say?
    <think>
    01:311
    02:310
    ...
    12:300
    </think>

    The answer is 12.

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

Two kinds of problem, so the demo's report has both rows of the real table.
Their thinking is the same count (only the separator differs); what they ask
of it differs:

- `count` ("How many numbers do you say?"): the answer is the last line's
  number, so it exists only at the end of the thinking. A cut is fatal: an
  answer after a forced close is the count so far, which is wrong, as a
  truncated real trace on a hard problem usually is.
- `check` ("Which number do you stop at?", lines written `01=303`): the
  answer is in reach from the first line (every line carries the hundreds
  digit, and the count stops at the round hundred), and the rest of the count
  only confirms it: overthinking, what real reasoning models do on problems
  they have already solved. A cut loses nothing: after a forced close the
  policy still answers right, so closing an overlong trace turns a lost
  answer into a right one, as the report's LiveCodeBench column shows.

The separator tells the kinds apart on every line, so the answer depends on
the last line only: a model of this size does not learn to look back from
the answer to the question's wording within a few CPU minutes.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from length_control.artifacts import write_text_atomic

# At least 10 lines: every count the policy answers with is a two-digit line number, copied as it
# stands (stripping a leading zero is one more rule a tiny model learns slowly).
SHORT_LINES = range(10, 15)  # finish well inside the demo's budget and context limit
LONG_LINES = range(22, 29)  # run past the context limit
LONG_SHARE = 0.45
ANSWER_PREFIX = "The answer is "
KINDS = ("count", "check")
QUESTIONS = {"count": "How many numbers do you say?", "check": "Which number do you stop at?"}
SEPARATORS = {"count": ":", "check": "="}


@dataclass(frozen=True)
class Problem:
    id: str
    start: int  # the count runs down to the round hundred below: 347 -> 300
    kind: Literal["count", "check"] = "count"

    @property
    def stop(self) -> int:
        return self.start // 100 * 100

    @property
    def question(self) -> str:
        return f"Count down from {self.start} to {self.stop}. {QUESTIONS[self.kind]}"

    @property
    def answer(self) -> str:
        return str(self.lines if self.kind == "count" else self.stop)

    @property
    def lines(self) -> int:
        return self.start - self.stop + 1

    def thinking(self) -> str:
        """The full reasoning, one numbered line per number (without the think tags)."""
        values = range(self.start, self.stop - 1, -1)
        separator = SEPARATORS[self.kind]
        return "\n".join(f"{i:02d}{separator}{value:03d}" for i, value in enumerate(values, start=1))

    def response(self, think_open: str = "<think>", think_close: str = "</think>") -> str:
        """The assistant message of the stage-1 SFT data: thinking, then the answer."""
        return f"{think_open}\n{self.thinking()}\n{think_close}\n\n{ANSWER_PREFIX}{self.answer}."

    def interrupted(self, lines: int, think_open: str = "<think>", think_close: str = "</think>") -> str:
        """The thinking closed after `lines` lines, answered with the best guess so far.

        For `count`, the count so far (wrong); for `check`, the round hundred
        the count is heading for (right). Stage 1 trains only the answer of these (the close
        is given, never learned), as a large model learns to answer after a
        `</think>` wherever it comes: what the forced close of stage 2 relies on.
        """
        partial = "\n".join(self.thinking().split("\n")[:lines])
        guess = lines if self.kind == "count" else self.answer
        return f"{think_open}\n{partial}\n{think_close}\n\n{ANSWER_PREFIX}{guess}."

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "question": self.question, "answer": self.answer, "lines": self.lines}


def make_problems(
    count: int, seed: int, prefix: str, long_share: float = LONG_SHARE, kinds: tuple[str, ...] = KINDS
) -> list[Problem]:
    """`count` problems, deterministic for (`seed`, `prefix`); line counts from the two bands, kinds alternating."""
    rng = random.Random(f"{prefix}:{seed}")
    problems = []
    for i in range(count):
        lines = rng.choice(LONG_LINES if rng.random() < long_share else SHORT_LINES)
        problems.append(
            Problem(f"{prefix}-{i:05d}", start=100 * rng.randint(1, 9) + lines - 1, kind=kinds[i % len(kinds)])
        )
    return problems


def sft_conversation(problem: Problem, think_open: str, think_close: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "content": problem.response(think_open, think_close)},
    ]


# Shipped prompt sets (prompts_sources/data/), regenerated with
#   python -m length_control.demo.task prompts_sources/data
# (count, seed, prefix, kinds). Seeds differ from the stage-1 SFT set's, so no eval
# problem is a training one by construction; each eval set holds one kind, one report row each.
SHIPPED = {
    "demo_train.jsonl": (240, 1001, "train", KINDS),
    "demo_count.jsonl": (40, 2002, "count", ("count",)),
    "demo_check.jsonl": (40, 3003, "check", ("check",)),
}


def shipped_records(name: str) -> list[dict[str, Any]]:
    count, seed, prefix, kinds = SHIPPED[name]
    return [problem.record() for problem in make_problems(count, seed, prefix, kinds=kinds)]


def write_prompt_files(folder: Path) -> None:
    for name in SHIPPED:
        lines = "".join(json.dumps(record) + "\n" for record in shipped_records(name))
        write_text_atomic(Path(folder) / name, lines)


if __name__ == "__main__":
    write_prompt_files(Path(sys.argv[1]))
