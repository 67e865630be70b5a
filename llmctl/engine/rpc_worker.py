"""A ``ggml-rpc-server`` on this machine: the worker side of llama.cpp's RPC backend, as
``llmctl rpc-server`` runs it in the foreground (and tests and benchmarks run it on loopback).

``start_worker`` checks the address first (upstream binds IPv4 literals only, and exits 0 with
nothing but "Failed to create server socket" when the port is taken), starts the server in a
process group of its own (Ctrl-C at the terminal is llmctl's to handle; on Linux it also dies
with llmctl), and waits until it answers ggml's RPC handshake (``rpc.probe``) — the only sign
that it listens, since it prints nothing after binding and its stdout is block-buffered into a
pipe until its first client. It runs with SIGPIPE ignored (see ``_worker_preexec``). What it
prints after that (a client came or went, an error) goes to a callback.

Nothing here prints.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping

from llmctl.engine import rpc
from llmctl.engine.server_process import _die_with_parent, describe_exit
from llmctl.errors import LlmctlError, UsageError

LOOPBACK = "127.0.0.1"
START_DEADLINE_S = 60.0  # a CUDA or Metal device can take a while to initialise
STOP_GRACE_S = 5.0
POLL_S = 0.05
# Upstream's own words (tools/rpc/README.md, rpc-server.cpp), which a non-loopback bind must repeat.
REMOTE_WARNING = (
    "ggml-rpc-server has no authentication and no encryption, and its parser has had remote "
    "memory-safety bugs: anyone who can reach {endpoint} can run code on this machine. "
    "Expose it only on a trusted network, or keep it on 127.0.0.1 and reach it through an SSH tunnel (ssh -L)."
)
_DEVICE_LINE = re.compile(r"^  (\S+): (.*) \((\d+) MiB, (\d+) MiB free\)$")
_BANNER = re.compile(r"^(Starting RPC server v|  endpoint |  local cache |Devices:|  transport )")


class RpcWorkerError(LlmctlError):
    """The local ggml-rpc-server could not start, or stopped on its own."""


@dataclass
class WorkerSpec:
    """How to run the worker: ggml-rpc-server's own options."""

    host: str = LOOPBACK
    port: int = rpc.DEFAULT_PORT
    threads: int | None = None  # None: upstream's default (half the logical CPUs)
    devices: str | None = None  # e.g. "CUDA0,CUDA1"; None: every GPU, else the CPU
    cache: bool = False  # keep received tensors in cache_dir() and skip resending them

    def args(self) -> list[str]:
        argv = ["-H", self.host, "-p", str(self.port)]
        if self.threads is not None:
            argv += ["-t", str(self.threads)]
        if self.devices:
            argv += ["-d", self.devices]
        if self.cache:
            argv.append("-c")
        return argv


@dataclass
class WorkerDevice:
    """A device as the server announces it as it starts."""

    name: str
    description: str
    total_mib: int
    free_mib: int


@dataclass
class RpcWorker:
    """A running ggml-rpc-server."""

    spec: WorkerSpec
    process: subprocess.Popen[bytes]
    info: rpc.WorkerInfo | None = None
    devices: list[WorkerDevice] = field(default_factory=list)
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))
    on_line: Callable[[str], None] | None = None
    _reader: threading.Thread | None = None
    _probe_done: threading.Event = field(default_factory=threading.Event)
    _forwarding: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def endpoint(self) -> rpc.Endpoint:
        return rpc.Endpoint(self.spec.host, self.spec.port)

    def exit_code(self) -> int | None:
        return self.process.poll()

    def wait(self) -> int:
        """Block until the server ends; its exit code."""
        code = self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        return code

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the end either way."""
        from llmctl.engine.server_process import stop_process

        stop_process(self.process, grace)
        if self._reader is not None:
            self._reader.join(timeout=2.0)

    def last_error(self) -> str | None:
        for line in reversed(self.tail):
            if re.search(r"error|fail|invalid|unknown|no devices", line, re.IGNORECASE):
                return line.strip()
        return None

    def _follow(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.tail.append(line)
            device = _DEVICE_LINE.match(line)
            if device:
                self.devices.append(WorkerDevice(device.group(1), device.group(2), int(device.group(3)), int(device.group(4))))
                continue
            if _BANNER.match(line):
                continue
            if not self._forwarding:
                if line == "Client connection closed":  # the end of start_worker's own probe
                    self._probe_done.set()
                continue
            if self.on_line is not None and line.strip():
                self.on_line(line)
        stream.close()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, *, allow_remote: bool) -> str:
    """The address to bind, as ggml-rpc-server takes it (an IPv4 literal); anything but loopback
    only with ``allow_remote``."""
    if host == "localhost":
        host = LOOPBACK
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise UsageError(
            f"--host {host!r} is not an IPv4 address: ggml-rpc-server binds IPv4 addresses only",
            hint="use 127.0.0.1 (the default), or this machine's IPv4 address on a trusted network with --allow-remote",
        ) from None
    if not is_loopback(host) and not allow_remote:
        raise UsageError(
            f"--host {host} would expose the RPC server beyond this machine; it has no authentication or encryption",
            hint="keep 127.0.0.1 and use an SSH tunnel (docs/multi-machine.md), or add --allow-remote on a trusted network",
        )
    return host


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where ggml-rpc-server keeps its tensor cache with ``-c`` (its fs_get_cache_directory() + /rpc)."""
    env = os.environ if env is None else env
    if env.get("LLAMA_CACHE"):
        return Path(env["LLAMA_CACHE"]) / "rpc"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "llama.cpp" / "rpc"
    return Path(env.get("HOME") or Path.home()) / ".cache" / "llama.cpp" / "rpc"


