"""serve's front against hostile clients and failing children.

The server runs in-process (tests/serve/inprocess.py: uvicorn on a thread, a free loopback
port) over a real store of small crafted GGUFs; each model's child is the fake llama-server
(tests/support/fake_llama_server.py), a real process started through the pool's launcher seam,
whose delays, holds, failures and deaths are under the test's control. Requests are raw HTTP,
since the openai client cannot send most of what is tried here. One slow test repeats the
hostile requests against a real ``llmctl serve`` over llama.cpp's llama-server and reads its log.
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

from llmctl.errors import NotFoundError
from tests.serve.inprocess import events, serving, wait_for
from tests.support.processes import alive as _alive

KEY = "sekret-key-123"
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


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


def _hold(tmp_path: Path, name: str = "release") -> tuple[dict[str, Any], Path]:
    """A ``fake`` switch that holds requests until the returned file exists."""
    gate = tmp_path / name
    return {"hold": str(gate)}, gate


def _send_and_leave(port: int, body: dict[str, Any], path: str = "/v1/chat/completions") -> socket.socket:
    """A raw client that sends a whole request and reads nothing yet: close the socket to leave."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))  # fmt: skip
    return sock


# --- one model must not stall the others ---------------------------------------------------


def test_a_busy_model_does_not_stall_other_routes_or_models(models, log_check, tmp_path: Path) -> None:
    """40 requests wait on model a (one decoding, 39 in its queue); listing, health, ps and model b
    still answer at once."""
    hold, gate = _hold(tmp_path)
    waiting = 40
    with serving(max_queue=64, max_loaded=2, parallel=1) as client:
        outcomes: list[int] = []

        def ask_a(stream: bool) -> None:
            status, _ = client.call("POST", "/v1/chat/completions", {**CHAT, "stream": stream, "fake": hold}, timeout=90)
            outcomes.append(status)

        threads = [threading.Thread(target=ask_a, args=(i % 8 == 0,)) for i in range(waiting)]
        for t in threads:
            t.start()
        wait_for(lambda: [m["busy"] for m in client.ps()] == [waiting], 30)
        # a is held: everything else answers within a bound far below "stalled"
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("GET", "/v1/models/a", None),
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
        gate.touch()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a request to a hung"
        assert outcomes == [200] * waiting
        client.wait_idle()


def test_requests_past_the_queue_get_503_without_waiting(models, log_check, tmp_path: Path) -> None:
    hold, gate = _hold(tmp_path)
    with serving(max_queue=2, parallel=1) as client:
        body = {"model": "a", "prompt": "x", "fake": hold}
        threads = [threading.Thread(target=client.call, args=("POST", "/v1/completions", body), kwargs={"timeout": 60}) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: [m["busy"] for m in client.ps()] == [3])
        started = time.perf_counter()
        status, headers, answer = client.exchange("POST", "/v1/completions", body, timeout=10)
        assert status == 503 and _is_openai_error(answer, 503) and headers["Retry-After"] == "1", answer
        assert time.perf_counter() - started < 2
        gate.touch()
        for t in threads:
            t.join(30)
        client.wait_idle()
    assert " 503 " in log_check()


def test_a_client_that_leaves_a_non_streaming_request_frees_the_model(models, log_check) -> None:
    """The generation of a client gone mid-answer stops (the child's request is closed); a queued one
    whose client is gone never starts, and its place is free at once."""
    slow = {**CHAT, "fake": {"text": "word " * 600, "delay": 0.05}}  # a 30 s reply
    with serving(parallel=1) as client:
        running = _send_and_leave(client.port, slow)
        wait_for(lambda: client.stats("a").get("pieces", 0) > 0)
        queued = _send_and_leave(client.port, slow)
        wait_for(lambda: [m["busy"] for m in client.ps()] == [2])
        queued.close()  # gone while waiting: its place is given back at once
        wait_for(lambda: [m["busy"] for m in client.ps()] == [1], seconds=5)
        running.close()  # gone mid-answer: the child's request is closed, and it stops
        wait_for(lambda: [m["busy"] for m in client.ps()] == [0], seconds=5)
        wait_for(lambda: client.stats("a")["cancelled"] == 2, seconds=5)
        pieces = client.stats("a")["pieces"]
        assert pieces < 200, pieces  # far from the 600 of the whole reply
        started = time.perf_counter()
        status, body = client.call("POST", "/v1/chat/completions", CHAT, timeout=60)
        assert status == 200 and body["choices"][0]["message"]["content"] == "hello world", body
        assert time.perf_counter() - started < 5
        stats = client.stats("a")
        assert stats["started"] == 2  # the two that stayed: the queued request never started
        assert stats["pieces"] == pieces + 2  # the stopped reply sent nothing more; "hello ", "world" since
    assert log_check().count(" 499 ") == 2  # each client that left is one line of the log


