"""A stand-in for an OpenAI-compatible server with known timings, for ``bench --serve``'s tests.

Every streamed reply waits ``ttft_s`` before its first token and ``token_s`` between tokens, so a
benchmark's TTFT and rates can be checked against those delays. Prompts count one token a word
plus one (a BOS), plus ``template_tokens`` for chat. ``slots`` limits the requests generating at
once (the others wait, as on a server with fewer slots than clients); ``max_active`` records the
most that ran together. Faults on request: every ``fail_every``-th timed request is answered 503,
every ``drop_every``-th has its connection dropped after ``drop_after`` tokens, an API key is
required when ``api_key`` is set, unknown models are 404, and ``refuse_ignore_eos`` answers 400 to
requests carrying ``ignore_eos`` (replies then end after ``natural_tokens``), and prompts longer
than ``max_prompt_tokens`` are answered 400.

Also runs as a process, as ``llmctl serve`` would be started: ``python -m tests.bench.fake_openai
--host H --port P [--ttft S] [--token S] [--exit-after N]`` (the process exits after N streamed replies).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(
        self,
        *,
        ttft_s: float = 0.05,
        token_s: float = 0.005,
        slots: int | None = None,
        models: tuple[str, ...] = ("fake",),
        api_key: str | None = None,
        fail_every: int = 0,
        drop_every: int = 0,
        drop_after: int = 3,
        refuse_ignore_eos: bool = False,
        natural_tokens: int = 5,
        template_tokens: int = 6,
        usage: bool = True,
        max_prompt_tokens: int = 0,
        exit_after: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.ttft_s, self.token_s, self.models, self.api_key = ttft_s, token_s, models, api_key
        self.fail_every, self.drop_every, self.drop_after = fail_every, drop_every, drop_after
        self.refuse_ignore_eos, self.natural_tokens, self.template_tokens, self.usage = refuse_ignore_eos, natural_tokens, template_tokens, usage
        self.exit_after, self.max_prompt_tokens = exit_after, max_prompt_tokens
        self.slot_count = slots
        self.slots = threading.Semaphore(slots) if slots else None
        self.lock = threading.Lock()
        self.streamed = 0  # streaming requests seen
        self.active = 0
        self.max_active = 0
        self.bodies: list[dict[str, Any]] = []
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        if "messages" in body:
            return self.template_tokens + 1 + sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        return 1 + len(str(body.get("prompt", "")).split())


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # each token a packet of its own, at once

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, data: dict[str, Any]) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def _authorized(self) -> bool:
            if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                self._error(401, "invalid or missing API key")
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif not self._authorized():
                return
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})
            elif self.path == "/props":
                self._json(200, {"build_info": "b0-fake", "total_slots": fake.slot_count or 99})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized():
                return
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._error(404, f"no route {self.path}")
                return
            if body.get("model") not in fake.models:
                self._error(404, f"model '{body.get('model')}' not found")
                return
            if fake.refuse_ignore_eos and "ignore_eos" in body:
                self._error(400, "unknown parameter 'ignore_eos'")
                return
            fake.bodies.append(body)
            prompt = fake.prompt_tokens(body)
            if fake.max_prompt_tokens and prompt > fake.max_prompt_tokens:
                self._error(400, "the request exceeds the available context size")
                return
            wanted = int(body.get("max_tokens") or 16)
            n = wanted if body.get("ignore_eos") else min(wanted, fake.natural_tokens)
            chat = "messages" in body
            usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
            if not body.get("stream"):
                choice = {"index": 0, "message": {"role": "assistant", "content": "x " * n}} if chat else {"index": 0, "text": "x " * n}
                self._json(200, {"object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage})
                return
            with fake.lock:
                fake.streamed += 1
                number = fake.streamed
            if fake.fail_every and number % fake.fail_every == 0:
                self._error(503, "server busy")
                return
            self._stream(body, n, chat, usage if fake.usage else None, number)
            if fake.exit_after and number >= fake.exit_after:
                os._exit(0)  # a server process that dies

        def _stream(self, body: dict[str, Any], n: int, chat: bool, usage: dict[str, Any] | None, number: int) -> None:
            if fake.slots:
                fake.slots.acquire()
            with fake.lock:
                fake.active += 1
                fake.max_active = max(fake.max_active, fake.active)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                if chat:  # llama-server's first chat chunk: the role, no content
                    self._event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                drop = fake.drop_every and number % fake.drop_every == 0
                time.sleep(fake.ttft_s)
                for i in range(n):
                    if i:
                        time.sleep(fake.token_s)
                    if drop and i == fake.drop_after:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    piece = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
                    last = i == n - 1
                    self._event({"choices": [{"index": 0, **piece, "finish_reason": "length" if last else None}]})
                if usage is not None and (body.get("stream_options") or {}).get("include_usage"):
                    self._event({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:
                pass
            finally:
                with fake.lock:
                    fake.active -= 1
                if fake.slots:
                    fake.slots.release()

        def _event(self, data: dict[str, Any]) -> None:
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.02)
    parser.add_argument("--token", type=float, default=0.002)
    parser.add_argument("--exit-after", type=int, default=0, help="exit after this many streamed requests")
    args = parser.parse_args()
    fake = FakeOpenAI(ttft_s=args.ttft, token_s=args.token, exit_after=args.exit_after, host=args.host, port=args.port)
    fake.httpd.serve_forever()


if __name__ == "__main__":
    main()
