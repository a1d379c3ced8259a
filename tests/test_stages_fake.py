"""The generate and evaluate stages on a scripted engine, with the demo tokenizer.

Each problem's "model" is a transcript: the tests know every token it writes,
so they can check the exact ids each stage asks for and records (both cases
of closing at the budget, resume by shard, the forced arm's two passes and
its metrics) in well under a second a test, with no vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from length_control import contracts, evaluate, generate, splice
from length_control.cut import grace_tokens
from length_control.engines.fake import UNLIKELY, ScriptedEngine, transcripts
from length_control.engines.openai import OpenAIEngine
from length_control.engines.protocol import Engine, EngineError
from length_control.engines.recipe_engine import SharedEngine
from length_control.engines.vllm import VLLMEngine
from length_control.errors import DataError, EmptyOutput
from length_control.policy import load_tokenizer
from length_control.recipe import Recipe, Sampling, load_recipe

BUDGET = 14  # B thinking tokens after <think>: "\n" + two 7-token lines, less the last newline,
# so the forced "\n</think>" ends a line
FIRST_PASS = BUDGET + 1  # a first pass's output tokens: the policy's <think> and B thinking tokens
CONTEXT_LIMIT = 60  # 28-token prompts get 32 tokens of room; the 46-token ones 14, less than B
ANSWER_MAX_TOKENS = 8

SHORT = ("short", "Count down from 102 to 100. How many numbers do you say?", "3")
LONG = ("long", "Count down from 925 to 900. How many numbers do you say?", "26")
CUT = ("cut", "Count down from 703 to 700. How many numbers do you say?", "4")
# Prompts so long that the context limit comes before B: LIMIT thinks as LONG does, CRAMPED as CUT does.
LIMIT = ("limit", "Count down from 925 to 900, saying every number out loud. How many numbers do you say?", "26")
CRAMPED = ("cramped", "Count down from 703 to 700, saying every number out loud. How many numbers do you say?", "4")


@pytest.fixture(scope="module")
def policy(tokenizer_policy: Path) -> Path:
    return tokenizer_policy


class Ids:
    """Token ids of the policy's texts, and the transcripts of the test problems."""

    def __init__(self, policy: Path) -> None:
        self.tokenizer = load_tokenizer(str(policy))
        self.eos = self.tokenizer.eos_token_id
        self.close = self("</think>")
        self.forced_close = self("\n</think>")
        # LONG thinks past the budget and past the eval's room, then would close and answer.
        self.long_thinking = self("<think>\n01:925\n02:924\n03:923\n04:922\n05:921\n06:920\n")
        self.long = self.long_thinking + self.close + self.answer("26")
        self.after_forced_close = self.answer("26")  # LONG's answer after a close forced at B
        # CUT closes within B; B falls inside its answer.
        self.cut_thinking = self("<think>\n01:703\n")
        self.cut = self.cut_thinking + self.close + self.answer("1")
        # SHORT ends within B.
        self.short = self("<think>\n") + self.close + self.answer("3")

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def answer(self, number: str) -> list[int]:
        return self(f"\n\nThe answer is {number}.") + [self.eos]

    def prompt(self, question: str) -> list[int]:
        messages = [{"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]

    def script(self) -> dict[tuple[int, ...], list[int]]:
        """What the model writes after each problem's prompt, and after LONG's forced close."""
        long = self.prompt(LONG[1])
        return {
            tuple(self.prompt(SHORT[1])): self.short,
            tuple(long): self.long,
            (*long, *self.long_thinking[:FIRST_PASS], *self.forced_close): self.after_forced_close,
            tuple(self.prompt(CUT[1])): self.cut,
            tuple(self.prompt(LIMIT[1])): self.long,
            tuple(self.prompt(CRAMPED[1])): self.cut,
        }


@pytest.fixture(scope="module")
def ids(policy: Path) -> Ids:
    ids = Ids(policy)
    # What the tests below mean by each transcript.
    assert ids.close[0] not in ids.long_thinking
    assert len(ids.long_thinking) > CONTEXT_LIMIT - len(ids.prompt(LONG[1])) > FIRST_PASS + len(ids.forced_close)
    assert len(ids.cut_thinking + ids.close) < FIRST_PASS < len(ids.cut) <= FIRST_PASS + ANSWER_MAX_TOKENS
    assert len(ids.short) <= FIRST_PASS and len(ids.after_forced_close) > ANSWER_MAX_TOKENS
    for cramped in (LIMIT, CRAMPED):
        assert len(ids.cut_thinking + ids.close) < CONTEXT_LIMIT - len(ids.prompt(cramped[1])) < FIRST_PASS
    return ids


def make_recipe(folder: Path, policy: Path, problems: list[tuple[str, str, str]]) -> Recipe:
    """A recipe in `folder` over `policy`, whose prompts and eval set are `problems` (id, question, answer)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"id": i, "question": q, "answer": a} for i, q, a in problems]
    for name in ("prompts", "evals"):  # record ids are "<source name>/<id>"
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        source = {
            "name": name,
            "dataset": {"path": f"{name}.jsonl"},
            "prompt": "{question}",
            "reference": "answer",
            "id": "id",
            "grader": "exact",
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(source))
    (folder / "axolotl.yaml").write_text("{}\n")
    recipe = {
        "name": "fake",
        "output_dir": "run",
        "model": {"path": str(policy)},
        "budget": BUDGET,
        "context_limit": CONTEXT_LIMIT,
        "prompts": {"sources": ["prompts.yaml"]},
        "generation": {"answer_max_tokens": ANSWER_MAX_TOKENS, "shard_size": 2},
        "train": {"template": "axolotl.yaml"},
        "eval": {"sets": ["evals.yaml"]},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(folder / "recipe.yaml")


def by_id(records: list[dict], key: str = "prompt_id") -> dict[str, dict]:
    return {r[key]: r for r in records}


def test_the_engines_keep_the_engine_protocol() -> None:
    for engine in (VLLMEngine, OpenAIEngine, SharedEngine, ScriptedEngine):
        assert issubclass(engine, Engine), engine


def test_the_scripted_engine_follows_its_transcripts() -> None:
    eos = 2
    # After [1, 1, 5, 6, 7] the longer listed context wins over the transcript of [1, 1].
    script = transcripts({(1, 1): [5, 6, 7, eos], (1, 1, 5, 9): [8, eos], (1, 1, 5, 6, 7): [4, eos]})
    engine = ScriptedEngine(script)
    requests = [
        {"key": "whole", "prompt_token_ids": [1, 1], "max_tokens": 4},  # EOS is the 4th token: stop
        {"key": "cut", "prompt_token_ids": [1, 1], "max_tokens": 3},
        {"key": "along", "prompt_token_ids": [1, 1, 5, 6], "max_tokens": 9},
        {"key": "branch", "prompt_token_ids": [1, 1, 5, 9], "max_tokens": 9},
        {"key": "longest", "prompt_token_ids": [1, 1, 5, 6, 7], "max_tokens": 9},
        {"key": "stopped", "prompt_token_ids": [1, 1], "max_tokens": 9, "stop_token_ids": [6]},  # as vLLM: kept
        {"key": "scored", "prompt_token_ids": [1, 1, 5, 9], "max_tokens": 1, "score_tail": 2},
    ]
    with engine:
        results = engine.generate(requests)
        assert engine.generate([]) == []
    assert [(r["key"], r["output_token_ids"], r["finish_reason"]) for r in results] == [
        ("whole", [5, 6, 7, eos], "stop"),
        ("cut", [5, 6, 7], "length"),
        ("along", [7, eos], "stop"),
        ("branch", [8, eos], "stop"),
        ("longest", [4, eos], "stop"),
        ("stopped", [5, 6], "stop"),
        ("scored", [], "stop"),
    ]
    # After [1, 1] the script writes 5; after [1, 1, 5] it writes 6, not 9.
    assert results[-1]["tail_logprobs"] == [0.0, UNLIKELY] and "tail_logprobs" not in results[0]
    assert (engine.requests, engine.calls) == (requests, 2)
    with pytest.raises(LookupError, match="no transcript fits"):
        engine.generate([{"key": "unscripted", "prompt_token_ids": [3], "max_tokens": 1}])


# ---------------------------------------------------------------- generate


class Generated(NamedTuple):
    recipe: Recipe
    summary: dict
    traces: dict[str, dict]  # by prompt id
    answers: dict[str, dict]  # by prompt id
    answer_requests: dict[str, dict]  # by prompt id


@pytest.fixture(scope="module")
def generated(tmp_path_factory, policy: Path, ids: Ids) -> Generated:
    """One generate run over LONG (case 1), CUT (case 2) and SHORT (ends within B)."""
    recipe = make_recipe(tmp_path_factory.mktemp("generate"), policy, [LONG, CUT, SHORT])
    engine = ScriptedEngine(transcripts(ids.script()))
    summary = generate.run(generate.plan(recipe), engine=engine)
    folder = recipe.output_dir / "generate"
    traces, answers = contracts.read_shards(folder, "traces"), contracts.read_shards(folder, "answers")
    answer_requests = [r for r in engine.requests if r["key"].endswith("/answer")]
    return Generated(recipe, summary, by_id(traces), by_id(answers), by_id(answer_requests))


def test_case_1_answers_after_exactly_b_tokens_and_the_forced_close(generated, ids: Ids) -> None:
    traces, answers, answer_requests = generated.traces, generated.answers, generated.answer_requests
    trace = traces["prompts/long"]
    assert trace["output_token_ids"] == ids.long[:FIRST_PASS]
    assert (trace["finish_reason"], trace["think_close"]) == ("length", None)
    request = answer_requests["prompts/long"]
    assert request["prompt_token_ids"] == ids.prompt(LONG[1]) + ids.long_thinking[:FIRST_PASS] + ids.forced_close
    answer = answers["prompts/long"]
    assert (answer["case"], answer["close_token_ids"]) == (1, ids.forced_close)
    # The scripted answer after the forced close, cut at answer_max_tokens.
    assert answer["answer_token_ids"] == ids.after_forced_close[:ANSWER_MAX_TOKENS]
    assert answer["finish_reason"] == "length"


def test_case_2_continues_the_whole_trace_from_its_own_close(generated, ids: Ids) -> None:
    traces, answers, answer_requests = generated.traces, generated.answers, generated.answer_requests
    trace = traces["prompts/cut"]
    assert trace["output_token_ids"] == ids.cut[:FIRST_PASS]
    assert (trace["finish_reason"], trace["think_close"]) == ("length", len(ids.cut_thinking))
    assert answer_requests["prompts/cut"]["prompt_token_ids"] == ids.prompt(CUT[1]) + ids.cut[:FIRST_PASS]
    answer = answers["prompts/cut"]
    assert (answer["case"], answer["close_token_ids"]) == (2, ids.close)
    assert (answer["answer_token_ids"], answer["finish_reason"]) == (ids.cut[FIRST_PASS:], "stop")


def test_the_answer_pass_samples_as_the_traces_unless_the_recipe_says_otherwise(
    generated, tmp_path: Path, policy: Path, ids: Ids
) -> None:
    sampling = generated.recipe.generation.sampling.model_dump()
    for request in generated.answer_requests.values():
        assert {key: request[key] for key in sampling} == sampling
    recipe = with_setting(
        make_recipe(tmp_path, policy, [LONG, CUT]), "generation", answer_sampling=Sampling(temperature=0, top_k=-1)
    )
    engine = ScriptedEngine(transcripts(ids.script()))
    generate.run(generate.plan(recipe), engine=engine)
    greedy = {"temperature": 0.0, "top_p": 0.95, "top_k": -1, "min_p": 0.0}
    firsts = [r for r in engine.requests if not r["key"].endswith("/answer")]
    answers = [r for r in engine.requests if r["key"].endswith("/answer")]
    assert len(answers) == 2 and all({key: r[key] for key in greedy} == greedy for r in answers)
    assert all({key: r[key] for key in sampling} == sampling for r in firsts)


def test_a_trace_that_ends_within_b_gets_no_answer(generated, ids: Ids) -> None:
    trace = generated.traces["prompts/short"]
    assert (trace["output_token_ids"], trace["finish_reason"]) == (ids.short, "stop")
    assert "prompts/short" not in generated.answers and "prompts/short" not in generated.answer_requests
    counts = {
        "traces": 3,
        "ended_within_budget": 1,
        "case1": 1,
        "case2": 1,
        "answers_cut": 1,
        "output_tokens": 2 * FIRST_PASS + len(ids.short),
    }
    assert {key: generated.summary[key] for key in counts} == counts


def outputs(folder: Path) -> list[str]:
    """The stage's output files; the manifest and the hidden plan also name the recipe's paths."""
    return sorted(p.name for p in folder.iterdir() if p.name != "manifest.json" and not p.name.startswith("."))


def test_a_crashed_run_resumes_at_the_missing_shard_with_the_same_files(tmp_path: Path, policy: Path, ids: Ids) -> None:
    prompts = [LONG, SHORT, CUT]  # shards of 2: CUT alone in the second
    script = transcripts(ids.script())
    cut_prompt = ids.prompt(CUT[1])

    def dies_at_cut(context: list[int]) -> list[int]:
        if context[: len(cut_prompt)] == cut_prompt:
            raise EngineError("the engine died")
        return script(context)

    whole = make_recipe(tmp_path / "whole", policy, prompts)
    generate.run(generate.plan(whole), engine=ScriptedEngine(script))
    crashed = make_recipe(tmp_path / "crashed", policy, prompts)
    with pytest.raises(EngineError):
        # One request in flight: the first shard is done before the second one's trace is asked for.
        generate.run(generate.plan(crashed), engine=ScriptedEngine(dies_at_cut, in_flight=1))
    folder = crashed.output_dir / "generate"
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["answers-00000.parquet", "traces-00000.parquet"]
    assert not (folder / "manifest.json").exists()

    resumed = ScriptedEngine(script)
    generate.run(generate.plan(crashed), engine=resumed)
    # Only the second shard is asked for: CUT's trace, then its answer.
    assert [(r["key"], r["prompt_token_ids"]) for r in resumed.requests] == [
        ("prompts/cut#0", cut_prompt),
        ("prompts/cut#0/answer", cut_prompt + ids.cut[:FIRST_PASS]),
    ]
    files = outputs(whole.output_dir / "generate")
    assert (
        files
        == outputs(folder)
        == [
            "answers-00000.parquet",
            "answers-00001.parquet",
            "termination.json",
            "traces-00000.parquet",
            "traces-00001.parquet",
        ]
    )
    for name in files:
        assert (folder / name).read_bytes() == (whole.output_dir / "generate" / name).read_bytes(), name


def test_the_demo_tokenizer_ends_a_turn_on_its_eos_token_as_before(generated, ids: Ids) -> None:
    """The demo's eos_token is its template's end of turn: termination.json holds what it always held, and no
    request asks the engine for a stop of its own (the demo's outputs stay byte for byte)."""
    termination = json.loads((generated.recipe.output_dir / "generate" / "termination.json").read_text())
    assert termination == {
        "eos_id": ids.eos,
        "forced_close_ids": ids.forced_close,
        "forced_close_tag_start": 1,
        "end_ids": [ids.eos],
    }
    assert ids.tokenizer.convert_ids_to_tokens(ids.eos) == "<|im_end|>"
    assert not any("stop_token_ids" in request for request in generated.answer_requests.values())
    assert "end_token" not in contracts.upstream(generated.recipe.output_dir / "generate")["config"]


@pytest.fixture(scope="module")
def turn_opening_eos(tmp_path_factory, policy: Path) -> Path:
    """The demo tokenizer with <|im_start|>, the token that opens a turn, as its eos_token, as
    SmolLM2-135M-Instruct's files name it; its template still ends an assistant turn with <|im_end|>."""
    import shutil

    folder = tmp_path_factory.mktemp("turn-opening-eos") / "policy"
    shutil.copytree(policy, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text()) | {"eos_token": "<|im_start|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def test_a_tokenizer_whose_eos_opens_a_turn_trains_the_templates_end_of_turn(
    tmp_path: Path, turn_opening_eos: Path, ids: Ids
) -> None:
    """The policy answers as its template taught it: the answer, <|im_end|>, then on into the next turn. Every
    request asks the engine to stop on <|im_end|>, so the answer ends there (an engine stopping on the
    eos_token alone would have run on to <|im_start|>), and the stage-2 row ends with it and trains it."""
    im_start, im_end = ids.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert load_tokenizer(str(turn_opening_eos)).eos_token_id == im_start
    long = ids.prompt(LONG[1])
    answer = ids("\n\nThe answer is 26.") + [im_end] + ids("\n") + [im_start] + ids("user\n")
    script = transcripts({tuple(long): ids.long, (*long, *ids.long_thinking[:FIRST_PASS], *ids.forced_close): answer})
    recipe = with_setting(make_recipe(tmp_path, turn_opening_eos, [LONG]), "generation", answer_max_tokens=16)
    engine = ScriptedEngine(script)
    generate.run(generate.plan(recipe), engine=engine)
    assert [request["stop_token_ids"] for request in engine.requests] == [[im_end], [im_end]]
    folder = recipe.output_dir / "generate"
    assert contracts.read_termination(folder).eos_id == im_end
    ended = answer[: answer.index(im_end) + 1]
    assert contracts.read_shards(folder, "answers")[0]["answer_token_ids"] == ended
    splice.run(splice.plan(recipe))
    row = pq.read_table(recipe.output_dir / "stage2" / "rows.parquet").to_pylist()[0]
    assert row["input_ids"][-len(ended) :] == ended and row["labels"][-1] == im_end

    forced = ScriptedEngine(script)  # the eval arms and the drift probe's greedy answers stop there too
    evaluate.run(evaluate.plan(recipe, "forced"), engine=forced)
    generating = [request for request in forced.requests if not request.get("score_tail")]
    assert len(generating) == 3 and all(request["stop_token_ids"] == [im_end] for request in generating)


def test_a_finished_stage_reruns_without_the_engine(generated) -> None:
    folder = generated.recipe.output_dir / "generate"
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    untouched = ScriptedEngine(lambda context: pytest.fail("the finished stage asked the engine"))
    assert generate.run(generate.plan(generated.recipe), engine=untouched) == generated.summary
    assert untouched.calls == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files


# ---------------------------------------------------------------- evaluate


EVALS = [LONG, CUT, SHORT, LIMIT, CRAMPED]


def samples_of(recipe: Recipe, arm: str) -> dict[str, dict]:
    import pyarrow.parquet as pq

    samples = pq.read_table(recipe.output_dir / "eval" / arm / "samples.parquet").to_pylist()
    return {s["problem_id"].removeprefix("evals/"): s for s in samples}


def test_the_forced_arm_closes_at_b_and_scores_the_answers(tmp_path: Path, policy: Path, ids: Ids) -> None:
    recipe = make_recipe(tmp_path, policy, EVALS)
    engine = ScriptedEngine(transcripts(ids.script()))
    metrics = evaluate.run(evaluate.plan(recipe, "forced"), engine=engine)

    prompt = {name: ids.prompt(question) for name, question, _ in EVALS}
    room = {name: CONTEXT_LIMIT - len(p) for name, p in prompt.items()}
    first_pass, answers = engine.requests[: len(EVALS)], [r for r in engine.requests if r["key"].endswith("/answer")]
    assert [(r["prompt_token_ids"], r["max_tokens"]) for r in first_pass] == [
        (prompt[name], min(FIRST_PASS, room[name])) for name, _, _ in EVALS
    ]
    # Past B without a close: cut at B, forced close, answer in the room left. Closed within
    # B: continued from its own close. SHORT ended; LIMIT and CRAMPED ran out of room first.
    long_prefix = ids.long_thinking[:FIRST_PASS] + ids.forced_close
    assert [(r["key"], r["prompt_token_ids"], r["max_tokens"]) for r in answers] == [
        ("evals/long#0/answer", prompt["long"] + long_prefix, room["long"] - len(long_prefix)),
        ("evals/cut#0/answer", prompt["cut"] + ids.cut[:FIRST_PASS], room["cut"] - FIRST_PASS),
    ]

    samples = samples_of(recipe, "forced")
    assert samples["long"]["output_token_ids"] == long_prefix + ids.after_forced_close
    assert samples["cut"]["output_token_ids"] == ids.cut
    assert samples["short"]["output_token_ids"] == ids.short
    assert samples["limit"]["output_token_ids"] == ids.long[: room["limit"]]
    assert samples["cramped"]["output_token_ids"] == ids.cut[: room["cramped"]]
    # CUT answers 1, not 4; CRAMPED's answer was cut by the limit.
    assert {name: s["correct"] for name, s in samples.items()} == {
        "long": True,
        "cut": False,
        "short": True,
        "limit": False,
        "cramped": False,
    }
    # Overlong means no close within the limit, not a cut: CRAMPED closed.
    assert {name: (s["finish_reason"], s["overlong"]) for name, s in samples.items()} == {
        "long": ("stop", False),
        "cut": ("stop", False),
        "short": ("stop", False),
        "limit": ("length", True),
        "cramped": ("length", False),
    }

    written = json.loads((recipe.output_dir / "eval" / "forced" / "metrics.json").read_text())
    assert written == metrics
    evals = metrics["benchmarks"]["evals"]
    assert (evals["problems"], evals["samples"]) == (5, 5)
    assert (evals["score"], evals["overlong_rate"], evals["closed_accuracy"]) == (2 / 5, 1 / 5, 2 / 4)
    thinking = [
        len(long_prefix) - len(ids.close),
        len(ids.cut_thinking),
        len(ids("<think>\n")),
        room["limit"],
        len(ids.cut_thinking),
    ]
    assert evals["mean_thinking_tokens"] == sum(thinking) / 5 - 1  # <think> is not a thinking token

    # The answer-drift reference: LONG alone was closed at B and answered; the script's own answer is certain.
    drift = pq.read_table(recipe.output_dir / "eval" / "forced" / "drift.parquet").to_pylist()
    assert [
        (r["problem_id"], r["answer_start"], r["greedy_token_ids"], r["answer_nll"], r["greedy_agrees"]) for r in drift
    ] == [("evals/long", len(long_prefix), ids.after_forced_close, 0.0, None)]
    assert (evals["drift_samples"], evals["answer_nll"]) == (1, 0.0) and "greedy_answer_agreement" not in evals


def test_the_before_arm_counts_overlong_samples_and_probes_them(tmp_path: Path, policy: Path, ids: Ids) -> None:
    recipe = make_recipe(tmp_path, policy, EVALS)
    engine = ScriptedEngine(transcripts(ids.script()))
    metrics = evaluate.run(evaluate.plan(recipe, "before"), engine=engine)["benchmarks"]["evals"]

    samples = samples_of(recipe, "before")
    long_room = CONTEXT_LIMIT - len(ids.prompt(LONG[1]))
    assert samples["long"]["output_token_ids"] == ids.long_thinking[:long_room]
    assert {name: s["overlong"] for name, s in samples.items()} == {
        "long": True,
        "cut": False,
        "short": False,
        "limit": True,
        "cramped": False,
    }
    assert (metrics["score"], metrics["overlong_rate"]) == (1 / 5, 2 / 5)
    # The probe takes LONG only (LIMIT never reached B). The script would go on thinking after
    # B + "\n", so the default log-probability makes the close unlikely, and greedy does not close.
    probed = [r for r in engine.requests if r["key"].startswith("close:") and r.get("score_tail")]
    assert [(r["prompt_token_ids"], r["score_tail"]) for r in probed] == [
        (ids.prompt(LONG[1]) + ids.long_thinking[:FIRST_PASS] + ids.forced_close, len(ids.close))
    ]
    assert (metrics["probe_traces"], metrics["close_nll"], metrics["greedy_close_rate"]) == (1, -UNLIKELY, 0.0)
    # The early-close probe takes the samples that closed on their own within B, at each "\n" before the close.
    early = pq.read_table(recipe.output_dir / "eval" / "before" / "early_close.parquet").to_pylist()
    asked = [r["key"] for r in engine.requests if r["key"].startswith("early:")]
    # CUT and CRAMPED ("<think>\n01:703\n</think>"): one place, after "<think>\n"
    assert [(r["problem_id"], r["positions"]) for r in early] == [("evals/cut", 1), ("evals/cramped", 1)]
    assert len(asked) == sum(r["positions"] for r in early)
    assert metrics["early_close_traces"] == len(early)
    # The answer-drift reference after the policy's own close: the samples that closed within B and ended.
    own = pq.read_table(recipe.output_dir / "eval" / "before" / "drift.parquet").to_pylist()
    # (CRAMPED closed within B but ran out of room before its answer ended: nothing to compare)
    assert sorted(r["problem_id"] for r in own) == ["evals/cut", "evals/short"]
    assert {(r["close"], r["greedy_agrees"]) for r in own} == {("own", None)}


# ---------------------------------------------------------------- what must fail before the GPUs do


HUGE = ("huge", "Count down from 925 to 900" + ", slowly and out loud" * 8 + ". How many numbers do you say?", "26")


def with_setting(recipe: Recipe, section: str, **values) -> Recipe:
    return recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=values)})


