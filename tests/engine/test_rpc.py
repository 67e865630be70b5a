"""llama.cpp's RPC backend, client side (llmctl/engine/rpc.py): the endpoint list, the protocol
version against the vendored header, and the preflight against real ggml-rpc-servers on loopback
and against a fake worker for the faults (another build, silence, a hang-up)."""

from __future__ import annotations

import csv
import io
import re
import socket
import struct
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from llmctl.bench.serving import free_port
from llmctl.engine import native, rpc
from llmctl.engine.rpc_worker import RpcWorker, WorkerSpec, start_worker
from llmctl.errors import EXIT_ERROR, EXIT_USAGE
from tests.support.fake_rpc_worker import FakeRpcWorker

# --- the endpoint list ---------------------------------------------------------------------------


def test_endpoints_parse_in_order_with_names_and_addresses() -> None:
    got = rpc.parse_endpoints("192.168.1.20:50052, gpu-box.lan:50053,localhost:1")
    assert got == [rpc.Endpoint("192.168.1.20", 50052), rpc.Endpoint("gpu-box.lan", 50053), rpc.Endpoint("localhost", 1)]
    assert rpc.format_endpoints(got) == "192.168.1.20:50052,gpu-box.lan:50053,localhost:1"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "at least one"),
        ("   ", "at least one"),
        ("10.0.0.1", "has no port"),
        ("10.0.0.1:", "port must be"),
        ("10.0.0.1:0", "port must be"),
        ("10.0.0.1:65536", "port must be"),
        ("10.0.0.1:5x", "port must be"),
        ("10.0.0.1:5²", "port must be"),  # a digit to str.isdigit(), not to int()
        ("10.0.0.1:٥٠٠٥٢", "port must be"),  # Arabic-Indic digits: llama.cpp would not read them either
        (":50052", "has no host"),
        ("10.0.0.1:50052,", "empty entry"),
        ("10.0.0.1:50052,,10.0.0.2:50052", "empty entry"),
        ("10.0.0.1:50052,10.0.0.1:50052", "listed twice"),
        ("bad_host!:50052", "neither an IPv4 address nor a host name"),
        ("999.1.1.1:50052", "neither an IPv4 address nor a host name"),
        ("a:b:c", "not HOST:PORT"),
        ("[::1]:50052", "is an IPv6 address"),
        ("[fe80::1]:50052", "is an IPv6 address"),
        ("::1:50052", "is an IPv6 address"),
        ("[::1]", "[ADDRESS]:PORT"),
        ("[not-v6]:1", "[ADDRESS]:PORT"),
        ("[::1]:99999", "port must be"),
    ],
)
def test_bad_endpoints_are_usage_errors_naming_the_entry(text: str, said: str) -> None:
    with pytest.raises(rpc.EndpointSyntaxError) as info:
        rpc.parse_endpoints(text)
    assert said in info.value.message
    assert info.value.exit_code == EXIT_USAGE
    assert info.value.hint


def test_ipv6_is_refused_because_upstream_connects_over_ipv4_only() -> None:
    with pytest.raises(rpc.EndpointSyntaxError) as info:
        rpc.parse_endpoints("[::1]:50052")
    assert "IPv4 only" in (info.value.hint or "")


def test_more_workers_than_llama_cpp_takes_are_refused() -> None:
    text = ",".join(f"10.0.0.{i}:50052" for i in range(1, rpc.MAX_ENDPOINTS + 2))
    with pytest.raises(rpc.EndpointSyntaxError, match="at most 16"):
        rpc.parse_endpoints(text)
    assert len(rpc.parse_endpoints(",".join(f"10.0.0.{i}:50052" for i in range(1, rpc.MAX_ENDPOINTS + 1)))) == 16


def test_a_huge_endpoint_list_is_refused_at_once() -> None:
    # LLMCTL_RPC is read on every command that takes --rpc: its length must not cost a quadratic check.
    started = time.monotonic()
    with pytest.raises(rpc.EndpointSyntaxError, match="lists 50000 workers"):
        rpc.parse_endpoints(",".join(f"h{i}:50052" for i in range(50_000)))
    assert time.monotonic() - started < 2.0


