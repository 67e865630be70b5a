"""``llmctl rpc-server``: lend this machine's devices to another machine's llama.cpp (a ggml-rpc-server
in the foreground)."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmctl import output

if TYPE_CHECKING:
    from llmctl.engine.rpc_worker import RpcWorker


def rpc_server(
    host: Annotated[
        str, typer.Option("--host", "-H", help="IPv4 address to listen on. Anything but loopback needs --allow-remote.", show_default=True)
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="TCP port to listen on.")] = 50052,
    threads: Annotated[int | None, typer.Option("--threads", "-t", min=1, help="CPU threads for the CPU device (default: half the logical CPUs).")] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", "-d", help="Devices to lend, comma-separated (e.g. CUDA0,CUDA1; default: every GPU, else the CPU).", metavar="DEVS"),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option("--cache", help="Keep the tensors it receives in a local cache (LLAMA_CACHE/rpc), so the next load skips sending large ones again."),
    ] = False,
    allow_remote: Annotated[
        bool,
        typer.Option("--allow-remote", help="Allow a non-loopback --host. The protocol has no authentication or encryption: trusted networks only."),
    ] = False,
) -> None:
    """Run a llama.cpp RPC worker here, so another machine's `--rpc` can use this one's memory and devices (Ctrl-C stops it)."""
    from llmctl.engine import rpc_worker

    bind = rpc_worker.check_host(host, allow_remote=allow_remote)
    spec = rpc_worker.WorkerSpec(bind, port, threads or rpc_worker.default_threads(), device, cache)
    endpoint = f"{bind}:{port}"
    if not rpc_worker.is_loopback(bind):
        output.warn(rpc_worker.REMOTE_WARNING.format(endpoint=endpoint))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop is a Ctrl-C too
    try:
        with output.status(f"Starting ggml-rpc-server on {endpoint}…"):
            worker = rpc_worker.start_worker(spec, on_line=_relay)
        output.info(_status_line(worker))
        output.info(f"use it from the main machine with --rpc {_reach(bind)}:{port} (or {_env_name()}=…); Ctrl-C stops it")
        try:
            code = worker.wait()
        except KeyboardInterrupt:
            worker.stop()
            output.info(f"rpc-server on {endpoint} stopped")
            return
    finally:
        signal.signal(signal.SIGTERM, previous)
    from llmctl.engine.server_process import describe_exit

    raise rpc_worker.RpcWorkerError(
        f"ggml-rpc-server on {endpoint} stopped on its own ({describe_exit(code)})" + (f": {worker.last_error()}" if worker.last_error() else ""),
        hint="start it again; run ggml-rpc-server by hand if it keeps stopping",
    )


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _relay(line: str) -> None:
    said = {"Accepted client connection": "client connected", "Client connection closed": "client disconnected"}.get(line)
    if said:
        output.dim(f"{time.strftime('%H:%M:%S')} {said}")
    else:
        output.info(f"ggml-rpc-server: {line}")


def _status_line(worker: RpcWorker) -> str:
    from llmctl.engine import rpc_worker

    spec = worker.spec
    if worker.devices:
        devices = "; ".join(
            f"{d.name} ({d.description}, {output.human_bytes(d.free_mib * 2**20)} free of {output.human_bytes(d.total_mib * 2**20)})" for d in worker.devices
        )
    else:  # the banner was not read: what the handshake reported
        reported = worker.info.devices if worker.info else []
        devices = "; ".join(f"#{d.index} ({output.human_bytes(d.free)} free of {output.human_bytes(d.total)})" for d in reported) or "?"
    protocol = f"ggml RPC protocol {worker.info.protocol}" if worker.info else "ggml RPC"
    cache = f"tensor cache {rpc_worker.cache_dir()}" if spec.cache else "no tensor cache"
    threads = f"{spec.threads} thread{'s' if spec.threads != 1 else ''}"
    return f"rpc-server listening on {spec.host}:{spec.port} ({protocol}): devices {devices}; {threads}; {cache}"


def _reach(bind: str) -> str:
    return "THIS-MACHINE'S-ADDRESS" if bind == "0.0.0.0" else bind


def _env_name() -> str:
    from llmctl.engine.rpc import ENV_RPC

    return ENV_RPC