def test_editing_a_data_file_makes_generate_and_eval_stale(tmp_path: Path, policy: Path, ids: Ids) -> None:
    recipe = make_recipe(tmp_path, policy, [SHORT])
    engine = ScriptedEngine(transcripts(ids.script()))
    assert generate.run(generate.plan(recipe), engine=engine)["traces"] == 1
    assert evaluate.run(evaluate.plan(recipe, "forced"), engine=engine)["benchmarks"]["evals"]["samples"] == 1
    for name in ("prompts", "evals"):  # the same definitions, one more row in their data
        with open(tmp_path / f"{name}.jsonl", "a") as data:
            data.write(json.dumps({"id": CUT[0], "question": CUT[1], "answer": CUT[2]}) + "\n")
    assert generate.run(generate.plan(recipe), engine=engine)["traces"] == 2
    assert evaluate.run(evaluate.plan(recipe, "forced"), engine=engine)["benchmarks"]["evals"]["samples"] == 2


def test_an_eval_arm_written_before_a_records_column_was_added_is_redone(
    tmp_path: Path, policy: Path, ids: Ids, monkeypatch
) -> None:
    recipe = make_recipe(tmp_path, policy, [LONG])
    engine = ScriptedEngine(transcripts(ids.script()))
    evaluate.run(evaluate.plan(recipe, "forced"), engine=engine)
    asked = len(engine.requests)
    evaluate.run(evaluate.plan(recipe, "forced"), engine=engine)
    assert len(engine.requests) == asked  # up to date
    newer = contracts.DRIFT_SCHEMA.append(pa.field("newer_column", pa.int32()))
    monkeypatch.setitem(contracts.PROBE_SCHEMAS, contracts.DRIFT, newer)
    evaluate.run(evaluate.plan(recipe, "forced"), engine=engine)
    assert len(engine.requests) > asked
    assert "newer_column" in pq.read_schema(recipe.output_dir / "eval" / "forced" / contracts.DRIFT).names


