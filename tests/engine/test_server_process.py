"""llama-server as a child process (llmctl/engine/server_process.py): its flags from a plan, its start
and health wait, its bounded log, its end, and that it never outlives its parent. The child here is
the fake llama-server (tests/support/fake_llama_server.py, a real process); the real one is in
tests/serve/test_serve.py (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.engine.server_process import (
    Address,
    ChildLog,
    ServerSpec,
    ServerStartError,
    Sockets,
    describe_exit,
    log_path_for,
    plan_server,
    server_args,
    start_server,
)
from tests.serve.inprocess import FAKE_SERVER

FAKE = [sys.executable, str(FAKE_SERVER)]


@pytest.fixture
def sockets():
    made = Sockets()
    yield made
    made.close()


def spec(**changes: object) -> ServerSpec:
    return ServerSpec(model=Path("/m/a.gguf"), alias="a", n_ctx=2048, slots=4, **changes)  # type: ignore[arg-type]


def test_the_flags_say_the_whole_plan_and_leave_llama_server_nothing_to_fit() -> None:
    assert server_args(spec(n_gpu_layers=33, threads=8, type_k="q8_0", type_v="q8_0", flash_attn=True)) == [
        "-m", "/m/a.gguf", "--alias", "a", "-c", "8192", "-np", "4", "--no-kv-unified", "-ngl", "33", "-t", "8", "-tb", "8",
        "-b", "512", "-ub", "512", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", "--fit", "off", "--cache-ram", "0", "--jinja", "--no-webui",
        "--embeddings", "--pooling", "mean",
    ]  # fmt: skip
    args = server_args(spec(mmproj=Path("/m/mmproj-f16.gguf"), swa_full=True, kv_unified=True, tensor_split=[0.75, 0.25], pooling=None))
    assert args[args.index("--mmproj") + 1] == "/m/mmproj-f16.gguf" and "--swa-full" in args and "--kv-unified" in args
    assert args[args.index("-ts") + 1] == "0.75,0.25" and "--pooling" not in args and "--embeddings" in args  # the GGUF's own pooling
    reranker = server_args(spec(reranker=True))
    assert "--rerank" in reranker and "--embeddings" not in reranker


def test_the_serving_plan_is_fits_with_slots_and_a_reranker_is_told_by_its_gguf(cli, make_gguf) -> None:
    from llmctl.commands import open_store
    from llmctl.plan.fit import Overrides

    assert cli("import", make_gguf("a.Q8_0.gguf"), "--name", "a").exit_code == 0
    assert cli("import", make_gguf("r.Q8_0.gguf", extra={"llama.pooling_type": 4}), "--name", "r").exit_code == 0
    assert cli("import", make_gguf("e.Q8_0.gguf", extra={"llama.pooling_type": 1}), "--name", "e").exit_code == 0
    store = open_store()
    planned = plan_server(store, "a", Overrides(n_ctx=256, parallel=2))
    assert (planned.spec.alias, planned.spec.n_ctx, planned.spec.slots, planned.spec.reranker, planned.spec.pooling) == ("a", 256, 2, False, "mean")
    assert planned.spec.model == store.resolve("a").paths[0] and planned.spec.mmproj is None
    assert planned.memory > 0
    assert plan_server(store, "r", Overrides()).spec.reranker
    assert plan_server(store, "e", Overrides()).spec.pooling is None  # an embedding model's own pooling stays


def test_a_child_starts_answers_health_and_stops(tmp_path: Path) -> None:
    sockets = Sockets()
    address = sockets.next()
    assert address.uds is not None and len(str(address.uds)) < 100 and oct(address.uds.parent.stat().st_mode)[-3:] == "700"
    log_path = log_path_for(tmp_path / "logs", "owner/model:Q4")
    assert log_path.name == "owner_model_Q4.log"
    child = start_server("a", spec(), command=FAKE, address=address, log_path=log_path, deadline_s=20)
    try:
        assert child.state() == "ready" and child.exit_code() is None
        from llmctl.engine.server_process import health

        assert health(address, timeout=2) == 200
        lines = log_path.read_text().splitlines()
        assert lines[0].startswith("--- ") and " a: " in lines[0] and "-np 4" in lines[0]
        assert any(line.startswith("fake llama-server for a:") for line in lines)
    finally:
        child.stop()
    assert child.state() == "exited 0"  # SIGTERM: llama-server's clean end
    assert not address.uds.exists()
    sockets.close()
    assert not address.uds.parent.exists()


def test_a_child_that_exits_while_loading_is_one_error_line_with_its_log(tmp_path: Path, sockets: Sockets) -> None:
    env = {"LLMCTL_FAKE_SERVER": json.dumps({"*": {"exit": 1}})}
    log_path = tmp_path / "a.log"
    with pytest.raises(ServerStartError) as caught:
        start_server("a", spec(), command=FAKE, address=sockets.next(), log_path=log_path, deadline_s=20, env=env)
    assert caught.value.message == "llama-server exited 1 while loading a: llama_model_load: error loading model: fake load failure"
    assert caught.value.hint == f"its log: {log_path}"


def test_a_child_that_never_answers_is_stopped_at_the_deadline(tmp_path: Path, sockets: Sockets) -> None:
    env = {"LLMCTL_FAKE_SERVER": json.dumps({"*": {"hang": True}}), "LLMCTL_FAKE_DIR": str(tmp_path)}
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="did not finish loading a within 1 s"):
        start_server("a", spec(), command=FAKE, address=sockets.next(), log_path=tmp_path / "a.log", deadline_s=1, env=env)
    assert time.monotonic() - started < 5
    pid = json.loads((tmp_path / "a.json").read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped


def test_a_missing_binary_is_one_error_line(tmp_path: Path, sockets: Sockets) -> None:
    with pytest.raises(ServerStartError, match="cannot start /nonexistent/llama-server: No such file or directory"):
        start_server("a", spec(), command=["/nonexistent/llama-server"], address=sockets.next(), log_path=tmp_path / "a.log", deadline_s=5)


def test_tcp_children_have_an_internal_key(tmp_path: Path) -> None:
    """Where there are no Unix sockets, a child listens on loopback with a random key, kept out of its log."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = Address(port=port, api_key="k" * 32)
    child = start_server("a", spec(), command=FAKE, address=address, log_path=tmp_path / "a.log", deadline_s=20)
    try:
        conn = address.connect(5)
        conn.request("POST", "/v1/embeddings", body=b'{"input": "x"}')
        assert conn.getresponse().status == 401  # without the key
        conn.close()
    finally:
        child.stop()
    log = (tmp_path / "a.log").read_text()
    assert "k" * 32 not in log and "--api-key ***" in log, log


