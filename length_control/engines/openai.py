"""Running OpenAI-compatible servers (vLLM, SGLang) as an engine: the `engine.openai` recipe section's.

Prompts go as token ids and outputs come back as token ids
(`return_token_ids`), so a sample is what the offline engine would write for
the same request and seed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from length_control.engines.protocol import EngineError, Progress, collect
from length_control.engines.requests import SAMPLING_KEYS

log = logging.getLogger(__name__)


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

    An endpoint that goes down (killed, its host gone: its requests fail in
    transport and it takes no new connection) is set aside with a warning
    that names it: its requests in flight and every later one go to the live
    endpoints at once, without spending a retry, and the stage completes
    with the same results (each request carries its seed). Only when none
    is left are the endpoints retried in turn, with backoff, and past
    `max_retries` the stage stops with an error that names the fix. An
    endpoint set aside that answers again takes requests again.
    """

    RUNS_ON_JOB_DEVICES = False  # the servers bring their own
    MODEL_LEN_SETTING = "context_limit (within the servers' --max-model-len)"
    RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
    CONNECTIONS_PER_CLIENT = 64
    CONNECT_TIMEOUT_S = 30.0  # a server that takes no connection for this long is down, whatever timeout_s says
    PROBE_TIMEOUT_S = 10.0  # the check of an endpoint whose request failed in transport

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
        self._set_aside: set[str] = set()  # endpoints found down: no request goes there while another is live
        self._probing: dict = {}  # an asyncio.Lock per endpoint: one check at a time

    @classmethod
    def from_recipe(cls, recipe, model: Path | str, *, log_name: str) -> OpenAIEngine:
        """The servers `recipe.engine.openai` names; they serve what they were started with, whatever `model`."""
        return cls(recipe.engine.openai)

    @staticmethod
    def model_len(recipe) -> int:
        """The recipe's context limit: the servers' own (`--max-model-len`) is theirs to hold at least that."""
        return recipe.context_limit

    @staticmethod
    def stays_up_during_training(recipe) -> bool:
        """Always: the client holds no model memory, and the servers run anyway."""
        return True

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
        self._set_aside, self._probing = set(), {}
        threading.Thread(target=self._loop.run_forever, daemon=True, name="openai engine").start()

        async def clients() -> list[httpx.AsyncClient]:
            count = -(-self.options.max_concurrency // self.CONNECTIONS_PER_CLIENT)
            size = -(-self.options.max_concurrency // count)
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            timeout = httpx.Timeout(self.options.timeout_s, connect=min(self.options.timeout_s, self.CONNECT_TIMEOUT_S))
            return [
                httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits, transport=self._transport)
                for _ in range(count)
            ]

        self._clients = asyncio.run_coroutine_threadsafe(clients(), self._loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def swap_weights(self, model: Path | str) -> bool:
        """Never: a server serves the model it was started with."""
        return False

    def close(self) -> None:
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
        with Progress(desc, len(requests)) as bar:
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
        client = self._clients[index % len(self._clients)]
        attempt, error = 0, ""
        while True:
            endpoint = self._endpoint(index + attempt)
            url = endpoint.rstrip("/") + "/completions"
            try:
                response = await client.post(url, json=body)
            except httpx.TransportError as failure:
                error = f"{url}: {type(failure).__name__}: {failure}"
                if await self._down(endpoint, client, error) and self._live():
                    continue  # a live endpoint takes it; no retry spent: the request did not fail, its server did
            else:
                if response.status_code == 200:
                    self._back(endpoint)
                    return _completion(url, request, response.json()["choices"][0])
                error = f"{url}: HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in self.RETRY_STATUS:
                    raise EngineError(f"request {request['key']} was refused: {error}")
            if attempt == self.options.max_retries:
                raise EngineError(self._failed(request, error))
            await self._sleep(min(30.0, 0.5 * 2**attempt))
            attempt += 1

    def _live(self) -> list[str]:
        return [endpoint for endpoint in self.options.endpoints if endpoint not in self._set_aside]

    def _endpoint(self, turn: int) -> str:
        """Round-robin over the live endpoints; over all of them when none is (one may be back)."""
        endpoints = self._live() or self.options.endpoints
        return endpoints[turn % len(endpoints)]

    async def _down(self, endpoint: str, client, error: str) -> bool:
        """Whether `endpoint` is down, after a request to it failed in transport: set aside the first time.

        Down means it takes no new connection (`GET /models` fails within
        `PROBE_TIMEOUT_S`): a server that was killed or whose host is gone.
        A server that answers is up, whatever happened to one request (a
        keep-alive connection it had closed, a read timeout): that request
        is retried as any other.
        """
        import asyncio

        import httpx

        if endpoint in self._set_aside:
            return True
        async with self._probing.setdefault(endpoint, asyncio.Lock()):
            if endpoint in self._set_aside:
                return True
            try:
                await client.get(endpoint.rstrip("/") + "/models", timeout=self.PROBE_TIMEOUT_S)
            except httpx.TransportError:
                self._set_aside.add(endpoint)
                live = self._live()
                where = f"its requests go to {', '.join(live)}" if live else "no endpoint is left"
                log.warning("endpoint %s is down (%s): %s", endpoint, error, where)
                return True
            return False

    def _back(self, endpoint: str) -> None:
        if endpoint in self._set_aside:
            self._set_aside.discard(endpoint)
            log.warning("endpoint %s answers again: it takes requests again", endpoint)

    def _failed(self, request: dict[str, Any], error: str) -> str:
        tries = f"request {request['key']} failed {self.options.max_retries + 1} times"
        if self._live():
            return f"{tries}; last: {error}"
        return (
            f"{tries}: every endpoint is down ({', '.join(self.options.endpoints)}); last: {error}. "
            "Start the servers again (or list running ones in engine.openai.endpoints) and rerun: "
            "the stages already finished are kept"
        )


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