def test_a_prompt_with_no_room_for_b_is_dropped_and_counted_never_cut_early(
    tmp_path: Path, policy: Path, ids: Ids
) -> None:
    recipe = make_recipe(tmp_path, policy, [LONG, LIMIT])
    assert len(ids.prompt(LIMIT[1])) + FIRST_PASS + len(ids.forced_close) + 1 > CONTEXT_LIMIT
    engine = ScriptedEngine(transcripts(ids.script()))
    summary = generate.run(generate.plan(recipe), engine=engine)
    assert (summary["prompts_too_long"], summary["traces"], summary["case1"]) == (1, 1, 1)
    assert all(r["prompt_id"] != "prompts/limit" for r in engine.requests)
    # No request asks for more than the engine's limit.
    assert all(len(r["prompt_token_ids"]) + r["max_tokens"] <= CONTEXT_LIMIT for r in engine.requests)
    strict = with_setting(make_recipe(tmp_path / "strict", policy, [LONG, LIMIT]), "generation", on_long_prompt="error")
    with pytest.raises(DataError, match=r"1 prompts .*prompts/limit.* leave no room for B = 14 thinking"):
        generate.run(generate.plan(strict), engine=engine)


def test_a_prompt_that_fills_the_context_is_dropped_and_counted(tmp_path: Path, policy: Path, ids: Ids) -> None:
    assert len(ids.prompt(HUGE[1])) >= CONTEXT_LIMIT
    engine = ScriptedEngine(transcripts(ids.script()))
    recipe = make_recipe(tmp_path / "mixed", policy, [LONG, HUGE])
    metrics = evaluate.run(evaluate.plan(recipe, "forced"), engine=engine)["benchmarks"]["evals"]
    assert (metrics["samples"], metrics["prompts_too_long"]) == (1, 1)
    strict = with_setting(recipe, "eval", on_long_prompt="error")
    (strict.output_dir / "eval" / "forced" / "manifest.json").unlink()
    with pytest.raises(DataError, match="evals: 1 prompts fill the context limit"):
        evaluate.run(evaluate.plan(strict, "forced"), engine=engine)
    only_huge = make_recipe(tmp_path / "huge", policy, [HUGE])
    with pytest.raises(EmptyOutput, match="every prompt fills the context limit; raise context_limit"):
        evaluate.run(evaluate.plan(only_huge, "forced"), engine=engine)


