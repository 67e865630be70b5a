"""serve: a real server process on a free loopback port, driven by the real openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LLMCTL_HOME": str(home), "NO_COLOR": "1", **(env or {})}
        env.pop("LLMCTL_API_KEY", None)
        exe = str(Path(sys.executable).with_name("llmctl"))
        self.log = open(home / "server.log", "w")
        self.proc = subprocess.Popen([exe, "serve", "--port", str(self.port), *args], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                assert self.proc.poll() is None, (home / "server.log").read_text()
                time.sleep(0.1)
        raise TimeoutError("server did not start")

    def client(self, key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        finally:
            self.log.close()
        return (Path(self.log.name)).read_text()


def _start_stream(port: int, payload: dict, events: int = 3) -> socket.socket:
    """Open a raw streaming request and read until ``events`` SSE events have arrived."""
    body = json.dumps({"stream": True, **payload}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    received = b""
    while received.count(b"data: ") < events:
        received += sock.recv(4096)
    return sock


LONG_STORY = {"model": "demo", "messages": [{"role": "user", "content": "Write a very long story."}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_model: Path):
    home = tmp_path_factory.mktemp("serve-home")
    second = home / "second.Q4_1.gguf"
    try:
        os.link(demo_model, second)
    except OSError:
        shutil.copy(demo_model, second)
    env = {**os.environ, "LLMCTL_HOME": str(home)}
    exe = str(Path(sys.executable).with_name("llmctl"))
    subprocess.run([exe, "import", str(demo_model), "--name", "demo"], env=env, check=True, capture_output=True)
    subprocess.run([exe, "import", str(second), "--name", "other"], env=env, check=True, capture_output=True)
    server = Server(home, "demo", "--max-queue", "4", "--max-loaded", "1")
    yield server
    server.stop()


def test_models_chat_completions_and_json_mode(served: Server) -> None:
    client = served.client()
    assert sorted(m.id for m in client.models.list().data) == ["demo", "other"]
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                                           temperature=0, seed=1, max_tokens=16)  # fmt: skip
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens >= 1
    again = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                                           temperature=0, seed=1, max_tokens=16)  # fmt: skip
    assert again.choices[0].message.content == reply.choices[0].message.content
    text = client.completions.create(model="demo", prompt="The capital of France is", temperature=0, max_tokens=4)
    assert "Paris" in text.choices[0].text
    stop = client.completions.create(model="demo", prompt="1, 2, 3,", temperature=0, max_tokens=30, stop=["6"])
    assert "6" not in stop.choices[0].text
    data = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Give a JSON object with a name and age of a person"}],
                                          temperature=0, max_tokens=200, response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(data.choices[0].message.content), dict)


def test_streaming(served: Server) -> None:
    stream = served.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Count to five."}], temperature=0, max_tokens=24, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = served.client().completions.create(model="demo", prompt="Once upon a time", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed)


def test_errors(served: Server) -> None:
    from openai import BadRequestError, NotFoundError

    client = served.client()
    with pytest.raises(NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "available: demo, other" in str(caught.value)
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=10**9)
    with pytest.raises(BadRequestError, match="context"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "word " * 9000}], max_tokens=4)
    status, body, _ = served.raw("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body, _ = served.raw("POST", "/v1/chat/completions", json.dumps({"model": "demo", "messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    # An oversized body is refused from its Content-Length, before the server reads it.
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 9437184\r\n\r\n{")  # fmt: skip
        reply = b""
        while b"larger than" not in reply and len(reply) < 8192:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413") and b"larger than" in reply


def test_load_bounded_queue_and_lru(served: Server) -> None:
    client = served.client()
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    before = served.rss()
    outcomes: list[str] = []

    def worker() -> None:
        import openai

        c = served.client()
        for _ in range(4):
            try:
                stream = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Tell me a fact."}], max_tokens=12, stream=True)
                text = "".join(ch.choices[0].delta.content or "" for ch in stream)
                outcomes.append("ok" if text else "empty")
            except openai.APIStatusError as exc:
                retry = exc.response.headers.get("retry-after")
                outcomes.append("503" if exc.status_code == 503 and retry else f"bad {exc.status_code}")

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(outcomes) == 64 and set(outcomes) <= {"ok", "503"}, outcomes
    assert outcomes.count("ok") >= 16
    assert served.rss() < before + 200 * 1024 * 1024  # bounded: no per-request growth
    # Streams finish on the server a moment after their clients read [DONE].
    deadline = time.time() + 30
    while any(m["busy"] for m in served.raw("GET", "/api/ps")[1]["models"]) and time.time() < deadline:
        time.sleep(0.1)
    # LRU: max-loaded 1, so loading another model unloads demo
    client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    status, ps, _ = served.raw("GET", "/api/ps")
    assert [m["name"] for m in ps["models"]] == ["other"]
    exe = str(Path(sys.executable).with_name("llmctl"))
    out = subprocess.run([exe, "ps", "--server", served.url], capture_output=True, text=True)
    assert out.returncode == 0 and "other" in out.stdout
    out = subprocess.run([exe, "stop", "other", "--server", served.url], capture_output=True, text=True)
    assert out.returncode == 0
    assert served.raw("GET", "/api/ps")[1]["models"] == []


def test_keep_alive_expiry_and_api_key(tmp_path: Path, demo_model: Path) -> None:
    env = {**os.environ, "LLMCTL_HOME": str(tmp_path)}
    exe = str(Path(sys.executable).with_name("llmctl"))
    subprocess.run([exe, "import", str(demo_model), "--name", "demo"], env=env, check=True, capture_output=True)
    server = Server(tmp_path, "--keep-alive", "1", "--api-key", "sekret-key-123")
    try:
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            server.client("wrong").models.list()
        assert server.raw("GET", "/v1/models")[0] == 401
        client = server.client("sekret-key-123")
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        headers = {"Authorization": "Bearer sekret-key-123"}
        assert [m["name"] for m in server.raw("GET", "/api/ps", headers=headers)[1]["models"]] == ["demo"]
        time.sleep(2.5)
        assert server.raw("GET", "/api/ps", headers=headers)[1]["models"] == []
    finally:
        log = server.stop()
    assert "keep-alive expired" in log
    assert "sekret-key-123" not in log


def _import(home: Path, path: Path, name: str) -> None:
    env = {**os.environ, "LLMCTL_HOME": str(home)}
    exe = str(Path(sys.executable).with_name("llmctl"))
    subprocess.run([exe, "import", str(path), "--name", name], env=env, check=True, capture_output=True)


def test_memory_budget_unloads_lru_and_load_failures_are_500(tmp_path: Path, demo_model: Path) -> None:
    from tests.support.gguf_factory import RawGGUF

    second = tmp_path / "second.Q4_1.gguf"
    os.link(demo_model, second) if demo_model.stat().st_dev == tmp_path.stat().st_dev else shutil.copy(demo_model, second)
    _import(tmp_path, demo_model, "demo")
    _import(tmp_path, second, "other")
    _import(tmp_path, RawGGUF.minimal().write(tmp_path / "hollow.gguf"), "hollow")  # a valid header llama.cpp cannot load
    profile = tmp_path / "machine.json"
    # room for one demo model at 8192 tokens of context (~470 MiB), not two
    profile.write_text(json.dumps({"cpu": {"physical_cores": 2}, "ram": {"total_gb": 4, "available_gb": 1.2}}))
    server = Server(tmp_path, "--max-loaded", "4", env={"LLMCTL_HW_PROFILE": str(profile)})
    try:
        client = server.client()
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert [m["name"] for m in server.raw("GET", "/api/ps")[1]["models"]] == ["other"]
        status, body, _ = server.raw("POST", "/v1/chat/completions", json.dumps({"model": "hollow", "messages": [{"role": "user", "content": "x"}]}).encode())
        assert status == 500 and "failed to load" in body["error"]["message"]
        reply = client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content is not None  # the others keep being served
    finally:
        log = server.stop()
    assert "making room in memory" in log


def test_a_client_that_disconnects_stops_its_generation(served: Server) -> None:
    with _start_stream(served.port, {**LONG_STORY, "max_tokens": 4000}, events=5):
        pass  # the client goes away mid-stream
    started = time.time()
    # The model is free again long before 4000 tokens could have been generated (~25 s here).
    while time.time() - started < 10:
        models = served.raw("GET", "/api/ps")[1]["models"]
        if all(m["busy"] == 0 for m in models):
            break
        time.sleep(0.1)
    assert all(m["busy"] == 0 for m in served.raw("GET", "/api/ps")[1]["models"])
    assert time.time() - started < 10


def test_sigterm_shuts_down_gracefully_mid_stream(tmp_path: Path, demo_model: Path) -> None:
    import signal

    _import(tmp_path, demo_model, "demo")
    server = Server(tmp_path, "demo")
    with _start_stream(server.port, {**LONG_STORY, "max_tokens": 4000}) as sock:
        started = time.time()
        server.proc.send_signal(signal.SIGTERM)
        while True:  # the stream ends (finished or cancelled) rather than hanging
            data = sock.recv(65536)
            if not data:
                break
        # uvicorn finishes its graceful shutdown, then re-raises the signal, as a server should
        assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert time.time() - started < 20
    server.log.close()
    assert "shutting down" in (tmp_path / "server.log").read_text()


def test_stop_and_model_names_are_strict(served: Server) -> None:
    client = served.client()
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert served.raw("POST", "/api/stop", json.dumps({"model": ""}).encode())[0] == 404  # no prefix games
    assert served.raw("POST", "/v1/chat/completions", json.dumps({"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]}).encode())[0] == 404
    status, body, _ = served.raw("POST", "/v1/chat/completions", json.dumps({
        "model": "demo", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}}).encode())  # fmt: skip
    assert status == 400 and body["error"]["param"] == "response_format"
    # stopping a model while it generates is refused, and the server lives on
    with _start_stream(served.port, {**LONG_STORY, "max_tokens": 400}):
        status, body409, _ = served.raw("POST", "/api/stop", json.dumps({"model": "demo"}).encode())
        assert status == 409 and "busy" in body409["error"]["message"]
    assert served.proc.poll() is None
