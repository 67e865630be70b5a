"""``llmctl rpc-server``: the address rules (loopback unless --allow-remote), a taken port, and the
real command as a user runs it: status line, a preflight from another process, Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmctl.bench.serving import free_port
from llmctl.engine import rpc, rpc_worker
from llmctl.errors import EXIT_USAGE

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "10.0.0.1"])
def test_a_non_loopback_host_needs_allow_remote(cli, host: str) -> None:
    result = cli("rpc-server", "--host", host, "--port", str(free_port()))
    assert result.exit_code == EXIT_USAGE
    assert f"--host {host} would expose the RPC server" in result.stderr
    assert "--allow-remote" in result.stderr and "SSH tunnel" in result.stderr
    assert "listening" not in result.stderr


def test_loopback_addresses_and_localhost_need_no_flag() -> None:
    assert rpc_worker.check_host("127.0.0.1", allow_remote=False) == "127.0.0.1"
    assert rpc_worker.check_host("127.0.0.2", allow_remote=False) == "127.0.0.2"
    assert rpc_worker.check_host("localhost", allow_remote=False) == "127.0.0.1"
    assert rpc_worker.check_host("0.0.0.0", allow_remote=True) == "0.0.0.0"


def test_a_host_name_or_ipv6_is_refused_as_upstream_binds_ipv4_literals(cli) -> None:
    for host in ("example.com", "::1"):
        result = cli("rpc-server", "--host", host)
        assert result.exit_code == EXIT_USAGE
        assert "not an IPv4 address" in result.stderr


def test_allow_remote_prints_upstreams_warning_before_binding(cli) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes, then the bind is refused.
    result = cli("rpc-server", "--host", "192.0.2.1", "--allow-remote", "--port", str(free_port()))
    assert result.exit_code == EXIT_USAGE
    assert "warning: ggml-rpc-server has no authentication and no encryption" in result.stderr
    assert "memory-safety" in result.stderr and "ssh -L" in result.stderr
    assert "--host 192.0.2.1 is not an address of this machine" in result.stderr


def test_a_port_in_use_is_one_line(cli, native_tools) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("rpc-server", "--port", str(port))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"error: 127.0.0.1:{port} is already in use"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_unknown_device_names_the_ones_there_are(cli, native_tools) -> None:
    result = cli("rpc-server", "--device", "NOPE0", "--port", str(free_port()))
    assert result.exit_code == 1
    assert "does not know --device NOPE0" in result.stderr
    assert "this machine's devices: CPU" in result.stderr


def test_the_worker_arguments_follow_the_options() -> None:
    spec = rpc_worker.WorkerSpec("127.0.0.1", 50100, threads=3, devices="CUDA0,CUDA1", cache=True)
    assert spec.args() == ["-H", "127.0.0.1", "-p", "50100", "-t", "3", "-d", "CUDA0,CUDA1", "-c"]
    assert rpc_worker.WorkerSpec().args() == ["-H", "127.0.0.1", "-p", "50052"]


def test_the_tensor_cache_folder_is_upstreams() -> None:
    assert rpc_worker.cache_dir({"LLAMA_CACHE": "/x", "HOME": "/h"}) == Path("/x/rpc")
    assert rpc_worker.cache_dir({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/llama.cpp/rpc")
    assert rpc_worker.cache_dir({"HOME": "/h"}) == Path("/h/.cache/llama.cpp/rpc")


class _Stderr:
    """The lines a child writes on stderr, read on a thread so waiting for one has a deadline."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout} s; seen: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def rest(self, timeout: float = 5) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                self.seen.append(self.lines.get(timeout=0.1))
            except queue.Empty:
                if not self.lines.qsize():
                    break
        return self.seen


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_rpc_server_starts_answers_preflight_and_stops_on_ctrl_c(native_tools, isolated: Path, stop: signal.Signals) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "rpc-server", "--port", str(port), "--threads", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        err = _Stderr(child.stderr)
        status = err.wait_for("listening")
        assert status.startswith(f"rpc-server listening on 127.0.0.1:{port} (ggml RPC protocol {rpc.RPC_PROTOCOL}): devices CPU (")
        assert "; 1 thread; no tensor cache" in status
        err.wait_for(f"--rpc 127.0.0.1:{port}")

        (info,) = rpc.preflight([rpc.Endpoint("127.0.0.1", port)])
        assert info.protocol == rpc.RPC_PROTOCOL and info.devices
        err.wait_for("client connected")  # what the worker says is relayed, one line each
        err.wait_for("client disconnected")

        child.send_signal(stop)  # Ctrl-C, or a service manager's stop
        assert child.wait(timeout=30) == 0
        lines = err.rest()
        assert f"rpc-server on 127.0.0.1:{port} stopped" in lines
        assert not any("Traceback" in line or "error" in line for line in lines)
        assert child.stdout is not None and child.stdout.read() == ""  # a server has no data for stdout
        with pytest.raises(rpc.EndpointUnreachableError):  # ggml-rpc-server went with it
            rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
