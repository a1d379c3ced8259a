"""Probes: what stage 2 moved in a model, measured without sampling.

A score is a difference of two pass@1s under sampling noise; a probe asks
the engine for log-probabilities and greedy continuations on held-out eval
samples, so the same question gets the same answer before and after
training, and a small change shows. Stage 2 should move one thing, the close
at the budget, and nothing else:

- `termination`: at the budget, does the model close? (what stage 2 trains)
- `answer_drift`: after a close at the budget, does it still answer as the
  stage-1 model did? The stage-1 model's forced-arm samples are the
  reference: prompt + thinking cut at B + the forced close + its own answer.
  Stage 2 should not move their NLL nor the greedy answer, except where the
  stage-1 model was split between two answers (`contracts.DECIDED_P`): any change of
  weights, or of kernels, may tip a near tie.
- `early_close`: on traces that closed on their own before B, is closing
  earlier any likelier? Stage 2 should teach "close at B", not "close".

Each returns one record per probed trace (`contracts.PROBE_SCHEMA`,
`DRIFT_SCHEMA`, `EARLY_CLOSE_SCHEMA`); `evaluate.summarize` averages them
per benchmark and the report sets before beside after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from length_control.contracts import DriftRecord, EarlyCloseRecord, ProbeRecord, Sample, SampleKey
from length_control.cut import CutPolicy
from length_control.engines.requests import least_p, score_request
from length_control.think import ThinkTokens


def termination(engine, samples: list[Sample], budget: int, think: ThinkTokens) -> list[ProbeRecord]:
    """For every held-out sample whose thinking ran past B (no close in its
    first B thinking tokens: a case-1 trace), given the prompt and the
    output cut exactly at B (`CutPolicy` with an exact cut, as stage 2's
    rows are at the default `cut.at`): `close_nll`, -log p of the
    `</think>` tokens of the forced close (the "\\n" before them is
    context), and `greedy_close`, whether greedy decoding writes the close
    in the next len(forced close) tokens. Stage 2 trains exactly this spot,
    so the probe shows whether training moved the close even when sampling
    noise hides it in the overlong rate.
    """
    rule = CutPolicy(think, budget)
    traces = [(s, rule.cut(s["output_token_ids"])) for s in samples if rule.ran_past(s["output_token_ids"])]
    close, tag_start = think.forced_close_ids, think.termination().forced_close_tag_start
    scored, greedy = [], []
    for s, cut in traces:
        prefix = list(s["prompt_token_ids"]) + list(s["output_token_ids"][:cut])
        scored.append(score_request(f"close:{sample_key(s)}", prefix + close, len(close) - tag_start))
        greedy.append(_greedy_request(f"close:{sample_key(s)}", prefix, len(close)))
    scores = ask(engine, scored, desc="probe: close NLL")
    continuations = ask(engine, greedy, desc="probe: greedy close")
    return [
        ProbeRecord(
            **_id(s),
            close_nll=-sum(score["tail_logprobs"]),
            greedy_close=think.find_close(cont["output_token_ids"]) is not None,
        )
        for (s, _), score, cont in zip(traces, scores, continuations)
    ]


def answer_drift(
    engine,
    samples: list[Sample],
    answer_starts: dict[str, int],
    context_limit: int,
    reference: list[DriftRecord] | None = None,
    close: str = "forced",
    stop_token_ids: Sequence[int] = (),
) -> list[DriftRecord]:
    """On the forced arm's samples that were closed at B and answered (`answer_starts`: sample key -> where
    its answer starts in the output), with prefix = prompt + thinking cut at B + forced close and answer = the
    stage-1 model's own answer tokens (its end token left out: stage 2 trains that one). With `close="own"`,
    the same on the before arm's samples that closed on their own within B (`own_answer_starts`): stage 2
    should not move those answers either.

    `answer_nll`, -log p(answer | prefix) summed over the answer's tokens, and `greedy_token_ids`, what greedy
    decoding writes after the prefix within the context limit. Without `reference` this is the reference (the
    stage-1 model's own record, run in the forced arm), and `stage1_greedy_min_p` is the least probability it
    gives a token of its greedy answer (`contracts.DECIDED_P`); with it (the stage-1 records), `greedy_agrees` says
    whether this model's greedy answer is the stage-1 model's, token for token, and `stage1_greedy_min_p` is
    the reference's. `stop_token_ids`: the end token, where the engine does not stop on it by itself
    (`ThinkTokens.stop_ids`), so that a greedy answer ends where a sampled one does.
    """
    probed = [s for s in samples if sample_key(s) in answer_starts]
    scored, greedy, prefixes = [], [], []
    for s in probed:
        prefix, answer = _prefix_and_answer(s, answer_starts[sample_key(s)])
        prefixes.append(prefix)
        if answer:
            scored.append(score_request(f"answer:{sample_key(s)}", prefix + answer, len(answer)))
        greedy.append(_greedy_request(f"answer:{sample_key(s)}", prefix, context_limit - len(prefix), stop_token_ids))
    nll = {score["key"]: -sum(score["tail_logprobs"]) for score in ask(engine, scored, desc="probe: answer NLL")}
    continuations = ask(engine, greedy, desc="probe: greedy answer")
    if reference is None:
        min_p = _greedy_min_p(
            engine,
            [
                (sample_key(s), prefix, list(cont["output_token_ids"]))
                for s, prefix, cont in zip(probed, prefixes, continuations)
            ],
        )
    else:
        min_p = {sample_key(r): r["stage1_greedy_min_p"] for r in reference}
    expected = {sample_key(r): list(r["greedy_token_ids"]) for r in reference or []}
    records = []
    for s, cont in zip(probed, continuations):
        key, ids = sample_key(s), list(cont["output_token_ids"])
        records.append(
            DriftRecord(
                **_id(s),
                close=close,
                answer_start=answer_starts[key],
                answer_nll=nll.get(f"answer:{key}", 0.0),
                greedy_token_ids=ids,
                greedy_agrees=ids == expected[key] if reference is not None else None,
                stage1_greedy_min_p=min_p[key],
            )
        )
    return records


def _greedy_min_p(engine, answers: list[tuple[str, list[int], list[int]]]) -> dict[str, float | None]:
    """Per sample key: the least probability the model gives a token of its greedy answer after the prefix
    (None for an empty answer: the context limit left no room)."""
    requests = [score_request(f"greedy:{key}", prefix + ids, len(ids)) for key, prefix, ids in answers if ids]
    scores = ask(engine, requests, desc="probe: greedy answer margin")
    min_p: dict[str, float | None] = {key: None for key, _, _ in answers}
    for score in scores:
        min_p[score["key"].removeprefix("greedy:")] = least_p(score["tail_logprobs"])
    return min_p


def own_answer_starts(samples: list[Sample], budget: int, think: ThinkTokens) -> dict[str, int]:
    """Where the answer starts in each sample that closed its thinking on its own within B and ended."""
    rule = CutPolicy(think, budget)
    return {
        sample_key(s): span[1]
        for s in samples
        if s["finish_reason"] == "stop" and (span := rule.own_close(s["output_token_ids"])) is not None
    }


def _prefix_and_answer(sample: Sample, answer_start: int) -> tuple[list[int], list[int]]:
    """The context a forced answer was written in, and its tokens without the end token that closed it."""
    output = list(sample["output_token_ids"])
    answer = output[answer_start:]
    if sample["finish_reason"] == "stop" and answer:
        answer = answer[:-1]
    return list(sample["prompt_token_ids"]) + output[:answer_start], answer


def early_close(
    engine, samples: list[Sample], budget: int, think: ThinkTokens, positions: int
) -> list[EarlyCloseRecord]:
    """On samples whose thinking closed on its own within B: at up to `positions` earlier places where it
    could have closed (after a token like the one its close follows, "\\n" for most templates; spread evenly
    over the thinking when there are more), p(its own close tag | the output up to there).

    `close_p_mean` is the mean over the places, `close_p_max` the likeliest. A model that learned "close"
    rather than "close at B" shows it here before any overlong rate falls below the budget.
    """
    rule = CutPolicy(think, budget)
    traces = []
    for s in samples:
        output = list(s["output_token_ids"])
        span, start = rule.own_close(output), think.thinking_start(output)
        if span is None or span[0] <= start:
            continue
        before_close = output[span[0] - 1]
        places = [t for t in range(start + 1, span[0]) if output[t - 1] == before_close]
        if places:
            traces.append((s, _spread(places, positions), output[span[0] : span[1]]))
    requests = [
        score_request(
            f"early:{sample_key(s)}@{t}", list(s["prompt_token_ids"]) + list(s["output_token_ids"][:t]) + tag, len(tag)
        )
        for s, places, tag in traces
        for t in places
    ]
    probability = {
        r["key"]: math.exp(sum(r["tail_logprobs"])) for r in ask(engine, requests, desc="probe: early close")
    }
    records = []
    for s, places, _ in traces:
        p = [probability[f"early:{sample_key(s)}@{t}"] for t in places]
        records.append(EarlyCloseRecord(**_id(s), positions=len(p), close_p_mean=sum(p) / len(p), close_p_max=max(p)))
    return records


def ask(engine, requests: list[dict[str, Any]], *, desc: str) -> list[dict[str, Any]]:
    """The engine's results for `requests`, in order, each distinct request sent once.

    A probe's requests are greedy or score a given text, so equal requests get equal results; samples
    that share a prefix (the demo's count is deterministic: a problem's 8 samples cut at B are one
    prefix) would otherwise cost the engine that many times over.
    """
    first: dict[tuple, str] = {}
    for request in requests:
        first.setdefault(_signature(request), request["key"])
    distinct = [request for request in requests if first[_signature(request)] == request["key"]]
    results = {result["key"]: result for result in engine.generate(distinct, desc=desc)}
    return [{**results[first[_signature(request)]], "key": request["key"]} for request in requests]


def _signature(request: dict[str, Any]) -> tuple:
    return tuple(request["prompt_token_ids"]), request["max_tokens"], request.get("score_tail")


def _spread(places: list[int], count: int) -> list[int]:
    """`count` of `places`, evenly spread from the first to the last (all of them when there are fewer)."""
    if len(places) <= count:
        return places
    if count == 1:
        return [places[-1]]
    return sorted({places[round(i * (len(places) - 1) / (count - 1))] for i in range(count)})


def sample_key(sample: SampleKey) -> str:
    """A sample's request key: problem id # sample index."""
    return f"{sample['problem_id']}#{sample['sample']}"


def _id(sample: SampleKey) -> SampleKey:
    return SampleKey(benchmark=sample["benchmark"], problem_id=sample["problem_id"], sample=sample["sample"])


def _greedy_request(
    key: str, prompt: Sequence[int], max_tokens: int, stop_token_ids: Sequence[int] = ()
) -> dict[str, Any]:
    request = {"key": key, "prompt_token_ids": list(prompt), "max_tokens": max_tokens, "seed": 0, "temperature": 0.0}
    return request | ({"stop_token_ids": list(stop_token_ids)} if stop_token_ids else {})