def test_a_stage_2_build_with_no_row_is_an_error_that_names_the_setting(tmp_path: Path, policy: Path, ids: Ids) -> None:
    engine = ScriptedEngine(transcripts(ids.script()))
    within = make_recipe(tmp_path / "within", policy, [SHORT])
    generate.run(generate.plan(within), engine=engine)
    with pytest.raises(EmptyOutput, match="every trace ended within the budget: lower `budget`"):
        splice.run(splice.plan(within))
    unfinished = make_recipe(tmp_path / "unfinished", policy, [LONG])  # its answer runs past answer_max_tokens
    generate.run(generate.plan(unfinished), engine=engine)
    with pytest.raises(EmptyOutput, match=r"1 answers did not finish within generation.answer_max_tokens"):
        splice.run(splice.plan(unfinished))
    assert not (unfinished.output_dir / "stage2" / "manifest.json").exists()


# ---------------------------------------------------------------- what a sweep shares


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in outputs(folder) if name.endswith(".parquet")}


def elsewhere(recipe: Recipe, name: str, **update) -> Recipe:
    """The recipe (same sources) with its run folder in `name`, and `update` set."""
    return recipe.model_copy(update={"output_dir": recipe.output_dir.parent / name, **update})


def test_a_lower_budget_cut_from_longer_traces_writes_the_files_sampled_at_it(
    tmp_path: Path, policy: Path, ids: Ids
) -> None:
    """Prefix sharing: traces sampled at B + 7 hold the first passes at B; only the answers after the close at B
    are generated, and the files are the ones a run sampled at B writes."""
    long = ids.prompt(LONG[1])
    script = transcripts(
        ids.script() | {(*long, *ids.long_thinking[: BUDGET + 8], *ids.forced_close): ids.after_forced_close}
    )
    sampled = make_recipe(tmp_path, policy, [LONG, CUT, SHORT])
    expected = generate.run(generate.plan(sampled), engine=ScriptedEngine(script))
    longer = elsewhere(sampled, "longer", budget=BUDGET + 7)
    generate.run(generate.plan(longer), engine=ScriptedEngine(script))
    assert contracts.upstream(longer.output_dir / "generate")["summary"]["case2"] == 0  # CUT ends within B + 7

    cut = elsewhere(sampled, "cut")
    engine = ScriptedEngine(script)
    summary = generate.run(generate.plan(cut, longer=longer.output_dir / "generate"), engine=engine)
    # No first pass is sampled: LONG's and CUT's answers after their close at B are.
    assert sorted(r["key"] for r in engine.requests) == ["prompts/cut#0/answer", "prompts/long#0/answer"]
    assert files_of(cut.output_dir / "generate") == files_of(sampled.output_dir / "generate")
    assert summary == expected

    # The same budget with other stage-2 settings (a span sweep) takes every answer too: nothing is generated.
    other = elsewhere(with_setting(sampled, "splice", termination_span="think_close"), "span")
    untouched = ScriptedEngine(lambda context: pytest.fail("an answer the longer run has was asked for again"))
    generate.run(generate.plan(other, longer=sampled.output_dir / "generate"), engine=untouched)
    assert untouched.calls == 0
    assert files_of(other.output_dir / "generate") == files_of(sampled.output_dir / "generate")

    # Traces of other settings, or of a lower budget, are not cut into a run.
    with pytest.raises(DataError, match="seed"):
        generate.run(
            generate.plan(elsewhere(sampled, "seed", seed=7), longer=longer.output_dir / "generate"),
            engine=ScriptedEngine(script),
        )
    with pytest.raises(DataError, match=f"budget \\({BUDGET + 7} < {BUDGET + 8}\\)"):
        generate.run(
            generate.plan(elsewhere(sampled, "larger", budget=BUDGET + 8), longer=longer.output_dir / "generate"),
            engine=ScriptedEngine(script),
        )


