"""serve against hostile clients and failing engines.

The server runs in-process (tests/serve/inprocess.py: uvicorn on a thread, a free
loopback port) over a real store of small crafted GGUFs, with fake engines
(llmctl/engine/fake.py) injected as the pool's loader: their delays and failures
are under the test's control. Requests are raw HTTP, since the openai client
cannot send most of what is tried here. One slow test repeats the hostile
requests against a real ``llmctl serve`` process and reads its log.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from llmctl.engine.base import EngineError
from llmctl.engine.fake import FakeEngine
from llmctl.errors import NotFoundError
from tests.serve.inprocess import FakeLoader, serving

KEY = "sekret-key-123"


@pytest.fixture
def log_check(capsys, caplog):
    """The server's log as it would be written: returns a function giving what was logged so far;
    fails the test if anything logged a traceback."""
    seen: list[str] = []

    def read() -> str:
        seen.append(capsys.readouterr().err)
        return "".join(seen)

    yield read
    text = read() + caplog.text
    assert "Traceback" not in text, text
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def _is_openai_error(body: Any, status: int) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and error["message"]
        and error["code"] == status
    )


# --- one model must not stall the others ---------------------------------------------------


def test_a_busy_model_does_not_stall_other_routes_or_models(models, log_check) -> None:
    """40 requests wait on model a (more than any default thread pool holds); listing, health,
    ps and model b still answer at once."""
    engines = {"a": FakeEngine(name="a", wait=True), "b": FakeEngine(name="b")}
    waiting = 40
    with serving(engines, max_queue=64, max_loaded=2) as client:
        outcomes: list[int] = []

        def ask_a(stream: bool) -> None:
            status, _ = client.call(
                "POST", "/v1/chat/completions", {"model": "a", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}, timeout=90
            )
            outcomes.append(status)

        threads = [threading.Thread(target=ask_a, args=(i % 8 == 0,)) for i in range(waiting)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while not any(m["busy"] == waiting for m in client.ps()) and time.time() < deadline:
            time.sleep(0.05)
        assert [m["busy"] for m in client.ps()] == [waiting]
        # a is held (its gate is shut): everything else answers within a bound far below "stalled"
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("GET", "/health", None),
            ("GET", "/api/ps", None),
            ("POST", "/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "hi"}]}),
            ("POST", "/v1/completions", {"model": "b", "prompt": "hi", "stream": True}),
        ]:
            started = time.perf_counter()
            status, answer = client.call(method, path, body, timeout=10)
            assert status == 200, (path, answer)
            assert time.perf_counter() - started < 5, path
        assert {m["name"]: m["busy"] for m in client.ps()} == {"a": waiting, "b": 0}
        engines["a"].gate.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request to a hung"
        assert outcomes == [200] * waiting
        client.wait_idle()


def test_requests_past_the_queue_get_503_without_waiting(models, log_check) -> None:
    engines = {"a": FakeEngine(name="a", wait=True)}
    with serving(engines, max_queue=2) as client:
        threads = [
            threading.Thread(target=client.call, args=("POST", "/v1/completions", {"model": "a", "prompt": "x"}), kwargs={"timeout": 60}) for _ in range(3)
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while not any(m["busy"] == 3 for m in client.ps()) and time.time() < deadline:
            time.sleep(0.05)
        status, body = client.call("POST", "/v1/completions", {"model": "a", "prompt": "x"}, timeout=10)
        assert status == 503 and _is_openai_error(body, 503)
        engines["a"].gate.set()
        for t in threads:
            t.join(30)
        client.wait_idle()


def _send_and_leave(port: int, body: dict[str, Any], path: str = "/v1/chat/completions") -> socket.socket:
    """A raw client that sends a whole request and reads nothing yet: close the socket to leave."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))  # fmt: skip
    return sock


