"""The cut rule (`cut.CutPolicy`): property tests over random budgets, cut settings, templates and outputs.

Every stage asks the rule its question, so these check that the answers fit together: the prompts the
preflight says will be dropped are the ones generate drops; a kept prompt has room for the answer after
any close; the cut keeps between B - grace and B thinking tokens; case 1 and case 2 are decided as
`think.close_at_budget` decides them; and splice reads back the close generate made. The policies are the
demo tokenizer in four forms: `</think>` as one token or as several BPE pieces, the thinking opened by the
policy or by an R1-style chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from length_control import generate, preflight
from length_control._schema import ConfigError
from length_control.cut import CutPolicy, recorded_close
from length_control.demo import task as demo_task
from length_control.demo.model import CHAT_TEMPLATE, build_tokenizer
from length_control.policy import load_tokenizer
from length_control.recipe import CutSpec, DemoModelSpec, SpliceSpec, ThinkTags, load_recipe
from length_control.splice import splice_row
from length_control.think import ThinkTokens

from test_preflight import HUGE, SHORT, small_recipe

TAGS = ThinkTags()
FORMS = [(variant, opens) for variant in ("standard", "multi-token-close") for opens in ("policy", "template")]
# An R1-style template: the generation prompt opens the thinking, so every output token is thinking.
R1_TEMPLATE = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
PROMPTS = [SHORT, *(SHORT.replace("to 100.", "to 100" + ", out loud" * n + ".") for n in (1, 2, 4)), HUGE]


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """A tokenizer-only model folder per form: all the preflight and the cut need of a policy."""
    problems = demo_task.make_problems(200, seed=0, prefix="tok")
    conversations = [demo_task.sft_conversation(p, TAGS.open, TAGS.close) for p in problems]
    folders = {}
    for variant, opens in FORMS:
        folder = tmp_path_factory.mktemp(f"{variant}-{opens}")
        tokenizer = build_tokenizer(conversations, DemoModelSpec(variant=variant), folder)
        if opens == "template":
            tokenizer.chat_template = R1_TEMPLATE
            tokenizer.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        folders[variant, opens] = folder
    return folders


@pytest.fixture(scope="module")
def thinks(policies: dict[tuple[str, str], Path]) -> dict[tuple[str, str], ThinkTokens]:
    thinks = {form: ThinkTokens(load_tokenizer(str(folder)), TAGS) for form, folder in policies.items()}
    for (variant, opens), think in thinks.items():  # what each form is meant to be
        assert think.opened_by_template == (opens == "template")
        assert (len(think.close_ids) == 1) == (variant == "standard")
    return thinks


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, policies: dict[tuple[str, str], Path]) -> Path:
    folder = tmp_path_factory.mktemp("recipe")
    small_recipe(folder, policies["standard", "policy"], prompts=PROMPTS, evals=[SHORT])
    return folder / "recipe.yaml"


def cut_specs() -> st.SearchStrategy[CutSpec]:
    return st.builds(CutSpec, at=st.sampled_from(["exact", "line_end"]), grace=st.floats(0, 0.95))


# ---------------------------------------------------------------- a prompt: preflight and generate agree


@settings(max_examples=24, deadline=None)
@given(data=st.data(), form=st.sampled_from(FORMS), budget=st.integers(1, 40), edge=st.integers(-1, 1))
def test_the_preflight_drops_exactly_the_prompts_generate_drops(
    recipe_file: Path, policies, thinks, data, form, budget: int, edge: int
) -> None:
    """The context limit is drawn at one prompt's edge (no room by one token, just enough, one to spare): the
    preflight's count of prompts to drop is generate's, and a kept prompt leaves room for B thinking tokens,
    the open tag the policy writes, the forced close and an answer token."""
    think = thinks[form]
    tokenizer = think.tokenizer
    lengths = [
        len(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )
        for q in PROMPTS
    ]
    open_tag = 0 if think.opened_by_template else len(think.open_ids)
    room = budget + open_tag + len(think.forced_close_ids) + 1
    limit = data.draw(st.sampled_from(lengths)) + room + edge
    recipe = load_recipe(recipe_file, [f"model.path={policies[form]}", f"budget={budget}", f"context_limit={limit}"])

    notes = preflight.check(recipe).text()
    said = re.search(r"prompts: prompts: (\d+) of \d+ prompts leave no room", notes)
    requests, dropped = generate.trace_requests(recipe, tokenizer, think, generate.load_prompts(recipe))

    assert (int(said.group(1)) if said else 0) == dropped == sum(length + room > limit for length in lengths)
    for request in requests:
        assert request["max_tokens"] == budget + open_tag
        assert len(request["prompt_token_ids"]) + request["max_tokens"] + len(think.forced_close_ids) < limit


# ---------------------------------------------------------------- an output: the cut, the case, the record


@st.composite
def first_passes(draw, think: ThinkTokens, spec: CutSpec) -> tuple[CutPolicy, list[int]]:
    """A budget, and what an engine returns for a first pass that ran into its max_tokens: lines of thinking,
    perhaps the policy's own close (whole, or written in pieces) and its answer; as many tokens as the first
    pass asks for, or fewer where the context limit came first (the forced arm). Most budgets end near the
    close, where B may split it."""
    line = st.text(alphabet="0123456789: abx+=", min_size=1, max_size=10)
    thinking = "\n".join(draw(st.lists(line, min_size=1, max_size=16)))
    encode = think.tokenizer.encode
    ids = encode(("" if think.opened_by_template else f"{TAGS.open}\n") + thinking, add_special_tokens=False)
    budgets = st.integers(1, 40)
    close = draw(st.sampled_from(["none", "whole", "pieces"]))
    if close != "none":
        tag = [TAGS.close] if close == "whole" else ["</", "think", ">"]
        ids += encode(draw(st.sampled_from(["\n", " ", ""])), add_special_tokens=False)
        close_at = len(ids) - think.thinking_start(ids)  # in thinking tokens
        ids += [i for part in tag for i in encode(part, add_special_tokens=False)]
        near_close = st.integers(max(1, close_at - 2), len(ids) + 6)
        budgets = st.one_of(budgets, near_close, near_close)
        ids += encode(draw(st.sampled_from(["\n\nIt is 26.", "26", "\n7"])), add_special_tokens=False)
    rule = CutPolicy(think, draw(budgets), spec)
    whole = st.just(rule.first_pass_tokens)
    length = draw(st.one_of(whole, whole, st.integers(1, rule.first_pass_tokens)))
    return rule, ids[:length]


def _text(think: ThinkTokens, ids: list[int]) -> str:
    """The output as ThinkTokens reads it: each token's own piece."""
    return "".join(think.tokenizer.decode([i]) for i in ids)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), form=st.sampled_from(FORMS), spec=cut_specs())
