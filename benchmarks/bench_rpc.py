"""RPC: pp and tg through two ggml-rpc-server workers vs the same tests locally (reported, no target).

Local: native ``llama-bench`` with 2 threads. RPC: ``llmctl bench --rpc`` (llama-bench across the
workers, every layer on them) with two workers of 1 thread each on loopback, so both sides use the
machine's two cores. Rounds alternate local and RPC; each figure is the median of the rounds.

With added latency: as root, each worker runs in its own network namespace behind a veth pair
(10.200.N.1 here, 10.200.N.2 in the namespace; only these addresses, nothing else routed), and
``tc netem`` delays each direction by half the RTT. Where namespaces or netem are not available
(a kernel without sch_netem), a small TCP proxy on loopback in front of each worker holds every
chunk half the RTT in each direction instead; its rows say "delay proxy" (the proxy's own CPU
shares the two cores). Namespaces are removed whatever happens.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from common import Row

from llmctl.bench.serving import free_port
from tools.demo_model import ensure_demo_model

ROUNDS = 2
TESTS = ("pp128", "tg32")
RTTS_MS = (0.5, 2.0, 5.0)
NS_PREFIX = "llmctl-rpcb"


def _tools() -> Path:
    from llmctl.engine import native

    tools = native.locate()
    if tools is None:
        raise RuntimeError("llama.cpp's tools are not built: `llmctl engine install`")
    return tools.path("llama-bench").parent


def _local(bin_dir: Path, model: Path) -> dict[str, float]:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", "128", "-n", "32", "-r", "3", "-t", "2", "-o", "json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return {_name(r): r["avg_ts"] for r in json.loads(out.stdout)}


def _rpc(endpoints: str, model: Path, home: str) -> dict[str, float]:
    env = {**os.environ, "LLMCTL_HOME": home, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    argv = [sys.executable, "-m", "llmctl", "bench", str(model), "--rpc", endpoints, "-p", "128", "-n", "32", "-r", "3", "-t", "1", "-o", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return {r["test"]: r["avg_ts"] for r in json.loads(out.stdout)["results"] if r["status"] == "ok"}


def _name(record: dict) -> str:
    return f"pp{record['n_prompt']}" if record["n_prompt"] else f"tg{record['n_gen']}"


@contextmanager
def _worker(bin_dir: Path, host: str, port: int, netns: str | None = None) -> Iterator[str]:
    argv = [str(bin_dir / "ggml-rpc-server"), "-H", host, "-p", str(port), "-t", "1"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from llmctl.engine.rpc import Endpoint, RpcError, probe

        deadline = time.monotonic() + 20
        while True:
            try:
                probe(Endpoint(host, port), timeout=2)
                break
            except RpcError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ggml-rpc-server at {host}:{port} did not start") from None
                time.sleep(0.1)
        yield f"{host}:{port}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextmanager
def _namespace(index: int, half_rtt_ms: float) -> Iterator[tuple[str, str]]:
    """A namespace reached through a veth pair whose both ends delay by ``half_rtt_ms``: (name, its address)."""
    name, here, there = f"{NS_PREFIX}{index}", f"veth-lr{index}", f"veth-lr{index}n"
    made: list[str] = []
    try:
        _sh("ip", "netns", "add", name)
        made.append(name)
        _sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _sh("ip", "link", "set", there, "netns", name)
        _sh("ip", "addr", "add", f"10.200.{index}.1/30", "dev", here)
        _sh("ip", "link", "set", here, "up")
        _sh("ip", "netns", "exec", name, "ip", "addr", "add", f"10.200.{index}.2/30", "dev", there)
        _sh("ip", "netns", "exec", name, "ip", "link", "set", there, "up")
        _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        _sh("tc", "qdisc", "add", "dev", here, "root", "netem", "delay", f"{half_rtt_ms}ms")
        _sh("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", there, "root", "netem", "delay", f"{half_rtt_ms}ms")
        yield name, f"10.200.{index}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)  # takes its peer with it
        if made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def _delay_proxy(target: str, one_way_s: float) -> Iterator[str]:
    """A loopback TCP proxy to ``target`` that delivers each chunk ``one_way_s`` after it arrived,
    in both directions (in order; no bandwidth limit): an RTT of twice that, where netem is missing."""
    import asyncio
    import logging
    import socket
    import threading

    host, port = target.rsplit(":", 1)
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # connections cut when it stops
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    ready = threading.Event()
    address: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump() -> None:
            while True:
                data = await reader.read(1 << 16)
                queue.put_nowait((loop.time() + one_way_s, data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        await asyncio.gather(pump(), deliver(), return_exceptions=True)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        for w in (client_writer, upstream_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        ready.set()
        async with server:
            await server.serve_forever()

    def serve() -> None:
        try:
            loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass  # stopped

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield address[0]
    finally:
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        thread.join(5)


def _netem_problem() -> str | None:
    """Why the latency rows cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    try:
        with _namespace(9, 0.25):
            return None
    except FileNotFoundError as exc:
        return f"{exc.filename} not installed"
    except subprocess.CalledProcessError as exc:
        return f"`{' '.join(exc.cmd[:4])} …` failed: {(exc.stderr or '').strip() or exc.returncode}"


def run() -> list[Row]:
    model = ensure_demo_model()
    bin_dir = _tools()
    local: dict[str, list[float]] = {t: [] for t in TESTS}
    remote: dict[str, list[float]] = {t: [] for t in TESTS}
    with tempfile.TemporaryDirectory() as home, ExitStack() as stack:
        endpoints = ",".join(stack.enter_context(_worker(bin_dir, "127.0.0.1", free_port())) for _ in range(2))
        for _ in range(ROUNDS):
            for test, value in _local(bin_dir, model).items():
                local[test].append(value)
            for test, value in _rpc(endpoints, model, home).items():
                remote[test].append(value)
    rows = []
    for test in TESTS:
        here, there = statistics.median(local[test]), statistics.median(remote[test])
        rows.append(Row(f"rpc {test}: 2 loopback workers (1 thread each)", there, "t/s", here, "local llama-bench, 2 threads", "reported", None))
    problem = _netem_problem()
    if problem is not None:
        print(f"rpc with added latency: tc netem / network namespaces unavailable here ({problem}); a delay proxy instead", file=sys.stderr)
        for rtt in RTTS_MS:
            with tempfile.TemporaryDirectory() as home, ExitStack() as stack:
                workers = [stack.enter_context(_worker(bin_dir, "127.0.0.1", free_port())) for _ in range(2)]
                proxied = [stack.enter_context(_delay_proxy(w, rtt / 2000)) for w in workers]
                figures = _rpc(",".join(proxied), model, home)
            for test in TESTS:
                name = f"rpc {test}: 2 workers at {rtt:g} ms RTT (delay proxy)"
                rows.append(Row(name, figures.get(test, float("nan")), "t/s", statistics.median(local[test]), "local", "reported", None))
        return rows
    for rtt in RTTS_MS:
        with tempfile.TemporaryDirectory() as home, ExitStack() as stack:
            names = []
            for index in (1, 2):
                netns, address = stack.enter_context(_namespace(index, rtt / 2))
                names.append(stack.enter_context(_worker(bin_dir, address, 50052, netns)))
            figures = _rpc(",".join(names), model, home)
        for test in TESTS:
            rows.append(
                Row(f"rpc {test}: 2 workers at {rtt:g} ms RTT (netem)", figures[test], "t/s", statistics.median(local[test]), "local", "reported", None)
            )
    return rows


if __name__ == "__main__":
    from common import print_table

    print_table(run())