def _wait_for(condition: Any, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    assert condition()


def test_a_client_that_leaves_a_non_streaming_request_frees_the_model(models, log_check) -> None:
    """The generation of a client gone mid-answer stops; a queued one whose client is gone never runs."""
    engine = FakeEngine(["word " * 600], name="a", delay=0.05)  # a 30 s reply, then "hello world"
    with serving({"a": engine}) as client:
        running = _send_and_leave(client.port, CHAT)
        _wait_for(lambda: engine.pieces > 0)
        queued = _send_and_leave(client.port, CHAT)
        _wait_for(lambda: [m["busy"] for m in client.ps()] == [2])
        queued.close()  # gone while waiting: its place is given back at once
        _wait_for(lambda: [m["busy"] for m in client.ps()] == [1], seconds=5)
        running.close()  # gone mid-answer: the generation stops at its next piece
        _wait_for(lambda: [m["busy"] for m in client.ps()] == [0], seconds=5)
        pieces = engine.pieces
        assert pieces < 200, pieces  # far from the 600 of the whole reply
        engine.delay = 0  # the next request is answered at once
        started = time.perf_counter()
        status, body = client.call("POST", "/v1/chat/completions", CHAT, timeout=60)
        assert status == 200 and body["choices"][0]["message"]["content"] == "hello world", body
        assert time.perf_counter() - started < 5
        assert engine.started == 2  # the two that stayed: the queued request never ran
        assert engine.pieces == pieces + 2  # the stopped reply sent nothing more; "hello ", "world" since
    assert " 499 " in log_check()  # each client that left is one line of the log


def test_a_client_that_leaves_while_its_model_loads_gives_its_place_back(models, log_check, monkeypatch) -> None:
    engine = FakeEngine(name="a")
    loading, release = threading.Event(), threading.Event()
    load = FakeLoader.load

    def slow_load(self: FakeLoader, name: str) -> FakeEngine:
        loading.set()
        assert release.wait(30)
        return load(self, name)

    monkeypatch.setattr(FakeLoader, "load", slow_load)
    with serving({"a": engine}) as client:
        sock = _send_and_leave(client.port, CHAT)
        assert loading.wait(20)
        sock.close()
        time.sleep(0.5)  # the server notices the client left
        release.set()
        _wait_for(lambda: [m["busy"] for m in client.ps()] == [0], seconds=5)
        assert engine.started == 0  # loaded, but nothing generated for the client that left
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 200


@pytest.mark.parametrize(
    "stop, needle",
    [(["x"] * 17, "17 stop strings"), (["x" * 257], "257 characters"), ([chr(0x4E00 + i % 20_000) + str(i) for i in range(350_000)], "350000 stop strings")],
    ids=["17 strings", "257 characters", "350,000 strings"],
)
def test_stop_lists_are_bounded(models, log_check, stop: list[str], needle: str) -> None:
    with serving({"a": FakeEngine(name="a")}) as client:
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "stop": stop})
        assert status == 400 and _is_openai_error(body, 400) and body["error"]["param"] == "stop", body
        assert needle in body["error"]["message"] and "--" not in body["error"]["message"], body
        assert client.ps() == []  # refused before anything loaded
        assert client.call("POST", "/v1/chat/completions", {**CHAT, "stop": ["x" * 256] * 16})[0] == 200


@pytest.mark.parametrize("field, value", [("temperature", b"NaN"), ("top_p", b"Infinity"), ("top_k", b"-3"), ("seed", b"-5")])
def test_a_setting_out_of_range_is_named_by_its_api_field(models, log_check, field: str, value: bytes) -> None:
    with serving({"a": FakeEngine(name="a")}) as client:
        status, body = client.call("POST", "/v1/chat/completions", _chat()[:-1] + b', "%s": %s}' % (field.encode(), value))
        assert status == 400 and _is_openai_error(body, 400) and body["error"]["param"] == field, body
        assert body["error"]["message"].startswith(f"{field} ") and "--" not in body["error"]["message"], body


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "loading"])
def test_max_queue_counts_the_requests_waiting_besides_the_running_one(models, log_check, monkeypatch, loaded: bool) -> None:
    """--max-queue 2: one request runs (or waits for the load) and 2 wait; the 4th is refused."""
    engine = FakeEngine(name="a", wait=True)
    release = threading.Event()
    load = FakeLoader.load
    monkeypatch.setattr(FakeLoader, "load", lambda self, name: release.wait(30) and load(self, name))
    with serving({"a": engine}, max_queue=2) as client:
        if loaded:
            release.set()
            engine.wait = False
            assert client.call("POST", "/v1/completions", {"model": "a", "prompt": "x"})[0] == 200
            engine.wait = True
        sockets = []
        for n in range(1, 4):
            sockets.append(_send_and_leave(client.port, {"model": "a", "prompt": "x"}, "/v1/completions"))
            if loaded:
                _wait_for(lambda: [m["busy"] for m in client.ps()] == [n])
            else:
                time.sleep(0.5)  # nothing to watch while the model loads: give the server time
        status, body = client.call("POST", "/v1/completions", {"model": "a", "prompt": "x"}, timeout=10)
        assert status == 503 and _is_openai_error(body, 503), body
        release.set()
        _wait_for(lambda: [m["busy"] for m in client.ps()] == [3])  # the three accepted ones, no more
        engine.gate.set()
        for sock in sockets:
            sock.settimeout(20)
            assert sock.recv(100).startswith(b"HTTP/1.1 200"), "an accepted request was not answered"
            sock.close()
        client.wait_idle()


