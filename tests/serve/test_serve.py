"""serve end to end: a real `llmctl serve` process on a free loopback port, its models in llama.cpp's
own llama-server children on the demo model, driven by the real openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import alive as _alive

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).with_name("llmctl"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tools_env(native_tools: Any) -> dict[str, str]:
    """Where a server process finds llama-server: the tests' build folder, or one's own build."""
    if native_tools.source == "llmctl":
        return {"LLMCTL_ENGINE_DIR": str(native_tools.bin_dir.parents[1])}
    return {"LLMCTL_LLAMA_BIN": str(native_tools.bin_dir)}


class Server:
    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LLMCTL_HOME": str(home), "NO_COLOR": "1", **(env or {})}
        env.pop("LLMCTL_API_KEY", None)
        self.log = open(home / "server.log", "w")
        self.proc = subprocess.Popen([EXE, "serve", "--port", str(self.port), *args], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
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

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)

    def ps(self, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return self.raw("GET", "/api/ps", headers=headers)[1]["models"]

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        finally:
            self.log.close()
        return (Path(self.log.name)).read_text()


def _start_stream(port: int, payload: dict, events: int = 3) -> socket.socket:
    """Open a raw streaming request and read until ``events`` SSE events have arrived."""
    body = json.dumps({"stream": True, **payload}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    received = b""
    while received.count(b"data: ") < events:
        received += sock.recv(4096)
    return sock


def _wait(condition: Any, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.1)
    assert condition()


def _import(home: Path, path: Path, name: str) -> None:
    env = {**os.environ, "LLMCTL_HOME": str(home)}
    subprocess.run([EXE, "import", str(path), "--name", name], env=env, check=True, capture_output=True)


LONG_STORY = {"model": "demo", "messages": [{"role": "user", "content": "Write a very long story."}]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_model: Path, native_tools):
    home = tmp_path_factory.mktemp("serve-home")
    second = home / "second.Q4_1.gguf"
    try:
        os.link(demo_model, second)
    except OSError:
        shutil.copy(demo_model, second)
    _import(home, demo_model, "demo")
    _import(home, second, "other")
    server = Server(home, "demo", "--max-queue", "4", "--max-loaded", "1", "--ctx", "2048", env=tools_env(native_tools))
    yield server
    server.stop()


def test_models_chat_completions_and_json_mode(served: Server) -> None:
    client = served.client()
    assert sorted(m.id for m in client.models.list().data) == ["demo", "other"]
    assert client.models.retrieve("demo").id == "demo"
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                                           temperature=0, seed=1, max_tokens=16)  # fmt: skip
    assert "Paris" in reply.choices[0].message.content and reply.model == "demo"
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


def test_streaming_with_usage(served: Server) -> None:
    stream = served.client().chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Count to five."}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len([c for c in chunks if c.choices and c.choices[0].delta.content])
    streamed = served.client().completions.create(model="demo", prompt="Once upon a time", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed)


def test_embeddings_have_the_models_width_and_the_same_text_gives_the_same_vector(served: Server) -> None:
    client = served.client()
    answer = client.embeddings.create(model="demo", input=["The cat sat on the mat.", "Stock markets fell today.", "The cat sat on the mat."])
    vectors = [d.embedding for d in answer.data]
    assert [len(v) for v in vectors] == [576] * 3  # SmolLM2-135M's embedding width
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-3  # normalised, as OpenAI's are
    assert answer.usage.prompt_tokens > 0


def _with_template(demo: Path, out: Path, template: str) -> Path:
    """A copy of ``demo`` whose chat template is ``template`` (weights and tokenizer unchanged)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(demo)
    writer = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents(), endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}, [])
    return out