def test_the_cut_keeps_between_b_minus_the_grace_and_b_thinking_tokens(thinks, data, form, spec: CutSpec) -> None:
    """Exactly B, less only the tokens of a close tag that B split; a line-end cut moves back at most its
    grace, to a line end, keeping a thinking token."""
    think = thinks[form]
    rule, output = data.draw(first_passes(think, spec))
    budget = rule.budget
    start = think.thinking_start(output)
    end = min(len(output), start + budget)  # where B thinking tokens end, or the output where it is shorter
    exact = CutPolicy(think, budget).cut(output)
    cut = rule.cut(output)

    assert rule.grace_tokens == (round(spec.grace * budget) if spec.at == "line_end" else 0)
    assert start <= cut <= exact <= end
    if exact < end:  # what was dropped is the start of a close tag, from the token that holds its first character
        partial = next(
            TAGS.close[:n]
            for n in range(len(TAGS.close) - 1, 1, -1)
            if _text(think, output[start:end]).endswith(TAGS.close[:n])
        )
        assert len(_text(think, output[exact + 1 : end])) < len(partial) <= len(_text(think, output[exact:end]))
    assert exact - cut <= rule.grace_tokens
    if cut < exact:
        assert cut > start
        assert think.tokenizer.decode([output[cut]]).startswith("\n") or think.tokenizer.decode(
            [output[cut - 1]]
        ).endswith("\n")


@settings(max_examples=200, deadline=None)
@given(data=st.data(), form=st.sampled_from(FORMS), spec=cut_specs())
def test_the_close_is_decided_as_close_at_budget_does_and_splice_reads_it_back(
    thinks, data, form, spec: CutSpec
) -> None:
    """Case 2 when the policy's own close ends by the cut, else case 1: the cut and the forced close. What the
    answer continues from fits the room a kept prompt has, and the stage-2 row splice builds from generate's
    answer record holds the same prefix."""
    think = thinks[form]
    rule, output = data.draw(first_passes(think, spec))
    budget = rule.budget
    closed = rule.close(output)
    span, cut = think.find_close(output), rule.cut(output)

    assert closed.case == (2 if span is not None and span[1] <= cut else 1)
    if closed.case == 1:
        assert (list(closed.thinking), list(closed.close), list(closed.after_close)) == (
            output[:cut],
            think.forced_close_ids,
            [],
        )
        assert rule.cut_back(output, closed) == CutPolicy(think, budget).cut(output) - cut
    else:
        assert closed.prefix() == output and list(closed.close) == output[span[0] : span[1]]
        assert rule.cut_back(output, closed) == 0
    assert len(closed.prefix()) + 1 <= rule.room_needed  # the answer pass of a kept prompt gets a token at least
    if rule.ran_past(output):  # a trace the termination probe takes is one the forcing closes at the cut
        assert closed.case == 1

    record = {
        "prompt_id": "p",
        "sample": 0,
        "case": closed.case,
        "close_at": len(closed.thinking),
        "close_token_ids": list(closed.close),
        "cut_back": rule.cut_back(output, closed),
        "thinking_start": think.thinking_start(output),
        "answer_token_ids": [think.eos_id],
        "finish_reason": "stop",
    }
    assert recorded_close(output, record).prefix() == closed.prefix()
    prompt = think.tokenizer.encode("Count down.", add_special_tokens=False)
    row, why = splice_row(
        {"prompt_token_ids": prompt, "output_token_ids": output},
        record,
        termination=think.termination(),
        spec=SpliceSpec(),
        max_len=None,
    )
    assert why == "kept" and list(row.input_ids) == prompt + closed.prefix() + [think.eos_id]


# ---------------------------------------------------------------- the recipe's section


def test_the_old_splice_keys_name_the_cut_section(recipe_file: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_recipe(recipe_file, ["splice.cut=line_end", "splice.cut_grace=0.1"])
    assert raised.value.problems == [
        "splice: the cut has its own top-level section now: move splice.cut (line_end) to cut.at and "
        "splice.cut_grace (0.1) to cut.grace, e.g. cut: {at: line_end, grace: 0.05}"
    ]
    recipe = load_recipe(recipe_file, ["cut.at=line_end", "cut.grace=0.1"])
    assert recipe.cut == CutSpec(at="line_end", grace=0.1)


def test_the_manifests_keep_the_cut_settings_under_their_old_names(recipe_file: Path) -> None:
    """Run folders made when the settings were `splice.cut` and `splice.cut_grace` stay up to date."""
    assert load_recipe(recipe_file).cut.manifest_config() == {"cut": "exact", "cut_grace": 0.05}
    assert CutSpec(at="line_end", grace=0.2).manifest_config() == {"cut": "line_end", "cut_grace": 0.2}