def default_threads() -> int:
    """ggml-rpc-server's own default: half the logical CPUs."""
    return max(1, (os.cpu_count() or 2) // 2)


def _check_port_free(host: str, port: int) -> None:
    """Bind as upstream will (SO_REUSEADDR), so a taken port is one clear error, not a silent exit 0."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise RpcWorkerError(
                f"{host}:{port} is already in use", hint=f"stop what listens there (`ss -ltnp 'sport = :{port}'`) or choose another --port"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {host} is not an address of this machine", hint="use 127.0.0.1, 0.0.0.0 or one of this machine's addresses") from None
        raise RpcWorkerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="choose another --port (ports below 1024 need root)") from None
    finally:
        probe.close()


def _worker_preexec() -> Callable[[], None]:
    """Ignore SIGPIPE in the server (inherited across exec), then ask to die with llmctl.

    ggml-rpc-server sends with flags 0 and leaves SIGPIPE at its default: a client that goes away
    while the server answers (a killed llama-server, an abandoned handshake) kills the worker.
    Ignored, the send fails with EPIPE, the server drops that client and accepts the next."""
    die_with_parent = _die_with_parent()

    def preexec() -> None:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if die_with_parent is not None:
            die_with_parent()

    return preexec


def start_worker(
    spec: WorkerSpec,
    *,
    binary: Path | None = None,
    deadline_s: float = START_DEADLINE_S,
    on_line: Callable[[str], None] | None = None,
) -> RpcWorker:
    """Start ggml-rpc-server for ``spec`` and return once it answers the RPC handshake.

    ``on_line`` receives what the server prints afterwards (client connections, errors). Raises
    ``RpcWorkerError`` if the port is taken, the server exits, or ``deadline_s`` passes first."""
    if binary is None:
        from llmctl.engine import native

        binary = native.require("ggml-rpc-server")
    _check_port_free(spec.host, spec.port)
    try:
        process = subprocess.Popen(
            [str(binary), *spec.args()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C reaches llmctl, which stops the server
            restore_signals=False,  # keep SIGPIPE ignored (see _worker_preexec)
            preexec_fn=_worker_preexec(),  # noqa: PLW1509 - a signal disposition and a prctl call
        )
    except OSError as exc:
        raise RpcWorkerError(f"cannot start {binary}: {exc.strerror or exc}", hint="check `llmctl engine status`") from None
    worker = RpcWorker(spec, process, on_line=on_line)
    assert process.stdout is not None
    worker._reader = threading.Thread(target=worker._follow, args=(process.stdout,), name="rpc-server-output", daemon=True)
    worker._reader.start()
    try:
        worker.info = _wait_ready(worker, deadline_s)
        worker._probe_done.wait(timeout=2.0)  # its banner and our probe's lines are read (stdout flushes at a client)
        worker._forwarding = True
    except BaseException:
        worker.stop(grace=1.0)
        raise
    return worker


def _wait_ready(worker: RpcWorker, deadline_s: float) -> rpc.WorkerInfo:
    address = LOOPBACK if worker.spec.host == "0.0.0.0" else worker.spec.host
    endpoint = rpc.Endpoint(address, worker.spec.port)
    expected = rpc.local_protocol()
    deadline = time.monotonic() + deadline_s
    while True:
        code = worker.exit_code()
        if code is not None:
            worker.wait()
            raise _exited(worker, code)
        try:
            info = rpc.probe(endpoint, timeout=2.0, expected=expected)
        except (rpc.EndpointUnreachableError, rpc.WorkerNotAnsweringError):
            if time.monotonic() > deadline:
                raise RpcWorkerError(
                    f"ggml-rpc-server did not start listening on {worker.endpoint} within {deadline_s:.0f} s", hint="run it by hand to see why"
                ) from None
            time.sleep(POLL_S)
            continue
        if worker.exit_code() is not None:  # the answer came from another process that took the port meanwhile
            worker.wait()
            raise _exited(worker, worker.process.returncode)
        return info


def _exited(worker: RpcWorker, code: int) -> RpcWorkerError:
    why = worker.last_error()
    if why and "Failed to create server socket" in why:
        return RpcWorkerError(f"ggml-rpc-server cannot listen on {worker.endpoint} (in use?)", hint="choose another --port")
    if any(line.startswith("error: unknown device") for line in worker.tail):
        known = [d.name for d in worker.devices]
        return RpcWorkerError(
            f"ggml-rpc-server does not know --device {worker.spec.devices}",
            hint=f"this machine's devices: {', '.join(known)}" if known else "see `llmctl hwinfo` for this machine's devices",
        )
    return RpcWorkerError(f"ggml-rpc-server {describe_exit(code)}" + (f": {why}" if why else ""), hint="run it by hand to see why")