def test_tool_calls_reach_the_models_template_and_are_answered_in_openais_shape(tmp_path: Path, demo_model: Path, native_tools) -> None:
    """The demo model with Qwen2.5's chat template (tools in a system block, <tool_call> tags): the
    tools reach the prompt (llama-server runs with --jinja), a history with tool calls and their
    results is accepted, and the answer is OpenAI's shape. (A 135M model seldom chooses to call a
    tool, and llama-server no longer forces one for tool_choice "required"; a call it makes is
    parsed into tool_calls.)"""
    template = (Path(__file__).parents[1] / "data" / "qwen2.5-tools.jinja").read_text()
    _import(tmp_path, _with_template(demo_model, tmp_path / "tools.Q4_1.gguf", template), "tools")
    server = Server(tmp_path, "tools", "--ctx", "1024", "--parallel", "1", env=tools_env(native_tools))
    try:
        client = server.client()
        question = [{"role": "user", "content": "What is the weather in Paris?"}]
        plain = client.chat.completions.create(model="tools", messages=question, max_tokens=4, temperature=0)
        with_tools = client.chat.completions.create(model="tools", messages=question, tools=[WEATHER], tool_choice="auto", max_tokens=32, temperature=0)
        assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tool's description is in the prompt
        history = [
            *question,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "clear"}'},
        ]
        for reply in (with_tools, client.chat.completions.create(model="tools", messages=history, tools=[WEATHER], max_tokens=32, temperature=0)):
            choice = reply.choices[0]
            assert reply.object == "chat.completion" and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length", "tool_calls")
            assert choice.message.content or choice.message.tool_calls
            for call in choice.message.tool_calls or []:
                assert call.type == "function" and call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
        streamed = list(client.chat.completions.create(model="tools", messages=history, tools=[WEATHER], max_tokens=16, temperature=0, stream=True))
        assert streamed and streamed[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        server.stop()


def test_the_anthropic_messages_api(served: Server) -> None:
    body = {"model": "demo", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]}
    status, answer, _ = served.raw("POST", "/v1/messages", json.dumps(body).encode(), headers={"anthropic-version": "2023-06-01"})
    assert status == 200 and answer["type"] == "message" and answer["model"] == "demo" and answer["content"][0]["type"] == "text", answer
    assert answer["usage"]["output_tokens"] >= 1
    status, counted, _ = served.raw("POST", "/v1/messages/count_tokens", json.dumps(body).encode())
    assert status == 200 and counted["input_tokens"] > 0


def test_rerank_needs_a_reranker(served: Server) -> None:
    status, answer, _ = served.raw("POST", "/v1/rerank", json.dumps({"model": "demo", "query": "cats", "documents": ["a cat", "a car"]}).encode())
    assert status == 400 and "is not a reranker" in answer["error"]["message"], answer


def test_four_clients_at_once_are_all_answered_by_the_models_slots(served: Server) -> None:
    assert [m["slots"] for m in served.ps()] == [4]  # what the planner chose for the demo model here
    results: list[str] = []

    def ask(n: int) -> None:
        stream = served.client().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": f"Tell me fact number {n}."}], max_tokens=24, stream=True
        )
        results.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and all(results), results
    log = Path(served.ps()[0]["log"]).read_text()
    assert "n_slots = 4" in log  # decoded in four slots of one llama-server


