"""llama.cpp's ``llama-server`` as a child process: its command line from a fit plan, its start
(a health wait under a deadline), its bounded log, and its end.

``serve`` runs one child per loaded model (the pool in llmctl/serve/pool.py decides which);
issue 14's ``--rpc`` workers start the same way. A child:

- listens on a Unix socket in a private (0700) folder, not on a TCP port: no port to race for,
  and no unauthenticated port that other users of the machine could reach past llmctl's API
  key (TCP loopback, with a random internal key, only where Unix sockets are missing);
- never outlives the server: it runs in a process group of its own (a Ctrl-C at the terminal
  reaches llmctl, which stops its children in order) and, on Linux, gets SIGKILL when the thread
  that started it ends (``PR_SET_PDEATHSIG``), so even a SIGKILL of the server takes it down;
- writes its stdout and stderr through a pipe into ``$LLMCTL_HOME/logs/<model>.log``, rotated
  at ``LOG_MAX_BYTES`` (one ``.log.1`` kept), whose last error line is quoted when it fails.

Nothing here prints; failures are ``ServerStartError``s with the log's path in the hint.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from llmctl.errors import LlmctlError

if TYPE_CHECKING:
    import http.client

    from llmctl.engine.chat_template import TemplateWorker
    from llmctl.models.store import Store
    from llmctl.plan.fit import Overrides

LOG_MAX_BYTES = 4 * 1024 * 1024
STOP_GRACE_S = 5.0
HEALTH_POLL_S = 0.05
POOLING_FOR_EMBEDDINGS = "mean"  # for models whose GGUF names no pooling (generative models)
_ERROR_LINE = re.compile(r"error|failed|exception|terminate|abort|what\(\)|cannot|unable", re.IGNORECASE)


class ServerStartError(LlmctlError):
    """A ``llama-server`` child that could not be started, or did not become ready."""


@dataclass
class ServerSpec:
    """What one child serves and how: the fit plan's choices as llama-server's flags."""

    model: Path  # the first file of a split model: llama.cpp finds the others
    alias: str  # the name answers carry in their "model" field (llmctl's name for it)
    n_ctx: int  # per slot: each request may use this much context
    slots: int  # requests decoded together (continuous batching)
    n_gpu_layers: int = 0
    threads: int = 1
    threads_batch: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    swa_full: bool = False
    kv_unified: bool = False  # one KV stream for all slots instead of one per slot
    tensor_split: list[float] | None = None
    mmproj: Path | None = None  # a multimodal projector: images (and audio) in chat messages
    reranker: bool = False  # the GGUF's pooling is "rank": /v1/rerank, nothing else
    pooling: str | None = POOLING_FOR_EMBEDDINGS  # None: the GGUF's own pooling for /v1/embeddings
    rpc: list[str] = field(default_factory=list)  # llama.cpp RPC workers (HOST:PORT) the offloaded layers go to

    @property
    def total_ctx(self) -> int:
        return self.n_ctx * self.slots


def server_args(spec: ServerSpec) -> list[str]:
    """llama-server's flags for ``spec`` (the address comes separately).

    Every setting is passed, and llama-server's own fitting is off (``--fit off``): the plan llmctl
    shows in ``fit`` is the one that runs. Unless the plan unifies it, the KV cache is split per slot
    (``--no-kv-unified``, ``-c`` = per-slot context × slots): every request can use the plan's whole
    context however busy the other slots are, and the memory is what the planner counted. The prompt
    cache in RAM (``--cache-ram``, 8 GiB by default) is off: memory outside the plan would break the
    pool's budget.
    """
    args = [
        "-m", str(spec.model), "--alias", spec.alias,
        "-c", str(spec.total_ctx), "-np", str(spec.slots), "--kv-unified" if spec.kv_unified else "--no-kv-unified",
        "-ngl", str(spec.n_gpu_layers),
        "-t", str(spec.threads), "-tb", str(spec.threads_batch or spec.threads),
        "-b", str(spec.n_batch), "-ub", str(spec.n_ubatch),
        "-ctk", spec.type_k, "-ctv", spec.type_v,
        "-fa", "on" if spec.flash_attn else "off",
        "--fit", "off", "--cache-ram", "0", "--jinja", "--no-webui",
    ]  # fmt: skip
    if spec.swa_full:
        args.append("--swa-full")
    if spec.tensor_split:
        args += ["-ts", ",".join(f"{share:g}" for share in spec.tensor_split)]
    if spec.rpc:
        args += ["--rpc", ",".join(spec.rpc)]
    if spec.mmproj is not None:
        args += ["--mmproj", str(spec.mmproj)]
    if spec.reranker:
        args.append("--rerank")
    else:
        # Generation is unaffected: llama-server switches embeddings on per batch, for the
        # requests that ask for them.
        args.append("--embeddings")
        if spec.pooling:
            args += ["--pooling", spec.pooling]
    return args


# llama.cpp's pooling types (``<arch>.pooling_type`` in a GGUF): 4 is a reranker's.
POOLING_RANK = 4


@dataclass
class ServerPlan:
    """A model planned for a child: the memory the pool's budget weighs, the flags, the plan's
    warnings, and the chat template llama-server will render (checked before it starts)."""

    memory: int
    spec: ServerSpec
    warnings: list[str] = field(default_factory=list)
    chat_template: str | None = None


SAMPLE_CHAT = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello"}]


def check_chat_template(worker: TemplateWorker, template: str | None) -> None:
    """Refuse a template that runs past llmctl's budgets (time, memory, output, recursion, size) on a
    plain conversation, before llama-server renders it: llama-server renders a model's template while
    it loads and for every request, without a budget, so a looping template would hang its load (and
    every load queued behind it) until the deadline. A template that merely fails in Jinja2 passes:
    llama.cpp's own Jinja engine may take what Jinja2 does not."""
    if not template:
        return
    from llmctl.engine.chat_template import ChatTemplateError

    variables = {"messages": SAMPLE_CHAT, "add_generation_prompt": True, "bos_token": "", "eos_token": ""}
    reply = worker.render(template, {**variables, "functions": None, "function_call": None, "tools": None, "tool_choice": None, "kwargs": {}})
    if reply.get("error") in ("memory", "output", "recursion"):
        raise ChatTemplateError(worker.budgets.problem(str(reply["error"])))