def test_the_forced_arm_cuts_its_first_passes_from_the_before_arm(tmp_path: Path, policy: Path, ids: Ids) -> None:
    alone = make_recipe(tmp_path, policy, EVALS)
    evaluate.run(evaluate.plan(alone, "forced"), engine=ScriptedEngine(transcripts(ids.script())))

    recipe = elsewhere(alone, "after-before")
    evaluate.run(evaluate.plan(recipe, "before"), engine=ScriptedEngine(transcripts(ids.script())))
    engine = ScriptedEngine(transcripts(ids.script()))
    plan = evaluate.plan(recipe, "forced")
    assert plan.reads.first_passes == recipe.output_dir / "eval" / "before"
    evaluate.run(plan, engine=engine)
    generated = [
        r["key"] for r in engine.requests if not r["key"].startswith(("answer:", "greedy:"))
    ]  # the drift probe's
    assert sorted(generated) == ["evals/cut#0/answer", "evals/long#0/answer"]
    assert samples_of(recipe, "forced") == samples_of(alone, "forced")


def test_a_before_arm_shared_at_another_budget_runs_only_its_probe(tmp_path: Path, policy: Path, ids: Ids) -> None:
    leader = make_recipe(tmp_path, policy, EVALS)
    evaluate.run(evaluate.plan(leader, "before"), engine=ScriptedEngine(transcripts(ids.script())))
    lower = elsewhere(leader, "lower", budget=BUDGET - 7)
    long, limit = ids.prompt(LONG[1]), ids.prompt(LIMIT[1])
    engine = ScriptedEngine(
        transcripts(
            ids.script()
            | {  # at B - 7 LIMIT has room to reach the budget
                (*prompt, *ids.long_thinking[: BUDGET - 6], *ids.forced_close): ids.after_forced_close
                for prompt in (long, limit)
            }
        )
    )
    shared = leader.output_dir / "eval" / "before"
    metrics = evaluate.run(evaluate.plan(lower, "before", samples=shared), engine=engine)
    assert all(r.get("score_tail") or r["temperature"] == 0.0 for r in engine.requests)  # the probe's, no sampling
    assert samples_of(lower, "before") == samples_of(leader, "before")
    # At B - 7 every sample but SHORT runs past the budget: the probe takes four, LONG's cut at B - 7.
    probed = [r["prompt_token_ids"] for r in engine.requests if r["key"].startswith("close:") and r.get("score_tail")]
    assert long + ids.long_thinking[: BUDGET - 6] + ids.forced_close in probed
    assert len(probed) == metrics["benchmarks"]["evals"]["probe_traces"] == 4

    resampled = elsewhere(
        with_setting(leader, "eval", sampling=leader.eval.sampling.model_copy(update={"temperature": 1.0})), "resampled"
    )
    with pytest.raises(DataError, match="eval"):
        evaluate.run(evaluate.plan(resampled, "before", samples=shared), engine=ScriptedEngine(lambda context: []))


