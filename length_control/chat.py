"""Chat conversations as training rows: chat-template ids, loss on assistant turns only."""

from __future__ import annotations

from length_control.errors import DataError


def assistant_only_row(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels train each assistant turn and its end token.

    Each assistant turn is located by rendering the conversation up to the turn
    with and without it, so any template works, as long as rendering a longer
    conversation extends the shorter one (checked). The newline a ChatML
    template writes after `<|im_end|>` is not trained.
    """

    def render(upto: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        return tokenizer.apply_chat_template(upto, add_generation_prompt=generation_prompt, tokenize=True)["input_ids"]

    ids = render(messages, False)
    labels = [-100] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:turn], True))
        end = len(render(messages[: turn + 1], False))
        if ids[:end] != render(messages[: turn + 1], False):
            raise DataError(
                tokenizer.name_or_path,
                [
                    f"its chat template renders assistant turn {turn} of a conversation differently once later turns "
                    "follow (Qwen3's drops the reasoning of every assistant turn but the last), so the turns cannot "
                    "be trained as the policy sees them; mix single-turn conversations in (splice.sft_mix), or give "
                    "the tokenizer a template that renders every turn as written"
                ],
            )
        while end > start and ids[end - 1] != tokenizer.eos_token_id and tokenizer.decode(ids[end - 1 : end]).isspace():
            end -= 1  # the template's whitespace after the end-of-turn token
        labels[start:end] = ids[start:end]
    return ids, labels