def plan_server(store: Store, name: str, overrides: Overrides, *, rpc: list[str] | None = None) -> ServerPlan:
    """``name``'s serving plan (``fit``'s, with parallel slots and its projector counted) as a ``ServerSpec``.
    With ``rpc`` workers every layer and the output go to them (their memory is checked when the
    child starts), and the plan weighs nothing in this machine's budget."""
    from dataclasses import replace

    from llmctl.config import get_settings
    from llmctl.engine.native import serving_hardware
    from llmctl.models.locate import Located
    from llmctl.plan.fit import make_plan
    from llmctl.plan.hardware import get_hardware
    from llmctl.plan.tuned import apply_tuned

    located = Located.of(store.resolve(name))
    overrides = apply_tuned(replace(overrides, serving=True), located.paths)
    hardware = serving_hardware(get_hardware(get_settings()))
    plan = make_plan([located.candidate(with_mmproj=True)], hardware, overrides, elsewhere=bool(rpc))
    cfg = plan.config
    pooling = located.headers[0].metadata.get(f"{located.info.architecture}.pooling_type")
    spec = ServerSpec(
        model=located.paths[0],
        alias=str(located.name),
        n_ctx=cfg.n_ctx,
        slots=plan.parallel,
        n_gpu_layers=(located.info.layer_count or 0) + 1 if rpc else cfg.n_gpu_layers,
        threads=plan.threads,
        n_batch=cfg.n_batch,
        n_ubatch=cfg.n_ubatch,
        type_k=cfg.type_k,
        type_v=cfg.type_v,
        flash_attn=cfg.flash_attn,
        swa_full=cfg.swa_full,
        kv_unified=cfg.kv_unified,
        tensor_split=cfg.tensor_split,
        mmproj=located.mmproj,
        reranker=pooling == POOLING_RANK,
        pooling=None if isinstance(pooling, int) else POOLING_FOR_EMBEDDINGS,
    )
    if rpc:
        spec.rpc = list(rpc)
    memory = 0 if rpc else plan.chosen.estimate.resident  # with workers, this machine holds the context's host buffers only
    return ServerPlan(memory, spec, list(plan.warnings), located.info.chat_template)


