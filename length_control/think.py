"""Where the thinking ends, in token ids.

A policy's `</think>` may be one token (Qwen3, the demo policy) or several
BPE pieces, and then the pieces the policy generates need not be the pieces
that encoding the tag alone gives (">" may merge with the newlines after it).
So a tag is found in the decoded pieces and mapped back to the tokens that
hold it; the ids stay the policy's own. B counts thinking tokens, whoever
opens the thinking (the policy, or an R1-style template in the prompt).

A turn ends on the end token, the stop the rows train: the token the chat
template ends an assistant turn with, as the policy learned it, not
whatever the tokenizer names `eos_token` (SmolLM2-135M-Instruct's files
name `<|im_start|>`, the token that opens a turn); `model.end_token` chooses
another. The generation config's end ids end a turn too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from length_control.errors import UserError
from length_control.recipe import GPT_OSS_SWITCH, ThinkTags


@dataclass(frozen=True)
class Termination:
    """The ids that end a turn, for stages that place them without a tokenizer.

    The generate stage, which has the tokenizer, writes them beside its
    records (`termination.json`); stage 2 builds its rows from ids alone.
    """

    eos_id: int  # the end token (`ThinkTokens.eos_id`); the name is the one termination.json has always had
    forced_close_ids: list[int]
    forced_close_tag_start: int  # where `</think>` starts among them (a "\n" before it is context)
    end_ids: list[int] = field(default_factory=list)  # every id that ends a turn (eos_id and the generation config's)

    def ends_turn(self, token: int) -> bool:
        return token == self.eos_id or token in self.end_ids


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


def close_at_budget(
    output: Sequence[int], cut: int, close_span: tuple[int, int] | None, forced_close: Sequence[int]
) -> Closed:
    """The method's one rule: which case a first pass is, and what the answer continues from.

    `cut.CutPolicy.close` applies it for every stage. `output` is a first
    pass that ran into the budget, `cut` where its thinking is cut
    (`CutPolicy.cut`) and `close_span` where its first close tag lies
    (`ThinkTokens.find_close`), or None. Case 1, no close: keep the output
    up to the cut and append the forced close. Case 2, the policy closed
    within B: keep its thinking, its own close and what it wrote after it
    (the answer that B cut).
    """
    if close_span is None or close_span[1] > cut:
        return Closed(1, output[:cut], forced_close, output[:0])
    start, end = close_span
    return Closed(2, output[:start], output[start:end], output[end:])


@dataclass
class ThinkTokens:
    """A tokenizer's view of the think tags, the budget and the end of a turn.

    B counts thinking tokens: the output tokens after the open tag when the
    policy writes it (`<think>` is one token in Qwen3, three BPE pieces in
    Llama 3.1, the last one holding the first newline too), every output
    token when the chat template opened the thinking in the prompt (R1-style
    templates end the generation prompt with `<think>\n`).
    """

    tokenizer: object
    tags: ThinkTags
    end_ids: list[int] = field(default_factory=list)  # the generation config's end ids (vLLM stops on each)
    end_token: str | None = None  # `model.end_token`; None: the chat template's end of turn, else the eos_token
    open_ids: list[int] = field(init=False)
    close_ids: list[int] = field(init=False)
    forced_close_ids: list[int] = field(init=False)
    eos_id: int = field(init=False)  # the end token: what the rows end with and train as the stop
    stop_ids: list[int] = field(init=False)  # the end token, where the engine does not stop on it by itself
    opened_by_template: bool = field(init=False)
    _pieces: dict[int, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        encode = self.tokenizer.encode
        self.open_ids = encode(self.tags.open, add_special_tokens=False)
        self.close_ids = encode(self.tags.close, add_special_tokens=False)
        self.forced_close_ids = encode(self.tags.forced_close, add_special_tokens=False)
        self.eos_id = end_token_id(self.tokenizer, self.tags, self.end_token)
        engine_stops = {self.tokenizer.eos_token_id, *self.end_ids}  # what vLLM stops on unasked
        self.stop_ids = [] if self.eos_id in engine_stops else [self.eos_id]
        self.end_ids = sorted({self.eos_id, *self.end_ids} - {None})
        self.opened_by_template = template_opens_thinking(self.tokenizer, self.tags)

    def termination(self) -> Termination:
        found = self.find_close(self.forced_close_ids)
        return Termination(self.eos_id, self.forced_close_ids, found[0] if found else 0, self.end_ids)

    def first_pass_tokens(self, budget: int) -> int:
        """max_tokens of a first pass: B thinking tokens, and the open tag's tokens when the policy writes it."""
        return budget if self.opened_by_template else budget + len(self.open_ids)

    def thinking_start(self, output_ids: Sequence[int]) -> int:
        """Where the thinking tokens start: after the token that completes an open tag the output starts
        with (whitespace before it allowed), else at the first output token."""
        if self.opened_by_template:
            return 0
        text = ""
        for i, token in enumerate(output_ids[: len(self.open_ids) + 4]):
            text += self._piece(token)
            if text.lstrip().startswith(self.tags.open):
                return i + 1
            if not self.tags.open.startswith(text.lstrip()):
                break
        return 0

    def budget_cut(self, output_ids: Sequence[int], budget: int) -> int:
        """Where B thinking tokens end in `output_ids`, before a close tag the cut splits.

        A policy cut while writing a multi-token close ("...</", "think" | ">")
        is closing: its partial tag is dropped, so the forced close does not
        follow half a tag.
        """
        start = self.thinking_start(output_ids)
        cut = first = min(len(output_ids), start + budget)
        held = 0  # characters in output_ids[first:cut]
        while first > start and held < len(self.tags.close):
            first -= 1  # enough tokens to hold all but the last character of the tag, whatever their pieces
            held += len(self._piece(output_ids[first]))
        pieces = [self._piece(token) for token in output_ids[first:cut]]
        at = _partial_tag_at("".join(pieces), self.tags.close)
        if at is None:
            return cut
        for i, piece in enumerate(pieces):  # the token that holds the partial tag's first character
            at -= len(piece)
            if at < 0:
                return first + i
        return cut

    def cut(self, output_ids: Sequence[int], budget: int, grace: int = 0) -> int:
        """Where a thinking that never closed is cut: after B thinking tokens (`budget_cut`), or with a
        `grace` of some tokens (`cut.at: line_end`) at the last line end within them before that."""
        cut = self.budget_cut(output_ids, budget)
        return self.line_end_before(output_ids, cut, grace) if grace else cut

    def line_end_before(self, output_ids: Sequence[int], cut: int, grace: int) -> int:
        """The last place in [cut - grace, cut] where a whole line of thinking ends, else `cut`.

        A forced close that starts with a newline ("\n</think>") should follow
        the line's last token, so that it ends the line as the policy's own
        "...\n</think>" does: the place before a token that starts a new line
        is taken first. Then (or for a close with no newline, gpt-oss's channel
        switch) the place after a token that ends one. At least one thinking
        token is kept.
        """
        floor = max(self.thinking_start(output_ids) + 1, cut - grace)
        places = range(min(cut, len(output_ids)), floor - 1, -1)
        if self.tags.forced_close.startswith("\n"):
            before_newline = next(
                (at for at in places if at < len(output_ids) and self._piece(output_ids[at]).startswith("\n")), None
            )
            if before_newline is not None:
                return before_newline
        return next((at for at in places if self._piece(output_ids[at - 1]).endswith("\n")), cut)

    def find_close(self, output_ids: Sequence[int]) -> tuple[int, int] | None:
        """(start, end): output_ids[start:end] are the tokens of the first close tag, or None.

        Found in the decoded pieces, so a close the policy wrote in other
        pieces than the canonical ones (Qwen3's `</think>` as "</", "think",
        ">" instead of its one token) is found too.
        """
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
            piece = self._pieces[token] = self.tokenizer.decode([int(token)])
        return piece


