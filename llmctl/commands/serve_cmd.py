"""``llmctl serve``, ``ps`` and ``stop``: an OpenAI-compatible local server and its loaded models."""

from __future__ import annotations

import ipaddress
import logging
import sys
import time
from typing import Annotated

import typer

from llmctl import output
from llmctl.commands import open_store
from llmctl.errors import UsageError
from llmctl.options import JsonOpt, RpcOpt
from llmctl.output import Column
from llmctl.serve.client import DEFAULT_PORT, DEFAULT_SERVER, ServerClient

ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="LLMCTL_SERVER", help="The running server's address (LLMCTL_SERVER)."),
]

PS_COLUMNS = [
    Column("NAME", lambda m: m["name"]),
    Column("MEMORY", lambda m: output.human_bytes(m["memory_bytes"]), right=True),
    Column("CONTEXT", lambda m: m["n_ctx"], right=True),
    Column("GPU LAYERS", lambda m: m["n_gpu_layers"], right=True),
    Column("SLOTS", lambda m: m["slots"], right=True),
    Column("BUSY", lambda m: m["busy"], right=True),
    Column("STATE", lambda m: m["state"]),
    Column("EXPIRES", lambda m: "never" if m["expires_in_s"] is None else f"in {m['expires_in_s']:.0f}s"),
]


def serve(
    models: Annotated[
        list[str] | None, typer.Argument(help="Models to load now (any model in the store loads on its first request).", show_default=False, metavar="MODEL...")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback should have --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LLMCTL_API_KEY", help="Require 'Authorization: Bearer KEY' (LLMCTL_API_KEY).")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", "-c", min=256, help="Context of each slot, for every model (default: each model's plan).")] = None,
    keep_alive: Annotated[str, typer.Option("--keep-alive", help="How long an idle model stays loaded: 300, 5m, 1h, or -1 for ever.")] = "5m",
    max_loaded: Annotated[int, typer.Option("--max-loaded", min=1, help="Models loaded at once; the least recently used is unloaded first.")] = 2,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait for a model whose slots are all busy, before 503.")] = 8,
    parallel: Annotated[
        int | None, typer.Option("--parallel", min=1, help="Requests each model serves at once (default: as many slots as memory allows, up to 4).")
    ] = None,
    rpc: RpcOpt = None,
) -> None:
    """Serve models over OpenAI- and Anthropic-compatible HTTP APIs, each in llama.cpp's llama-server."""
    from llmctl.engine import native
    from llmctl.serve.app import run_server
    from llmctl.serve.pool import ModelPool, ServerSettings

    if not _is_loopback(host) and not api_key:
        output.warn(f"binding to {host} without --api-key: anyone who can reach this port can use your models")
    from llmctl.engine.rpc import endpoints_from

    workers = [str(e) for e in endpoints_from(rpc)]
    if workers and max_loaded > 1:
        # A ggml-rpc-server serves one client at a time: two children could not share the workers.
        output.info(f"--rpc: one model is loaded at a time (each RPC worker serves one llama-server), not {max_loaded}")
        max_loaded = 1
    settings = ServerSettings(
        keep_alive=parse_duration(keep_alive), max_loaded=max_loaded, max_queue=max_queue, ctx=ctx, api_key=api_key, parallel=parallel, rpc=workers
    )
    native.require("llama-server")  # missing: one error line with the hint, before anything listens
    store = open_store()
    for name in models or []:
        if store.resolve(name).kind == "path":  # unknown names fail now, not at the first request
            raise UsageError(f"{name} is a file, not a model in the store", hint=f"register it first: llmctl import {name}")
    log_to_stderr()
    run_server(ModelPool(store, settings), host, port, list(models or []))


def ps(server: ServerOpt = DEFAULT_SERVER, json_output: JsonOpt = False) -> None:
    """List the models a running `llmctl serve` has loaded."""
    answer = ServerClient.at(server).loaded()
    output.emit_records(answer["models"], PS_COLUMNS, json_output=json_output, document=answer, empty="No models loaded.")


def stop(
    model: Annotated[str, typer.Argument(help="A loaded model's name.", show_default=False, metavar="MODEL")],
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Unload a model from a running `llmctl serve`."""
    ServerClient.at(server).stop(model)
    output.info(f"Stopped {model}")


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip().lower()
    try:
        if raw and raw[-1] in units:
            return float(raw[:-1]) * units[raw[-1]]
        return float(raw)
    except ValueError:
        raise UsageError(f"--keep-alive {text!r} is not a duration", hint="e.g. 300, 5m, 1h, or -1 to keep models loaded") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LogLine(logging.Formatter):
    """One line of serve's log: the time, "warning: " for a warning (what a model's load had to
    change), then the message with the control, bidi and line-breaking characters that clients may
    send escaped (``output.safe``); a traceback follows only where one was logged (``LLMCTL_DEBUG=1``)."""

    def format(self, record: logging.LogRecord) -> str:
        label = "warning: " if record.levelno == logging.WARNING else ""
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {label}{output.safe(record.getMessage())}"
        return line + "\n" + self.formatException(record.exc_info) if record.exc_info else line


class StderrLog(logging.StreamHandler):
    """Log lines on the stderr in use when each is written (tests capture it), not the one at start-up."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_to_stderr() -> None:
    """Send the "llmctl.serve" loggers' records to stderr as ``LogLine``s (once, however often called)."""
    logger = logging.getLogger("llmctl.serve")
    if not any(isinstance(handler, StderrLog) for handler in logger.handlers):
        handler = StderrLog()
        handler.setFormatter(LogLine())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # each line once, whatever else configures the root logger