def test_the_flag_wins_over_the_environment_and_neither_means_local() -> None:
    env = {rpc.ENV_RPC: "10.0.0.9:50052"}
    assert rpc.endpoints_from("10.0.0.1:1", env) == [rpc.Endpoint("10.0.0.1", 1)]
    assert rpc.endpoints_from(None, env) == [rpc.Endpoint("10.0.0.9", 50052)]
    assert rpc.endpoints_from(None, {}) == []
    assert rpc.endpoints_from(None, {rpc.ENV_RPC: "  "}) == []
    with pytest.raises(rpc.EndpointSyntaxError):
        rpc.endpoints_from("", env)  # an explicit empty --rpc is a mistake, not "local"
    with pytest.raises(rpc.EndpointSyntaxError) as info:
        rpc.endpoints_from(None, {rpc.ENV_RPC: "10.0.0.1"})
    assert info.value.message.startswith(f"{rpc.ENV_RPC}: ")


def test_the_environment_variable_is_read_from_the_process(monkeypatch) -> None:
    monkeypatch.setenv(rpc.ENV_RPC, "127.0.0.1:50052")
    assert rpc.endpoints_from(None) == [rpc.Endpoint("127.0.0.1", 50052)]


# --- the protocol version ---------------------------------------------------------------------------


def _vendored_header() -> str | None:
    archive = native.engine_dir() / "sdist" / f"llama_cpp_python-{native.llama_cpp_python_version()}.tar.gz"
    if not archive.exists():
        return None
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.endswith("vendor/llama.cpp/ggml/include/ggml-rpc.h"):
                handle = tar.extractfile(member)
                return handle.read().decode() if handle else None
    return None


def test_the_protocol_constant_is_the_vendored_headers() -> None:
    header = _vendored_header()
    if header is None:
        pytest.skip("the llama-cpp-python source distribution is not in the engine folder (`llmctl engine install` keeps it)")
    found = [int(re.search(rf"#define RPC_PROTO_{part}_VERSION\s+(\d+)", header).group(1)) for part in ("MAJOR", "MINOR", "PATCH")]  # type: ignore[union-attr]
    assert rpc.ProtocolVersion(*found) == rpc.RPC_PROTOCOL


@pytest.mark.slow
def test_the_built_server_speaks_the_protocol_constant(native_tools) -> None:
    assert rpc.local_protocol() == rpc.RPC_PROTOCOL