def test_a_client_that_leaves_mid_stream_stops_its_generation(models, log_check) -> None:
    with serving() as client:
        body = json.dumps({**CHAT, "stream": True, "fake": {"text": "word " * 600, "delay": 0.05}}).encode()
        with socket.create_connection(("127.0.0.1", client.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(4096)
        wait_for(lambda: [m["busy"] for m in client.ps()] == [0], seconds=5)
        wait_for(lambda: client.stats("a")["cancelled"] == 1, seconds=5)
        assert client.stats("a")["pieces"] < 100
    assert " 499 " in log_check() and "(the client went away)" in log_check()


def test_a_client_that_leaves_while_its_model_loads_gives_its_place_back(models, log_check) -> None:
    with serving(fake={"a": {"load_s": 1.5}}) as client:
        sock = _send_and_leave(client.port, CHAT)
        wait_for(lambda: client.stats("a") != {})  # the child is starting
        sock.close()
        wait_for(lambda: [(m["name"], m["busy"]) for m in client.ps()] == [("a", 0)], seconds=10)
        assert client.stats("a")["started"] == 0  # loaded, but nothing generated for the client that left
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 200


@pytest.mark.parametrize(
    "stop, needle",
    [(["x"] * 17, "17 stop strings"), (["x" * 257], "257 characters"), ([chr(0x4E00 + i % 20_000) + str(i) for i in range(350_000)], "350000 stop strings")],
    ids=["17 strings", "257 characters", "350,000 strings"],
)
@pytest.mark.parametrize("field, path", [("stop", "/v1/chat/completions"), ("stop_sequences", "/v1/messages")])
def test_stop_lists_are_bounded(models, log_check, stop: list[str], needle: str, field: str, path: str) -> None:
    with serving() as client:
        status, body = client.call("POST", path, {**CHAT, field: stop})
        assert status == 400 and _is_openai_error(body, 400) and body["error"]["param"] == field, body
        assert needle in body["error"]["message"] and "--" not in body["error"]["message"], body
        assert client.ps() == []  # refused before anything loaded
        assert client.call("POST", path, {**CHAT, field: ["x" * 256] * 16})[0] == 200


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "loading"])
def test_max_queue_counts_the_requests_waiting_besides_the_running_one(models, log_check, tmp_path: Path, loaded: bool) -> None:
    """One slot and --max-queue 2: one request decodes (or waits for the load) and 2 wait; the 4th is refused."""
    hold, gate = _hold(tmp_path)
    body = {"model": "a", "prompt": "x", "fake": hold}
    with serving(parallel=1, max_queue=2, fake={"a": {"load_s": 0 if loaded else 3}}) as client:
        if loaded:
            assert client.call("POST", "/v1/completions", {"model": "a", "prompt": "x"})[0] == 200
        sockets = []
        for n in range(1, 4):
            sockets.append(_send_and_leave(client.port, body, "/v1/completions"))
            if loaded:
                wait_for(lambda: [m["busy"] for m in client.ps()] == [n])
            else:
                time.sleep(0.3)  # nothing to watch while the model loads: give the server time
        status, answer = client.call("POST", "/v1/completions", body, timeout=10)
        assert status == 503 and _is_openai_error(answer, 503), answer
        wait_for(lambda: [m["busy"] for m in client.ps()] == [3])  # the three accepted ones, no more
        gate.touch()
        for sock in sockets:
            sock.settimeout(20)
            assert sock.recv(100).startswith(b"HTTP/1.1 200"), "an accepted request was not answered"
            sock.close()
        client.wait_idle()


# --- what the front refuses: 400s ----------------------------------------------------------


def _chat(**changes: Any) -> bytes:
    return json.dumps({**CHAT, **changes}).encode()


