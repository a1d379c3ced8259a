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

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tqdm import tqdm

from length_control.contracts import RunLayout
from length_control.envs import engine_bin, engine_environ
from length_control.progress import ticking
from length_control.recipe import VLLMOptions


@runtime_checkable
class Engine(Protocol):
    """What a stage needs from an engine: token ids in, token ids out.

    A context manager: entering starts the engine (which may take minutes),
    leaving stops it, and `generate` is called in between, as often as the
    stage likes. The contract every engine keeps, and the stages rely on:

    - one result per request, in the order of `requests` (each carries the
      request's `key`); an engine that cannot return one raises instead of
      dropping the sample;
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


class EngineError(RuntimeError):
    """The engine failed; the message carries the tail of its log."""


def request_seed(run_seed: int, prompt_id: str, sample: int) -> int:
    """A seed per request: vLLM applies one seed's stream to every prompt that shares it."""
    digest = hashlib.sha256(f"{run_seed}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_request(prompt_id: str, sample: int, prompt_token_ids: list[int], *, max_tokens: int,
                   run_seed: int, sampling) -> dict[str, Any]:
    """Sample `sample` of a prompt: the one request builder of generate and evaluate.

    Its seed comes from (run seed, prompt id, sample), so a sample is the same
    whatever else is in the batch, and a rerun asks for the same tokens.
    """
    return {
        "key": f"{prompt_id}#{sample}",
        "prompt_id": prompt_id,
        "sample": sample,
        "prompt_token_ids": list(prompt_token_ids),
        "max_tokens": max_tokens,
        "seed": request_seed(run_seed, prompt_id, sample),
        **sampling.model_dump(),
    }


def answer_request(first: dict[str, Any], prefix: list[int], *, max_tokens: int, run_seed: int) -> dict[str, Any]:
    """The answer pass of a request whose thinking was closed: its prompt + `prefix`, its own seed."""
    return {
        **first,
        "prompt_token_ids": first["prompt_token_ids"] + prefix,
        "max_tokens": max_tokens,
        "seed": request_seed(run_seed, f"{first['prompt_id']}/answer", first["sample"]),
    }


