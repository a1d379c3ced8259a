"""The cut rule: where a thinking that ran past the budget B is closed, decided in one place.

Generate closes a trace that ran past B (case 1: cut it and append the
forced close; case 2: keep the close the policy wrote within B), the forced
eval arm does the same at inference time, the termination probe asks the
model at that place, splice reads the close back from generate's records,
and the preflight drops the prompts that leave no room for it. Each of them
asks `CutPolicy`, so what the preflight promises is what generate does, and
what stage 2 trains is where the probes look.

`ThinkTokens` knows the tokenizer: where the tags and B thinking tokens lie
in a list of ids. The policy adds the run's settings to it: the budget, the
recipe's `cut:` section (exactly at B, or at a line end within a grace
before it) and the forced close.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from length_control.recipe import CutSpec, EvalRecipe
from length_control.think import Closed, ThinkTokens, close_at_budget

if TYPE_CHECKING:
    from length_control.contracts import Answer


@dataclass(frozen=True)
class CutPolicy:
    """The cut rule of one run: a policy's think tokens, the budget B and the cut settings."""

    think: ThinkTokens
    budget: int
    spec: CutSpec = CutSpec()  # exactly at B unless a recipe says otherwise

    @classmethod
    def of(cls, recipe: EvalRecipe, think: ThinkTokens) -> CutPolicy:
        """The rule a recipe sets (its budget and its `cut:` section) for a policy's think tokens."""
        return cls(think, recipe.budget, recipe.cut)

    # ------------------------------------------------------------ a prompt

    @property
    def first_pass_tokens(self) -> int:
        """max_tokens of a first pass: B thinking tokens, and the open tag's tokens when the policy writes it."""
        return self.think.first_pass_tokens(self.budget)

    @property
    def room_needed(self) -> int:
        """The tokens a prompt must leave free: a whole first pass, the forced close and one answer token."""
        return self.first_pass_tokens + len(self.think.forced_close_ids) + 1

    def has_room(self, prompt_tokens: int, model_len: int) -> bool:
        """Whether a prompt of `prompt_tokens` is kept. One without `room_needed` within the engine's
        `model_len` is dropped (or refused, `generation.on_long_prompt`): the engine would stop its trace
        before B, and closing it there would train the close at the wrong place."""
        return prompt_tokens + self.room_needed <= model_len

    # ------------------------------------------------------------ an output

    @property
    def grace_tokens(self) -> int:
        """The thinking tokens before B a line-end cut may move back."""
        return grace_tokens(self.spec, self.budget)

    def cut(self, output: Sequence[int]) -> int:
        """Where `output` is cut when it did not close within B: after B thinking tokens (before a partial close
        tag there), or at the last line end within `grace_tokens` before that."""
        return self.think.cut(output, self.budget, self.grace_tokens)

    def close(self, output: Sequence[int]) -> Closed:
        """A first pass that ran into B, closed: case 1, cut and the forced close appended; case 2, the close the
        policy wrote before the cut kept, with what it wrote after it."""
        return close_at_budget(output, self.cut(output), self.think.find_close(output), self.think.forced_close_ids)

    def cut_back(self, output: Sequence[int], closed: Closed) -> int:
        """The thinking tokens a line-end cut gave up before B (case 1); 0 for an exact cut and in case 2."""
        return self.think.budget_cut(output, self.budget) - len(closed.thinking) if closed.case == 1 else 0

    def ran_past(self, output: Sequence[int]) -> bool:
        """Whether `output` holds B thinking tokens and no close tag among them: a case-1 trace, whose close
        at the cut the termination probe measures."""
        past = self.think.thinking_start(output) + self.budget
        return len(output) >= past and self.think.find_close(output[:past]) is None

    def own_close(self, output: Sequence[int]) -> tuple[int, int] | None:
        """The (start, end) of the close tag `output` wrote itself, when it starts within B thinking tokens."""
        span = self.think.find_close(output)
        return span if span is not None and span[0] - self.think.thinking_start(output) <= self.budget else None


def recorded_close(output: Sequence[int], answer: Answer) -> Closed:
    """The close generate made, read back from its answer record (`case`, `close_at`, `close_token_ids`), for
    the stages that have the ids and no tokenizer: splice, and a sweep's shorter budgets."""
    close, at = answer["close_token_ids"], answer["close_at"]
    after_close = output[at + len(close) :] if answer["case"] == 2 else output[:0]
    return Closed(answer["case"], output[:at], close, after_close)


def grace_tokens(spec: CutSpec, budget: int) -> int:
    """The thinking tokens before B a line-end cut may move back: none for an exact cut."""
    return round(spec.grace * budget) if spec.at == "line_end" else 0


def describe_cut(recipe: EvalRecipe) -> str:
    """Where case 1 is closed, for people (a plan's steps)."""
    grace = (
        f" (back to the last line end within {grace_tokens(recipe.cut, recipe.budget)})"
        if recipe.cut.at == "line_end"
        else ""
    )
    return f"first {recipe.budget} thinking tokens{grace} + {recipe.model.think.forced_close!r}"