# --- bad requests are 400s -----------------------------------------------------------------

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def _chat(**changes: Any) -> bytes:
    return json.dumps({**CHAT, **changes}).encode()


HOSTILE = {
    "JSON nested 1,000 deep": ("/v1/chat/completions", _chat()[:-1] + b', "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", None),
    "JSON nested 100 deep": ("/v1/chat/completions", _chat()[:-1] + b', "x": ' + b"[" * 100 + b"]" * 100 + b"}", None),
    "a text part that is a number": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages"),
    "a text part that is null": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}]), "messages"),
    "a content part that is a string": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": ["hi"]}]), "messages"),
    "json_schema that is a string": ("/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": "x"}), "response_format"),
    "a 5,000-character model name": ("/v1/chat/completions", _chat(model="m" * 5000), "model"),
    "stream_options that is a string": ("/v1/chat/completions", _chat(stream=True, stream_options="yes"), "stream_options"),
    "include_usage that is a string": ("/v1/chat/completions", _chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
    "stream that is a string": ("/v1/chat/completions", _chat(stream="yes"), "stream"),
    "a lone surrogate in a message": ("/v1/chat/completions", _chat()[:-1].replace(b'"hi"', b'"hi \\ud800"') + b"}", None),
    "a lone surrogate in a prompt": ("/v1/completions", b'{"model": "a", "prompt": "\\udfff"}', None),
    "a lone surrogate in a key": ("/v1/chat/completions", _chat()[:-1] + b', "\\ud800": 1}', None),
    "max_tokens of 400 digits": ("/v1/chat/completions", _chat()[:-1] + b', "max_tokens": 1' + b"0" * 400 + b"}", "max_tokens"),
    "temperature of 400 digits": ("/v1/chat/completions", _chat()[:-1] + b', "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    "max_tokens that is NaN": ("/v1/chat/completions", _chat()[:-1] + b', "max_tokens": NaN}', "max_tokens"),
    "bytes that are not UTF-8": ("/v1/chat/completions", b'{"model": "\xff\xfe"}', None),
    "a prompt that is a number": ("/v1/completions", b'{"model": "a", "prompt": 5}', "prompt"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_requests_are_400_with_an_openai_error(models, log_check, case: str) -> None:
    path, body, param = HOSTILE[case]
    engines = {"a": FakeEngine(name="a")}
    with serving(engines) as client:
        status, answer = client.call("POST", path, body)
        assert status == 400 and _is_openai_error(answer, 400), answer
        assert answer["error"]["type"] == "invalid_request_error"
        if param:
            assert answer["error"]["param"] == param, answer
        assert client.ps() == []  # refused before anything loaded
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 200  # and the server lives on
    log = log_check()
    assert " 400 " in log


def test_unknown_routes_and_methods_answer_in_openai_format(models, log_check) -> None:
    with serving({"a": FakeEngine(name="a")}) as client:
        status, body = client.call("GET", "/v1/nothing")
        assert status == 404 and _is_openai_error(body, 404)
        status, body = client.call("GET", "/v1/chat/completions")
        assert status == 405 and _is_openai_error(body, 405)


# --- names are model names, never paths ----------------------------------------------------


def test_path_like_names_answer_exactly_like_a_missing_model(models, log_check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_gguf) -> None:
    from llmctl.commands import open_store

    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "repo").mkdir(parents=True)  # a relative directory that looks like a Hub name
    (tmp_path / "folder").mkdir()
    loose = make_gguf("loose.Q8_0.gguf")  # a valid model file that is not in the store
    registered = open_store().resolve("a").paths[0]
    names = [
        str(tmp_path), str(tmp_path) + "/", str(tmp_path / "folder"), "folder", "owner/repo", "./folder", "../..",
        "a/../b", "/etc/passwd", "/nonexistent/x", str(loose), "models/loose.Q8_0.gguf", str(registered),
        "~", "~root", "~nosuchuser-llmctl", "~/x", "C:\\Windows", "a\\b", "a\x00b", "a\nb",
    ]  # fmt: skip
    with serving({"a": FakeEngine(name="a")}) as client:

        def ask(name: str) -> tuple[int, Any]:
            status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "model": name})
            return status, json.loads(json.dumps(body).replace(json.dumps(name)[1:-1], "NAME"))

        missing = ask("no-such-model")
        assert missing[0] == 404 and _is_openai_error(missing[1], 404)
        for name in names:
            assert ask(name) == missing, name
            status, body = client.call("POST", "/api/stop", {"model": name})
            assert status == 404 and body["error"]["message"] == f"model '{name}' is not loaded", name
        assert client.ps() == []