# --- the address a child listens on ------------------------------------------------------------


@dataclass
class Address:
    """Where a child listens: a Unix socket (``uds``), or TCP loopback with an internal ``api_key``."""

    uds: Path | None = None
    port: int | None = None
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        """Where it listens, for messages: ``unix:PATH`` or ``http://127.0.0.1:PORT``."""
        return f"unix:{self.uds}" if self.uds is not None else f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        if self.uds is not None:
            return ["--host", str(self.uds)]  # a host ending in .sock: llama-server listens on it
        return ["--host", "127.0.0.1", "--port", str(self.port), "--api-key", str(self.api_key)]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        import http.client

        if self.uds is None:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        return _unix_connection(str(self.uds), timeout)


def _unix_connection(path: str, timeout: float) -> http.client.HTTPConnection:
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixConnection("llama-server", timeout=timeout)


class Sockets:
    """A private folder for the children's sockets (0700; short, under the temp folder, since a
    socket's path may not exceed ~100 bytes), removed with its sockets by ``close``."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._count = 0
        self._lock = threading.Lock()

    def next(self) -> Address:
        if not hasattr(socket, "AF_UNIX") or sys.platform == "win32":
            with socket.socket() as probe:  # the port is free now; a race loses only this start
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            return Address(port=port, api_key=secrets.token_urlsafe(24))
        with self._lock:
            if self._folder is None:
                _remove_stale_folders()
                self._folder = Path(tempfile.mkdtemp(prefix=f"{SOCKETS_PREFIX}{os.getpid()}-"))  # mode 0700
            self._count += 1
            return Address(uds=self._folder / f"{self._count}.sock")

    def close(self) -> None:
        if self._folder is not None:
            _remove_folder(self._folder)


SOCKETS_PREFIX = "llmctl-sock-"


def _remove_folder(folder: Path) -> None:
    """A sockets folder and its sockets (nothing else: a folder holding anything else is left)."""
    for path in folder.glob("*.sock"):
        try:
            path.unlink()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass


def _remove_stale_folders() -> None:
    """The sockets folders of servers that died without cleaning up (SIGKILL), by their pid."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SOCKETS_PREFIX}*"):
        pid = folder.name[len(SOCKETS_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove_folder(folder)
        except OSError:
            pass


# --- the log ---------------------------------------------------------------------------------


class ChildLog:
    """A child's output, read from its pipe on a thread of its own into a file rotated at
    ``max_bytes`` (one older file kept), remembering the last lines for error messages."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._thread: threading.Thread | None = None
        path.parent.mkdir(parents=True, exist_ok=True)

    def follow(self, stream: IO[bytes], header: str) -> None:
        self._thread = threading.Thread(target=self._copy, args=(stream, header), name="llmctl-child-log", daemon=True)
        self._thread.start()

    def _copy(self, stream: IO[bytes], header: str) -> None:
        out = self._write(None, header.encode() + b"\n")
        try:
            for raw in iter(stream.readline, b""):
                self.tail.append(raw.decode("utf-8", "replace").rstrip())
                out = self._write(out, raw)
        except (OSError, ValueError):
            pass  # the pipe closed under us
        finally:
            if out is not None:
                out.close()
            stream.close()

    def _write(self, out: IO[bytes] | None, raw: bytes) -> IO[bytes] | None:
        """Append ``raw``, rotating first if the file would pass its bound. A failure (a full disk)
        drops the line, never the reading: a child whose pipe fills up would stall."""
        try:
            if out is None:
                out = open(self.path, "ab")
            if out.tell() and out.tell() + len(raw) > self.max_bytes:
                out.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                out = open(self.path, "ab")
            out.write(raw)
            out.flush()  # the log is read while the child runs
            return out
        except OSError:
            if out is not None:
                out.close()
            return None

    def join(self, timeout: float = 2.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def last_error(self) -> str | None:
        """The last line that reads like an error (else the last line), for a one-line message."""
        lines = [line for line in self.tail if line.strip()]
        for line in reversed(lines):
            if _ERROR_LINE.search(line):
                return line.strip()[:300]
        return lines[-1].strip()[:300] if lines else None


def log_path_for(logs: Path, name: str) -> Path:
    """``<logs>/<name>.log``, with what a file name cannot hold replaced."""
    return logs / (re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120] + ".log")


# --- the process -----------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGKILL the child when the thread that started it ends.

    libc's ``prctl`` is looked up here, in the parent: between fork and exec the child only calls it
    (and checks that the parent did not die before the call, which the flag would miss)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass
class ServerProcess:
    """A running child: its address, process and log."""

    name: str
    spec: ServerSpec
    address: Address
    process: subprocess.Popen[bytes]
    log: ChildLog
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return self.address.base_url

    @property
    def log_path(self) -> Path:
        return self.log.path

    def exit_code(self) -> int | None:
        """None while it runs."""
        return self.process.poll()

    def state(self) -> str:
        """ "ready", or how it ended: "exited N" / "killed by SIGNAME"."""
        return describe_exit(self.exit_code())

    def terminate(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.terminate()
            except OSError:
                pass

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the end either way."""
        stop_process(self.process, grace)
        self.log.join()
        if self.address.uds is not None:
            try:
                self.address.uds.unlink()
            except OSError:
                pass


def stop_process(process: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the end either way (a child of
    llmctl's: llama-server, ggml-rpc-server)."""
    if process.poll() is None:
        try:
            process.terminate()
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except OSError:
            pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "ready"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"


def start_server(
    name: str,
    spec: ServerSpec,
    *,
    command: list[str],
    address: Address,
    log_path: Path,
    deadline_s: float,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``command`` (llama-server, or a stand-in) for ``spec`` and wait until ``/health``
    answers 200; stop it and raise ``ServerStartError`` if it exits or ``deadline_s`` passes first."""
    argv = [*command, *server_args(spec), *address.args()]
    log = ChildLog(log_path)
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: the terminal's Ctrl-C is llmctl's to handle
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only a prctl call, resolved in the parent
        )
    except OSError as exc:
        raise ServerStartError(f"cannot start {command[0]}: {exc.strerror or exc}", hint="check `llmctl engine status`") from None
    assert process.stdout is not None
    shown = " ".join(a if a != address.api_key else "***" for a in argv)
    log.follow(process.stdout, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {shown}")
    child = ServerProcess(name, spec, address, process, log)
    try:
        _wait_healthy(child, deadline_s)
    except BaseException:
        child.stop(grace=1.0)
        raise
    return child


def _wait_healthy(child: ServerProcess, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        code = child.exit_code()
        if code is not None:
            child.log.join()
            why = child.log.last_error()
            raise ServerStartError(
                f"llama-server {describe_exit(code)} while loading {child.name}" + (f": {why}" if why else ""),
                hint=f"its log: {child.log.path}",
            )
        if health(child.address, timeout=1.0) == 200:
            return
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"llama-server did not finish loading {child.name} within {deadline_s:.0f} s",
                hint=f"its log: {child.log.path}",
            )
        time.sleep(HEALTH_POLL_S)


def health(address: Address, timeout: float) -> int | None:
    """``GET /health``'s status (503 while loading), or None when nothing answers."""
    import http.client

    try:
        conn = address.connect(timeout)
        try:
            conn.request("GET", "/health", headers=address.headers())
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None