def test_a_line_end_cut_closes_after_the_last_whole_line_and_records_it(tmp_path: Path, policy: Path, ids: Ids) -> None:
    """B = 12 falls inside LONG's second line ("\\n02:924" starts at thinking token 7): with `cut.at:
    line_end` and room for it, the close goes before that line's newline, so "\\n</think>" ends the first
    line as the policy's own closes do; the answer record and the stage-2 row say where."""
    budget, line = 12, len(ids("<think>\n01:925"))  # the cut: after the first whole line
    long = ids.prompt(LONG[1])
    script = transcripts(ids.script() | {(*long, *ids.long_thinking[:line], *ids.forced_close): ids.answer("26")})
    recipe = with_setting(
        make_recipe(tmp_path, policy, [LONG]).model_copy(update={"budget": budget}), "cut", at="line_end", grace=0.5
    )
    recipe = with_setting(recipe, "generation", answer_max_tokens=16)  # room for the whole answer
    engine = ScriptedEngine(script)
    summary = generate.run(generate.plan(recipe), engine=engine)
    answer = contracts.read_shards(recipe.output_dir / "generate", "answers")[0]
    assert engine.requests[-1]["prompt_token_ids"] == long + ids.long_thinking[:line] + ids.forced_close
    assert (answer["case"], answer["close_at"], answer["cut_back"]) == (1, line, budget + 1 - line)
    assert summary["case1_cut_at_line_end"] == 1

    import pyarrow.parquet as pq

    splice.run(splice.plan(recipe))
    meta = pq.read_table(recipe.output_dir / "stage2" / "meta.parquet").to_pylist()
    assert [(m["close_at"], m["cut_back"]) for m in meta] == [(line, budget + 1 - line)]

    # The forced arm cuts the same way; an exact cut (the default) stays at B, inside the line.
    forced = ScriptedEngine(script)
    evaluate.run(evaluate.plan(recipe, "forced"), engine=forced)
    answered = [r for r in forced.requests if r["key"].endswith("/answer")]
    assert answered[-1]["prompt_token_ids"] == long + ids.long_thinking[:line] + ids.forced_close
    assert grace_tokens(with_setting(recipe, "cut", at="exact").cut, budget) == 0


