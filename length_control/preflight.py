"""Every check that can fail before an engine starts, run at once, in seconds.

    length-control validate RECIPE --deep
    length-control run RECIPE            (runs it before the first stage)

A typo in a data file, a tokenizer that cannot spell `</think>`, prompts
longer than the context or an output folder that cannot be written would
otherwise surface after hours of GPU time. The preflight reads every prompt
source and eval set (rows read, kept, dropped by each filter), loads the
tokenizer and checks the think tags, measures the prompts against the budget
and the context limit, checks the output folder and sizes everything the
run will write against the free space of its filesystem (`disk.estimate`).
Every problem is listed with its file and its fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from length_control import disk
from length_control.cut import CutPolicy
from length_control.engines.recipe_engine import model_len, model_len_setting
from length_control.errors import UserError
from length_control.policy import policy_path, think_tokens
from length_control.prompts import SourceCheck, check_source, with_system_line
from length_control.recipe import GPT_OSS_SWITCH, Recipe
from length_control.sources import load_source_spec
from length_control.think import ThinkTokens, detect_preset, end_token_problem, one_token, turn_end_id


class PreflightError(UserError):
    def __init__(self, recipe: Recipe, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"preflight of {recipe.name}: {len(problems)} {noun}; nothing was started:\n{lines}")


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was checked, for people

    def text(self) -> str:
        return "\n".join(f"  {note}" for note in self.notes)


def check(recipe: Recipe) -> Preflight:
    """All checks; raise `PreflightError` listing every problem, else return what was found."""
    found = Preflight()
    _output_dir(recipe, found)
    think = _think_tokens(recipe, found)
    prompts = _sources("prompts", [(ref.source, ref.sample) for ref in recipe.prompts.sources], found)
    evals = _sources("eval", [(s.source, None) for s in recipe.eval.sets], found)
    if think is not None:
        _lengths(recipe, think, prompts, evals, found)
    if found.problems:
        raise PreflightError(recipe, found.problems)
    return found


def _output_dir(recipe: Recipe, found: Preflight) -> None:
    import os

    folder = Path(recipe.output_dir)
    existing = disk.existing_parent(folder)
    if existing.is_file():
        found.problems.append(f"output_dir {folder}: {existing} is a file; point output_dir at a folder")
        return
    if not os.access(existing, os.W_OK | os.X_OK):
        found.problems.append(f"output_dir {folder}: {existing} is not writable; pick a folder you can write")
        return
    found.notes.append(f"output_dir {folder}: writable")


def _think_tokens(recipe: Recipe, found: Preflight) -> ThinkTokens | None:
    """The policy's tokenizer and think tags, checked; None when it is not on this machine or fails a check."""

    model = policy_path(recipe.model)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as error:
        if recipe.model.path is not None:
            found.problems.append(
                f"model.path {model}: its tokenizer does not load ({error}); "
                "point model.path at a Hugging Face model folder with its tokenizer files"
            )
        else:
            found.notes.append(
                f"tokenizer of {model}: not on this machine; the think tags are checked when the engine loads it"
            )
        return None
    tags, end_token = recipe.model.think, recipe.model.end_token
    if end_token is not None and one_token(tokenizer, end_token) is None:
        found.problems.append(end_token_problem(tokenizer, end_token))
        return None
    think = think_tokens(model, tokenizer, recipe.model)
    problems = []
    for key, text, ids in (
        ("open", tags.open, tokenizer.encode(tags.open, add_special_tokens=False)),
        ("close", tags.close, think.close_ids),
        ("forced_close", tags.forced_close, think.forced_close_ids),
    ):
        if not ids:
            problems.append(f"model.think.{key} {text!r}: the tokenizer of {model} encodes it to no token")
        elif tokenizer.decode(ids) != text:
            problems.append(
                f"model.think.{key} {text!r}: the tokenizer of {model} cannot spell it (it comes back "
                f"as {tokenizer.decode(ids)!r}); name the tags its vocabulary has, or use its tokenizer"
            )
    if not problems:
        closed = tokenizer.encode(f"{tags.open}\nx{tags.forced_close}\n\nanswer", add_special_tokens=False)
        if think.find_close(think.forced_close_ids) is None or think.find_close(closed) is None:
            problems.append(f"model.think: {tags.close!r} is not found back in the tokenized thinking; check the tags")
    if think.eos_id is None:
        problems.append(
            f"model {model}: its tokenizer has no eos_token and its chat template ends no assistant turn with "
            "one token; stage 2 trains an end token after the answer: name one with model.end_token"
        )
    if not tokenizer.chat_template:
        problems.append(f"model {model}: its tokenizer has no chat template; prompts are chats")
    preset = detect_preset(tokenizer)
    if preset == "gpt-oss" and tags.close != GPT_OSS_SWITCH:
        problems.append(
            f"model.think: the tokenizer of {model} has gpt-oss's channels (<|channel|>): its policy "
            f"thinks in the analysis channel and never writes {tags.close!r}; set model.think: gpt-oss"
        )
    found.problems += problems
    if problems:
        return None
    opened = (
        "the chat template opens it in the prompt: B counts every output token"
        if think.opened_by_template
        else f"the policy writes {tags.open!r} ({len(think.open_ids)} tokens): B counts the tokens after it"
    )
    found.notes.append(
        f"tokenizer of {model}: looks like model.think: {preset}; {opened}; {tags.close!r} = "
        f"{think.close_ids}, forced close {tags.forced_close!r} = {think.forced_close_ids}, "
        f"turn ends on {think.end_ids}"
    )
    end_line = _end_token_line(tokenizer, think, model)
    if end_line is not None:
        found.notes.append(end_line)
    return think


