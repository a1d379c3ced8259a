"""The real tokenizers (envs/tokenizers.lock, fetched by ./run.sh setup) where this toolkit works on them.

Pinned per family, on the real files: how the think tags tokenize and what
their pieces merge with, the end of a turn (the tokenizer's eos_token and
what the chat template writes), the generation prompt, what Qwen3's template
does to reasoning, gpt-oss's channel tokens; and that `ThinkTokens` finds
the policy's own close in the ids of a realistic trace, canonical or written
in pieces. A new package version or transformers version that moves one of
these facts fails here first.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path

import pytest

from length_control import tokenizer_files
from length_control.recipe import ThinkTags
from length_control.think import ThinkTokens, close_at_budget

FAMILIES = ("qwen3", "deepseek-v3", "llama-3.1", "gpt-oss")

tokenizer = functools.cache(tokenizer_files.load_tokenizer)

# Thinking as a policy writes it: LaTeX, code with indentation, unicode (multi-byte, an emoji).
THINKING = (
    "<think>\nThe sum of the first 12 odd numbers: $\\sum_{k=1}^{12} (2k-1) = 12^2 = 144$.\n\n"
    "Check:\n```python\ndef odd_sum(n):\n    return sum(2 * k - 1 for k in range(1, n + 1))\n```\n"
    "odd_sum(12) → 144 ✓  (12 terms , each odd) 😀 so it is 144"
)  # " ," survives: no clean-up
# What comes right before and after the close: its pieces merge with some of them.
BEFORE_CLOSE = (".\n", ".\n\n", " ", "", "\n```\n", " 😀", "…")
AFTER_CLOSE = ("\n\nThe sum is $\\boxed{144}$.", "\nThe sum is 144.", "144")


def pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]


def test_the_lock_pins_exact_versions_and_tarball_integrity() -> None:
    pins = tokenizer_files.pins()
    assert tuple(pins) == FAMILIES
    for pin in pins.values():
        assert pin.version.count(".") == 2 and pin.version.replace(".", "").isdigit(), pin
        assert pin.integrity.startswith("sha512-") and len(pin.integrity) == 95, pin


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_each_as_its_tokenizer_json_defines_it(family: str) -> None:
    from tokenizers import Tokenizer

    tok = tokenizer(family)
    text = THINKING + ".\n</think>\n\n" + AFTER_CLOSE[0]
    own = Tokenizer.from_file(str(tokenizer_files.folder(family) / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == own.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_deepseek_v3_loads_wrong_without_its_model_type(tmp_path: Path) -> None:
    """Why a fetched folder carries a config.json: DeepSeek-V3's tokenizer_config names LlamaTokenizerFast,
    and transformers 5 then builds a SentencePiece pipeline on the vocabulary that drops newlines."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_files.folder("deepseek-v3") / name, tmp_path / name)
    bare = AutoTokenizer.from_pretrained(tmp_path)
    assert type(bare).__name__ == "LlamaTokenizer"
    assert bare.decode(bare.encode("x\n</think>", add_special_tokens=False)) != "x\n</think>"
    assert json.loads((tokenizer_files.folder("deepseek-v3") / "config.json").read_text()) == {
        "model_type": "deepseek_v3"
    }


@pytest.mark.parametrize(
    "family, open_pieces, close_pieces",
    [
        ("qwen3", ["<think>"], ["</think>"]),  # one added token each (not special: skip_special_tokens keeps them)
        ("deepseek-v3", ["<", "think", ">"], ["</", "think", ">"]),
        ("llama-3.1", ["<th", "ink", ">"], ["</", "think", ">"]),
        ("gpt-oss", ["<th", "ink", ">"], ["</", "think", ">"]),
    ],
)
def test_how_the_think_tags_tokenize(family: str, open_pieces: list[str], close_pieces: list[str]) -> None:
    """In the BPE families the open tag's ">" also takes the thinking's first newline: the first thinking
    token is inside the tag."""
    tok = tokenizer(family)
    assert pieces(tok, "<think>") == open_pieces
    assert pieces(tok, "</think>") == close_pieces
    first_line = [*open_pieces[:-1], ">\n", "So"] if len(open_pieces) > 1 else ["<think>", "\n", "So"]
    assert pieces(tok, "<think>\nSo") == first_line
    if family == "qwen3":
        assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
        assert tok.decode([151667, 151668], skip_special_tokens=True) == "<think></think>"