# Refused by the front, before anything loads: what is not JSON, or not JSON llama-server's parser
# reads the same way, and model names that are no names.
HOSTILE = {
    "JSON nested 1,000 deep": ("/v1/chat/completions", _chat()[:-1] + b', "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", None),
    "JSON nested 100 deep": ("/v1/chat/completions", _chat()[:-1] + b', "x": ' + b"[" * 100 + b"]" * 100 + b"}", None),
    "a 5,000-character model name": ("/v1/chat/completions", _chat(model="m" * 5000), "model"),
    "a model name that is a number": ("/v1/embeddings", b'{"model": 5, "input": "x"}', "model"),
    "no model": ("/v1/messages", b'{"messages": []}', "model"),
    "a lone surrogate in a message": ("/v1/chat/completions", _chat()[:-1].replace(b'"hi"', b'"hi \\ud800"') + b"}", None),
    "a lone surrogate in a prompt": ("/v1/completions", b'{"model": "a", "prompt": "\\udfff"}', None),
    "a lone surrogate in a key": ("/v1/chat/completions", _chat()[:-1] + b', "\\ud800": 1}', None),
    "max_tokens of 400 digits": ("/v1/chat/completions", _chat()[:-1] + b', "max_tokens": 1' + b"0" * 400 + b"}", "max_tokens"),
    "temperature of 400 digits": ("/v1/chat/completions", _chat()[:-1] + b', "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    "a number past 64-bit floats": ("/v1/chat/completions", _chat()[:-1] + b', "top_p": 1e400}', "top_p"),
    "a huge number deep in tools": (
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"maximum": 10**30}}}]),
        "tools",
    ),
    "max_tokens that is NaN": ("/v1/chat/completions", _chat()[:-1] + b', "max_tokens": NaN}', None),
    "top_p that is Infinity": ("/v1/chat/completions", _chat()[:-1] + b', "top_p": -Infinity}', None),
    "bytes that are not UTF-8": ("/v1/chat/completions", b'{"model": "\xff\xfe"}', None),
    "a body that is a list": ("/v1/completions", b'[{"model": "a"}]', None),
    "malformed JSON": ("/v1/chat/completions", b"{not json", None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_requests_are_400_with_an_openai_error(models, log_check, case: str) -> None:
    path, body, param = HOSTILE[case]
    with serving() as client:
        status, answer = client.call("POST", path, body)
        assert status == 400 and _is_openai_error(answer, 400), answer
        assert answer["error"]["type"] == "invalid_request_error"
        if param:
            assert answer["error"]["param"] == param, answer
        assert client.ps() == []  # refused before anything loaded
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 200  # and the server lives on
    log = log_check()
    assert " 400 " in log


def test_an_oversized_body_is_413_from_its_length_before_it_is_read(models, log_check) -> None:
    from llmctl.serve.app import MAX_BODY_BYTES

    with serving() as client:
        with socket.create_connection(("127.0.0.1", client.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n{{".encode())  # fmt: skip
            reply = b""
            while b"larger than" not in reply and len(reply) < 8192:
                data = sock.recv(8192)
                if not data:
                    break
                reply += data
        assert reply.startswith(b"HTTP/1.1 413") and b"larger than" in reply
        # sent in chunks, with no length: counted as it arrives
        conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
        conn.putrequest("POST", "/v1/embeddings")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer and close before all is sent
        response = conn.getresponse()
        assert response.status == 413 and _is_openai_error(json.loads(response.read()), 413)
        conn.close()
        assert client.ps() == []


def test_unknown_routes_and_methods_answer_in_openai_format(models, log_check) -> None:
    with serving() as client:
        status, body = client.call("GET", "/v1/nothing")
        assert status == 404 and _is_openai_error(body, 404)
        status, body = client.call("GET", "/v1/chat/completions")
        assert status == 405 and _is_openai_error(body, 405)
        status, body = client.call("POST", "/slots/0?action=erase", {"model": "a"})  # llama-server's own routes stay inside
        assert status == 404 and _is_openai_error(body, 404)


# --- what the model cannot do: 400s before llama-server's 500s and 501s ----------------------


def test_rerank_and_images_are_refused_clearly_for_models_that_cannot(models, log_check) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with serving() as client:
        status, body = client.call("POST", "/v1/rerank", {"model": "a", "query": "q", "documents": ["x", "y"]})
        assert status == 400 and _is_openai_error(body, 400) and "is not a reranker" in body["error"]["message"], body
        for path, part in (("/v1/chat/completions", image), ("/v1/messages", {"type": "image", "source": {"type": "base64", "data": "x"}})):
            status, body = client.call("POST", path, {"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, part]}]})
            assert status == 400 and "has no multimodal projector (mmproj)" in body["error"]["message"] and body["error"]["param"] == "messages", body
        assert client.stats("a")["started"] == 0  # none of it reached the child
        client.wait_idle()


# --- the child's answers come back as they are -----------------------------------------------


def test_every_route_passes_the_body_through_and_the_answer_back(models, log_check) -> None:
    """The body reaches llama-server as the client sent it (the front rewrites nothing) and the
    answer, status and body, comes back unchanged; the model field says llmctl's name."""
    with serving() as client:
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "model": "A"})  # another name for a
        assert status == 200 and body["model"] == "a" and body["choices"][0]["message"]["content"] == "hello world"
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
        status, body = client.call("POST", "/v1/completions", {"model": "a", "prompt": "hi", "fake": {"text": "one two three"}})
        assert status == 200 and body["choices"][0]["text"] == "one two three"
        status, body = client.call("POST", "/v1/embeddings", {"model": "a", "input": ["x", "y", "x"]})
        assert status == 200 and [len(d["embedding"]) for d in body["data"]] == [8, 8, 8] and body["data"][0]["embedding"] == body["data"][2]["embedding"]
        status, body = client.call("POST", "/v1/messages", {"model": "a", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and body["content"][0]["text"] == "hello world" and body["usage"]["output_tokens"] == 2
        status, body = client.call("POST", "/v1/messages/count_tokens", {"model": "a", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and body["input_tokens"] > 0
        status, stream = client.call("POST", "/v1/messages", {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and "event: content_block_delta" in stream and stream.rstrip().endswith('data: {"type": "message_stop"}')
        # the child's refusals too: its status code and its body
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "fake": {"status": 400, "message": "tools need --jinja"}})
        assert (status, body) == (400, {"error": {"code": 400, "message": "tools need --jinja", "type": "invalid_request_error"}})
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "fake": {"status": 500, "message": "the chat template failed"}})
        assert status == 500 and body["error"]["message"] == "the chat template failed"
        paths = client.stats("a")["paths"]
        assert paths == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens", "/v1/messages",
                         "/v1/chat/completions", "/v1/chat/completions"]  # fmt: skip
        client.wait_idle()
    log = log_check()
    assert "POST /v1/chat/completions 200" in log and "model=a in=4 out=2" in log and "POST /v1/chat/completions 500" in log


def test_streams_are_relayed_event_by_event_as_they_come(models, log_check) -> None:
    """With 0.3 s between pieces, each event reaches the client on its own, long before the end;
    usage comes last when asked for, then [DONE]."""
    with serving() as client:
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 200  # loaded
        body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}, "fake": {"text": "a b c d", "delay": 0.3}}).encode()
        with socket.create_connection(("127.0.0.1", client.port), timeout=30) as sock:
            started = time.perf_counter()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            received = b""
            arrivals = []
            while not received.endswith(b"0\r\n\r\n"):
                data = sock.recv(65536)
                if not data:
                    break
                received += data
                arrivals.append((time.perf_counter() - started, received.count(b"data: ")))
        first = next(t for t, n in arrivals if n >= 1)
        assert first < 0.25, arrivals  # the first piece, before the second exists
        assert arrivals[-1][0] > 1.0  # the last after four pauses
        data = [line for line in received.decode().splitlines() if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and json.loads(data[-2][6:])["usage"]["completion_tokens"] == 4
    assert "in=" in log_check() and " stream" in log_check()


# --- a child that dies ------------------------------------------------------------------------


def test_a_child_killed_mid_answer_is_an_error_event_or_502_and_the_next_request_starts_it_again(models, log_check) -> None:
    with serving(keep_alive=-1) as client:
        status, stream = client.call("POST", "/v1/chat/completions", {**CHAT, "stream": True, "fake": {"text": "one two three four", "die_after": 2}})
        assert status == 200
        data = events(stream)
        assert data[-1] == "[DONE]", stream
        error = json.loads(data[-2])
        assert _is_openai_error(error, 502) and "killed by SIGKILL mid-answer" in error["error"]["message"], error
        assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-2]] == ["one ", "two "]  # the half event was dropped
        assert [(m["name"], m["state"], m["busy"]) for m in client.ps()] == [("a", "killed by SIGKILL", 0)]  # ps shows it
        first_pid = client.stats("a")["pid"]
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "fake": {"die_after": 1}})  # not streamed
        assert status == 502 and _is_openai_error(body, 502) and body["error"]["type"] == "server_error", body
        assert client.stats("a")["pid"] != first_pid  # started again for it
        status, stream = client.call("POST", "/v1/messages", {"model": "a", "stream": True, "messages": CHAT["messages"], "fake": {"die_after": 1}})
        assert status == 200 and stream.rstrip().splitlines()[-2:] == ["event: error", stream.rstrip().splitlines()[-1]], stream
        assert json.loads(stream.rstrip().splitlines()[-1][6:])["type"] == "error"  # Anthropic's error event
        status, body = client.call("POST", "/v1/chat/completions", CHAT)
        assert status == 200 and body["choices"][0]["message"]["content"] == "hello world"
        assert [(m["state"], m["busy"]) for m in client.ps()] == [("ready", 0)]
        assert client.call("POST", "/api/stop", {"model": "a"}) == (200, {"stopped": "a"})
    log = log_check()
    assert " 502 " in log and "killed by SIGKILL" in log and "it starts again on the next request" in log