def test_without_tools_the_constant_is_the_local_protocol(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    assert rpc.local_protocol() == rpc.RPC_PROTOCOL


# --- the preflight against fakes ----------------------------------------------------------------------


def test_an_unreachable_endpoint_fails_fast_naming_it() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(rpc.EndpointUnreachableError) as info:
        rpc.preflight([rpc.Endpoint("127.0.0.1", port)], timeout=5, expected=rpc.RPC_PROTOCOL)
    assert time.monotonic() - started < 2  # refused at once, not after the timeout
    message = info.value.message
    assert f"127.0.0.1:{port}" in message and "unreachable" in message and "\n" not in message
    assert "llmctl rpc-server" in (info.value.hint or "")
    assert info.value.exit_code == EXIT_ERROR
    assert info.value.endpoint == rpc.Endpoint("127.0.0.1", port)


def test_an_unresolvable_name_is_unreachable() -> None:
    with pytest.raises(rpc.EndpointUnreachableError, match="cannot resolve"):
        rpc.probe(rpc.Endpoint("no-such-worker.invalid", 50052), timeout=5, expected=rpc.RPC_PROTOCOL)


def test_a_hung_name_lookup_is_given_up_at_the_deadline(monkeypatch) -> None:
    release = threading.Event()

    def hang(*_args: object, **_kwargs: object) -> list[object]:
        release.wait(30)
        raise socket.gaierror("released")

    monkeypatch.setattr(rpc.socket, "getaddrinfo", hang)
    started = time.monotonic()
    try:
        with pytest.raises(rpc.EndpointUnreachableError, match="no answer within 0.3 s"):
            rpc.preflight([rpc.Endpoint("slow-dns.example", 50052)], timeout=0.3, expected=rpc.RPC_PROTOCOL)
        assert time.monotonic() - started < 5
    finally:
        release.set()


def test_results_come_in_the_order_given_whatever_answers_first() -> None:
    with FakeRpcWorker(devices=[(1, 2)]) as a, FakeRpcWorker(devices=[(3, 4), (5, 6)]) as b:
        infos = rpc.preflight(rpc.parse_endpoints(f"{b.endpoint},{a.endpoint}"), timeout=5, expected=rpc.RPC_PROTOCOL)
    assert [len(i.devices) for i in infos] == [2, 1]


def test_the_probe_sends_ggmls_hello_and_reads_each_devices_memory() -> None:
    with FakeRpcWorker(devices=[(1 << 30, 2 << 30), (5 << 30, 8 << 30)]) as fake:
        (info,) = rpc.preflight(rpc.parse_endpoints(fake.endpoint), timeout=5, expected=rpc.RPC_PROTOCOL)
    assert info.protocol == rpc.ProtocolVersion(7, 0, 0)
    assert [(d.index, d.free, d.total) for d in info.devices] == [(0, 1 << 30, 2 << 30), (1, 5 << 30, 8 << 30)]
    hello = bytes([14]) + struct.pack("<Q", 24) + bytes(24)  # RPC_CMD_HELLO, 24 zero bytes of conn_caps: plain TCP
    assert fake.received == [hello, bytes([15]) + struct.pack("<Q", 0), bytes([11]) + struct.pack("<QI", 4, 0), bytes([11]) + struct.pack("<QI", 4, 1)]
    assert info.to_dict()["endpoint"] == fake.endpoint


@pytest.mark.parametrize("version", [(6, 1, 0), (7, 1, 0), (7, 0, 1)])
def test_a_worker_of_another_build_is_refused_naming_both_versions(version: tuple[int, int, int]) -> None:
    with FakeRpcWorker(version=version) as fake:
        with pytest.raises(rpc.ProtocolMismatchError) as info:
            rpc.preflight(rpc.parse_endpoints(fake.endpoint), timeout=5, expected=rpc.RPC_PROTOCOL)
        assert len(fake.received) == 1  # nothing after the handshake
    message = info.value.message
    assert fake.endpoint in message and ".".join(map(str, version)) in message and str(rpc.RPC_PROTOCOL) in message
    assert "all nodes must run the same llama.cpp build" in message
    assert info.value.remote == version and info.value.local == rpc.RPC_PROTOCOL


def test_a_worker_that_accepts_and_never_answers_times_out_within_the_bound() -> None:
    with FakeRpcWorker(mode="silent") as fake:
        started = time.monotonic()
        with pytest.raises(rpc.WorkerNotAnsweringError) as info:
            rpc.preflight(rpc.parse_endpoints(fake.endpoint), timeout=0.5, expected=rpc.RPC_PROTOCOL)
        waited = time.monotonic() - started
    assert 0.4 < waited < 3
    assert "did not answer the handshake within 0.5 s" in info.value.message
    assert "one client at a time" in (info.value.hint or "")


def test_a_worker_that_hangs_up_at_the_handshake_points_at_another_build() -> None:
    with FakeRpcWorker(mode="hang-up") as fake:
        with pytest.raises(rpc.WorkerNotAnsweringError, match="closed the connection during the handshake"):
            rpc.probe(rpc.parse_endpoints(fake.endpoint)[0], timeout=5, expected=rpc.RPC_PROTOCOL)


def test_the_first_failure_in_the_order_given_is_reported() -> None:
    with FakeRpcWorker() as good, FakeRpcWorker(version=(6, 0, 0)) as old:
        gone = free_port()
        endpoints = rpc.parse_endpoints(f"{good.endpoint},{old.endpoint},127.0.0.1:{gone}")
        with pytest.raises(rpc.ProtocolMismatchError):
            rpc.preflight(endpoints, timeout=5, expected=rpc.RPC_PROTOCOL)
        assert len(rpc.preflight(endpoints[:1], timeout=5, expected=rpc.RPC_PROTOCOL)) == 1
    assert rpc.preflight([], timeout=5) == []


# --- the preflight against real ggml-rpc-servers ------------------------------------------------------


@pytest.fixture
def two_workers(native_tools):
    """Two real ggml-rpc-servers on loopback, one thread each, on free ports."""
    binary = native_tools.path("ggml-rpc-server")
    workers: list[RpcWorker] = []
    try:
        for _ in range(2):
            workers.append(start_worker(WorkerSpec(port=free_port(), threads=1), binary=binary))
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.slow
def test_two_real_workers_pass_preflight_and_accept_the_next_client(two_workers: list[RpcWorker]) -> None:
    endpoints = [w.endpoint for w in two_workers]
    first = rpc.preflight(endpoints)
    assert [i.endpoint for i in first] == endpoints
    for info in first:
        assert info.protocol == rpc.RPC_PROTOCOL
        assert info.devices and all(0 < d.free <= d.total for d in info.devices)
    assert [i.endpoint for i in rpc.preflight(endpoints)] == endpoints  # the probe's close freed them
    assert all(w.exit_code() is None for w in two_workers)
    assert two_workers[0].devices and two_workers[0].devices[0].name == "CPU"  # its banner, read at start


HELLO = bytes([14]) + struct.pack("<Q", 24) + bytes(24)


def _hold(endpoint: rpc.Endpoint) -> socket.socket:
    """A client that has shaken hands and stays, as llama-server does."""
    held = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
    held.sendall(HELLO)
    assert len(held.recv(64)) > 0
    return held


def _free_again(endpoint: rpc.Endpoint) -> rpc.WorkerInfo:
    deadline = time.monotonic() + 10
    while True:  # queued connections are served and dropped first
        try:
            return rpc.preflight([endpoint], timeout=2)[0]
        except rpc.WorkerNotAnsweringError:
            assert time.monotonic() < deadline


@pytest.mark.slow
def test_a_worker_busy_with_another_client_is_reported_as_not_answering(two_workers: list[RpcWorker]) -> None:
    endpoint = two_workers[0].endpoint
    held = _hold(endpoint)
    try:
        with pytest.raises(rpc.WorkerNotAnsweringError) as info:
            rpc.preflight([endpoint], timeout=0.5)
        assert "one client at a time" in (info.value.hint or "")
    finally:
        held.close()
    assert _free_again(endpoint).protocol == rpc.RPC_PROTOCOL
    assert two_workers[0].exit_code() is None


@pytest.mark.slow
def test_an_abandoned_probe_does_not_kill_a_plain_ggml_rpc_server(native_tools) -> None:
    """Upstream's server dies of SIGPIPE when it answers a client that has gone; the probe that
    gives up on a busy worker resets its connection, so the server never answers it."""
    port = free_port()
    plain = subprocess.Popen([str(native_tools.path("ggml-rpc-server")), "-p", str(port), "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = rpc.Endpoint("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while True:
            try:
                rpc.probe(endpoint, timeout=2)
                break
            except rpc.EndpointUnreachableError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        held = _hold(endpoint)
        with pytest.raises(rpc.WorkerNotAnsweringError):
            rpc.preflight([endpoint], timeout=0.3)
        held.close()
        assert _free_again(endpoint).protocol == rpc.RPC_PROTOCOL
        assert plain.poll() is None
    finally:
        plain.kill()
        plain.wait()


@pytest.mark.slow
def test_a_worker_llmctl_starts_survives_a_client_that_leaves_before_its_answer(two_workers: list[RpcWorker]) -> None:
    """A client that sends a request and closes before the answer (a killed llama-server) would
    kill a plain ggml-rpc-server with SIGPIPE; llmctl starts its workers with SIGPIPE ignored."""
    endpoint = two_workers[0].endpoint
    held = _hold(endpoint)
    rude = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
    rude.sendall(HELLO)
    time.sleep(0.2)
    rude.close()  # a plain close: the answer will meet a closed socket
    held.close()
    assert _free_again(endpoint).protocol == rpc.RPC_PROTOCOL
    assert two_workers[0].exit_code() is None


@pytest.mark.slow
def test_llama_cpp_uses_both_workers_after_the_preflight(two_workers: list[RpcWorker], native_tools, demo_model: Path) -> None:
    endpoints = [w.endpoint for w in two_workers]
    rpc.preflight(endpoints)
    done = subprocess.run(
        [str(native_tools.path("llama-bench")), "-m", str(demo_model), "--rpc", rpc.format_endpoints(endpoints),
         "-p", "16", "-n", "4", "-r", "1", "-t", "1", "-o", "csv"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [("16", "0"), ("0", "4")]
    for row in rows:  # llama-bench names the workers as its GPUs
        assert row["backends"] == "RPC" and set(row["gpu_info"].split(", ")) == {str(e) for e in endpoints}
        assert float(row["avg_ts"]) > 0
    assert all(w.exit_code() is None for w in two_workers)
    assert rpc.preflight(endpoints)  # and free again for the next client