def _end_token_line(tokenizer, think: ThinkTokens, model: str) -> str | None:
    """Which token the rows train as the stop, when the chat template's end of turn, the tokenizer's eos_token
    and `model.end_token` do not all name the same one; and how to choose.

    A policy trained on its template ends its answers with the template's end of turn, so the rows end with
    that one by default; a tokenizer's eos_token may name another (SmolLM2-135M-Instruct's names
    <|im_start|>, the token that opens a turn). vLLM stops on the eos_token and the generation config's ids
    unasked; the end token, where it is neither, is asked for in every request (`ThinkTokens.stop_ids`).
    """
    eos, template_end, chosen = tokenizer.eos_token_id, turn_end_id(tokenizer, think.tags), think.eos_id
    if chosen == eos and template_end in (None, eos):
        return None

    def name(token: int | None) -> str:
        return "none" if token is None else f"{tokenizer.convert_ids_to_tokens(token)!r} (id {token})"

    why = "model.end_token" if think.end_token is not None else "the chat template's end of turn"
    stops = "; the engine is asked to stop on it too" if think.stop_ids else ""
    others = {}  # the tokens not chosen, by id: what they are
    for token, what in ((template_end, "the chat template's end of turn"), (eos, "the eos_token")):
        if token is not None and token != chosen:
            others[token] = others.get(token, []) + [what]
    choose = "".join(
        f"; to train {' and '.join(what)} instead, set model.end_token: {tokenizer.convert_ids_to_tokens(token)!r}"
        + (" (or remove the key)" if token == template_end else "")
        for token, what in others.items()
    )
    return (
        f"end token: the rows end with {name(chosen)} and train it as the stop ({why}){stops}; the chat template "
        f"of {model} ends an assistant turn with {name(template_end)}, its eos_token is {name(eos)}{choose}"
    )


def _sources(key: str, definitions: list[tuple[Path, int | None]], found: Preflight) -> dict[str, SourceCheck]:
    """Each local source read and built as its stage will (with the recipe's `sample`); Hub ones noted."""
    checks = {}
    for definition, sample in definitions:
        spec = load_source_spec(definition)
        if spec.dataset.path is None:
            found.notes.append(
                f"{key}: {definition.name} reads the Hub dataset {spec.dataset.hf}; its rows are "
                "checked when the stage reads them"
            )
            continue
        result = check_source(spec, sample)
        found.problems += result.problems
        found.notes.append(f"{key}: {definition.name}: {result.summary()}")
        checks[spec.name] = result
    return checks