def test_a_child_that_cannot_load_is_a_500_with_its_last_error_and_the_others_are_served(models, log_check) -> None:
    with serving(fake={"a": {"exit": 1}}) as client:
        status, body = client.call("POST", "/v1/chat/completions", CHAT)
        assert status == 500 and _is_openai_error(body, 500), body
        assert (
            body["error"]["message"]
            == "model 'a' failed to load: llama-server exited 1 while loading a: llama_model_load: error loading model: fake load failure"
        )
        assert client.call("POST", "/v1/chat/completions", {**CHAT, "model": "b"})[0] == 200
        assert [m["name"] for m in client.ps()] == ["b"]
    log = log_check()
    assert "a failed to load" in log and "logs/a.log" in log  # the log says where to look; the client is not told


def test_a_child_that_never_gets_ready_is_given_up_at_the_load_deadline(models, log_check) -> None:
    with serving(fake={"a": {"hang": True}}, load_timeout=1.0) as client:
        started = time.perf_counter()
        status, body = client.call("POST", "/v1/chat/completions", CHAT)
        assert status == 500 and "did not finish loading a within 1 s" in body["error"]["message"], body
        assert time.perf_counter() - started < 10
        assert client.ps() == []
        pid = client.stats("a")["pid"]
        wait_for(lambda: not _alive(pid), seconds=5)  # and it was stopped


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
    with serving() as client:

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
    with serving(api_key=KEY) as client:
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 401
        assert client.call("POST", "/v1/chat/completions", CHAT, headers=auth)[0] == 200
        assert client.call("GET", "/health") == (200, {"status": "ok"})
        assert client.call("GET", "/health", headers={"Authorization": "Bearer wrong"}) == (200, {"status": "ok"})
        assert client.call("GET", "/health", headers=auth) == (200, {"status": "ok", "loaded": ["a"]})
    assert KEY not in log_check()