@pytest.mark.parametrize(
    "family, close_in_context, spaced",
    [
        ("qwen3", [".\n", "</think>", "\n\n", "The"], [" ", "</think>"]),
        ("deepseek-v3", [".\n", "</", "think", ">\n\n", "The"], [" </", "think", ">"]),
        ("llama-3.1", [".\n", "</", "think", ">\n\n", "The"], [" </", "think", ">"]),
        ("gpt-oss", [".\n", "</", "think", ">\n\n", "The"], [" </", "think", ">"]),
    ],
)
def test_what_the_close_merges_with(family: str, close_in_context: list[str], spaced: list[str]) -> None:
    """The "\\n" before the close goes to the text before it (".\\n"); in the BPE families ">" takes the
    newlines after it and "</" the space before it. Qwen3's one token merges with nothing."""
    tok = tokenizer(family)
    assert pieces(tok, ".\n</think>\n\nThe") == close_in_context
    assert pieces(tok, "so </think>")[1:] == spaced
    whole = tok.encode("\n</think>\n\n", add_special_tokens=False)
    parts = [i for part in ("\n", "</think>", "\n\n") for i in tok.encode(part, add_special_tokens=False)]
    assert (whole == parts) == (family == "qwen3")


@pytest.mark.parametrize(
    "family, forced_close_pieces, eos_id",
    [
        ("qwen3", ["\n", "</think>"], 151645),
        ("deepseek-v3", ["\n", "</", "think", ">"], 1),
        ("llama-3.1", ["\n", "</", "think", ">"], 128009),
        ("gpt-oss", ["\n", "</", "think", ">"], 200002),
    ],
)
def test_the_forced_close_and_the_termination(family: str, forced_close_pieces: list[str], eos_id: int) -> None:
    tok = tokenizer(family)
    think = ThinkTokens(tok, ThinkTags())
    assert [tok.decode([i]) for i in think.forced_close_ids] == forced_close_pieces
    assert think.termination().forced_close_tag_start == 1 and think.termination().eos_id == eos_id
    assert think.stop_ids == []  # the end token is the eos_token: the engine stops on it unasked


def chunked(tok, text: str, rng: random.Random, keep_whole: str | None) -> list[int]:
    """The ids of `text` written in pieces (a valid, non-canonical sequence, as a policy may write it):
    each chunk encoded alone. No cut falls inside `keep_whole`."""
    inside = range(text.index(keep_whole) + 1, text.index(keep_whole) + len(keep_whole)) if keep_whole else ()
    cuts = sorted(rng.sample([i for i in range(1, len(text)) if i not in inside], 16))
    chunks = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)])]
    return [i for chunk in chunks for i in tok.encode(chunk, add_special_tokens=False)]


@pytest.mark.parametrize("family", FAMILIES)
def test_think_tokens_find_the_policys_own_close_in_a_realistic_trace(family: str) -> None:
    """Canonical ids and ids written in pieces (cuts inside the tag too, where it is BPE pieces; Qwen3's
    policy writes its `</think>` as the one token): the span found holds the whole tag and no token
    more, thinking + close + after are the output unchanged, and the close takes from the thinking at
    most the space that merges into "</"."""
    tok = tokenizer(family)
    think = ThinkTokens(tok, ThinkTags())
    rng = random.Random(0)
    for before in BEFORE_CLOSE:
        for after in AFTER_CLOSE:
            text = THINKING + before + "</think>" + after
            canonical = tok.encode(text, add_special_tokens=False)
            for ids in [canonical] + [
                chunked(tok, text, rng, "</think>" if family == "qwen3" else None) for _ in range(5)
            ]:
                span = think.find_close(ids)
                assert span is not None, (text, pieces(tok, text))
                start, end = span
                assert "</think>" in tok.decode(ids[start:end])
                assert "</think>" not in tok.decode(ids[start + 1 : end]) + tok.decode(ids[start : end - 1])
                closed = close_at_budget(ids, len(ids), span, think.forced_close_ids)
                assert closed.case == 2 and closed.prefix() == ids
                thinking = tok.decode(list(closed.thinking))
                assert text.startswith(thinking)
                carried = (THINKING + before)[len(thinking) :]  # what the close's first token holds before "<"
                assert carried == "" or (carried == " " and family != "qwen3")


