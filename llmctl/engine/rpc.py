"""llama.cpp's RPC backend, client side: the ``--rpc`` endpoint list and the preflight that checks
each worker (a ``ggml-rpc-server``) before anything is launched against it.

Why a preflight: llama.cpp's RPC client (inside ``llama-server``, ``llama-bench``,
``llama-fit-params``) calls ``GGML_ABORT`` when an endpoint is unreachable or answers the
handshake with another protocol version, which kills the whole process with a C++ backtrace.
So llmctl connects to each endpoint first, with a bounded timeout, and speaks the start of the
protocol itself (ggml/src/ggml-rpc/ggml-rpc.cpp in the vendored llama.cpp):

- a request is ``| cmd: u8 | size: u64 | payload |``, an answer ``| size: u64 | payload |``,
  little-endian, no framing beyond that;
- the first command must be ``RPC_CMD_HELLO`` (14) with a 24-byte ``conn_caps`` payload (all
  zero: plain TCP, no RDMA upgrade); the answer is ``major, minor, patch: u8, padding: u8,
  conn_caps[24]``;
- ``RPC_CMD_DEVICE_COUNT`` (15, empty payload) answers a u32, and ``RPC_CMD_GET_DEVICE_MEMORY``
  (11, payload u32 device) answers ``free, total: u64``.

A ``ggml-rpc-server`` serves one client at a time: while ``llama-server`` holds a worker, another
connection is accepted by the kernel but gets no answer until that client leaves. The probe
closes its connection when done, and the server then accepts the next client as before. A probe
that gives up (a busy or silent worker) resets its connection instead: a ggml-rpc-server that
later reads the abandoned HELLO would answer into a closed socket and die of SIGPIPE.

Upstream's transport is IPv4 only (``gethostbyname`` and ``AF_INET`` on both sides), and it
splits an endpoint at its first ``:``; IPv6 endpoints are therefore recognised and refused with
that reason rather than handed on to abort.

Nothing here prints.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, NamedTuple

from llmctl.errors import LlmctlError, UsageError

ENV_RPC = "LLMCTL_RPC"
DEFAULT_PORT = 50052  # ggml-rpc-server's own default
PREFLIGHT_TIMEOUT_S = 5.0
MAX_ENDPOINTS = 16  # GGML_RPC_MAX_SERVERS in ggml-rpc.h
MAX_DEVICES = 256  # far above any machine; bounds what a worker can make us ask for

# ggml-rpc.cpp's commands and message sizes (protocol 7.x)
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24
HELLO_ANSWER_SIZE = 4 + CONN_CAPS_SIZE


class ProtocolVersion(NamedTuple):
    """ggml's RPC protocol version (``RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION``); the patch number
    follows ggml's op set, so two builds agree on a graph only when all three match."""

    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


# The protocol of the llama.cpp that the pinned llama-cpp-python vendors (its ggml/include/ggml-rpc.h;
# tests/engine/test_rpc.py checks this against that header and against the built ggml-rpc-server).
RPC_PROTOCOL = ProtocolVersion(7, 0, 0)


class RpcError(LlmctlError):
    """A worker that cannot be used: unreachable, silent, or speaking another protocol."""

    def __init__(self, message: str, hint: str | None = None, *, endpoint: Endpoint | None = None) -> None:
        super().__init__(message, hint)
        self.endpoint = endpoint


class EndpointUnreachableError(RpcError):
    """Nothing accepts connections at the endpoint (refused, no route, unknown host, connect timeout)."""


class WorkerNotAnsweringError(RpcError):
    """Something accepted the connection but did not complete ggml's RPC handshake in time, or
    answered with something else."""


class ProtocolMismatchError(RpcError):
    """The worker speaks another ggml RPC protocol version: another llama.cpp build."""

    def __init__(self, endpoint: Endpoint, remote: ProtocolVersion, local: ProtocolVersion) -> None:
        super().__init__(
            f"rpc worker {endpoint} speaks ggml RPC protocol {remote}, this llmctl's llama.cpp speaks {local}: all nodes must run the same llama.cpp build",
            hint=f"install the same llmctl and llama-cpp-python on {endpoint.host} (`llmctl engine install`) and restart `llmctl rpc-server` there",
            endpoint=endpoint,
        )
        self.remote = remote
        self.local = local


class EndpointSyntaxError(UsageError):
    """An ``--rpc`` / ``LLMCTL_RPC`` value that is not a list of HOST:PORT."""


@dataclass(frozen=True)
class Endpoint:
    """One worker's address, as llama.cpp's ``--rpc`` takes it."""

    host: str  # an IPv4 address or a host name
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class DeviceMemory:
    """One of a worker's devices, as ``RPC_CMD_GET_DEVICE_MEMORY`` reports it (bytes)."""

    index: int
    free: int
    total: int