# --- the log -------------------------------------------------------------------------------


def test_the_log_escapes_what_clients_send(models, log_check) -> None:
    hostile = "/%1b%5b31mred%c2%9bcsi%e2%80%aertl%e2%80%a8line%e2%81%a6iso%0aforged%20200"
    with serving() as client:
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

# Passed through to llama-server, which answers them itself (an error, or leniently an answer):
# requests of the wrong shape.
PASSED_THROUGH = {
    "a text part that is a number": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])),
    "a text part that is null": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}])),
    "a content part that is a string": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": ["hi"]}])),
    "messages that is a string": ("/v1/chat/completions", _chat(messages="hi")),
    "json_schema that is a string": ("/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": "x"})),
    "a schema llama.cpp cannot turn into a grammar": (
        "/v1/chat/completions",
        _chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}),
    ),
    "stream_options that is a string": ("/v1/chat/completions", _chat(stream=True, stream_options="yes")),
    "stream that is a string": ("/v1/chat/completions", _chat(stream="yes")),
    "a prompt that is a number": ("/v1/completions", b'{"model": "a", "prompt": 5}'),
    "embeddings of nothing": ("/v1/embeddings", b'{"model": "a"}'),
    "temperature that is a string": ("/v1/chat/completions", _chat(temperature="hot")),
}


