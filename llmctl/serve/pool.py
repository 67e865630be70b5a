"""The models a server holds, each in a ``llama-server`` child of its own: loaded on demand, kept for
keep-alive, unloaded least recently used first within ``--max-loaded`` and the memory budget, each
with a bounded number of requests in flight.

The pool is the front's bookkeeping (as Ollama's scheduler and llama-swap are): names, loading,
keep-alive, memory budgets and places in the queue. Generation is llama-server's: a model's slots
decode together (continuous batching) and up to ``--max-queue`` more requests wait in its queue.
What starts a child is the ``loader`` (a field, like the clock: tests give one that starts a fake
llama-server, or none at all).

Why a child per model and not llama-server's router mode (``--models-preset``): the pool already
owns names from the store, load on demand, keep-alive and LRU within a memory budget, and each
model gets its own fit plan (GPU layers, context, slots, KV types, flash attention), which a
router's presets would have to repeat; a child per model also keeps a crash to that model.

It answers in the API's terms (``ApiError``: 404 for a name it cannot serve, 503 with
Retry-After for a full queue) and logs what it does to the "llmctl.serve.pool" logger.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from llmctl.errors import AmbiguousNameError, LlmctlError, NotFoundError, UsageError
from llmctl.serve.api import ApiError

if TYPE_CHECKING:
    from llmctl.engine.server_process import Address, ServerSpec
    from llmctl.models.store import Store

log = logging.getLogger(__name__)

CONTROL_THREADS = 4  # store look-ups, listings, unloads: never shared with loading
LOAD_TIMEOUT_S = 300.0


@dataclass
class ServerSettings:
    keep_alive: float = 300.0  # seconds a model stays loaded after its last request; < 0: for ever
    max_loaded: int = 2
    max_queue: int = 8  # requests waiting per model, beyond its slots, before 503
    ctx: int | None = None
    api_key: str | None = None
    parallel: int | None = None  # slots per model (llama-server -np); None: the fit plan's choice
    load_timeout: float = LOAD_TIMEOUT_S  # for a child to answer /health after it starts
    rpc: list[str] = field(default_factory=list)  # llama.cpp RPC workers every child's layers go to (serve --rpc)


class Child(Protocol):
    """A loaded model's server: ``engine.server_process.ServerProcess``, or a test's stand-in."""

    spec: ServerSpec
    address: Address

    @property
    def pid(self) -> int: ...

    @property
    def log_path(self) -> Path: ...

    def exit_code(self) -> int | None: ...

    def state(self) -> str: ...

    def terminate(self) -> None:
        """Ask it to end (SIGTERM), without waiting."""
        ...

    def stop(self) -> None:
        """End it and wait (SIGKILL after a grace period)."""
        ...


class Loader(Protocol):
    """How the pool loads a model: first its plan (the memory it will take, weighed against the
    budget before anything is unloaded), then the child that serves it."""

    def plan(self, name: str) -> tuple[int, Any]:
        """The bytes the model will take, and what ``load`` needs."""
        ...

    def load(self, planned: Any) -> Child: ...

    def close(self) -> None: ...


class ChildLoader:
    """The pool's loader in use: the model's serving plan (``fit``'s, with slots), then a llama-server
    child started with it. ``command`` is what runs instead of llama-server (tests: a fake one)."""

    def __init__(self, store: Store, settings: ServerSettings, *, command: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        from llmctl.engine.server_process import Sockets

        self.store, self.settings, self.command, self.env = store, settings, command, env
        self.sockets = Sockets()
        self._templates: Any = None  # a TemplateWorker, started at the first load

    def plan(self, name: str) -> tuple[int, Any]:
        from llmctl.engine.server_process import plan_server
        from llmctl.plan.fit import Overrides

        planned = plan_server(
            self.store, name, Overrides(n_ctx=self.settings.ctx, parallel=self.settings.parallel, serving=True), rpc=self.settings.rpc or None
        )
        return planned.memory, planned

    def load(self, planned: Any) -> Child:
        from llmctl.config import get_settings
        from llmctl.engine import native
        from llmctl.engine.server_process import check_chat_template, log_path_for, start_server

        for warning in planned.warnings:
            log.warning(warning)
        if self._templates is None:
            from llmctl.engine.chat_template import TemplateWorker

            self._templates = TemplateWorker()
        check_chat_template(self._templates, planned.chat_template)
        spec = planned.spec
        if spec.rpc:
            # llama-server aborts on a worker it cannot reach: check them all first, for a clear error.
            from llmctl.engine.rpc import parse_endpoints
            from llmctl.plan import rpc_fit

            _, projection = rpc_fit.check_workers(spec.alias, spec.model, parse_endpoints(",".join(spec.rpc)), layer_count=spec.n_gpu_layers,
                                                  n_ctx=spec.total_ctx, n_gpu_layers=spec.n_gpu_layers, type_k=spec.type_k, type_v=spec.type_v,
                                                  flash_attn=spec.flash_attn)  # fmt: skip
            if not projection.fits:
                raise rpc_fit.refusal(projection)
        command = self.command or [str(native.require("llama-server"))]
        return start_server(
            spec.alias,
            spec,
            command=command,
            address=self.sockets.next(),
            log_path=log_path_for(get_settings().home / "logs", spec.alias),
            deadline_s=self.settings.load_timeout,
            env=self.env,
        )

    def close(self) -> None:
        self.sockets.close()
        if self._templates is not None:
            self._templates.close()


@dataclass
class Loaded:
    name: str
    child: Child
    memory: int
    loaded_at: float
    last_used: float
    busy: int = 0  # requests in flight: decoding in a slot or waiting for one
    reported: bool = False  # its end has been logged

    @property
    def slots(self) -> int:
        return self.child.spec.slots

    @property
    def alive(self) -> bool:
        return self.child.exit_code() is None

    def expires_at(self, keep_alive: float) -> float | None:
        return None if keep_alive < 0 else self.last_used + keep_alive


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def looks_like_path(name: str) -> bool:
    """A name a client gives that could only mean a place on this machine's disk.

    The server serves models of the store by name; such names are answered as
    unknown before the store (which would look at the disk) sees them.
    """
    return name.startswith(("/", "~", ".", "\\")) or "\\" in name or bool(_DRIVE.match(name)) or ".." in name.split("/") or not name.isprintable()


class ModelPool:
    """Loaded models: on demand, kept for keep-alive, least-recently-used out when full."""

    def __init__(self, store: Store, settings: ServerSettings, loader: Loader | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.settings = settings
        self.loader: Loader = loader or ChildLoader(store, settings)
        self.clock = clock  # when models were used, for keep-alive and least-recently-used
        self.models: dict[str, Loaded] = {}
        self._guard = threading.Lock()  # the dict, busy counts, load/unload decisions; never held while a child stops
        self._load_lock = threading.Lock()  # one load at a time
        self._waiting_loads: dict[str, int] = {}
        # Names clients used for loaded models → the store's name, valid while the index is unchanged
        # (``index_stamp``): repeated requests do not read the index; any change to it (`rm`, an
        # import) resolves afresh, so answers stay what resolving every time would give.
        self._names: dict[str, str] = {}
        self._names_stamp: Any = None
        self.control = ThreadPoolExecutor(max_workers=CONTROL_THREADS, thread_name_prefix="llmctl-control")
        # Children are started on this one long-lived thread (or the main thread, for the models
        # named on the command line): Linux's PR_SET_PDEATHSIG kills a child when the thread that
        # started it ends, so it must not be a thread that comes and goes.
        self._loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmctl-load")

    def names(self) -> list[str]:
        return [row.name for row in self.store.listing() if row.status == "ok"]

    def _memory_budget(self) -> int:
        """What loaded models may use: RAM available now plus what the loaded ones hold, minus the margin."""
        from llmctl.config import get_settings
        from llmctl.plan.fit import RAM_MARGIN
        from llmctl.plan.hardware import get_hardware

        hw = get_hardware(get_settings())
        # A live probe's available RAM already excludes the running children; a profile's is what
        # the described machine has free before anything is loaded.
        held = sum(m.memory for m in self.models.values() if m.alive) if hw.source == "live" else 0
        return hw.ram_available + held - RAM_MARGIN

    # --- names ---------------------------------------------------------------------------

    def missing(self, name: str) -> ApiError:
        return ApiError(404, f"model '{name}' not found; available: {', '.join(self.names()) or '(none)'}", "invalid_request_error", "model")

    def canonical(self, name: str) -> str:
        """The store's name for what a client asked for. Paths, directories and unknown names all
        get the same 404: the API tells nothing about this machine's files."""
        return self._canonical(name)[0]

    def _canonical(self, name: str) -> tuple[str, Any]:
        """``canonical``, and the index stamp it was resolved under (for ``_remember``)."""
        stamp = self.store.index_stamp()
        with self._guard:
            if stamp != self._names_stamp:
                self._names.clear()
                self._names_stamp = stamp
            known = self._names.get(name)
        if known is not None:
            return known, stamp
        return self._resolve(name), stamp

    def _remember(self, name: str, canonical: str, stamp: Any) -> None:
        """Answer ``name`` from the pool from now on, while ``canonical`` stays loaded and the index unchanged."""
        with self._guard:
            if stamp != self._names_stamp:
                self._names.clear()
                self._names_stamp = stamp
            if canonical in self.models:
                self._names[name] = canonical

    def _resolve(self, name: str) -> str:
        if looks_like_path(name):
            raise self.missing(name)
        try:
            resolved = self.store.resolve(name, paths=False)
        except AmbiguousNameError as exc:
            raise ApiError(400, exc.message, param="model") from None
        except (NotFoundError, UsageError, OSError, ValueError, RuntimeError):
            # UsageError: "is a directory"; OSError: a name too long for a path, unreadable places
            raise self.missing(name) from None
        except LlmctlError as exc:
            raise ApiError(400, exc.message, param="model") from None
        if resolved.kind == "path":  # a client may name models, not files on this machine
            raise self.missing(name)
        return str(resolved.name)

    # --- taking a model, loading it ------------------------------------------------------

    def _claim(self, canonical: str) -> Loaded | None:
        """Count a request on the loaded model (None if it is not loaded, or its child has ended:
        it is then loaded afresh); 503 when its slots and queue are full."""
        with self._guard:
            model = self.models.get(canonical)
            if model is None:
                return None
            if not model.alive:
                return None
            limit = model.slots + self.settings.max_queue
            if model.busy >= limit:
                raise ApiError(
                    503, f"model '{canonical}' is busy ({model.slots} slot(s) in use, {model.busy - model.slots} request(s) queued)", "server_error",
                    headers={"Retry-After": "1"},
                )  # fmt: skip
            model.busy += 1
            model.last_used = self.clock()
            return model

    def acquire(self, name: str) -> Loaded:
        """The loaded model, loading it (and making room) if needed; counts the request as busy.

        Blocking, for the models named on the command line (the operator may name a registered
        model by its file); requests from clients go through ``acquire_async``."""
        try:
            canonical = str(self.store.resolve(name).name)
        except LlmctlError as exc:
            raise ApiError(400, exc.message, param="model") from None
        return self._claim(canonical) or self._load(canonical)

    async def acquire_async(self, name: str) -> Loaded:
        """``acquire`` for the event loop: waiting for the store or for a load holds no shared thread."""
        loop = asyncio.get_running_loop()
        # A name already answered for a loaded model is a dict look-up under the index's stamp (one
        # stat): no thread hop on every request. Anything else is resolved on a control thread.
        stamp = self.store.index_stamp()
        with self._guard:
            known = self._names.get(name) if stamp == self._names_stamp else None
        if known is not None:
            canonical = known
        else:
            canonical, stamp = await loop.run_in_executor(self.control, self._canonical, name)
        model = self._claim(canonical)
        if model is not None:
            self._remember(name, canonical, stamp)
            return model
        with self._guard:
            waiting = self._waiting_loads.get(canonical, 0)
            if waiting > self.settings.max_queue:
                raise ApiError(503, f"model '{canonical}' is loading ({waiting} requests waiting)", "server_error", headers={"Retry-After": "2"})
            self._waiting_loads[canonical] = waiting + 1
        future = self._loading.submit(self._load, canonical)
        try:
            model = await asyncio.wrap_future(future)  # cancelling this cancels the load if it has not begun
            self._remember(name, canonical, stamp)
            return model
        except asyncio.CancelledError:
            # If it had begun, the request is counted on the model when it ends: give that back.
            future.add_done_callback(self._release_abandoned)
            raise
        finally:
            with self._guard:
                self._waiting_loads[canonical] -= 1
                if not self._waiting_loads[canonical]:
                    del self._waiting_loads[canonical]

    def _release_abandoned(self, future: Future[Loaded]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.release(future.result())

    def _load(self, canonical: str) -> Loaded:
        with self._load_lock:
            model = self._claim(canonical)  # loaded meanwhile by a request that came first
            if model is not None:
                return model
            try:
                memory, planned = self.loader.plan(canonical)
            except LlmctlError as exc:
                raise ApiError(500, f"model '{canonical}' cannot be loaded: {exc.message}", "server_error") from None
            with self._guard:
                ended = [(m, f"its llama-server {m.child.state()}") for m in self.models.values() if not m.alive]
                for model, _why in ended:
                    self._forget(model)
                victims = self._make_room(memory)
            self._stop(ended + victims)
            try:
                child = self.loader.load(planned)
            except LlmctlError as exc:
                log.error(f"{canonical} failed to load: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
                from llmctl.engine.rpc import RpcError

                if isinstance(exc, RpcError):  # a worker down or busy: worth retrying, unlike a bad file
                    raise ApiError(503, f"model '{canonical}' cannot load: {exc.message}", "server_error", headers={"Retry-After": "5"}) from None
                raise ApiError(500, f"model '{canonical}' failed to load: {exc.message}", "server_error") from None
            except Exception as exc:  # noqa: BLE001 - one bad file must not take the server down
                raise ApiError(500, f"model '{canonical}' failed to load: {type(exc).__name__}: {exc}", "server_error") from None
            log.info(f"loaded {canonical} ({child.spec.slots} slot(s) of {child.spec.n_ctx} tokens, pid {child.pid}, log {child.log_path})")
            now = self.clock()
            with self._guard:
                model = Loaded(canonical, child, memory, now, now, busy=1)
                self.models[canonical] = model
                return model

    def release(self, model: Loaded) -> None:
        with self._guard:
            model.busy -= 1
            model.last_used = self.clock()

    # --- children that end ---------------------------------------------------------------

    def check_children(self) -> None:
        """Log, once, each child that has ended; the next request for its model starts it again."""
        with self._guard:
            ended = [m for m in self.models.values() if not m.reported and not m.alive]
            for model in ended:
                model.reported = True
        for model in ended:
            log.warning(f"{model.name}: llama-server {model.child.state()}; it starts again on the next request (log {model.child.log_path})")

    # --- unloading -----------------------------------------------------------------------

    def _make_room(self, memory: int) -> list[tuple[Loaded, str]]:
        """Take idle models out, least recently used first, until one more model of ``memory`` bytes
        fits both ``--max-loaded`` and the memory budget (per the planner's estimates); returns them
        and why, to be stopped once the guard is let go."""
        budget = self._memory_budget()
        victims = []
        while self.models and (len(self.models) + 1 > self.settings.max_loaded or sum(m.memory for m in self.models.values()) + memory > budget):
            idle = [m for m in self.models.values() if m.busy == 0]
            if not idle:
                raise ApiError(503, "every loaded model is busy; try again shortly", "server_error", headers={"Retry-After": "2"})
            victim = min(idle, key=lambda m: m.last_used)
            victims.append((victim, "making room" if len(self.models) >= self.settings.max_loaded else "making room in memory"))
            self._forget(victim)
        return victims

    def _forget(self, model: Loaded) -> None:
        """Out of the pool (under the guard); its child is stopped by ``_stop``."""
        if self.models.get(model.name) is model:
            del self.models[model.name]
        for client_name in [k for k, v in self._names.items() if v == model.name]:
            del self._names[client_name]

    def _stop(self, models: list[tuple[Loaded, str]]) -> None:
        for model, why in models:
            model.child.stop()
            log.info(f"unloaded {model.name} ({why})")

    def unload(self, name: str) -> bool:
        """Unload a loaded model by its name (or another name of it); refuse while it has requests in flight."""
        try:
            canonical = self.canonical(name) if name else ""
        except ApiError:
            return False
        with self._guard:
            model = self.models.get(canonical)
            if model is None:
                return False
            if model.busy and model.alive:
                raise ApiError(409, f"model '{model.name}' is busy ({model.busy} request(s)); try again when it is idle", "invalid_request_error", "model")
            self._forget(model)
        self._stop([(model, "stopped")])
        return True

    def expire(self) -> None:
        """Unload the idle models whose keep-alive has run out."""
        self._stop(self.take_expired())

    def take_expired(self) -> list[tuple[Loaded, str]]:
        """Take out the idle models whose keep-alive has run out (quick: the event loop calls it);
        their children are then stopped with ``stop_taken``, off the loop."""
        now = self.clock()
        with self._guard:
            expired = []
            for model in list(self.models.values()):
                expiry = model.expires_at(self.settings.keep_alive)
                if model.busy == 0 and expiry is not None and now >= expiry:
                    self._forget(model)
                    expired.append((model, "keep-alive expired"))
        return expired

    def stop_taken(self, models: list[tuple[Loaded, str]]) -> None:
        self._stop(models)

    def close(self) -> None:
        """Stop every child (SIGTERM together, then each waited for) and the pool's threads."""
        with self._guard:
            models = list(self.models.values())
            self.models.clear()
        for model in models:
            model.child.terminate()  # all at once: each takes a moment to end
        self._stop([(model, "the server is stopping") for model in models])
        self.loader.close()
        for executor in (self.control, self._loading):
            executor.shutdown(wait=False, cancel_futures=True)

    def ps(self) -> list[dict[str, Any]]:
        """The loaded models, as ``GET /api/ps`` answers (docs/json.md)."""
        now = self.clock()
        with self._guard:
            return [_ps_record(m, self.settings.keep_alive, now) for m in self.models.values()]


def _ps_record(model: Loaded, keep_alive: float, now: float) -> dict[str, Any]:
    expiry = model.expires_at(keep_alive)
    spec = model.child.spec
    return {
        "name": model.name,
        "memory_bytes": model.memory,
        "n_ctx": spec.n_ctx,
        "n_gpu_layers": spec.n_gpu_layers,
        "slots": spec.slots,
        "busy": model.busy,
        "state": model.child.state(),
        "pid": model.child.pid,
        "log": str(model.child.log_path),
        "loaded_s_ago": round(now - model.loaded_at, 1),
        "expires_in_s": None if expiry is None else round(max(expiry - now, 0), 1),
    }