def test_any_model_is_evaluated_without_a_recipe_as_a_recipes_before_arm(
    tmp_path: Path, policy: Path, ids: Ids
) -> None:
    from length_control._schema import ConfigError
    from length_control.recipe import eval_recipe

    recipe = make_recipe(tmp_path, policy, EVALS)
    evaluate.run(evaluate.plan(recipe, "before"), engine=ScriptedEngine(transcripts(ids.script())))
    alone = eval_recipe(
        str(policy),
        [tmp_path / "evals.yaml"],
        context_limit=CONTEXT_LIMIT,
        budget=BUDGET,
        output_dir=tmp_path / "alone",
    )
    assert alone.output_dir == tmp_path / "alone" and alone.eval.arms == ["before"]
    evaluate.run(evaluate.plan(alone, "before"), engine=ScriptedEngine(transcripts(ids.script())))
    assert samples_of(alone, "before") == samples_of(recipe, "before")
    # Without a budget there is no probe; the rest is the same.
    unbudgeted = eval_recipe(
        str(policy), [tmp_path / "evals.yaml"], context_limit=CONTEXT_LIMIT, output_dir=tmp_path / "unbudgeted"
    )
    engine = ScriptedEngine(transcripts(ids.script()))
    metrics = evaluate.run(evaluate.plan(unbudgeted, "before"), engine=engine)["benchmarks"]["evals"]
    assert "probe_traces" not in metrics and not any(r.get("score_tail") for r in engine.requests)
    assert samples_of(unbudgeted, "before") == samples_of(recipe, "before")

    (tmp_path / "ungraded.yaml").write_text(
        yaml.safe_dump({"name": "ungraded", "dataset": {"path": "evals.jsonl"}, "prompt": "{question}", "id": "id"})
    )
    for kwargs, message in [
        ({"budget": CONTEXT_LIMIT}, "smaller than --context-limit"),
        ({"overrides": ["eval.arms=[before,forced]"]}, "give --budget"),
        ({"sets": [tmp_path / "ungraded.yaml"]}, "no `grader`"),
    ]:
        arguments = {"sets": [tmp_path / "evals.yaml"], "context_limit": CONTEXT_LIMIT} | kwargs
        with pytest.raises(ConfigError, match=message):
            eval_recipe(str(policy), arguments.pop("sets"), **arguments)


