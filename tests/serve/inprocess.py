"""serve in the test's own process: the pool starting fake llama-servers (tests/support/fake_llama_server.py,
real child processes on Unix sockets) through its child-launcher seam, uvicorn on a thread on a free
loopback port, and a raw HTTP client (the openai client cannot send most of what the tests try).

The fakes' behaviour is under the test's control: at start through ``fake=`` (per model, see the
fake's docstring), per request through a ``"fake"`` object in the body; what they did is in
``client.stats(name)``. The server's log goes to stderr as ``llmctl serve`` writes it.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

FAKE_SERVER = Path(__file__).parents[1] / "support" / "fake_llama_server.py"


def fake_loader(store: Any, settings: Any, stats_dir: Path, fake: dict[str, Any] | None = None) -> Any:
    """The pool's real loader, starting the fake llama-server instead of llama.cpp's."""
    from llmctl.serve.pool import ChildLoader

    env = {"LLMCTL_FAKE_SERVER": json.dumps(fake or {}), "LLMCTL_FAKE_DIR": str(stats_dir)}
    return ChildLoader(store, settings, command=[sys.executable, str(FAKE_SERVER)], env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int, stats_dir: Path, pool: Any) -> None:
        self.port = port
        self.stats_dir = stats_dir
        self.pool = pool

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
        """Raw HTTP: ``body`` as bytes goes out as it is; anything else as JSON. Returns status and
        the parsed JSON answer (the text of a stream)."""
        status, _headers, answer = self.exchange(method, path, body, headers, timeout)
        return status, answer

    def exchange(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any, Any]:
        """``call``, with the answer's headers."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        if response.getheader("content-type", "").startswith("text/event-stream"):
            return response.status, response.headers, raw.decode()
        return response.status, response.headers, json.loads(raw) if raw else None

    def ps(self, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return self.call("GET", "/api/ps", headers=headers)[1]["models"]

    def stats(self, name: str) -> dict[str, Any]:
        """What the fake llama-server of model ``name`` did (its latest child)."""
        path = self.stats_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_idle(self, headers: dict[str, str] | None = None) -> None:
        wait_for(lambda: all(m["busy"] == 0 for m in self.ps(headers)))


def wait_for(condition: Any, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    assert condition()


def events(stream: str) -> list[str]:
    """The data of a stream's events, in order."""
    return [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data: ")]


@contextmanager
def serving(*, fake: dict[str, Any] | None = None, loader: Any = None, **settings: Any) -> Iterator[Client]:
    """The app over a pool of fake llama-servers on a free port; ``settings`` are ServerSettings'.
    On the way out the server stops, and with it every child."""
    import uvicorn

    from llmctl.commands import open_store
    from llmctl.commands.serve_cmd import log_to_stderr
    from llmctl.serve.app import create_app
    from llmctl.serve.pool import ModelPool, ServerSettings

    log_to_stderr()
    stats_dir = Path(tempfile.mkdtemp(prefix="llmctl-fake-"))
    store = open_store()
    server_settings = ServerSettings(**settings)
    pool = ModelPool(store, server_settings, loader=loader or fake_loader(store, server_settings, stats_dir, fake))
    port = free_port()
    # log_config=None: uvicorn's own loggers propagate to pytest's capture, tracebacks included.
    server = uvicorn.Server(uvicorn.Config(create_app(pool), host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Client(port, stats_dir, pool)
    finally:
        server.should_exit = True
        thread.join(20)
        pool.close()
        shutil.rmtree(stats_dir, ignore_errors=True)