@dataclass
class WorkerInfo:
    """What the preflight learned about one worker."""

    endpoint: Endpoint
    protocol: ProtocolVersion
    devices: list[DeviceMemory] = field(default_factory=list)
    latency_s: float = 0.0  # connect + handshake, a rough idea of the link

    def to_dict(self) -> dict[str, object]:
        return {
            "endpoint": str(self.endpoint),
            "host": self.endpoint.host,
            "port": self.endpoint.port,
            "protocol": str(self.protocol),
            "devices": [asdict(d) for d in self.devices],
            "latency_ms": round(self.latency_s * 1000, 2),
        }


# --- the endpoint list --------------------------------------------------------------------------

_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_USAGE_HINT = "give HOST:PORT[,HOST:PORT…], e.g. --rpc 192.168.1.20:50052,192.168.1.21:50052"
_IPV4_ONLY_HINT = "llama.cpp's RPC transport connects over IPv4 only: use the worker's IPv4 address or name, or an `ssh -L` tunnel to 127.0.0.1"


def parse_endpoint(text: str) -> Endpoint:
    """One ``HOST:PORT``; ``[IPv6]:PORT`` is recognised and refused (upstream is IPv4 only)."""
    item = text.strip()
    if not item:
        raise EndpointSyntaxError("an empty rpc endpoint", hint=_USAGE_HINT)
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or not _is_ipv6(host) or not rest.startswith(":"):
            raise EndpointSyntaxError(f"rpc endpoint {item!r}: an IPv6 address goes as [ADDRESS]:PORT", hint=_USAGE_HINT)
        _port(item, rest[1:])  # a bad port is the first thing to say
        raise EndpointSyntaxError(f"rpc endpoint {item!r} is an IPv6 address", hint=_IPV4_ONLY_HINT)
    if item.count(":") > 1:
        if _is_ipv6(item) or _is_ipv6(item.rpartition(":")[0]):
            raise EndpointSyntaxError(f"rpc endpoint {item!r} is an IPv6 address", hint=_IPV4_ONLY_HINT)
        raise EndpointSyntaxError(f"rpc endpoint {item!r} is not HOST:PORT", hint=_USAGE_HINT)
    host, sep, port_text = item.partition(":")
    if not sep:
        raise EndpointSyntaxError(f"rpc endpoint {item!r} has no port", hint=f"add the worker's port: {item}:{DEFAULT_PORT} is `llmctl rpc-server`'s default")
    if not host:
        raise EndpointSyntaxError(f"rpc endpoint {item!r} has no host", hint=_USAGE_HINT)
    if not _is_ipv4(host) and (not _HOST_NAME.match(host) or host.replace(".", "").isdigit()):
        raise EndpointSyntaxError(f"rpc endpoint {item!r}: {host!r} is neither an IPv4 address nor a host name", hint=_USAGE_HINT)
    return Endpoint(host, _port(item, port_text))


def parse_endpoints(text: str) -> list[Endpoint]:
    """``HOST:PORT,HOST:PORT…`` → endpoints, in order; empty entries, duplicates and more than
    ``MAX_ENDPOINTS`` are refused (upstream would abort on them or register a worker twice)."""
    items = text.split(",")
    if not text.strip():
        raise EndpointSyntaxError("--rpc needs at least one HOST:PORT", hint=_USAGE_HINT)
    listed = sum(1 for item in items if item.strip())
    if listed > MAX_ENDPOINTS:  # before the entries are read: a huge list must not cost a quadratic check for duplicates
        raise EndpointSyntaxError(f"--rpc lists {listed} workers; llama.cpp takes at most {MAX_ENDPOINTS}", hint="use fewer, larger workers")
    endpoints: list[Endpoint] = []
    for item in items:
        if not item.strip():
            raise EndpointSyntaxError(f"--rpc {text.strip()!r} has an empty entry", hint=_USAGE_HINT)
        endpoint = parse_endpoint(item)
        if endpoint in endpoints:
            raise EndpointSyntaxError(f"rpc endpoint {endpoint} is listed twice", hint="name each worker once")
        endpoints.append(endpoint)
    return endpoints


def endpoints_from(flag: str | None, env: Mapping[str, str] | None = None) -> list[Endpoint]:
    """The endpoints a command uses: its ``--rpc`` value, else ``LLMCTL_RPC``, else none (local).

    An empty ``--rpc ""`` is an error; an empty ``LLMCTL_RPC`` means unset."""
    if flag is not None:
        return parse_endpoints(flag)
    value = (os.environ if env is None else env).get(ENV_RPC, "")
    if not value.strip():
        return []
    try:
        return parse_endpoints(value)
    except EndpointSyntaxError as exc:
        raise EndpointSyntaxError(f"{ENV_RPC}: {exc.message}", hint=exc.hint) from None