def test_a_conditioned_run_states_each_budget_and_trains_one_dataset_on_all(
    tmp_path: Path, policy: Path, ids: Ids
) -> None:
    """Budgets 7 and 14: each budget's traces come from prompts that state it, LONG is cut at each, and the one
    stage-2 dataset holds both rows. A row trains the thinking before its close too, so that under the line
    the policy thinks on to the budget asked for (`conditioning.train_thinking`)."""
    import pyarrow.parquet as pq

    from length_control import pipeline

    make_recipe(tmp_path, policy, [LONG, SHORT])
    overrides = ["conditioning.budgets=[7,14]", "generation.answer_max_tokens=16", "context_limit=120"]
    recipe = load_recipe(tmp_path / "recipe.yaml", overrides)

    def prompt(question: str, budget: int) -> list[int]:
        messages = [
            {"role": "system", "content": f"Think for at most {budget} tokens."},
            {"role": "user", "content": question},
        ]
        return ids.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]

    script = {}
    for budget in (7, 14):
        long = prompt(LONG[1], budget)
        script |= {
            tuple(long): ids.long,
            tuple(prompt(SHORT[1], budget)): ids.short,
            (*long, *ids.long_thinking[: budget + 1], *ids.forced_close): ids.after_forced_close,
        }
    engine = ScriptedEngine(transcripts(script))  # a prompt without the line has no transcript
    plans = pipeline.plans_of(recipe)
    stage = {s.name: s for s in pipeline.STAGES}
    for plan in plans(stage["generate"]):
        generate.run(plan, engine=engine)
    traced = {tuple(r["prompt_token_ids"]) for r in engine.requests if not r["key"].endswith("/answer")}
    assert traced == {tuple(prompt(q, budget)) for q in (LONG[1], SHORT[1]) for budget in (7, 14)}

    def rows(recipe: Recipe) -> dict[tuple[str, int], set[int]]:
        """The trained positions of each row, by (prompt id, budget); the last position is the row's EOS."""
        [plan] = pipeline.plans_of(recipe)(stage["splice"])
        splice.run(plan)
        folder = recipe.output_dir / "stage2"
        meta = pq.read_table(folder / contracts.META).to_pylist()
        data = pq.read_table(folder / contracts.ROWS).to_pylist()
        return {
            (m["prompt_id"], m["budget"]): {
                i - len(r["input_ids"]) if i == len(r["input_ids"]) - 1 else i
                for i, label in enumerate(r["labels"])
                if label != splice.IGNORE
            }
            for m, r in zip(meta, data)
            if m["kind"] == "length"
        }

    first = {budget: len(prompt(LONG[1], budget)) + 1 for budget in (7, 14)}  # LONG's first thinking token
    tag = len(ids.forced_close) - 1  # the trained close is "</think>", after the forced close's newline
    built = rows(recipe)
    # SHORT closes by 7 and is cut in its answer there (case 2): its own close is trained, nothing else.
    assert sorted(built) == [("prompts/long", 7), ("prompts/long", 14), ("prompts/short", 7)]
    for budget in (7, 14):
        assert built["prompts/long", budget] == {*range(first[budget], first[budget] + budget + tag + 1), -1}
    assert len(built["prompts/short", 7]) > 2  # its thinking, its own close and EOS

    alone = recipe.model_copy(update={"conditioning": recipe.conditioning.model_copy(update={"train_thinking": False})})
    assert rows(alone)["prompts/long", 14] == {first[14] + 14 + tag, -1}


# ---------------------------------------------------------------- a stage that runs again says why


def test_a_finished_stage_that_runs_again_names_the_file_or_setting(
    tmp_path: Path, policy: Path, ids: Ids, capsys
) -> None:
    recipe = with_setting(make_recipe(tmp_path, policy, [LONG, CUT]), "generation", answer_max_tokens=16)
    generate.run(generate.plan(recipe), engine=ScriptedEngine(transcripts(ids.script())))
    summary = splice.run(splice.plan(recipe))
    stage2 = recipe.output_dir / "stage2"
    assert splice.run(splice.plan(recipe)) == summary and capsys.readouterr().out == ""  # up to date: silent

    rows = stage2 / contracts.ROWS
    rows.write_bytes(rows.read_bytes()[:-16])
    assert splice.run(splice.plan(recipe)) == summary
    assert capsys.readouterr().out == f"{stage2} is redone: output not matching its manifest: rows.parquet\n"
    (stage2 / contracts.META).unlink()
    splice.run(splice.plan(recipe))
    assert capsys.readouterr().out == f"{stage2} is redone: output missing: meta.parquet\n"
    splice.run(splice.plan(with_setting(recipe, "splice", termination_span="think_close_answer_eos")))
    assert capsys.readouterr().out == f"{stage2} is redone: config changed: splice.termination_span\n"


def test_the_decided_span_scores_each_answer_and_trains_only_the_decided_ones(
    tmp_path: Path, policy: Path, ids: Ids
) -> None:
    """`think_close_decided_answer_eos`: generate scores every answer under the policy (in case 2 with what the
    first pass wrote after its own close); splice trains an answer whose every token had at least DECIDED_P,
    and only the close and EOS of one the policy was split on."""
    import math

    recipe = with_setting(make_recipe(tmp_path, policy, [LONG, CUT]), "generation", answer_max_tokens=16)
    recipe = with_setting(recipe, "splice", termination_span="think_close_decided_answer_eos")
    script = transcripts(ids.script())
    after_forced_close = (*ids.prompt(LONG[1]), *ids.long_thinking[:FIRST_PASS], *ids.forced_close)

    def logprob(context: list[int], token: int) -> float:  # LONG's answer opens on a near tie
        if tuple(context) == after_forced_close:
            return math.log(0.5)
        return 0.0 if script(context)[:1] == [token] else UNLIKELY

    engine = ScriptedEngine(script, logprob)
    generate.run(generate.plan(recipe), engine=engine)
    answers = by_id(contracts.read_shards(recipe.output_dir / "generate", "answers"))
    assert answers["prompts/long"]["answer_least_p"] == pytest.approx(0.5)
    assert answers["prompts/cut"]["answer_least_p"] == 1.0
    scored = {r["key"].split("#")[0]: r for r in engine.requests if r["key"].endswith("/answer/score")}
    cut_answer = ids.cut[len(ids.cut_thinking) + len(ids.close) :]  # all the policy wrote after its own close
    assert scored["prompts/cut"]["prompt_token_ids"][-len(cut_answer) :] == cut_answer
    assert scored["prompts/cut"]["score_tail"] == len(cut_answer)

    summary = splice.run(splice.plan(recipe))
    assert summary["answer_undecided"] == 1
    rows = pq.read_table(recipe.output_dir / "stage2" / "rows.parquet").to_pylist()
    meta = pq.read_table(recipe.output_dir / "stage2" / "meta.parquet").to_pylist()
    trained = {m["prompt_id"]: sum(label != -100 for label in row["labels"]) for m, row in zip(meta, rows)}
    tag = len(ids.forced_close) - 1  # "\n" is context, "</think>" is trained
    assert trained["prompts/long"] == tag + 1  # the close and EOS only
    assert trained["prompts/cut"] == len(ids.close) + len(cut_answer)  # the close, the answer and EOS
