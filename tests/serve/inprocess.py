"""serve in the test's own process: the pool over fake engines, uvicorn on a thread on a free
loopback port, and a raw HTTP client (the openai client cannot send most of what the tests try).

The engines are ``llmctl.engine.fake.FakeEngine``s, handed out by name by ``FakeLoader``: their
delays, gates and failures are under the test's control. The server's log goes to stderr as
``llmctl serve`` writes it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from llmctl.engine.fake import FakeEngine


class FakeLoader:
    """The pool's loader over fake engines: the engine named like the model, ``memory`` bytes each
    (per name, or one figure for all); ``loads`` lists the names loaded, in order."""

    def __init__(self, engines: dict[str, FakeEngine], memory: dict[str, int] | int = 1 << 20) -> None:
        self.engines = engines
        self.memory = memory
        self.loads: list[str] = []

    def plan(self, name: str) -> tuple[int, str]:
        return (self.memory[name] if isinstance(self.memory, dict) else self.memory), name

    def load(self, name: str) -> FakeEngine:
        self.loads.append(name)
        return self.engines[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
        """Raw HTTP: ``body`` as bytes goes out as it is; anything else as JSON. Returns status and
        the parsed JSON answer (the text of a stream)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        if response.getheader("content-type", "").startswith("text/event-stream"):
            return response.status, raw.decode()
        return response.status, json.loads(raw) if raw else None

    def ps(self, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return self.call("GET", "/api/ps", headers=headers)[1]["models"]

    def wait_idle(self, headers: dict[str, str] | None = None) -> None:
        deadline = time.time() + 20
        while any(m["busy"] for m in self.ps(headers)) and time.time() < deadline:
            time.sleep(0.05)
        assert all(m["busy"] == 0 for m in self.ps(headers)), self.ps(headers)


@contextmanager
def serving(engines: dict[str, FakeEngine], *, loader: Any = None, **settings: Any) -> Iterator[Client]:
    """The app over a pool of ``engines`` (or ``loader``) on a free port; ``settings`` are ServerSettings'.
    On the way out every engine's gate opens, so no request is left hanging."""
    import uvicorn

    from llmctl.commands import open_store
    from llmctl.commands.serve_cmd import log_to_stderr
    from llmctl.serve.app import create_app
    from llmctl.serve.pool import ModelPool, ServerSettings

    log_to_stderr()
    pool = ModelPool(open_store(), ServerSettings(**settings), loader=loader or FakeLoader(engines))
    port = free_port()
    # log_config=None: uvicorn's own loggers propagate to pytest's capture, tracebacks included.
    server = uvicorn.Server(uvicorn.Config(create_app(pool), host="127.0.0.1", port=port, log_level="warning", log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Client(port)
    finally:
        for engine in engines.values():
            engine.gate.set()
        server.should_exit = True
        thread.join(20)
        pool.close()
