"""Where the thinking ends, in token ids.

A policy's `</think>` may be one token (Qwen3, the demo policy) or several
BPE pieces, and then the pieces the policy generates need not be the pieces
that encoding the tag alone gives (">" may merge with the newlines after it).
So a multi-token tag is found in the decoded text and mapped back to the
tokens that hold it; the ids stay the policy's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from length_control.recipe import ThinkTags


@dataclass(frozen=True)
class Termination:
    """The ids that end a turn, for stages that place them without a tokenizer.

    The generate stage, which has the tokenizer, writes them beside its
    records (`termination.json`); stage 2 builds its rows from ids alone.
    """

    eos_id: int
    forced_close_ids: list[int]
    forced_close_tag_start: int  # where `</think>` starts among them (a "\n" before it is context)


@dataclass(frozen=True)
class Closed:
    """An output whose thinking is closed at the budget: what the answer continues from."""

    case: int  # 1: no close within B, cut and forced; 2: the policy's own close within B
    thinking: Sequence[int]
    close: Sequence[int]  # the forced close (case 1) or the policy's own close tokens (case 2)
    after_close: Sequence[int]  # what the policy already wrote after its own close (case 2)

    def prefix(self) -> list[int]:
        """thinking + close + after_close: the output the answer pass continues."""
        return [*self.thinking, *self.close, *self.after_close]


def close_at_budget(output: Sequence[int], budget: int, close_span: tuple[int, int] | None,
                    forced_close: Sequence[int]) -> Closed:
    """The method's one rule, shared by generate, splice and the forced arm.

    `output` is a first pass of at most B tokens and `close_span` where its
    first close tag lies (`ThinkTokens.find_close`), or None. Case 1, no
    close: keep exactly the first B tokens and append the forced close.
    Case 2, the policy closed within B: keep its thinking, its own close and
    what it wrote after it (the answer that B cut).
    """
    if close_span is None:
        return Closed(1, output[:budget], forced_close, output[:0])
    start, end = close_span
    return Closed(2, output[:start], output[start:end], output[end:])


@dataclass
class ThinkTokens:
    """A tokenizer's view of the think tags and the end of a turn."""

    tokenizer: object
    tags: ThinkTags
    close_ids: list[int] = field(init=False)
    forced_close_ids: list[int] = field(init=False)
    eos_id: int = field(init=False)
    _pieces: dict[int, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        encode = self.tokenizer.encode
        self.close_ids = encode(self.tags.close, add_special_tokens=False)
        self.forced_close_ids = encode(self.tags.forced_close, add_special_tokens=False)
        self.eos_id = self.tokenizer.eos_token_id

    def termination(self) -> Termination:
        found = self.find_close(self.forced_close_ids)
        return Termination(self.eos_id, self.forced_close_ids, found[0] if found else 0)

    def find_close(self, output_ids: list[int]) -> tuple[int, int] | None:
        """(start, end): output_ids[start:end] are the tokens of the first close tag, or None."""
        if len(self.close_ids) == 1:
            try:
                start = output_ids.index(self.close_ids[0])
            except ValueError:
                return None
            return start, start + 1
        text, starts = "", []
        for token in output_ids:
            starts.append(len(text))
            text += self._piece(token)
        at = text.find(self.tags.close)
        if at < 0:
            return None
        end_char = at + len(self.tags.close)
        start = max(i for i, s in enumerate(starts) if s <= at)
        end = next((i for i, s in enumerate(starts) if s >= end_char), len(output_ids))
        return start, end

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token])
        return piece
