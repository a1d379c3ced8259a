"""A local HTTP server that speaks the OpenAI completions API in front of the scripted engine (not `vllm serve`).

    python tests/openai_server.py SCRIPT.json [--hold-after N]

SCRIPT.json lists the transcripts, `[[context ids, written ids], ...]`
(`engines.fake.transcripts`). The server answers `POST /v1/completions` as a
vLLM server does for `OpenAIEngine`: the prompt as token ids, the output as
`token_ids`, vLLM's `prompt_logprobs` when asked (keyed by token id as a
string); `GET /v1/models` names the model. A request asking for
`prompt_logprobs` is a scoring request: it writes nothing, as the scripted
engine's `score_tail` requests do, and a prompt position the script cannot
score gets null (the client reads only the scored tail).

It prints `listening PORT` once it serves. `--hold-after N`: after N
answers, every further request is held, unanswered, and `holding K` is
printed as the K-th arrives: a test kills the server then, with requests in
flight on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's package, as the benches do

from length_control.engines.fake import ScriptedEngine, transcripts
from length_control.engines.requests import SAMPLING_KEYS

MODEL = "scripted"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", type=Path)
    parser.add_argument("--hold-after", type=int, default=None)
    args = parser.parse_args()
    table = {tuple(context): written for context, written in json.loads(args.script.read_text())}
    engine = ScriptedEngine(transcripts(table))
    served = Served(engine, args.hold_after)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a kill resets connections with requests on them

        def do_GET(self) -> None:
            self._reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.rstrip("/") != "/v1/completions" or body.get("model") != MODEL:
                self._reply(404, {"error": f"no {self.path} for model {body.get('model')!r}"})
                return
            self._reply(200, {"choices": [served.complete(body)]})

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass  # stdout is the test's

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


class Served:
    """The scripted engine behind the endpoint: one request at a time, and the hold after `hold_after` answers."""

    def __init__(self, engine: ScriptedEngine, hold_after: int | None) -> None:
        self.engine, self.hold_after = engine, hold_after
        self.lock = threading.Lock()
        self.answered = self.held = 0

    def complete(self, body: dict) -> dict:
        with self.lock:
            if self.hold_after is not None and self.answered >= self.hold_after:
                self.held += 1
                print(f"holding {self.held}", flush=True)
                hold = True
            else:
                self.answered += 1
                hold = False
        if hold:
            threading.Event().wait()  # until the test kills the server
        if body.get("prompt_logprobs") is not None:  # a score: nothing written, as the scripted engine's
            return {
                "index": 0,
                "token_ids": [],
                "finish_reason": "stop",
                "stop_reason": None,
                "prompt_logprobs": self.prompt_logprobs(body["prompt"]),
            }
        request = {
            "key": "request",
            "prompt_token_ids": body["prompt"],
            "max_tokens": body["max_tokens"],
            "seed": body["seed"],
            **{key: body[key] for key in SAMPLING_KEYS if key in body},
        }
        with self.lock:
            [result] = self.engine.generate([request])
        return {
            "index": 0,
            "token_ids": result["output_token_ids"],
            **{key: result[key] for key in ("finish_reason", "stop_reason")},
        }

    def prompt_logprobs(self, prompt: list[int]) -> list[dict | None]:
        """vLLM's: per prompt token {token id: {"logprob": ...}}; null for the first and where no script fits."""
        entries: list[dict | None] = [None]
        for at in range(1, len(prompt)):
            try:
                entries.append({str(prompt[at]): {"logprob": self.engine.logprob(prompt[:at], prompt[at])}})
            except LookupError:
                entries.append(None)
        return entries


if __name__ == "__main__":
    sys.exit(main())
