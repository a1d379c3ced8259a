"""The probes on a scripted engine: which samples each probes, what it asks the engine for, and
how it scores the answers; and how an eval grades its samples."""

from __future__ import annotations

import math

from length_control import probes
from length_control.contracts import DRIFT, EARLY_CLOSE, PROBE
from length_control.engines.fake import ScriptedEngine, transcripts
from length_control.evaluate import summarize
from length_control.recipe import ThinkTags
from length_control.think import ThinkTokens

VOCAB = {"<think>": 1, "</think>": 2, "\n": 3, "a": 4, "<eos>": 5, "b": 6}


class Tokenizer:
    """Single-character pieces and whole tags: enough for ThinkTokens."""

    eos_token_id = VOCAB["<eos>"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        while text:
            piece = next(p for p in sorted(VOCAB, key=len, reverse=True) if text.startswith(p))
            ids.append(VOCAB[piece])
            text = text[len(piece) :]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        names = {v: k for k, v in VOCAB.items()}
        return "".join(names[i] for i in ids)


def _sample(problem: str, output: list[int]) -> dict:
    return {
        "benchmark": "demo",
        "problem_id": problem,
        "sample": 0,
        "prompt_token_ids": [9, 9],
        "output_token_ids": output,
    }


def test_the_probe_takes_case_1_traces_and_scores_the_close_tag() -> None:
    think = ThinkTokens(Tokenizer(), ThinkTags())
    a, b, close = VOCAB["a"], VOCAB["b"], VOCAB["</think>"]
    samples = [
        _sample("long", [1, 3, a, a, a, a, a, a]),  # ran past B = 3 thinking tokens unclosed: probed
        _sample("late", [1, 3, b, a, 3, close, 3, a]),  # closed after B: probed too
        _sample("short", [1, 3, close, 3, a, 5]),  # closed within B: not a case-1 trace
        _sample("cut", [1, 3, a]),  # never reached B: nothing to probe
    ]
    # What the model writes after each probed prefix (prompt + <think> + B tokens) and after the forced
    # close there, and how likely it finds the close after the forced close's "\n".
    script = transcripts(
        {(9, 9, 1, 3, a, a): [3, a], (9, 9, 1, 3, a, a, 3, close): [3, b, 5], (9, 9, 1, 3, b, a): [3, close, 3, b, 5]}
    )
    p_close = {(9, 9, 1, 3, a, a, 3): 0.25, (9, 9, 1, 3, b, a, 3): 0.5}
    engine = ScriptedEngine(script, logprob=lambda context, token: math.log(p_close[tuple(context)]))
    probe = probes.termination(engine, samples, budget=3, think=think)

    assert [p["problem_id"] for p in probe] == ["long", "late"]
    assert [p["close_nll"] for p in probe] == [math.log(4), math.log(2)]
    assert [p["greedy_close"] for p in probe] == [False, True]
    scored = [r for r in engine.requests if r.get("score_tail")]
    # prompt + <think> and the first B thinking tokens + the forced close ("\n</think>"); only "</think>" is scored
    assert [r["prompt_token_ids"] for r in scored] == [[9, 9, 1, 3, a, a, 3, close], [9, 9, 1, 3, b, a, 3, close]]
    assert [r["score_tail"] for r in scored] == [1, 1]
    greedy = [r for r in engine.requests if not r.get("score_tail")]
    assert greedy[0]["prompt_token_ids"] == [9, 9, 1, 3, a, a] and greedy[0]["temperature"] == 0.0
    assert greedy[0]["max_tokens"] == 2

    metrics = summarize(
        [{**s, "thinking_tokens": 4, "closed_think": True, "overlong": False, "correct": True} for s in samples],
        context_limit=16,
        probes={PROBE: probe},
    )["benchmarks"]["demo"]
    assert metrics["probe_traces"] == 2 and metrics["greedy_close_rate"] == 0.5
    assert math.isclose(metrics["close_nll"], (math.log(4) + math.log(2)) / 2)


def test_samples_are_graded_after_their_close_and_an_unclosed_one_is_overlong() -> None:
    from types import SimpleNamespace

    from length_control.evaluate import Problem, _score_all

    think = ThinkTokens(Tokenizer(), ThinkTags())
    spec = SimpleNamespace(name="demo", grader="exact")
    prompt = {"id": "p", "reference": "b"}
    a, b, close = VOCAB["a"], VOCAB["b"], VOCAB["</think>"]
    results = {
        "p#0": {"output_token_ids": [1, a, close, b], "finish_reason": "stop"},  # right
        "p#1": {"output_token_ids": [1, b, close, a], "finish_reason": "stop"},  # wrong: b was thinking
        "p#2": {"output_token_ids": [1, a, a, b], "finish_reason": "length"},
    }  # never closed
    samples = _score_all([Problem(0, spec, prompt, [9, 9], 3)], results, think, Tokenizer())
    assert [s["correct"] for s in samples] == [True, False, False]
    assert [s["overlong"] for s in samples] == [False, False, True]
    assert [s["thinking_tokens"] for s in samples] == [1, 1, 3]  # after <think>, up to the close
    assert samples[1]["extracted"] == "a" and samples[2]["why"] == "the thinking never closed"


def test_the_drift_probe_scores_the_forced_answer_and_compares_greedy_answers() -> None:
    a, b, close, eos = VOCAB["a"], VOCAB["b"], VOCAB["</think>"], VOCAB["<eos>"]
    # Two forced samples: prompt [9, 9], thinking cut at B, the forced close "\n</think>", the answer, EOS;
    # a third closed on its own within B (no answer start): not probed.
    forced = [
        {**_sample("p", [1, 3, a, a, 3, close, b, b, eos]), "finish_reason": "stop"},
        {**_sample("q", [1, 3, b, b, 3, close, a, eos]), "finish_reason": "stop"},
        {**_sample("r", [1, 3, close, a, eos]), "finish_reason": "stop"},
    ]
    starts = {"p#0": 6, "q#0": 6}
    stage_1 = transcripts({(9, 9, 1, 3, a, a, 3, close): [b, b, eos], (9, 9, 1, 3, b, b, 3, close): [a, eos]})
    reference = probes.answer_drift(ScriptedEngine(stage_1), forced, starts, context_limit=12)
    assert [(r["problem_id"], r["answer_start"], r["greedy_token_ids"], r["greedy_agrees"]) for r in reference] == [
        ("p", 6, [b, b, eos], None),
        ("q", 6, [a, eos], None),
    ]
    assert [r["answer_nll"] for r in reference] == [0.0, 0.0]  # the script writes its own answers: certain
    assert [r["stage1_greedy_min_p"] for r in reference] == [1.0, 1.0]  # and its greedy answers are decided

    # After training, q's answer is cut short: its greedy answer differs and its answer tokens got unlikely.
    trained = ScriptedEngine(
        transcripts({(9, 9, 1, 3, a, a, 3, close): [b, b, eos], (9, 9, 1, 3, b, b, 3, close): [eos]})
    )
    after = probes.answer_drift(trained, forced, starts, context_limit=12, reference=reference)
    assert [r["greedy_agrees"] for r in after] == [True, False]
    assert after[0]["answer_nll"] == 0.0 and math.isclose(after[1]["answer_nll"], -math.log(1e-6))
    scored = [r for r in trained.requests if r.get("score_tail")]
    # prefix + answer, the answer's tokens scored without the EOS that ended it
    assert [(r["prompt_token_ids"], r["score_tail"]) for r in scored] == [
        ([9, 9, 1, 3, a, a, 3, close, b, b], 2),
        ([9, 9, 1, 3, b, b, 3, close, a], 1),
    ]
    greedy = [r for r in trained.requests if not r.get("score_tail")]
    assert [r["max_tokens"] for r in greedy] == [12 - 8, 12 - 8]  # the context limit - prompt - prefix

    metrics = summarize(
        [{**s, "thinking_tokens": 2, "closed_think": True, "overlong": False, "correct": True} for s in forced],
        context_limit=12,
        probes={DRIFT: after},
    )["benchmarks"]["demo"]
    assert metrics["drift_samples"] == 2 and metrics["greedy_answer_agreement"] == 0.5
    assert (metrics["decided_answer_agreement"], metrics["split_samples"], metrics["ties_tipped"]) == (0.5, 0, 0)
    assert [r["stage1_greedy_min_p"] for r in after] == [1.0, 1.0]  # the reference's, beside each comparison

    # Had the stage-1 model been split on q's answer (a token at 0.5), its flip is a tie tipped, not drift.
    split = [{**r, "stage1_greedy_min_p": 0.5} if r["problem_id"] == "q" else r for r in reference]
    after = probes.answer_drift(trained, forced, starts, context_limit=12, reference=split)
    metrics = summarize(
        [{**s, "thinking_tokens": 2, "closed_think": True, "overlong": False, "correct": True} for s in forced],
        context_limit=12,
        probes={DRIFT: after},
    )["benchmarks"]["demo"]
    assert (metrics["greedy_answer_agreement"], metrics["decided_answer_agreement"]) == (0.5, 1.0)
    assert (metrics["split_samples"], metrics["ties_tipped"]) == (1, 1)


def test_the_early_close_probe_asks_at_the_line_ends_before_the_own_close() -> None:
    think = ThinkTokens(Tokenizer(), ThinkTags())
    a, close = VOCAB["a"], VOCAB["</think>"]
    samples = [
        _sample("early", [1, 3, a, 3, a, 3, close, 3, a, 5]),  # closed after 5 thinking tokens: probed
        _sample("long", [1, 3, a, a, a, a, a, a, a]),  # never closed within B: the termination probe's
        _sample("late", [1, 3, a, 3, a, a, a, a, 3, close, 5]),  # closed past B = 6: not probed
    ]
    p_close = {(9, 9, 1, 3): 0.1, (9, 9, 1, 3, a, 3): 0.3}
    engine = ScriptedEngine(transcripts({}), logprob=lambda context, token: math.log(p_close[tuple(context)]))
    records = probes.early_close(engine, samples, budget=6, think=think, positions=16)
    assert [(r["problem_id"], r["positions"]) for r in records] == [("early", 2)]
    assert math.isclose(records[0]["close_p_mean"], 0.2) and math.isclose(records[0]["close_p_max"], 0.3)
    # after each "\n" (the token its own close follows) before the close, the close tag is scored
    assert [(r["prompt_token_ids"], r["score_tail"]) for r in engine.requests] == [
        ([9, 9, 1, 3, close], 1),
        ([9, 9, 1, 3, a, 3, close], 1),
    ]
    assert probes.early_close(engine, samples, budget=6, think=think, positions=1)[0]["positions"] == 1

    metrics = summarize(
        [{**s, "thinking_tokens": 2, "closed_think": True, "overlong": False, "correct": True} for s in samples],
        context_limit=16,
        probes={EARLY_CLOSE: records},
    )["benchmarks"]["demo"]
    assert metrics["early_close_traces"] == 1 and math.isclose(metrics["early_close_p"], 0.2)


def test_a_probe_sends_each_distinct_request_once() -> None:
    """Samples that share a prefix (a problem's samples cut at B, where its thinking is deterministic) cost one
    request; every sample still gets its result, under its own key."""
    a, eos = VOCAB["a"], VOCAB["<eos>"]
    engine = ScriptedEngine(transcripts({(9, 9): [a, eos]}))
    requests = [
        {"key": key, "prompt_token_ids": [9, 9], "max_tokens": 2, "seed": 0, "temperature": 0.0}
        for key in ("p#0", "p#1", "p#2")
    ]
    requests.append({**requests[0], "key": "p#3", "max_tokens": 1})  # another question of the same prefix
    results = probes.ask(engine, requests, desc="probe")
    assert [(r["key"], r["output_token_ids"]) for r in results] == [
        ("p#0", [a, eos]),
        ("p#1", [a, eos]),
        ("p#2", [a, eos]),
        ("p#3", [a]),
    ]
    assert [r["key"] for r in engine.requests] == ["p#0", "p#3"]