def _lengths(
    recipe: Recipe, think: ThinkTokens, prompts: dict[str, SourceCheck], evals: dict[str, SourceCheck], found: Preflight
) -> None:
    """Prompts against the room they need: the first pass, the close and an answer (generate, as
    `CutPolicy.has_room` keeps them), the context limit (eval)."""
    rule = CutPolicy.of(recipe, think)
    limit = model_len(recipe)

    def lengths(check: SourceCheck) -> list[int]:
        stated = recipe.stated_budget()
        return [
            len(
                think.tokenizer.apply_chat_template(
                    with_system_line(p, stated)["messages"], add_generation_prompt=True, tokenize=True
                )["input_ids"]
            )
            for p in check.prompts
        ]

    prompt_tokens = []
    for name, check in prompts.items():
        sizes = lengths(check)
        too_long = sum(not rule.has_room(size, limit) for size in sizes)
        prompt_tokens += sizes
        if too_long:
            line = (
                f"prompts: {name}: {too_long} of {len(sizes)} prompts leave no room for B = {recipe.budget} "
                f"thinking tokens, the close and an answer within {limit} tokens"
            )
            if recipe.generation.on_long_prompt == "error":
                found.problems.append(
                    f"{line}; raise {model_len_setting(recipe)}, lower budget, or set generation.on_long_prompt: drop"
                )
            else:
                found.notes.append(f"{line}: they will be dropped")
    for name, check in evals.items():
        sizes = lengths(check)
        too_long = sum(size >= recipe.context_limit for size in sizes)
        if too_long == len(sizes) and sizes:
            found.problems.append(
                f"eval: {name}: every prompt fills the context limit ({recipe.context_limit}); raise context_limit"
            )
        elif too_long:
            line = f"eval: {name}: {too_long} of {len(sizes)} prompts fill the context limit ({recipe.context_limit})"
            if recipe.eval.on_long_prompt == "error":
                found.problems.append(f"{line}; raise context_limit or set eval.on_long_prompt: drop")
            else:
                found.notes.append(f"{line}: they will be dropped")
    _disk(recipe, think, prompt_tokens, evals, found)


def _disk(
    recipe: Recipe, think: ThinkTokens, prompt_tokens: list[int], evals: dict[str, SourceCheck], found: Preflight
) -> None:
    """What the run writes, part by part (`disk.estimate`), against the free space of its folder's filesystem."""
    from length_control import train

    rule = CutPolicy.of(recipe, think)
    eval_samples, uncounted = [], []
    for definition in recipe.eval.sets:
        check = evals.get(load_source_spec(definition.source).name)
        if check is None:
            uncounted.append(f"the eval samples of {definition.source.name} (a Hub dataset)")
        else:
            eval_samples.append(len(check.prompts) * definition.samples_per_problem)
    uncounted += [
        f"the traces and rows of {ref.source.name} (a Hub dataset)"
        for ref in recipe.prompts.sources
        if load_source_spec(ref.source).dataset.path is None
    ]
    shape = disk.RunShape(
        prompt_tokens=prompt_tokens,
        samples_per_prompt=recipe.generation.samples_per_prompt,
        room=rule.first_pass_tokens + len(think.forced_close_ids) + recipe.generation.answer_max_tokens,
        sequence_len=train.sequence_len(recipe)[0],
        eval_samples=eval_samples,
        context_limit=recipe.context_limit,
    )
    need = disk.estimate(recipe, shape, train.training_choices(recipe), disk.local_model(policy_path(recipe.model)))
    need.uncounted += uncounted
    line, fits = disk.check_room(Path(recipe.output_dir), need)
    (found.notes if fits else found.problems).append(line)
