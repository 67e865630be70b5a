"""run and chat on a llama-server child with llama.cpp RPC workers (llmctl/engine/server_engine.py).

Fast: the --rpc flag, the plan's layers on the workers, the request sent for each sampling
setting, llama-server's events read back, chat ending when the engine is lost. Slow: the engine
over the fake llama-server (timings, a child that dies, a worker that is gone), then the real
thing: two ``ggml-rpc-server`` processes on loopback, the demo model split across them, its
temperature-0 text against llama-server without workers and against the in-process engine, chat
with slash commands, and a worker killed with SIGKILL mid-generation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from llmctl.engine.base import EngineError, EngineLostError, Result
from llmctl.engine.fake import FakeEngine
from llmctl.engine.server_engine import answer_error, finish_of, parse_event, request_body
from llmctl.errors import EXIT_USAGE
from tests.serve.inprocess import FAKE_SERVER
from tests.support.processes import alive

# --- fast: the flag, the plan, the request, the answer ----------------------------------------


class Recorder:
    """An engine factory that records what it was asked for and hands out a fake."""

    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.engine = engine or FakeEngine(["ok"])
        self.calls: list[dict[str, Any]] = []

    def __call__(self, name: str, paths: list[Path], plan: Any, **options: Any) -> FakeEngine:
        self.calls.append({"plan": plan, **options})
        self.engine.config = plan.config
        return self.engine


def test_run_with_rpc_asks_for_the_workers_with_every_layer_on_them(cli, make_gguf, monkeypatch) -> None:
    from llmctl.engine import runner

    recorder = Recorder()
    monkeypatch.setattr(runner, "engine_factory", recorder)
    monkeypatch.setattr(runner, "_check_workers_fit", lambda *args: None)  # no workers: the engine is a fake
    model = make_gguf(n_layers=12)
    r = cli("run", model, "Hi", "--rpc", "127.0.0.1:50052,127.0.0.9:50053", "--json")
    assert r.exit_code == 0, r.stderr
    (call,) = recorder.calls
    assert call["rpc"] == ["127.0.0.1:50052", "127.0.0.9:50053"]
    assert call["plan"].config.n_gpu_layers == 13  # the 12 blocks and the output layer
    assert json.loads(r.stdout)["load"]["n_gpu_layers"] == 13
    monkeypatch.setenv("LLMCTL_RPC", "127.0.0.1:50099")
    assert cli("run", model, "Hi", "--gpu-layers", "5").exit_code == 0
    assert recorder.calls[-1]["rpc"] == ["127.0.0.1:50099"] and recorder.calls[-1]["plan"].config.n_gpu_layers == 5
    monkeypatch.delenv("LLMCTL_RPC")
    assert cli("run", model, "Hi").exit_code == 0
    assert "rpc" not in recorder.calls[-1] and recorder.calls[-1]["plan"].config.n_gpu_layers == 0  # in-process, as before


def test_a_bad_rpc_flag_is_a_usage_error_before_anything_loads(cli, make_gguf, fake_engines) -> None:
    r = cli("run", make_gguf(), "Hi", "--rpc", "localhost")
    assert r.exit_code == EXIT_USAGE and "rpc endpoint 'localhost' has no port" in r.stderr and "Traceback" not in r.stderr
    assert fake_engines.made == []
    assert cli("chat", make_gguf(), "--rpc", "a:b", input="Hi\n").exit_code == EXIT_USAGE


def test_chat_ends_when_the_engine_is_lost_and_keeps_the_workers_for_a_new_context(cli, make_gguf, monkeypatch) -> None:
    from llmctl.engine import runner

    lost = EngineLostError("the RPC worker 127.0.0.9:50053 went away during generation", hint="restart it")
    recorder = Recorder(FakeEngine(["first reply", "second reply"], fail=lost, fail_after=1))
    monkeypatch.setattr(runner, "engine_factory", recorder)
    monkeypatch.setattr(runner, "_check_workers_fit", lambda *args: None)  # no workers: the engine is a fake
    r = cli("chat", make_gguf(), "--rpc", "127.0.0.9:50053", input="Hello\nAgain\nOnce more\n")
    assert r.exit_code == 1
    assert "error: the RPC worker 127.0.0.9:50053 went away during generation" in r.stderr and "Traceback" not in r.stderr
    assert len(recorder.engine.calls) == 1 and recorder.engine.closed  # no turn after the loss; the engine closed
    recorder.engine = FakeEngine(["a", "b"])
    assert cli("chat", make_gguf(n_ctx=4096), "--rpc", "127.0.0.9:50053", input="Hi\n/set ctx 1024\nAgain\n").exit_code == 0
    assert [call["rpc"] for call in recorder.calls[1:]] == [["127.0.0.9:50053"]] * 2  # /set ctx reloads on the same workers


def test_sampling_settings_become_llama_servers_request_fields() -> None:
    from llama_cpp import LlamaGrammar

    from llmctl.engine.llama import sampling_kwargs
    from llmctl.engine.sampling import from_flags

    settings = from_flags(temperature=0.0, top_p=0.5, top_k=7, min_p=0.1, repeat_penalty=1.2, seed=42, max_tokens=9, stop=["END"])
    grammar = LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
    body = request_body([1, 2, 3], {**sampling_kwargs(settings), "stop": ["END", "<|im_end|>"], "grammar": grammar})
    assert body == {
        "prompt": [1, 2, 3], "stream": True, "cache_prompt": True, "temperature": 0.0, "top_p": 0.5, "top_k": 7, "min_p": 0.1,
        "repeat_penalty": 1.2, "seed": 42, "n_predict": 9, "stop": ["END", "<|im_end|>"], "grammar": 'root ::= "yes" | "no"',
    }  # fmt: skip
    unset = request_body([1], sampling_kwargs(from_flags()))
    assert unset["seed"] == -1 and unset["n_predict"] == -1 and unset["stop"] == [] and "grammar" not in unset


def test_llama_servers_events_and_errors_are_read() -> None:
    assert parse_event(b"") is None and parse_event(b": keep-alive") is None
    assert parse_event(b'data: {"content": "Hi", "stop": false}') == {"content": "Hi", "stop": False}
    assert finish_of({"stop_type": "limit"}) == "length" and finish_of({"stop_type": "eos"}) == finish_of({"stop_type": "word"}) == "stop"
    with pytest.raises(EngineError, match="llama-server: boom"):
        parse_event(b'data: {"error": {"code": 500, "message": "boom", "type": "server_error"}}')
    too_long = json.dumps({"error": {"code": 400, "message": "request (9000 tokens) exceeds the context (8192)", "type": "exceed_context_size_error"}})
    error = answer_error(400, too_long.encode())
    assert error.message.startswith("request (9000 tokens)") and error.hint == "shorten the input or raise --ctx"
    assert "answered 502" in answer_error(502, b"Bad Gateway").message


# --- slow: the engine over the fake llama-server --------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fake_engine(demo_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rpc: list[str], **fake: Any) -> Any:
    from llmctl.commands import open_store
    from llmctl.config import get_settings
    from llmctl.engine.server_engine import ServerEngine
    from llmctl.models.locate import Located
    from llmctl.plan.fit import Overrides, make_plan
    from llmctl.plan.hardware import get_hardware

    monkeypatch.setenv("LLMCTL_FAKE_SERVER", json.dumps({"*": fake}))
    monkeypatch.setenv("LLMCTL_FAKE_DIR", str(tmp_path))
    located = Located.of(open_store().resolve(str(demo_model)))
    plan = make_plan([located.candidate()], get_hardware(get_settings()), Overrides(n_ctx=1024, threads=1))
    return ServerEngine.load("demo", [demo_model], plan, rpc=rpc, command=[sys.executable, str(FAKE_SERVER)])


def last_body(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "demo.json").read_text())["last_body"]


@pytest.mark.slow
def test_the_engine_sends_the_rendered_prompt_as_tokens_and_reads_timings(demo_model, monkeypatch, tmp_path) -> None:
    from llmctl.engine.sampling import from_flags

    engine = fake_engine(demo_model, monkeypatch, tmp_path, [], text="Hello there friend")
    try:
        assert engine.n_ctx == 1024 and engine.has_chat_template and engine.count_tokens("<|im_start|>") == 1
        pieces = list(engine.chat([{"role": "user", "content": "Hi"}], from_flags(temperature=0)))
        result = pieces[-1]
        assert isinstance(result, Result) and "".join(p for p in pieces if isinstance(p, str)) == "Hello there friend" == result.text
        prompt = engine.llm.tokenize(b"<|im_start|>system\n", add_bos=False, special=True)
        body = last_body(tmp_path)
        assert body["prompt"][: len(prompt)] == prompt and body["temperature"] == 0.0  # the template rendered here, as tokens
        t = result.timings
        assert (t.prompt_tokens, t.prompt_eval_tokens, t.generated_tokens) == (len(body["prompt"]), len(body["prompt"]), 3)
        assert t.prompt_eval_s == pytest.approx(len(body["prompt"]) / 1000) and result.finish_reason == "stop" and t.load_s > 0
        cut = list(engine.complete("Once upon", from_flags(max_tokens=2)))[-1]
        assert isinstance(cut, Result) and cut.text == "Hello there " and cut.finish_reason == "length" and cut.timings.generated_tokens == 2
        child = engine.child
        engine.set_threads(3)  # llama-server is started again with the new count
        assert engine.threads == 3 and engine.child is not child and not alive(child.pid) and engine.child.spec.threads == 3
        assert list(engine.complete("again", from_flags()))[-1].text == "Hello there friend"
    finally:
        engine.close()
    assert engine.child is None


@pytest.mark.slow
def test_a_child_that_dies_mid_reply_names_the_worker_that_went_away(demo_model, monkeypatch, tmp_path) -> None:
    from llmctl.engine.sampling import from_flags

    gone = f"127.0.0.1:{free_port()}"  # nothing listens there: the worker that went away
    monkeypatch.setattr("llmctl.engine.rpc.preflight", lambda endpoints: [])  # it was there when the child started
    engine = fake_engine(demo_model, monkeypatch, tmp_path, [gone], text="one two three four", die_after=2)
    pid = engine.child.pid
    try:
        shown = []
        with pytest.raises(EngineLostError) as lost:
            for piece in engine.complete("Hi", from_flags()):
                shown.append(piece)
        assert shown == ["one ", "two "] and not alive(pid) and engine.child is None
        assert lost.value.message == f"the RPC worker {gone} went away during generation" and "llama-server's log" in (lost.value.hint or "")
    finally:
        engine.close()


@pytest.mark.slow
def test_a_dead_child_without_a_missing_worker_says_how_it_ended(demo_model, monkeypatch, tmp_path) -> None:
    from llmctl.engine.sampling import from_flags

    engine = fake_engine(demo_model, monkeypatch, tmp_path, [], text="one two", die_after=1)
    try:
        with pytest.raises(EngineLostError, match="llama-server killed by SIGKILL while generating"):
            list(engine.complete("Hi", from_flags()))
    finally:
        engine.close()


# --- slow: real llama-server, real RPC workers ------------------------------------------------


def start_worker(binary: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", "1"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, f"127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ggml-rpc-server did not start: {log.read_text()}") from None
            time.sleep(0.05)


@pytest.fixture
def workers(native_tools, tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """Two ggml-rpc-server processes on loopback, one thread each."""
    started = [start_worker(native_tools.path("ggml-rpc-server"), tmp_path / f"worker{i}.log") for i in range(2)]
    yield started
    for process, _ in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def rpc_children(workers: list[tuple[subprocess.Popen[bytes], str]]) -> list[int]:
    """llama-server processes still running with these workers."""
    endpoints = ",".join(endpoint for _, endpoint in workers).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"llama-server") and endpoints in argv and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_model_split_across_two_workers_writes_what_it_writes_in_one_process(cli, demo_model, workers, monkeypatch) -> None:
    from llmctl.commands import open_store
    from llmctl.engine.runner import plan_model
    from llmctl.engine.sampling import from_flags
    from llmctl.engine.server_engine import ServerEngine
    from llmctl.plan.fit import Overrides

    endpoints = ",".join(endpoint for _, endpoint in workers)
    prompt = ["run", demo_model, "Name three colours.", "--temperature", "0", "--max-tokens", "48", "--ctx", "1024"]
    split = cli(*prompt, "--rpc", endpoints, "--json")
    assert split.exit_code == 0, split.stderr
    local = cli(*prompt, "--json")
    assert local.exit_code == 0, local.stderr
    on_workers, in_process = json.loads(split.stdout), json.loads(local.stdout)
    assert on_workers["load"]["n_gpu_layers"] == 31 and in_process["load"]["n_gpu_layers"] == 0
    # Measured: identical text and token counts (the same prompt tokens, greedy sampling, the same llama.cpp build).
    assert on_workers["text"] == in_process["text"] and len(on_workers["text"]) > 20
    assert on_workers["usage"] == in_process["usage"] and on_workers["finish_reason"] == in_process["finish_reason"]
    assert on_workers["timings"]["prompt_eval_tokens"] == in_process["timings"]["prompt_eval_tokens"] > 0
    # llama-server alone, without workers (every layer on this machine's CPU).
    planned = plan_model(open_store(), str(demo_model), Overrides(n_ctx=1024))
    engine = ServerEngine.load("demo", [demo_model], planned.plan, rpc=[])
    try:
        assert "--rpc" not in engine.child.process.args
        messages = [{"role": "user", "content": "Name three colours."}]
        alone = list(engine.chat(messages, from_flags(temperature=0, max_tokens=48)))[-1]
    finally:
        engine.close()
    assert isinstance(alone, Result) and alone.text == on_workers["text"]
    assert rpc_children(workers) == []


@pytest.mark.slow
def test_chat_on_workers_keeps_its_slash_commands(cli, demo_model, workers) -> None:
    endpoints = ",".join(endpoint for _, endpoint in workers)
    script = "/set temperature 0\n/set max_tokens 16\nSay hi.\n/set threads 1\n/show\n/clear\nSay hi.\n/stats\n"
    r = cli("chat", demo_model, "--ctx", "1024", "--rpc", endpoints, input=script)
    assert r.exit_code == 0, r.stderr
    replies = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2 and replies[0] == replies[-1]  # the same greedy reply after the restart for /set threads
    assert "threads = 1" in r.stderr and "1 thread" in r.stderr and "session:     2 replies" in r.stderr
    assert rpc_children(workers) == []


@pytest.mark.slow
def test_a_worker_killed_mid_generation_ends_run_with_its_name(demo_model, workers, tmp_path: Path) -> None:
    endpoints = ",".join(endpoint for _, endpoint in workers)
    victim, victim_endpoint = workers[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    command = [
        sys.executable,
        "-m",
        "llmctl",
        "run",
        str(demo_model),
        "Write a long story about a dragon.",
        "--temperature",
        "0",
        "--ctx",
        "2048",
        "--rpc",
        endpoints,
    ]
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        run = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        deadline = time.monotonic() + 120
        while out.stat().st_size < 40 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # generation has begun
        assert run.poll() is None, err.read_text()
        victim.send_signal(signal.SIGKILL)
        code = run.wait(timeout=60)
    said = err.read_text()
    assert code == 1, said
    assert f"error: the RPC worker {victim_endpoint} went away during generation" in said and "Traceback" not in said
    assert workers[1][1] not in said.splitlines()[0]  # only the worker that died is named
    assert rpc_children(workers) == []  # llama-server went with it


@pytest.mark.slow
def test_a_model_too_large_for_this_machine_runs_on_workers_that_hold_it_and_one_they_cannot_is_refused(
    cli, demo_model, workers, tmp_path, monkeypatch
) -> None:
    """With --rpc the workers' memory decides (llama.cpp's own projection, as `fit --rpc`), not this machine's."""
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"name": "a 0.1 GiB box", "os": "Linux", "backend": "cpu",
                                "cpu": {"brand": "x", "physical_cores": 2, "logical_cores": 2, "features": ["avx2"], "bandwidth_gbs": 10},
                                "ram": {"total_gib": 0.1, "available_gib": 0.1}, "disk_free_gib": 10}))  # fmt: skip
    monkeypatch.setenv("LLMCTL_HW_PROFILE", str(tiny))
    endpoints = ",".join(endpoint for _, endpoint in workers)
    prompt = ["run", demo_model, "Say hi.", "--temperature", "0", "--max-tokens", "4", "--ctx", "1024"]
    assert cli(*prompt).exit_code == 4  # here alone it does not fit
    on_workers = cli(*prompt, "--rpc", endpoints)
    assert on_workers.exit_code == 0 and on_workers.stdout.strip(), on_workers.stderr
    too_long = cli("run", demo_model, "Say hi.", "--max-tokens", "4", "--ctx", str(4 * 1024 * 1024), "--rpc", endpoints)
    assert too_long.exit_code == 4 and "does not fit on the RPC workers" in too_long.stderr, too_long.stderr
    assert rpc_children(workers) == []