@pytest.mark.parametrize(
    "family, eos, turn_end",
    [
        ("qwen3", "<|im_end|>", "<|im_end|>\n"),
        ("deepseek-v3", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        ("llama-3.1", "<|eot_id|>", "<|eot_id|>"),
    ],
)
def test_the_template_ends_an_assistant_turn_with_the_eos_token(family: str, eos: str, turn_end: str) -> None:
    tok = tokenizer(family)
    conversation = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "ANSWER"}]
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert tok.eos_token == eos
    assert rendered.split("ANSWER")[1] == turn_end


def test_the_end_ids_beside_the_eos_token() -> None:
    """Each family's other end-of-text ids. Qwen3's generation config stops on <|endoftext|> too. The
    llama3_1 package's names are Llama 3.0's: 3.1 names 128008 <|eom_id|> and stops on it."""
    assert tokenizer("qwen3").convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [151645, 151643]
    llama = tokenizer("llama-3.1")
    assert llama.convert_ids_to_tokens([128001, 128008, 128009]) == [
        "<|end_of_text|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    assert tokenizer("gpt-oss").convert_ids_to_tokens([199999, 200002, 200007, 200012]) == [
        "<|endoftext|>",
        "<|return|>",
        "<|end|>",
        "<|call|>",
    ]


