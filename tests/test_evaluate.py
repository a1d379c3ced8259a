"""The termination probe on a scripted engine: which samples it probes, what it asks the
engine for, and how it scores the answers."""

from __future__ import annotations

import math

from length_control.evaluate import summarize, termination_probe
from length_control.fake_engine import ScriptedEngine, transcripts
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
            text = text[len(piece):]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        names = {v: k for k, v in VOCAB.items()}
        return "".join(names[i] for i in ids)


def _sample(problem: str, output: list[int]) -> dict:
    return {"benchmark": "demo", "problem_id": problem, "sample": 0, "prompt_token_ids": [9, 9],
            "output_token_ids": output}


def test_the_probe_takes_case_1_traces_and_scores_the_close_tag() -> None:
    think = ThinkTokens(Tokenizer(), ThinkTags())
    a, b, close = VOCAB["a"], VOCAB["b"], VOCAB["</think>"]
    samples = [
        _sample("long", [1, 3, a, a, a, a, a, a]),           # ran past B = 3 thinking tokens unclosed: probed
        _sample("late", [1, 3, b, a, 3, close, 3, a]),       # closed after B: probed too
        _sample("short", [1, 3, close, 3, a, 5]),            # closed within B: not a case-1 trace
        _sample("cut", [1, 3, a]),                           # never reached B: nothing to probe
    ]
    # What the model writes after each probed prefix (prompt + <think> + B tokens) and after the forced
    # close there, and how likely it finds the close after the forced close's "\n".
    script = transcripts({(9, 9, 1, 3, a, a): [3, a], (9, 9, 1, 3, a, a, 3, close): [3, b, 5],
                          (9, 9, 1, 3, b, a): [3, close, 3, b, 5]})
    p_close = {(9, 9, 1, 3, a, a, 3): 0.25, (9, 9, 1, 3, b, a, 3): 0.5}
    engine = ScriptedEngine(script, logprob=lambda context, token: math.log(p_close[tuple(context)]))
    probe = termination_probe(engine, samples, budget=3, think=think)

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

    metrics = summarize([{**s, "thinking_tokens": 4, "closed_think": True, "overlong": False, "correct": True}
                         for s in samples], context_limit=16, probe=probe)["benchmarks"]["demo"]
    assert metrics["probe_traces"] == 2 and metrics["greedy_close_rate"] == 0.5
    assert math.isclose(metrics["close_nll"], (math.log(4) + math.log(2)) / 2)


def test_samples_are_graded_after_their_close_and_an_unclosed_one_is_overlong() -> None:
    from types import SimpleNamespace

    from length_control.evaluate import _score_all

    think = ThinkTokens(Tokenizer(), ThinkTags())
    spec = SimpleNamespace(name="demo", grader="exact")
    prompt = {"id": "p", "reference": "b"}
    a, b, close = VOCAB["a"], VOCAB["b"], VOCAB["</think>"]
    results = {"p#0": {"output_token_ids": [1, a, close, b], "finish_reason": "stop"},   # right
               "p#1": {"output_token_ids": [1, b, close, a], "finish_reason": "stop"},   # wrong: b was thinking
               "p#2": {"output_token_ids": [1, a, a, b], "finish_reason": "length"}}    # never closed
    samples = _score_all([(spec, prompt, [9, 9], 3)], results, think, Tokenizer())
    assert [s["correct"] for s in samples] == [True, False, False]
    assert [s["overlong"] for s in samples] == [False, False, True]
    assert [s["thinking_tokens"] for s in samples] == [1, 1, 3]  # after <think>, up to the close
    assert samples[1]["extracted"] == "a" and samples[2]["why"] == "the thinking never closed"