class _Worker:
    """One `vllm_worker` process: one engine replica."""

    def __init__(self, engine_args: dict[str, Any], env: dict[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        read_fd, write_fd = os.pipe()
        command = worker_command(engine_args) + ["--reply-fd", str(write_fd)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")

    def send(self, job: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()

    def expect(self, *kinds: str) -> dict[str, Any]:
        line = self._replies.readline()
        if not line:
            code = self.process.wait()
            raise EngineError(f"the vLLM engine exited (status {code}) before replying; log tail:\n{self._log_tail()}")
        message = json.loads(line)
        if "error" in message:
            raise EngineError(f"the vLLM engine failed a job:\n{message['error']}")
        if not any(kind in message for kind in kinds):
            raise EngineError(f"unexpected reply from the vLLM engine: {message}")
        return message

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()  # the worker's loop ends, and vLLM shuts down
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._replies.close()
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

    vLLM's offline `LLM` does not do data parallelism in one process, so each
    replica is its own engine on its own slice of the devices (tensor parallel
    inside it), and every batch is split into contiguous parts, one per
    replica: the split depends only on the batch, so reruns are reproducible.
    Use as a context manager.
    """

    PROGRESS_EVERY = 256  # requests per engine call: a progress line (and a flush) each

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
        self.env = engine_environ(**options.env)
        self.log_path = Path(log_path)
        self._workers: list[_Worker] = []

    def replicas(self) -> list[tuple[dict[str, str], Path]]:
        """Per data-parallel replica: its environment changes and its log file."""
        count = self.options.data_parallel_size
        if count == 1:
            return [({}, self.log_path)]
        tp, visible = self.options.tensor_parallel_size, self.env.get("CUDA_VISIBLE_DEVICES")
        return [
            ({"CUDA_VISIBLE_DEVICES": replica_devices(replica, tp, visible)},
             self.log_path.with_name(f"{self.log_path.stem}.dp{replica}{self.log_path.suffix}"))
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
                    worker.expect("ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        """Results in the order of `requests`; raises EngineError if any is missing."""
        if not requests:
            return []
        assert self._workers, "use VLLMEngine as a context manager"
        parts = _split(requests, len(self._workers))
        results: dict[str, dict] = {}
        with tempfile.TemporaryDirectory(prefix="lc-gen-") as scratch, tqdm(
            total=len(requests), desc=desc, unit="sample", leave=False
        ) as bar:
            outputs = []
            for i, (worker, part) in enumerate(zip(self._workers, parts)):
                requests_path, output_path = Path(scratch, f"requests{i}.jsonl"), Path(scratch, f"results{i}.jsonl")
                requests_path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
                worker.send({"requests": str(requests_path), "output": str(output_path), "chunk": self.PROGRESS_EVERY})
                outputs.append(output_path)
            tokens = 0
            for worker, output_path in zip(self._workers, outputs):
                while "done" not in (message := worker.expect("progress", "done")):
                    tokens += message["tokens"]
                    bar.update(message["progress"])
                    bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}")
                with open(output_path, encoding="utf-8") as f:
                    results.update((r["key"], r) for r in map(json.loads, f))
        missing = [r["key"] for r in requests if r["key"] not in results]
        if missing:
            raise EngineError(f"the engine returned no result for {len(missing)} requests, e.g. {missing[:3]}")
        return [results[r["key"]] for r in requests]


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    """`parts` contiguous slices, sizes differing by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


class OpenAIEngine:
    """Running OpenAI-compatible servers (vLLM, SGLang) behind `/v1/completions`.

    Prompts go as token ids and outputs come back as token ids
    (`return_token_ids`), so nothing is decoded and re-encoded. Requests are
    spread round-robin over the endpoints with at most `max_concurrency` in
    flight; a failed request is retried with backoff and, past `max_retries`,
    stops the stage with the server's error: a sample is never dropped.
    """

    RETRY_STATUS = {408, 429, 500, 502, 503, 504}

    def __init__(self, options, *, sleep=None, transport=None) -> None:
        """`sleep` and `transport` (an httpx transport) stand in for the clock and the network in tests."""
        import time

        self.options = options
        self._sleep = sleep or time.sleep
        self._transport = transport
        self._client = None

    def describe(self) -> list[str]:
        o = self.options
        return [f"POST {url}/completions (model {o.model!r}, token ids in and out, <= {o.max_concurrency} "
                f"in flight, {o.max_retries} retries)" for url in o.endpoints]

    def __enter__(self) -> OpenAIEngine:
        import httpx

        headers = {}
        if self.options.api_key_env:
            key = os.environ.get(self.options.api_key_env)
            if not key:
                raise EngineError(f"environment variable {self.options.api_key_env} (openai.api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.options.max_concurrency)
        self._client = httpx.Client(timeout=self.options.timeout_s, headers=headers, limits=limits,
                                    transport=self._transport)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        from concurrent.futures import ThreadPoolExecutor

        assert self._client is not None, "use OpenAIEngine as a context manager"
        results: list[dict | None] = [None] * len(requests)
        with ThreadPoolExecutor(self.options.max_concurrency) as pool, tqdm(
            total=len(requests), desc=desc, unit="sample", leave=False
        ) as bar:
            futures = {pool.submit(self._complete, i, r): i for i, r in enumerate(requests)}
            for future in futures:
                results[futures[future]] = future.result()  # re-raises the first failure
                bar.update(1)
        return results  # type: ignore[return-value]

    def _complete(self, index: int, request: dict[str, Any]) -> dict[str, Any]:
        import httpx

        endpoints = self.options.endpoints
        body = {
            "model": self.options.model,
            "prompt": request["prompt_token_ids"],
            "max_tokens": request["max_tokens"],
            "seed": request["seed"],
            "return_token_ids": True,
            **{k: request[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in request},
            # vLLM's extension: the prompt tokens' own log-probabilities (the termination probe's score_tail)
            **({"prompt_logprobs": 0} if request.get("score_tail") else {}),
        }
        error = ""
        for attempt in range(self.options.max_retries + 1):
            url = endpoints[(index + attempt) % len(endpoints)].rstrip("/") + "/completions"
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as failure:
                error = f"{url}: {type(failure).__name__}: {failure}"
            else:
                if response.status_code == 200:
                    choice = response.json()["choices"][0]
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
                error = f"{url}: HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in self.RETRY_STATUS:
                    raise EngineError(f"request {request['key']} was refused: {error}")
            if attempt < self.options.max_retries:
                self._sleep(min(30.0, 0.5 * 2**attempt))
        raise EngineError(f"request {request['key']} failed {self.options.max_retries + 1} times; last: {error}")


def _tail_logprobs(url: str, request: dict[str, Any], prompt_logprobs: list | None) -> list[float]:
    """The log-probabilities of the last `score_tail` prompt tokens, from vLLM's `prompt_logprobs`."""
    count = request["score_tail"]
    if not prompt_logprobs:
        raise EngineError(f"{url} returned no prompt_logprobs: the termination probe needs a vLLM server "
                          "(its prompt_logprobs extension); leave the probe's arms to the offline engine")
    tail = zip(request["prompt_token_ids"][-count:], prompt_logprobs[-count:])
    return [entry[str(token)]["logprob"] for token, entry in tail]  # JSON keys are strings


class SharedEngine:
    """One engine for several stages of the same model, started on first use.

    The pipeline hands it to every stage that runs the stage-1 policy (eval
    before, eval forced, generate), so the policy costs one engine start; a
    stage that is up to date never starts it.
    """

    def __init__(self, recipe, model: str, log_name: str) -> None:
        self._make = lambda: open_engine(recipe, model, log_name=log_name)
        self._engine = None

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        if not requests:
            return []
        if self._engine is None:
            self._engine = self._make().__enter__()
        return self._engine.generate(requests, desc=desc)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.__exit__(None, None, None)
            self._engine = None

    def __enter__(self) -> SharedEngine:
        return self  # the engine starts on first use, not here

    def __exit__(self, *exc: object) -> None:
        self.close()


def engine_for(recipe, model: str, *, log_name: str, shared: SharedEngine | None):
    """The shared engine when the caller has one (left open), else a new one for this stage."""
    import contextlib

    return contextlib.nullcontext(shared) if shared is not None else open_engine(recipe, model, log_name=log_name)


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
