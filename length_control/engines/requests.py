"""The requests every engine takes: built here, one builder per kind, so a sample is the same on any engine.

A request carries its own seed (from the run seed, the prompt id and the
sample), so its result does not depend on the batch, the engine replica or
the endpoint that served it. Stdlib only: the vLLM worker process reads
`SAMPLING_KEYS` from here too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

# The sampling settings a request may carry, passed through to the engine as they are (vLLM's SamplingParams
# fields; the endpoint engine sends them in the request body).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "stop_token_ids", "thinking_token_budget")


def request_seed(run_seed: int, prompt_id: str, sample: int) -> int:
    """A seed per request: vLLM applies one seed's stream to every prompt that shares it."""
    digest = hashlib.sha256(f"{run_seed}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_request(
    prompt_id: str,
    sample: int,
    prompt_token_ids: list[int],
    *,
    max_tokens: int,
    run_seed: int,
    sampling,
    stop_token_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """Sample `sample` of a prompt: the one request builder of generate and evaluate.

    Its seed comes from (run seed, prompt id, sample), so a sample is the same
    whatever else is in the batch, and a rerun asks for the same tokens.
    `stop_token_ids`: ids to stop on besides the engine's own (the eos_token
    and the generation config's), `ThinkTokens.stop_ids`; the answer pass
    after a close inherits them.
    """
    return {
        "key": f"{prompt_id}#{sample}",
        "prompt_id": prompt_id,
        "sample": sample,
        "prompt_token_ids": list(prompt_token_ids),
        "max_tokens": max_tokens,
        "seed": request_seed(run_seed, prompt_id, sample),
        **sampling.model_dump(),
        **({"stop_token_ids": list(stop_token_ids)} if stop_token_ids else {}),
    }


def score_request(key: str, prompt: Sequence[int], tail: int) -> dict[str, Any]:
    """The log-probabilities of the prompt's last `tail` tokens (one token is generated, and not used): the
    probes' questions, and generate's of the answers it will train."""
    return {
        "key": key,
        "prompt_token_ids": list(prompt),
        "max_tokens": 1,
        "seed": 0,
        "temperature": 0.0,
        "score_tail": tail,
    }


def least_p(tail_logprobs: Sequence[float]) -> float:
    """The probability of the least likely of the scored tokens: a text is decided when every token of it is
    (`contracts.DECIDED_P`)."""
    return math.exp(min(tail_logprobs))


def shorter_result(longer: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """What a request asked for with `max_tokens` returns, from the same request's result with more.

    A seeded request's tokens do not depend on max_tokens (each step draws
    from the request's own generator), so the shorter result is the longer
    one's first tokens: a trace sampled to B_max holds the first pass at any
    B below it. When the longer output goes on past `max_tokens`, its token
    there did not stop it: the shorter one ran out of tokens ("length").
    """
    output = longer["output_token_ids"]
    if len(output) <= max_tokens:
        return dict(longer)
    return {**longer, "output_token_ids": output[:max_tokens], "finish_reason": "length", "stop_reason": None}


def answer_request(
    first: dict[str, Any], prefix: list[int], *, max_tokens: int, run_seed: int, sampling=None
) -> dict[str, Any]:
    """The answer pass of a request whose thinking was closed: its prompt + `prefix`, its own seed.

    `sampling`: the answer pass's own, where it differs from the first pass's.
    """
    return {
        **first,
        **(sampling.model_dump() if sampling is not None else {}),
        "key": f"{first['key']}/answer",
        "prompt_token_ids": first["prompt_token_ids"] + prefix,
        "max_tokens": max_tokens,
        "seed": request_seed(run_seed, f"{first['prompt_id']}/answer", first["sample"]),
    }