def format_endpoints(endpoints: list[Endpoint]) -> str:
    """The value of llama.cpp's ``--rpc``."""
    return ",".join(str(e) for e in endpoints)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _port(item: str, text: str) -> int:
    # ASCII digits only: str.isdigit() also holds for "²", which int() refuses
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise EndpointSyntaxError(f"rpc endpoint {item!r}: the port must be a number from 1 to 65535", hint=_USAGE_HINT)
    return int(text)


# --- the preflight --------------------------------------------------------------------------------


def preflight(endpoints: list[Endpoint], *, timeout: float = PREFLIGHT_TIMEOUT_S, expected: ProtocolVersion | None = None) -> list[WorkerInfo]:
    """Check every worker before anything is launched against them; return what each reported.

    All endpoints are probed at once, each within ``timeout`` seconds (resolution, connect,
    handshake and memory queries together). The first failure in the order given is raised:
    ``EndpointUnreachableError``, ``WorkerNotAnsweringError`` or ``ProtocolMismatchError``.
    ``expected`` is the protocol the local tools speak (default: ``local_protocol()``)."""
    if not endpoints:
        return []
    want = expected or local_protocol()
    results: dict[int, WorkerInfo | BaseException] = {}

    def run(index: int, endpoint: Endpoint) -> None:
        try:
            results[index] = probe(endpoint, timeout=timeout, expected=want)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            results[index] = exc

    # Daemon threads, not a pool: a name lookup cannot be interrupted, and a hung resolver must
    # neither hold the caller past the deadline nor keep the process from exiting.
    threads = [threading.Thread(target=run, args=(i, e), name=f"rpc-preflight-{e}", daemon=True) for i, e in enumerate(endpoints)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 1.0
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    found: list[WorkerInfo] = []
    for index, endpoint in enumerate(endpoints):
        result = results.get(index)
        if result is None:
            raise EndpointUnreachableError(
                f"rpc worker {endpoint} is unreachable: no answer within {timeout:g} s (name lookup or connect)",
                hint=_unreachable_hint(endpoint),
                endpoint=endpoint,
            )
        if isinstance(result, BaseException):
            raise result
        found.append(result)
    return found


def probe(endpoint: Endpoint, *, timeout: float = PREFLIGHT_TIMEOUT_S, expected: ProtocolVersion | None = None) -> WorkerInfo:
    """Connect to one worker, shake hands, ask its devices' memory, and leave."""
    want = expected or local_protocol()
    started = time.monotonic()
    deadline = started + timeout
    sock = _connect(endpoint, timeout)
    done = False
    try:
        channel = _Channel(sock, endpoint, deadline, timeout, want)
        channel.send(CMD_HELLO, bytes(CONN_CAPS_SIZE))
        answer = channel.receive(HELLO_ANSWER_SIZE, what="the handshake")
        remote = ProtocolVersion(answer[0], answer[1], answer[2])
        latency = time.monotonic() - started
        if remote != want:
            raise ProtocolMismatchError(endpoint, remote, want)
        channel.send(CMD_DEVICE_COUNT, b"")
        (count,) = struct.unpack("<I", channel.receive(4, what="the device count"))
        if count > MAX_DEVICES:
            raise WorkerNotAnsweringError(
                f"rpc worker {endpoint} reports {count} devices", hint="check that it is a `llmctl rpc-server` / ggml-rpc-server", endpoint=endpoint
            )
        devices = []
        for index in range(count):
            channel.send(CMD_GET_DEVICE_MEMORY, struct.pack("<I", index))
            free, total = struct.unpack("<QQ", channel.receive(16, what="device memory"))
            devices.append(DeviceMemory(index, free, total))
        done = True
        return WorkerInfo(endpoint, remote, devices, latency)
    finally:
        if not done:
            # Reset rather than close: a ggml-rpc-server that gets to a request after its client left
            # answers into a closed socket and dies of SIGPIPE (upstream ignores no signal); a reset
            # connection fails its reads instead, and it goes on to the next client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _unreachable_hint(endpoint: Endpoint) -> str:
    return f"start `llmctl rpc-server` on {endpoint.host} (port {endpoint.port}), or check the ssh tunnel / firewall to it"


def _connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    try:
        # AF_INET only, as upstream resolves (gethostbyname): a name with only an IPv6 address fails here too.
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise EndpointUnreachableError(
            f"rpc worker {endpoint} is unreachable: cannot resolve {endpoint.host!r} to an IPv4 address ({getattr(exc, 'strerror', None) or exc})",
            hint=_unreachable_hint(endpoint),
            endpoint=endpoint,
        ) from None
    address = infos[0][4]  # the first address, as gethostbyname's h_addr
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect(address)
    except TimeoutError:
        sock.close()
        raise EndpointUnreachableError(
            f"rpc worker {endpoint} is unreachable: no answer to connect within {timeout:g} s", hint=_unreachable_hint(endpoint), endpoint=endpoint
        ) from None
    except OSError as exc:
        sock.close()
        raise EndpointUnreachableError(
            f"rpc worker {endpoint} is unreachable: {exc.strerror or exc}", hint=_unreachable_hint(endpoint), endpoint=endpoint
        ) from None
    return sock


class _Channel:
    """ggml RPC's framing over one socket, every read and write within the probe's deadline."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint, deadline: float, timeout: float, expected: ProtocolVersion) -> None:
        self.sock = sock
        self.expected = expected
        self.endpoint = endpoint
        self.deadline = deadline
        self.timeout = timeout

    def _left(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._silent(what)
        return left

    def _silent(self, what: str) -> WorkerNotAnsweringError:
        return WorkerNotAnsweringError(
            f"rpc worker {self.endpoint} accepted the connection but did not answer {what} within {self.timeout:g} s",
            hint="a ggml-rpc-server serves one client at a time: is another llama-server or llmctl using it? "
            "Otherwise check that the port is a `llmctl rpc-server`",
            endpoint=self.endpoint,
        )

    def send(self, command: int, payload: bytes) -> None:
        self.sock.settimeout(self._left("the handshake"))
        try:
            self.sock.sendall(struct.pack("<BQ", command, len(payload)) + payload)
        except TimeoutError:
            raise self._silent("the handshake") from None
        except OSError as exc:
            raise self._closed("the handshake", exc) from None

    def receive(self, size: int, *, what: str) -> bytes:
        head = self._exactly(8, what)
        (length,) = struct.unpack("<Q", head)
        if length != size:
            raise WorkerNotAnsweringError(
                f"rpc worker {self.endpoint} answered {what} with {length} bytes instead of {size}: not the ggml RPC protocol this llama.cpp speaks",
                hint="all nodes must run the same llama.cpp build; check that the port is a `llmctl rpc-server`",
                endpoint=self.endpoint,
            )
        return self._exactly(size, what)

    def _exactly(self, size: int, what: str) -> bytes:
        data = b""
        while len(data) < size:
            self.sock.settimeout(self._left(what))
            try:
                chunk = self.sock.recv(size - len(data))
            except TimeoutError:
                raise self._silent(what) from None
            except OSError as exc:
                raise self._closed(what, exc) from None
            if not chunk:
                raise self._closed(what, None)
            data += chunk
        return data

    def _closed(self, what: str, exc: OSError | None) -> WorkerNotAnsweringError:
        why = f" ({exc.strerror or exc})" if exc is not None else ""
        return WorkerNotAnsweringError(
            f"rpc worker {self.endpoint} closed the connection during {what}{why}: it may run another llama.cpp build "
            f"(this one speaks ggml RPC protocol {self.expected}), or not be a ggml-rpc-server",
            hint="all nodes must run the same llama.cpp build: run `llmctl rpc-server` there from the same llmctl install",
            endpoint=self.endpoint,
        )


# --- the protocol the local tools speak -----------------------------------------------------------

_STARTING = re.compile(r"Starting RPC server v(\d+)\.(\d+)\.(\d+)")


def local_protocol() -> ProtocolVersion:
    """The protocol of the local llama.cpp tools: asked of the installed ``ggml-rpc-server``
    (one's own build under ``LLMCTL_LLAMA_BIN`` may differ from the pinned one), else ``RPC_PROTOCOL``."""
    from llmctl.engine import native

    try:
        tools = native.locate()
    except native.NativeEngineError:
        return RPC_PROTOCOL
    if tools is None or "ggml-rpc-server" in tools.missing():
        return RPC_PROTOCOL
    binary = tools.path("ggml-rpc-server")
    try:
        stamp = binary.stat().st_mtime_ns
    except OSError:
        return RPC_PROTOCOL
    return _server_protocol(binary, stamp) or RPC_PROTOCOL


@lru_cache(maxsize=8)
def _server_protocol(binary: Path, _stamp: int) -> ProtocolVersion | None:
    """What ``binary`` prints as it starts, asked to bind an invalid host: it prints its banner,
    fails to create the socket and exits at once, without listening anywhere (~40 ms on CPU)."""
    try:
        done = subprocess.run(
            [str(binary), "-d", "CPU", "-H", "invalid-host", "-p", "1"], capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _STARTING.search(done.stdout)
    return ProtocolVersion(*(int(match.group(i)) for i in (1, 2, 3))) if match else None