def test_the_log_is_rotated_at_its_bound_and_remembers_the_last_error(tmp_path: Path) -> None:
    log = ChildLog(tmp_path / "a.log", max_bytes=1000)
    reader, writer = os.pipe()
    log.follow(os.fdopen(reader, "rb"), "--- start")
    with os.fdopen(writer, "wb") as out:
        for n in range(100):
            out.write(b"line %03d of the child's chatter\n" % n)
        out.write(b"srv load_model: failed to load model 'x'\nmain: exiting\n")
    log.join(5)
    assert (tmp_path / "a.log").stat().st_size <= 1000 and (tmp_path / "a.log.1").stat().st_size <= 1000
    assert (tmp_path / "a.log").read_text().endswith("main: exiting\n")
    assert log.last_error() == "srv load_model: failed to load model 'x'"


def test_exits_read_as_ps_shows_them() -> None:
    assert [describe_exit(c) for c in (None, 0, 1, -9, -15)] == ["ready", "exited 0", "exited 1", "killed by SIGKILL", "killed by SIGTERM"]


PARENT = """
import sys, time
from pathlib import Path
from llmctl.engine.server_process import ServerSpec, Sockets, start_server
child = start_server("a", ServerSpec(model=Path("/m/a.gguf"), alias="a", n_ctx=256, slots=1), command=sys.argv[1:],
                     address=Sockets().next(), log_path=Path("{log}"), deadline_s=20)
print(child.pid, child.address.uds, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_parent_even_by_sigkill(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(log=tmp_path / "a.log"), *FAKE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert parent.stdout is not None
    pid_text, socket_path = parent.stdout.readline().split()
    pid, folder = int(pid_text), Path(socket_path).parent
    os.kill(pid, 0)  # running
    assert os.getpgid(pid) == pid  # in a process group of its own: a terminal's Ctrl-C is the parent's to pass on
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            assert folder.exists()  # left behind by the killed parent: the next server's Sockets removes it
            fresh = Sockets()
            fresh.next()
            fresh.close()
            assert not folder.exists()
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the child outlived its parent's SIGKILL")