def test_client_names_never_touch_the_file_system(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer is the same, and the store is not even asked about paths (no timing side channel)."""
    from llmctl.commands import open_store

    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "repo").mkdir(parents=True)
    probed: list[str] = []
    for method in ("is_file", "is_dir", "exists"):
        original = getattr(Path, method)
        monkeypatch.setattr(Path, method, lambda self, _o=original: probed.append(str(self)) or _o(self))
    store = open_store()
    with pytest.raises(NotFoundError):
        store.resolve("owner/repo", paths=False)
    assert not [p for p in probed if p.endswith("owner/repo")]
    assert store.resolve("a", paths=False).name == "a"  # registered names still resolve


def test_health_lists_loaded_models_only_to_key_holders(models, log_check) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with serving({"a": FakeEngine(name="a")}, api_key=KEY) as client:
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 401
        assert client.call("POST", "/v1/chat/completions", CHAT, headers=auth)[0] == 200
        assert client.call("GET", "/health") == (200, {"status": "ok"})
        assert client.call("GET", "/health", headers={"Authorization": "Bearer wrong"}) == (200, {"status": "ok"})
        assert client.call("GET", "/health", headers=auth) == (200, {"status": "ok", "loaded": ["a"]})
    assert KEY not in log_check()


# --- a failing generation frees its model --------------------------------------------------


FAILURES = {
    "engine": {"fail": EngineError("the model's chat template took longer than 1 s to render")},  # what a template over its budget raises
    "crash": {"fail": RuntimeError("something unexpected")},
    "midway": {"fail": EngineError("llama_decode failed"), "fail_after": 1},
}


@pytest.mark.parametrize("fail", sorted(FAILURES))
def test_a_failing_generation_answers_500_and_frees_the_model(models, log_check, fail: str) -> None:
    with serving({"a": FakeEngine(name="a", **FAILURES[fail])}) as client:
        status, body = client.call("POST", "/v1/chat/completions", CHAT)
        assert status == 500 and _is_openai_error(body, 500) and body["error"]["type"] == "server_error", body
        client.wait_idle()
        status, stream = client.call("POST", "/v1/chat/completions", {**CHAT, "stream": True})
        assert status == 200
        events = [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", stream
        error = json.loads(events[-2])
        assert _is_openai_error(error, 500), stream
        client.wait_idle()
        assert client.call("POST", "/api/stop", {"model": "a"}) == (200, {"stopped": "a"})
        assert client.ps() == []
    log = log_check()
    assert "500" in log


# --- the log -------------------------------------------------------------------------------


def test_the_log_escapes_what_clients_send(models, log_check) -> None:
    hostile = "/%1b%5b31mred%c2%9bcsi%e2%80%aertl%e2%80%a8line%e2%81%a6iso%0aforged%20200"
    with serving({"a": FakeEngine(name="a")}) as client:
        assert client.call("GET", hostile)[0] == 404
        assert client.call("POST", "/v1/chat/completions", {**CHAT, "model": "x\x1b[2Jy\u202e"})[0] == 404
    log = log_check()
    assert "red" in log and "\\x1b" in log
    for raw in ("\x1b", "\x9b", "\u202e", "\u2066", "\u2028"):
        assert raw not in log, repr(raw)
    assert all(line[:2].isdigit() for line in log.splitlines()), log  # no line a client started


# --- ps and stop keep the key at home ------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers with a redirect to ``target`` (when set), or with an empty ps; records every request."""

    target: str | None = None
    seen: list[dict[str, str]] = []

    def _answer(self) -> None:
        self.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.target:
            self.send_response(307 if self.command == "POST" else 302)
            self.send_header("Location", self.target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps({"models": [], "stopped": "x"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _recorder(target: str | None) -> Iterator[tuple[str, list[dict[str, str]]]]:
    handler = type("Handler", (_Recorder,), {"target": target, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("command", [["ps"], ["stop", "a"]])
def test_ps_and_stop_do_not_follow_redirects_with_the_key(cli, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    monkeypatch.setenv("LLMCTL_API_KEY", KEY)
    with _recorder(None) as (elsewhere, elsewhere_seen):
        other_host = elsewhere.replace("127.0.0.1", "localhost")  # another origin: other name, same machine
        with _recorder(other_host) as (server, server_seen):
            r = cli(*command, "--server", server)
    assert r.exit_code == 1, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and "redirect" in r.stderr and "Traceback" not in r.stderr
    assert server_seen and server_seen[0]["authorization"] == f"Bearer {KEY}"  # the key went where it was meant to
    assert elsewhere_seen == []  # and nowhere else
    with _recorder(None) as (server, server_seen):  # without a redirect the same call works
        assert cli(*command, "--server", server).exit_code == 0
    assert server_seen[0]["authorization"] == f"Bearer {KEY}"


# --- the same hostile requests against a real server process -------------------------------


@pytest.mark.slow
def test_a_real_server_answers_hostile_requests_with_400s_and_logs_no_traceback(tmp_path: Path, make_gguf) -> None:
    from tests.serve.test_serve import Server

    env = {**os.environ, "LLMCTL_HOME": str(tmp_path)}
    exe = str(Path(sys.executable).with_name("llmctl"))
    subprocess.run([exe, "import", str(make_gguf("a.Q8_0.gguf")), "--name", "a"], env=env, check=True, capture_output=True)
    server = Server(tmp_path)
    try:
        for case, (path, body, _param) in HOSTILE.items():
            status, answer, _ = server.raw("POST", path, body)
            assert status == 400 and _is_openai_error(answer, 400), (case, answer)
        for name in ("~nosuchuser-llmctl", str(tmp_path), "/etc/passwd"):
            status, answer, _ = server.raw("POST", "/v1/chat/completions", json.dumps({**CHAT, "model": name}).encode())
            assert status == 404 and _is_openai_error(answer, 404), (name, answer)
        assert server.raw("GET", "/health")[1] == {"status": "ok", "loaded": []}
        assert server.proc.poll() is None
    finally:
        log = server.stop()
    assert "Traceback" not in log and " 400 " in log, log


# --- a loaded model is found without reading the index ---------------------------------------


def test_repeated_requests_to_a_loaded_model_do_not_read_the_index(models, log_check, monkeypatch) -> None:
    """Only a name not yet seen for a loaded model is resolved through the store; an unload forgets
    it, and any change to the index (here `rm` of a loaded model) resolves afresh, so the answer is
    what resolving every time gives: 404 for a removed model, as before."""
    from llmctl.commands import open_store
    from llmctl.models.store import Store

    counts = {"resolve": 0, "read": 0}
    for method, key in (("resolve", "resolve"), ("_read_index", "read")):
        original = getattr(Store, method)

        def counting(self: Store, *args: Any, _o: Any = original, _k: str = key, **kwargs: Any) -> Any:
            counts[_k] += 1
            return _o(self, *args, **kwargs)

        monkeypatch.setattr(Store, method, counting)

    def ask(name: str) -> int:
        return client.call("POST", "/v1/chat/completions", {**CHAT, "model": name})[0]

    with serving({"a": FakeEngine(name="a"), "b": FakeEngine(name="b")}) as client:
        assert ask("a") == 200  # resolved, then loaded
        first = dict(counts)
        assert first["resolve"] == 1 and first["read"] >= 1
        for _ in range(5):
            assert ask("a") == 200
        assert counts == first  # answered from the pool
        assert ask("A") == 200  # another name for it: resolved once, then remembered
        assert counts["resolve"] == 2
        assert ask("A") == 200 and counts["resolve"] == 2
        assert client.call("POST", "/api/stop", {"model": "A"})[0] == 200  # no index read either
        assert counts["resolve"] == 2
        assert ask("a") == 200 and counts["resolve"] == 3  # unloaded: resolved (and loaded) again
        assert ask("b") == 200 and counts["resolve"] == 4
        open_store().remove_entry("b")  # `llmctl rm b` while it is loaded
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "model": "b"})
        assert status == 404 and _is_openai_error(body, 404) and "model 'b' not found" in body["error"]["message"]
        assert ask("a") == 200  # the index changed: resolved afresh, still served
        assert counts["resolve"] == 6
        assert ask("a") == 200 and counts["resolve"] == 6