def _post(url: str, body: bytes) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_a_real_server_answers_hostile_requests_with_errors_and_logs_no_traceback(tmp_path: Path, demo_model: Path, native_tools) -> None:
    """The front's 400s, and llama-server's own answers to what it is passed: an error status with an
    error body, never a dead child or a hung request."""
    from tests.serve.test_serve import Server

    env = {**os.environ, "LLMCTL_HOME": str(tmp_path)}
    exe = str(Path(sys.executable).with_name("llmctl"))
    subprocess.run([exe, "import", str(demo_model), "--name", "a"], env=env, check=True, capture_output=True)
    server = Server(tmp_path, "a", "--ctx", "512", "--parallel", "2")
    try:
        for case, (path, body, _param) in HOSTILE.items():
            status, answer, _ = server.raw("POST", path, body)
            assert status == 400 and _is_openai_error(answer, 400), (case, answer)
        for case, (path, body) in PASSED_THROUGH.items():
            status, text = _post(server.url + path, body)
            # llama-server's own answer: an error body with its status, or (it is lenient) an answer
            assert status < 400 or isinstance(json.loads(text).get("error"), dict), (case, status, text)
            assert status not in (499, 502), (case, status, text)
            assert [m["state"] for m in server.raw("GET", "/api/ps")[1]["models"]] == ["ready"], case
        for name in ("~nosuchuser-llmctl", str(tmp_path), "/etc/passwd"):
            status, answer, _ = server.raw("POST", "/v1/chat/completions", json.dumps({**CHAT, "model": name}).encode())
            assert status == 404 and _is_openai_error(answer, 404), (name, answer)
        assert server.raw("GET", "/health")[1] == {"status": "ok", "loaded": ["a"]}
        reply = server.client().chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content is not None
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

    with serving() as client:
        assert ask("a") == 200  # resolved, then planned (which resolves it too) and loaded
        first = dict(counts)
        assert first["resolve"] == 2 and first["read"] >= 1
        for _ in range(5):
            assert ask("a") == 200
        assert counts == first  # answered from the pool
        assert ask("A") == 200  # another name for it: resolved once, then remembered
        assert counts["resolve"] == 3
        assert ask("A") == 200 and counts["resolve"] == 3
        assert client.call("POST", "/api/stop", {"model": "A"})[0] == 200  # no index read either
        assert counts["resolve"] == 3
        assert ask("a") == 200 and counts["resolve"] == 5  # unloaded: resolved (and planned) again
        assert ask("b") == 200 and counts["resolve"] == 7
        open_store().remove_entry("b")  # `llmctl rm b` while it is loaded
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "model": "b"})
        assert status == 404 and _is_openai_error(body, 404) and "model 'b' not found" in body["error"]["message"]
        assert ask("a") == 200  # the index changed: resolved afresh, still served
        assert counts["resolve"] == 9
        assert ask("a") == 200 and counts["resolve"] == 9


# --- a hostile chat template ------------------------------------------------------------------


@pytest.mark.parametrize("template", ["{{ 'A' * 20000000000 }}", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"], ids=["multiply", "recursion"])
def test_a_template_past_its_budgets_is_refused_before_a_child_starts(cli, make_gguf, log_check, template: str) -> None:
    """llama-server renders the template while it loads, with no budget: llmctl renders it within
    its own budgets first (engine/chat_template.py), and a template that blows one is a 500 at once."""
    assert cli("import", make_gguf("h.Q8_0.gguf", chat_template=template), "--name", "h").exit_code == 0
    assert cli("import", make_gguf("a.Q8_0.gguf"), "--name", "a").exit_code == 0
    with serving() as client:
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "model": "h"})
        assert status == 500 and "the model's chat template failed" in body["error"]["message"], body
        assert client.stats("h") == {} and client.ps() == []  # no child was started
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 200  # a plain template loads


def test_each_request_has_a_connection_of_its_own_so_none_meets_one_the_child_dropped(models, log_check) -> None:
    """llama-server closes a kept-alive connection left idle 5 s, unannounced: a request sent on one
    just then would fail before reaching it. Each request opens its own (a child that closes every
    connection after its answer is served as well as any)."""
    with serving(fake={"a": {"drop_idle": True}}) as client:
        for n in range(5):
            status, body = client.call("POST", "/v1/chat/completions", CHAT)
            assert status == 200, (n, body)
            status, stream = client.call("POST", "/v1/completions", {"model": "a", "prompt": "x", "stream": True})
            assert status == 200 and events(stream)[-1] == "[DONE]", (n, stream)
        assert client.stats("a")["started"] == 10  # each once
