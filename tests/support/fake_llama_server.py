"""A stand-in for llama.cpp's ``llama-server``, run as a real child process by serve's pool in the
fast tests (``ChildLoader(command=[python, this file])``): it takes llama-server's command line,
listens where it is told (a Unix socket, or TCP with an API key), and speaks enough of its API:
``/health`` (503 while "loading"), ``/v1/chat/completions`` and ``/v1/completions`` (streamed as
server-sent events or whole, with usage and timings), its own ``/completion`` (streamed, for the
server engine; the body it got is kept as ``last_body``), ``/v1/embeddings``, ``/v1/rerank`` (with
``--rerank``), ``/v1/messages`` and ``/v1/messages/count_tokens``.

Switches, so tests can make it slow, fail or die:

- at start, from ``LLMCTL_FAKE_SERVER`` (JSON, by alias or ``"*"``): ``load_s`` (answer 503 this
  long), ``exit`` (exit with this code after printing ``error: fake load failure``), ``hang``
  (never answer /health), ``drop_idle`` (close each connection after its answer, unannounced, as
  llama-server does to a kept-alive connection left idle 5 s);
- per request, from the body's ``"fake"`` object: ``text`` (the reply), ``delay`` (seconds
  between pieces), ``hold`` (a file: wait until it exists before answering), ``die_after`` (SIGKILL
  itself after this many pieces), ``status`` (answer this status with an error body); for
  ``/completion``, ``text``, ``delay`` and ``die_after`` may also be given at start.

What it did goes to ``$LLMCTL_FAKE_DIR/<alias>.json`` (requests started and finished, pieces sent,
cancellations, the paths asked for, its argv), for the tests to read. Like llama-server, it
decodes at most ``-np`` requests at once; the others wait for a slot.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = {"--no-kv-unified", "--kv-unified", "--jinja", "--no-webui", "--swa-full", "--rerank", "--embeddings"}


def parse(argv: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {"flags": set()}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in FLAGS:
            options["flags"].add(arg)
            i += 1
        else:
            options[arg] = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
    return options


OPTIONS = parse(sys.argv[1:])
ALIAS = OPTIONS.get("--alias", "model")
SETTINGS = json.loads(os.environ.get("LLMCTL_FAKE_SERVER", "{}") or "{}")
MINE = {**SETTINGS.get("*", {}), **SETTINGS.get(ALIAS, {})}
STATS_DIR = os.environ.get("LLMCTL_FAKE_DIR")
STATS: dict[str, Any] = {"started": 0, "finished": 0, "pieces": 0, "cancelled": 0, "paths": [], "argv": sys.argv[1:], "pid": os.getpid()}
LOCK = threading.Lock()
SLOTS = threading.Semaphore(int(OPTIONS.get("-np", 1)))
READY_AT = time.monotonic() + float(MINE.get("load_s", 0))


def record(**changes: Any) -> None:
    with LOCK:
        for key, value in changes.items():
            if key == "paths":
                STATS["paths"].append(value)
            else:
                STATS[key] += value
        if STATS_DIR:
            target = Path(STATS_DIR) / f"{ALIAS}.json"
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(STATS))
            os.replace(partial, target)


def vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255 - 0.5, 6) for b in digest[:8]]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # the pool logs requests; this keeps its log short
        pass

    # --- plumbing ------------------------------------------------------------------------

    def _json(self, status: int, data: Any) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"code": status, "message": message, "type": kind}})

    def _gone(self) -> bool:
        """Whether the client closed its connection (as llama-server polls it)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _begin_events(self) -> None:
        """The head of a server-sent-events answer, its body in chunks (``_chunk``)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _authorized(self) -> bool:
        key = OPTIONS.get("--api-key")
        return not key or self.headers.get("Authorization") == f"Bearer {key}"

    # --- routes --------------------------------------------------------------------------

    def do_GET(self) -> None:
        if self.path == "/health":
            if MINE.get("hang") or time.monotonic() < READY_AT:
                self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
            else:
                self._json(200, {"status": "ok"})
            return
        self._error(404, "File Not Found", "not_found_error")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self._authorized():
            self._error(401, "Invalid API Key", "authentication_error")
            return
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self._error(400, f"invalid JSON: {exc}")
            return
        # A request waits for one of the -np slots, as in llama-server's queue; its client may leave meanwhile.
        while not SLOTS.acquire(timeout=0.02):
            if self._gone():
                record(cancelled=1)
                return
        try:
            self._answer(body)
        finally:
            SLOTS.release()
        if MINE.get("drop_idle"):
            self.close_connection = True  # as llama-server drops an idle kept-alive connection, unannounced

    def _answer(self, body: dict[str, Any]) -> None:
        record(started=1, paths=self.path)
        fake = body.get("fake") if isinstance(body.get("fake"), dict) else {}
        hold = fake.get("hold")
        while hold and not os.path.exists(hold):
            if self._gone():
                record(cancelled=1)
                return
            time.sleep(0.02)
        if fake.get("status"):
            self._error(int(fake["status"]), str(fake.get("message", "fake failure")))
        elif self.path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
            self._generate(body, fake)
        elif self.path == "/completion":
            self._native(body, {**MINE, **fake})
        elif self.path == "/v1/embeddings":
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else inputs
            if not isinstance(inputs, list):
                self._error(400, '"input" or "content" must be provided')
                return
            data = [{"object": "embedding", "index": i, "embedding": vector(str(text))} for i, text in enumerate(inputs)]
            self._json(200, {"object": "list", "model": ALIAS, "data": data, "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})
        elif self.path == "/v1/rerank":
            if "--rerank" not in OPTIONS["flags"]:
                self._error(501, "This server does not support reranking. Start it with `--reranking`", "not_supported_error")
                return
            documents = body.get("documents") or []
            results = [{"index": i, "relevance_score": float(len(str(d)))} for i, d in enumerate(documents)]
            self._json(200, {"model": ALIAS, "object": "list", "results": results, "usage": {"prompt_tokens": len(documents), "total_tokens": len(documents)}})
        elif self.path == "/v1/messages/count_tokens":
            self._json(200, {"input_tokens": len(json.dumps(body.get("messages", [])).split())})
        else:
            self._error(404, "File Not Found", "not_found_error")
        record(finished=1)

    def _native(self, body: dict[str, Any], fake: dict[str, Any]) -> None:
        """llama-server's own ``/completion``, streamed: one event per token, then the final one
        with ``stop_type`` and ``timings`` (the end-of-generation token counted, as llama-server does)."""
        with LOCK:
            STATS["last_body"] = body
        pieces = re.findall(r"\S+\s*", str(fake.get("text", "hello world")))
        limit = int(body.get("n_predict", -1))
        cut = 0 <= limit < len(pieces)
        pieces = pieces[:limit] if cut else pieces
        prompt_n = len(body.get("prompt") or [])
        die_after = fake.get("die_after")
        self._begin_events()
        try:
            for n, piece in enumerate(pieces):
                if die_after is not None and n >= int(die_after):
                    os.kill(os.getpid(), signal.SIGKILL)
                event = {"index": 0, "content": piece, "stop": False, "tokens_predicted": n + 1, "tokens_evaluated": prompt_n}
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())
                record(pieces=1)
                time.sleep(float(fake.get("delay", 0)))
            predicted = len(pieces) + (0 if cut else 1)
            timings = {"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": prompt_n * 1.0, "predicted_n": predicted, "predicted_ms": predicted * 10.0}
            last = {"index": 0, "content": "", "stop": True, "stop_type": "limit" if cut else "eos", "tokens_predicted": predicted,
                    "tokens_evaluated": prompt_n, "timings": timings}  # fmt: skip
            self._chunk(f"data: {json.dumps(last)}\n\n".encode())
            self._chunk(b"")
        except OSError:
            record(cancelled=1)

    def _generate(self, body: dict[str, Any], fake: dict[str, Any]) -> None:
        pieces = re.findall(r"\S+\s*", str(fake.get("text", "hello world"))) or [""]
        delay = float(fake.get("delay", 0))
        die_after = fake.get("die_after")
        prompt_n = len(json.dumps(body.get("messages", body.get("prompt", ""))).split())
        timings = {"prompt_n": prompt_n, "predicted_n": len(pieces)}
        chat = self.path == "/v1/chat/completions"
        anthropic = self.path == "/v1/messages"
        ident = "chatcmpl-fake" if chat else "cmpl-fake"
        if not body.get("stream"):
            sent = []
            for n, piece in enumerate(pieces):
                if die_after is not None and n >= int(die_after):
                    os.kill(os.getpid(), signal.SIGKILL)
                if self._gone():
                    record(cancelled=1)
                    return
                time.sleep(delay)
                sent.append(piece)
                record(pieces=1)
            text = "".join(sent)
            usage = {"prompt_tokens": prompt_n, "completion_tokens": len(pieces), "total_tokens": prompt_n + len(pieces)}
            if anthropic:
                self._json(200, {"type": "message", "role": "assistant", "model": ALIAS, "content": [{"type": "text", "text": text}],
                                 "stop_reason": "end_turn", "usage": {"input_tokens": prompt_n, "output_tokens": len(pieces)}})  # fmt: skip
            elif chat:
                self._json(200, {"id": ident, "object": "chat.completion", "model": ALIAS, "usage": usage, "timings": timings,
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})  # fmt: skip
            else:
                self._json(200, {"id": ident, "object": "text_completion", "model": ALIAS, "usage": usage, "timings": timings,
                                 "choices": [{"index": 0, "finish_reason": "stop", "text": text}]})  # fmt: skip
            return
        self._begin_events()
        try:
            for n, piece in enumerate(pieces):
                if die_after is not None and n >= int(die_after):
                    self._chunk(b'data: {"partial": "an event cut sho')  # half an event, then death
                    os.kill(os.getpid(), signal.SIGKILL)
                if anthropic:
                    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
                    self._chunk(f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode())
                else:
                    choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                    self._chunk(f"data: {json.dumps({'id': ident, 'model': ALIAS, 'choices': [choice]})}\n\n".encode())
                record(pieces=1)
                time.sleep(delay)
            if anthropic:
                self._chunk(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
            else:
                last = {
                    "id": ident,
                    "model": ALIAS,
                    "choices": [{"index": 0, "finish_reason": "stop", **({"delta": {}} if chat else {"text": ""})}],
                    "timings": timings,
                }
                self._chunk(f"data: {json.dumps(last)}\n\n".encode())
                options = body.get("stream_options") or {}
                if options.get("include_usage"):
                    usage = {"prompt_tokens": prompt_n, "completion_tokens": len(pieces), "total_tokens": prompt_n + len(pieces)}
                    self._chunk(f"data: {json.dumps({'id': ident, 'choices': [], 'usage': usage})}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except OSError:  # the client went away: as llama-server does, the task is cancelled
            record(cancelled=1)


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> Any:
        request, _ = super().get_request()
        return request, ("local", 0)


class TcpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    record()  # the stats file exists from the start
    shown = ["***" if sys.argv[i - 1] == "--api-key" else arg for i, arg in enumerate(sys.argv[1:], start=1)]
    print(f"fake llama-server for {ALIAS}: {' '.join(shown)}", flush=True)
    if "exit" in MINE:
        print("llama_model_load: error loading model: fake load failure", flush=True)
        sys.exit(int(MINE["exit"]))
    host = OPTIONS.get("--host", "127.0.0.1")
    if host.endswith(".sock"):
        server: socketserver.BaseServer = UnixServer(host, Handler)
    else:
        server = TcpServer((host, int(OPTIONS.get("--port", 0))), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