@pytest.mark.parametrize(
    "family, prompt_end",
    [
        ("qwen3", "<|im_start|>assistant\n"),
        ("deepseek-v3", "<｜Assistant｜>"),  # DeepSeek-V3's template; R1's opens "<think>\n" here
        ("llama-3.1", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ],
)
def test_the_generation_prompt_does_not_open_the_thinking(family: str, prompt_end: str) -> None:
    tok = tokenizer(family)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(prompt_end) and "<think>" not in prompt


def test_qwen3_closes_an_empty_thinking_in_the_prompt_when_thinking_is_off() -> None:
    prompt = tokenizer("qwen3").apply_chat_template(
        [{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3s_template_rewrites_the_reasoning_it_renders() -> None:
    """An assistant turn is not rendered as written: the last turn's reasoning loses its outer newlines and
    gets its own, an earlier turn's reasoning is dropped (stage 2 must not train on rendered text)."""
    conversation = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\n\n  r2  \n\n</think>\nA2"},
    ]
    assert tokenizer("qwen3").apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n  r2  \n</think>\n\nA2<|im_end|>\n"
    )


def test_llamas_template_trims_the_assistant_turn() -> None:
    rendered = tokenizer("llama-3.1").apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA\n"}],
        tokenize=False,
    )
    assert rendered.endswith("<|end_header_id|>\n\n<think>\nr\n</think>\n\nA<|eot_id|>")


def test_gpt_oss_has_channels_and_no_chat_template() -> None:
    tok = tokenizer("gpt-oss")
    assert tok.chat_template is None
    assert pieces(tok, "<|start|>assistant<|channel|>analysis<|message|>") == [
        "<|start|>",
        "assistant",
        "<|channel|>",
        "analysis",
        "<|message|>",
    ]
    assert pieces(tok, "<|end|><|start|>assistant<|channel|>final<|message|>") == [
        "<|end|>",
        "<|start|>",
        "assistant",
        "<|channel|>",
        "final",
        "<|message|>",
    ]


def test_gpt_oss_switch_to_the_final_channel_is_a_close_the_machinery_finds() -> None:
    """gpt-oss thinks in the analysis channel and answers in the final one; as think tags, the switch is
    a six-token close (all special tokens but "assistant" and "final"), found like any multi-token close."""
    tok = tokenizer("gpt-oss")
    switch = "<|end|><|start|>assistant<|channel|>final<|message|>"
    think = ThinkTokens(tok, ThinkTags(open="<|channel|>analysis<|message|>", close=switch, forced_close=switch))
    thinking = "<|channel|>analysis<|message|>We need 12 odd numbers: 144."
    ids = tok.encode(thinking + switch + "144<|return|>", add_special_tokens=False)
    start = len(tok.encode(thinking, add_special_tokens=False))
    assert think.find_close(ids) == (start, start + 6)
    assert think.termination().forced_close_tag_start == 0 and think.eos_id == 200002


R1_GENERATION_PROMPT = "{{'<｜Assistant｜><think>\\n'}}"


def r1_template() -> str:
    """DeepSeek-R1's change to DeepSeek-V3's template: the generation prompt opens the thinking."""
    template = tokenizer("deepseek-v3").chat_template
    assert template.endswith("{{'<｜Assistant｜>'}}{% endif %}")
    return template.removesuffix("{{'<｜Assistant｜>'}}{% endif %}") + R1_GENERATION_PROMPT + "{% endif %}"


@pytest.mark.parametrize("family, open_tokens", [("qwen3", 1), ("deepseek-v3", 3), ("llama-3.1", 3)])
def test_b_counts_the_thinking_tokens_after_the_policys_open_tag(family: str, open_tokens: int) -> None:
    """Qwen3's <think> is one token; the BPE families' open tag ends in ">\\n", so their first newline is
    part of the tag and the first thinking token is "So". Either way the first pass asks for B more."""
    tok = tokenizer(family)
    think = ThinkTokens(tok, ThinkTags())
    ids = tok.encode("<think>\nSo 12 odd numbers sum to 144.", add_special_tokens=False)
    assert not think.opened_by_template and len(think.open_ids) == open_tokens
    assert think.thinking_start(ids) == open_tokens and think.first_pass_tokens(10) == 10 + open_tokens
    assert think.budget_cut(ids, 4) == open_tokens + 4
    assert think.thinking_start(tok.encode("So it is", add_special_tokens=False)) == 0  # no open tag: all thinking


def test_an_r1_template_opens_the_thinking_and_every_output_token_is_thinking() -> None:
    import copy

    tok = copy.copy(tokenizer("deepseek-v3"))
    tok.chat_template = r1_template()
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    think = ThinkTokens(tok, ThinkTags())
    ids = tok.encode("So 12 odd numbers sum to 144.", add_special_tokens=False)
    assert think.opened_by_template and think.first_pass_tokens(10) == 10
    assert think.thinking_start(ids) == 0 and think.budget_cut(ids, 4) == 4


@pytest.mark.parametrize("family", FAMILIES[:3])
def test_a_cut_inside_a_multi_token_close_drops_the_partial_tag(family: str) -> None:
    """Cut at B while the policy writes "</", "think" (">" would come next): the thinking ends before
    the partial tag, so the forced close does not follow half a tag. Qwen3's policy may write the BPE
    pieces too, instead of its one token."""
    tok = tokenizer(family)
    think = ThinkTokens(tok, ThinkTags())
    thinking = tok.encode("<think>\nSo it is 144.\n", add_special_tokens=False)
    partial = tok.encode("</", add_special_tokens=False) + tok.encode("think", add_special_tokens=False)
    ids = thinking + partial + tok.encode(">", add_special_tokens=False)
    budget = len(thinking) + len(partial) - think.thinking_start(ids)
    assert think.budget_cut(ids, budget) == len(thinking)
    assert think.budget_cut(ids, budget - 3) == len(thinking) - 1  # no partial tag there: exactly B
    assert think.find_close(ids) == (len(thinking), len(ids))


def test_qwen3s_close_written_in_pieces_is_found_before_a_later_canonical_one() -> None:
    tok = tokenizer("qwen3")
    think = ThinkTokens(tok, ThinkTags())
    pieces_close = [i for part in ("</", "think", ">") for i in tok.encode(part, add_special_tokens=False)]
    head = tok.encode("<think>\nSo 144.", add_special_tokens=False)
    ids = head + pieces_close + tok.encode("\n\nThe sum is 144. </think>", add_special_tokens=False)
    assert len(pieces_close) == 3 and think.find_close(ids) == (len(head), len(head) + 3)


def test_the_termination_ends_on_every_id_the_engine_stops_on() -> None:
    """Qwen3's generation config stops on <|endoftext|> too: a row may end with it."""
    think = ThinkTokens(tokenizer("qwen3"), ThinkTags(), end_ids=[151645, 151643])
    termination = think.termination()
    assert termination.eos_id == 151645 and termination.end_ids == [151643, 151645]
    assert termination.ends_turn(151643) and termination.ends_turn(151645) and not termination.ends_turn(198)


def _tokenizer_folder(tmp_path: Path, family: str, **config) -> Path:
    """A copy of a family's tokenizer folder (what the preflight loads of a policy), tokenizer_config edited."""
    folder = tmp_path / family
    shutil.copytree(tokenizer_files.folder(family), folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text()) | config
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize(
    "family, preset, opened",
    [
        ("qwen3", "qwen3", "the policy writes '<think>' (1 tokens)"),
        ("llama-3.1", "llama-think", "the policy writes '<think>' (3 tokens)"),
        ("deepseek-r1", "deepseek-r1", "the chat template opens it in the prompt: B counts every output token"),
    ],
)
def test_the_preflight_says_which_family_the_tokenizer_looks_like(
    tmp_path: Path, family: str, preset: str, opened: str
) -> None:
    from length_control import preflight

    from test_preflight import SHORT, small_recipe

    if family == "deepseek-r1":
        folder = _tokenizer_folder(tmp_path, "deepseek-v3", chat_template=r1_template())
    else:
        folder = _tokenizer_folder(tmp_path, family)
    notes = preflight.check(small_recipe(tmp_path / "recipe", folder, [SHORT], [SHORT], context_limit=200)).text()
    assert f"looks like model.think: {preset}; {opened}" in notes
    assert "warning" not in notes


def test_the_preflight_stops_think_tags_on_a_gpt_oss_tokenizer_and_takes_its_preset(tmp_path: Path) -> None:
    from length_control import preflight

    from test_preflight import SHORT, small_recipe

    harmony = (
        "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
    )
    folder = _tokenizer_folder(tmp_path, "gpt-oss", chat_template=harmony)
    with pytest.raises(preflight.PreflightError, match=r"gpt-oss's channels .* set model.think: gpt-oss"):
        preflight.check(small_recipe(tmp_path / "tags", folder, [SHORT], [SHORT], context_limit=200))
    recipe = small_recipe(
        tmp_path / "preset",
        folder,
        [SHORT],
        [SHORT],
        context_limit=200,
        model={"path": str(folder), "think": "gpt-oss"},
    )
    assert recipe.model.think.close == "<|end|><|start|>assistant<|channel|>final<|message|>"
    assert "looks like model.think: gpt-oss" in preflight.check(recipe).text()


def test_a_tokenizer_whose_eos_opens_a_turn_trains_the_templates_end_of_turn(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct's files name <|im_start|>, the token that opens a turn, as eos_token, and its
    ChatML template ends an assistant turn with <|im_end|> (Qwen3's tokenizer, so edited, is the same case):
    the rows end with <|im_end|>, the engine is asked to stop on it, and the preflight says so and how to
    train the eos_token instead; `model.end_token` chooses, and must be one token."""
    from length_control import preflight
    from length_control.errors import UserError
    from length_control.policy import load_tokenizer

    from test_preflight import SHORT, small_recipe

    folder = _tokenizer_folder(tmp_path, "qwen3", eos_token="<|im_start|>")
    tok = load_tokenizer(str(folder))
    im_start, im_end = 151644, 151645
    assert tok.convert_ids_to_tokens([im_start, im_end]) == ["<|im_start|>", "<|im_end|>"]
    think = ThinkTokens(tok, ThinkTags())
    assert (think.eos_id, think.stop_ids, think.end_ids) == (im_end, [im_end], [im_end])
    assert think.termination().eos_id == im_end and not think.termination().ends_turn(im_start)
    notes = preflight.check(small_recipe(tmp_path / "default", folder, [SHORT], [SHORT], context_limit=200)).text()
    assert (
        "end token: the rows end with '<|im_end|>' (id 151645) and train it as the stop (the chat template's end "
        "of turn); the engine is asked to stop on it too; the chat template of " in notes
    )
    assert "its eos_token is '<|im_start|>' (id 151644); to train the eos_token instead, set model.end_token: " in notes

    chosen = ThinkTokens(tok, ThinkTags(), end_token="<|im_start|>")
    assert (chosen.eos_id, chosen.stop_ids, chosen.end_ids) == (im_start, [], [im_start])
    recipe = small_recipe(
        tmp_path / "chosen",
        folder,
        [SHORT],
        [SHORT],
        context_limit=200,
        model={"path": str(folder), "end_token": "<|im_start|>"},
    )
    notes = preflight.check(recipe).text()
    assert "the rows end with '<|im_start|>' (id 151644) and train it as the stop (model.end_token);" in notes
    assert (
        "its eos_token is '<|im_start|>' (id 151644); to train the chat template's end of turn instead, "
        "set model.end_token: '<|im_end|>' (or remove the key)" in notes
    )

    with pytest.raises(UserError, match=r"model.end_token '</end>': the policy's tokenizer spells it as 3 tokens"):
        ThinkTokens(tok, ThinkTags(), end_token="</end>")
    recipe = small_recipe(
        tmp_path / "pieces",
        folder,
        [SHORT],
        [SHORT],
        context_limit=200,
        model={"path": str(folder), "end_token": "</end>"},
    )
    with pytest.raises(preflight.PreflightError, match=r"name one token of its vocabulary, e.g. '<\|im_end\|>', which"):
        preflight.check(recipe)


def test_a_qwen3_base_tokenizer_trains_the_templates_end_of_turn_and_stops_on_it(tmp_path: Path) -> None:
    """Qwen3 base models name <|endoftext|> as eos_token while the template ends turns with <|im_end|>:
    without a generation config listing <|im_end|>, the engine is asked to stop on it; with one, it stops
    on both unasked, and a row may end with either."""
    from length_control import preflight

    from test_preflight import SHORT, small_recipe

    folder = _tokenizer_folder(tmp_path, "qwen3", eos_token="<|endoftext|>")
    notes = preflight.check(small_recipe(tmp_path / "bare", folder, [SHORT], [SHORT], context_limit=200)).text()
    assert "turn ends on [151645]" in notes and "the rows end with '<|im_end|>' (id 151645)" in notes
    assert "the engine is asked to stop on it too" in notes and "set model.end_token: '<|endoftext|>'" in notes
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}))
    notes = preflight.check(small_recipe(tmp_path / "listed", folder, [SHORT], [SHORT], context_limit=200)).text()
    assert "turn ends on [151643, 151645]" in notes and "asked to stop" not in notes


def test_an_unknown_think_preset_names_the_presets(tmp_path: Path) -> None:
    from length_control._schema import ConfigError

    from test_preflight import SHORT, small_recipe

    folder = _tokenizer_folder(tmp_path, "qwen3")
    with pytest.raises(ConfigError, match="unknown think preset 'qwen2'; use one of qwen3, deepseek-r1, llama-think"):
        small_recipe(tmp_path / "r", folder, [SHORT], [SHORT], model={"path": str(folder), "think": "qwen2"})


def test_the_sft_mix_masks_qwen3s_reasoning_turn_and_stops_a_conversation_its_template_rewrites() -> None:
    """One turn with reasoning: the assistant turn as Qwen3's template renders it is trained, its end
    token too, the newline after it not. Two turns: the first turn's reasoning vanishes once the second
    follows, so the turns cannot be trained as rendered: one error naming the template's behaviour and
    the fix."""
    from length_control.chat import assistant_only_row
    from length_control.errors import DataError

    tok = tokenizer("qwen3")
    turn = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n5"}]
    ids, labels = assistant_only_row(tok, turn)
    trained = tok.decode([i for i, label in zip(ids, labels) if label != -100])
    assert trained == "<think>\nadd\n</think>\n\n5<|im_end|>"
    with pytest.raises(DataError, match=r"Qwen3's drops the reasoning .* mix single-turn conversations"):
        assistant_only_row(tok, turn + turn)


def test_a_partial_close_in_small_pieces_is_dropped_too() -> None:
    tok = tokenizer("qwen3")
    think = ThinkTokens(tok, ThinkTags())
    thinking = tok.encode("<think>\nSo 144.\n", add_special_tokens=False)
    partial = [i for part in ("</", "th", "ink") for i in tok.encode(part, add_special_tokens=False)]
    ids = thinking + partial
    assert len(partial) == 3 and think.budget_cut(ids, len(ids) - 1) == len(thinking)


@pytest.mark.parametrize("family", FAMILIES[:3])
def test_a_line_end_cut_moves_back_to_the_last_whole_line(family: str) -> None:
    """`cut.at: line_end` on real BPE: B falls inside the third line. Where a token starts the next line
    ("\\n", "\\n\\n"), the cut goes before it and the forced "\\n</think>" ends the line; where the newlines
    merged into the line's last token (".\\n\\n"), the cut goes after it. Outside the grace it stays at B."""
    tok = tokenizer(family)
    think = ThinkTokens(tok, ThinkTags())
    lines = "<think>\nSo 12 odd numbers sum to 144.\nCheck with n = 3: 1 + 3 + 5 = 9.\n\nSo far so good, and"
    ids = tok.encode(lines, add_special_tokens=False)
    start = think.thinking_start(ids)
    budget = len(ids) - start - 2  # two tokens before the end: inside "So far so good"
    exact = think.cut(ids, budget)
    line_end = think.cut(ids, budget, grace=budget)
    kept = tok.decode(ids[:line_end])
    assert exact == start + budget and line_end < exact
    assert kept.endswith(("= 9.", "= 9.\n\n"))  # before the newlines, or after a token that holds them
    assert tok.decode(ids[line_end:exact]).lstrip("\n").startswith("So far")
    assert think.cut(ids, budget, grace=1) == exact  # no line end within one token of B