def _partial_tag_at(text: str, tag: str) -> int | None:
    """Where `text` ends with a proper prefix of `tag` of at least two characters ("</"), or None."""
    for length in range(min(len(tag) - 1, len(text)), 1, -1):
        if text.endswith(tag[:length]):
            return len(text) - length
    return None


def template_opens_thinking(tokenizer, tags: ThinkTags) -> bool:
    """Whether the chat template's generation prompt ends inside an open thinking (R1-style templates)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    return prompt.rstrip().endswith(tags.open.rstrip())


def detect_preset(tokenizer) -> str:
    """The `model.think` preset a tokenizer points to: its vocabulary and its template tell the family."""
    if "<|channel|>" in tokenizer.get_vocab():
        return "gpt-oss"
    if template_opens_thinking(tokenizer, ThinkTags()):
        return "deepseek-r1"
    return "qwen3" if len(tokenizer.encode("</think>", add_special_tokens=False)) == 1 else "llama-think"


def turn_end(tokenizer) -> str | None:
    """The text the chat template ends an assistant turn with (whitespace after it aside), or None."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    marker = "ANSWER-7f3a"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = rendered.rpartition(marker)[2].rstrip()
    return after or None


def one_token(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer spells it as one token, else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def turn_end_id(tokenizer, tags: ThinkTags) -> int | None:
    """The token the chat template ends an assistant turn with, or None: no template, a turn end of several
    tokens, or gpt-oss, whose template ends a message with <|end|> where the final channel ends with <|return|>
    (its eos_token)."""
    end = turn_end(tokenizer)
    if end is None or tags.close == GPT_OSS_SWITCH:
        return None
    return one_token(tokenizer, end)


def end_token_id(tokenizer, tags: ThinkTags, end_token: str | None = None) -> int | None:
    """The end token: `end_token` (`model.end_token`), else the chat template's end of turn, else the eos_token.

    A policy trained on its chat template ends an answer with the template's end of turn; the tokenizer's
    eos_token may name another token (one that opens a turn, or ends a document), and training that one as
    the stop teaches the policy a stop its template never writes.
    """
    if end_token is not None:
        found = one_token(tokenizer, end_token)
        if found is None:
            raise UserError(end_token_problem(tokenizer, end_token))
        return found
    template_end = turn_end_id(tokenizer, tags)
    return template_end if template_end is not None else tokenizer.eos_token_id


def end_token_problem(tokenizer, end_token: str) -> str:
    """Why `model.end_token` cannot be the end token (it is not one token), and the fix."""
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(end_token, add_special_tokens=False)]
    template_end = turn_end(tokenizer)
    example = f", e.g. {template_end!r}, which the chat template ends an assistant turn with" if template_end else ""
    return (
        f"model.end_token {end_token!r}: the policy's tokenizer spells it as {len(pieces)} tokens {pieces}; "
        f"name one token of its vocabulary{example}, or remove the key"
    )