def test_errors(served: Server) -> None:
    from openai import BadRequestError, NotFoundError

    client = served.client()
    with pytest.raises(NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "available: demo, other" in str(caught.value)
    with pytest.raises(BadRequestError, match="context"):  # llama-server's own answer, passed on
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "word " * 9000}], max_tokens=4)
    status, body, _ = served.raw("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body, _ = served.raw("POST", "/v1/chat/completions", json.dumps({"model": "demo", "messages": "hi"}).encode())
    assert status == 400 and body["error"]["message"], body
    # An oversized body is refused from its Content-Length, before the server reads it.
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 40000000\r\n\r\n{")  # fmt: skip
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
                text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
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
    assert outcomes.count("ok") >= 16 and "503" in outcomes  # 4 slots + 4 queued at once, of 16 clients
    assert served.rss() < before + 200 * 1024 * 1024  # bounded: no per-request growth
    _wait(lambda: all(m["busy"] == 0 for m in served.ps()), 30)
    # LRU: max-loaded 1, so loading another model unloads demo (and ends its child)
    pid = served.ps()[0]["pid"]
    client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert [m["name"] for m in served.ps()] == ["other"] and not _alive(pid)
    out = subprocess.run([EXE, "ps", "--server", served.url], capture_output=True, text=True)
    assert out.returncode == 0 and "other" in out.stdout and "ready" in out.stdout
    out = subprocess.run([EXE, "stop", "other", "--server", served.url], capture_output=True, text=True)
    assert out.returncode == 0
    assert served.ps() == []


def test_keep_alive_expiry_and_api_key(tmp_path: Path, demo_model: Path, native_tools) -> None:
    _import(tmp_path, demo_model, "demo")
    server = Server(tmp_path, "--keep-alive", "1", "--api-key", "sekret-key-123", "--ctx", "1024", env=tools_env(native_tools))
    try:
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            server.client("wrong").models.list()
        assert server.raw("GET", "/v1/models")[0] == 401
        client = server.client("sekret-key-123")
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        headers = {"Authorization": "Bearer sekret-key-123"}
        assert [m["name"] for m in server.ps(headers)] == ["demo"]
        anthropic = {"x-api-key": "sekret-key-123"}  # how Anthropic's clients send the key
        assert (
            server.raw(
                "POST", "/v1/messages", json.dumps({"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode(), anthropic
            )[0]
            == 200
        )
        _wait(lambda: server.ps(headers) == [], 10)
    finally:
        log = server.stop()
    assert "keep-alive expired" in log
    assert "sekret-key-123" not in log and "sekret-key-123" not in (tmp_path / "logs" / "demo.log").read_text()


def test_memory_budget_unloads_lru_and_load_failures_are_500(tmp_path: Path, demo_model: Path, native_tools) -> None:
    from tests.support.gguf_factory import RawGGUF

    second = tmp_path / "second.Q4_1.gguf"
    os.link(demo_model, second) if demo_model.stat().st_dev == tmp_path.stat().st_dev else shutil.copy(demo_model, second)
    _import(tmp_path, demo_model, "demo")
    _import(tmp_path, second, "other")
    _import(tmp_path, RawGGUF.minimal().write(tmp_path / "hollow.gguf"), "hollow")  # a valid header llama.cpp cannot load
    profile = tmp_path / "machine.json"
    # room for one demo model with 4 slots of 2048 tokens (~311 MiB in use of a 461 MiB budget), not two
    profile.write_text(json.dumps({"cpu": {"physical_cores": 2}, "ram": {"total_gib": 4, "available_gib": 0.95}}))
    server = Server(tmp_path, "--max-loaded", "4", "--ctx", "2048", env={"LLMCTL_HW_PROFILE": str(profile), **tools_env(native_tools)})
    try:
        client = server.client()
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert [m["name"] for m in server.ps()] == ["other"]
        status, body, _ = server.raw("POST", "/v1/chat/completions", json.dumps({"model": "hollow", "messages": [{"role": "user", "content": "x"}]}).encode())
        assert status == 500 and "failed to load" in body["error"]["message"] and "llama-server exited" in body["error"]["message"], body
        reply = client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content is not None  # the others keep being served
    finally:
        log = server.stop()
    assert "making room in memory" in log and "logs/hollow.log" in log


def test_a_client_that_disconnects_stops_its_generation(served: Server) -> None:
    served.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)  # loaded
    log = Path(served.ps()[0]["log"])
    before = log.read_text().count("stop processing")
    with _start_stream(served.port, {**LONG_STORY, "max_tokens": 4000}, events=5):
        pass  # the client goes away mid-stream
    # llama-server hears the connection close and releases the slot, long before 4000 tokens
    _wait(lambda: all(m["busy"] == 0 for m in served.ps()), 10)
    _wait(lambda: log.read_text().count("stop processing") > before or "cancel" in log.read_text(), 20)


def test_stop_and_model_names_are_strict(served: Server) -> None:
    client = served.client()
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert served.raw("POST", "/api/stop", json.dumps({"model": ""}).encode())[0] == 404  # no prefix games
    assert served.raw("POST", "/v1/chat/completions", json.dumps({"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]}).encode())[0] == 404
    status, body, _ = served.raw("POST", "/v1/chat/completions", json.dumps({
        "model": "demo", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}}).encode())  # fmt: skip
    assert 400 <= status < 500 and body["error"]["message"], body  # llama-server refuses the schema; the child lives on
    # stopping a model while it generates is refused, and the server lives on
    with _start_stream(served.port, {**LONG_STORY, "max_tokens": 400}):
        status, body409, _ = served.raw("POST", "/api/stop", json.dumps({"model": "demo"}).encode())
        assert status == 409 and "busy" in body409["error"]["message"]
    assert served.proc.poll() is None


def test_kill_9_of_a_child_mid_stream_is_an_error_event_and_the_next_request_starts_it_again(served: Server) -> None:
    import openai

    client = served.client()
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    pid = served.ps()[0]["pid"]
    stream = client.chat.completions.create(**LONG_STORY, max_tokens=2000, stream=True)
    pieces = 0
    with pytest.raises(openai.APIError, match="killed by SIGKILL mid-answer"):
        for _chunk in stream:
            pieces += 1
            if pieces == 3:
                os.kill(pid, signal.SIGKILL)
    assert [(m["name"], m["state"], m["busy"]) for m in served.ps()] == [("demo", "killed by SIGKILL", 0)]
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert reply.choices[0].message.content
    assert [(m["state"], m["pid"] != pid) for m in served.ps()] == [("ready", True)]
    assert served.proc.poll() is None


def test_sigterm_shuts_down_gracefully_mid_stream_and_ends_the_children(tmp_path: Path, demo_model: Path, native_tools) -> None:
    _import(tmp_path, demo_model, "demo")
    server = Server(tmp_path, "demo", "--ctx", "1024", env=tools_env(native_tools))
    pid = server.ps()[0]["pid"]
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
    assert not _alive(pid)
    server.log.close()
    assert "shutting down" in (tmp_path / "server.log").read_text()


def test_no_child_survives_a_sigkill_of_the_server(tmp_path: Path, demo_model: Path, native_tools) -> None:
    _import(tmp_path, demo_model, "demo")
    server = Server(tmp_path, "demo", "--ctx", "1024", env=tools_env(native_tools))
    pid = server.ps()[0]["pid"]
    assert _alive(pid)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server.log.close()
    _wait(lambda: not _alive(pid), 10)


def test_serve_rpc_splits_every_child_across_the_workers_and_survives_a_worker_killed(tmp_path: Path, demo_model: Path, native_tools) -> None:
    """`serve --rpc`: the child's layers on the workers; a worker killed mid-answer ends that stream
    with an error and the server stays up; while it is down a request gets 503 naming it; restarted,
    it is used again."""
    import openai

    from llmctl.engine.rpc_worker import WorkerSpec, start_worker
    from tests.support.rpc_workers import endpoints_of, running_workers

    _import(tmp_path, demo_model, "demo")
    with running_workers(native_tools.path("ggml-rpc-server")) as workers:
        server = Server(tmp_path, "demo", "--ctx", "1024", "--rpc", endpoints_of(workers), env=tools_env(native_tools))
        try:
            client = server.client()
            cmdline = Path(f"/proc/{server.ps()[0]['pid']}/cmdline").read_bytes().split(b"\0")
            assert endpoints_of(workers).encode() in cmdline and cmdline[cmdline.index(b"-ngl") + 1] == b"31"
            reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
            assert reply.choices[0].message.content
            stream = client.chat.completions.create(model="demo", messages=LONG_STORY["messages"], max_tokens=2000, stream=True)
            victim = workers[1]
            with pytest.raises(openai.APIError):
                for pieces, _chunk in enumerate(stream):
                    if pieces == 3:
                        os.kill(victim.process.pid, signal.SIGKILL)
            _wait(lambda: server.ps()[0]["state"] != "ready", 30)
            status, body, _headers = server.raw(
                "POST", "/v1/chat/completions", json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
            )
            assert status == 503 and str(victim.endpoint) in body["error"]["message"], body
            workers[1] = start_worker(WorkerSpec(port=victim.endpoint.port, threads=1), binary=native_tools.path("ggml-rpc-server"))
            reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
            assert reply.choices[0].message.content and server.ps()[0]["state"] == "ready"
            assert server.proc.poll() is None
        finally:
            server.stop()
