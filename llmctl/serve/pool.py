"""The models a server holds: loaded on demand, kept for keep-alive, unloaded least recently used
first within ``--max-loaded`` and the memory budget, each with its bounded queue.

The pool is the front's bookkeeping (as Ollama's scheduler and llama-swap are): names, loading,
keep-alive, memory budgets and queue places. What serves a loaded model is made by its
``loader`` (a field, like the clock: tests give fakes): today an in-process engine per model,
fed by one generation thread of its own; an engine in a process of its own can take its place
behind the same ``plan``/``load`` seam.

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
from typing import TYPE_CHECKING, Any, Callable, Protocol

from llmctl.errors import AmbiguousNameError, LlmctlError, NotFoundError, UsageError
from llmctl.serve.api import ApiError

if TYPE_CHECKING:
    from llmctl.engine.base import Engine
    from llmctl.models.store import Store

log = logging.getLogger(__name__)

CONTROL_THREADS = 4  # store look-ups, listings, unloads: never shared with generation or loading


@dataclass
class ServerSettings:
    keep_alive: float = 300.0  # seconds a model stays loaded after its last request; < 0: for ever
    max_loaded: int = 2
    max_queue: int = 8  # requests waiting per model before 503
    ctx: int | None = None
    api_key: str | None = None
    parallel: int | None = None  # slots per model (llama-server -np); None: the fit plan's choice


class Loader(Protocol):
    """How the pool loads a model: first its plan (the memory it will take, weighed against the
    budget before anything is unloaded), then the engine that serves it."""

    def plan(self, name: str) -> tuple[int, Any]:
        """The bytes the model will take, and what ``load`` needs."""
        ...

    def load(self, planned: Any) -> Engine: ...


class PlannedLoader:
    """The pool's loader in use: the model's fit plan (whose estimate the memory budget uses), then
    the engine ``llmctl.engine.runner`` makes from it (the same path as ``run``)."""

    def __init__(self, store: Store, ctx: int | None) -> None:
        self.store, self.ctx = store, ctx

    def plan(self, name: str) -> tuple[int, Any]:
        from llmctl.engine.runner import plan_model
        from llmctl.plan.fit import Overrides

        planned = plan_model(self.store, name, Overrides(n_ctx=self.ctx))
        return planned.plan.chosen.estimate.total, planned

    def load(self, planned: Any) -> Engine:
        from llmctl.engine.runner import LoadFeedback, load_planned

        return load_planned(self.store, planned, feedback=LoadFeedback(note=log.warning)).engine


def _generation_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmctl-generate")


@dataclass
class Loaded:
    name: str
    engine: Engine
    memory: int
    loaded_at: float
    last_used: float
    busy: int = 0  # requests running or waiting
    # One thread per model: its queue is the model's queue (one generation at a time), and a
    # request waiting for its turn holds no thread that other routes or models need.
    executor: ThreadPoolExecutor = field(default_factory=_generation_thread)

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
        self.loader: Loader = loader or PlannedLoader(store, settings.ctx)
        self.clock = clock  # when models were used, for keep-alive and least-recently-used
        self.models: dict[str, Loaded] = {}
        self._guard = threading.Lock()  # the dict, busy counts, load/unload decisions
        self._load_lock = threading.Lock()  # one load at a time
        self._waiting_loads: dict[str, int] = {}
        # Names clients used for loaded models → the store's name, valid while the index is unchanged
        # (``index_stamp``): repeated requests do not read the index; any change to it (`rm`, an
        # import) resolves afresh, so answers stay what resolving every time would give.
        self._names: dict[str, str] = {}
        self._names_stamp: Any = None
        self.control = ThreadPoolExecutor(max_workers=CONTROL_THREADS, thread_name_prefix="llmctl-control")
        self._loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmctl-load")

    def names(self) -> list[str]:
        return [row.name for row in self.store.listing() if row.status == "ok"]

    def _memory_budget(self) -> int:
        """What loaded models may use: RAM available now plus what the loaded ones hold, minus the margin."""
        from llmctl.config import get_settings
        from llmctl.plan.fit import RAM_MARGIN
        from llmctl.plan.hardware import get_hardware

        hw = get_hardware(get_settings())
        # A live probe's available RAM already excludes the loaded models; a profile's is what the
        # described machine has free before anything is loaded.
        held = sum(m.memory for m in self.models.values()) if hw.source == "live" else 0
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
        """Count a request on the loaded model (None if it is not loaded); 503 past the queue."""
        with self._guard:
            model = self.models.get(canonical)
            if model is not None:
                if model.busy > self.settings.max_queue:
                    raise ApiError(503, f"model '{canonical}' is busy ({model.busy} requests queued)", "server_error", headers={"Retry-After": "1"})
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
                self._make_room(memory)
            try:
                engine = self.loader.load(planned)
            except LlmctlError as exc:
                raise ApiError(500, f"model '{canonical}' failed to load: {exc.message}", "server_error") from None
            except Exception as exc:  # noqa: BLE001 - one bad file must not take the server down
                raise ApiError(500, f"model '{canonical}' failed to load: {type(exc).__name__}: {exc}", "server_error") from None
            now = self.clock()
            with self._guard:
                model = Loaded(canonical, engine, memory, now, now, busy=1)
                self.models[canonical] = model
                return model

    # --- a request's turn ----------------------------------------------------------------

    def submit(self, model: Loaded, work: Callable[[], Any]) -> Future[Any]:
        """Queue ``work`` on the model's own thread; the request stops counting as busy when it ends,
        however it ends (finished, failed, cancelled before its turn)."""
        try:
            future = model.executor.submit(work)
        except RuntimeError:  # unloaded meanwhile (cannot happen while busy; belt and braces)
            self.release(model)
            raise ApiError(503, f"model '{model.name}' was unloaded; try again", "server_error", headers={"Retry-After": "1"}) from None
        future.add_done_callback(lambda _: self.release(model))
        return future

    def release(self, model: Loaded) -> None:
        with self._guard:
            model.busy -= 1
            model.last_used = self.clock()

    # --- unloading -----------------------------------------------------------------------

    def _make_room(self, memory: int) -> None:
        """Unload idle models, least recently used first, until one more model of ``memory`` bytes fits
        both ``--max-loaded`` and the memory budget (per the planner's estimates)."""
        budget = self._memory_budget()
        while self.models and (len(self.models) + 1 > self.settings.max_loaded or sum(m.memory for m in self.models.values()) + memory > budget):
            idle = [m for m in self.models.values() if m.busy == 0]
            if not idle:
                raise ApiError(503, "every loaded model is busy; try again shortly", "server_error", headers={"Retry-After": "2"})
            victim = min(idle, key=lambda m: m.last_used)
            self._unload(victim.name, "making room" if len(self.models) >= self.settings.max_loaded else "making room in memory")

    def _unload(self, name: str, why: str) -> None:
        model = self.models.pop(name, None)
        for client_name in [k for k, v in self._names.items() if v == name]:
            del self._names[client_name]
        if model is not None:
            model.executor.shutdown(wait=False)  # idle: its thread ends at once
            # frees llama.cpp's memory (and the engine's helpers) now, not at garbage collection
            close = getattr(model.engine, "close", None) or getattr(model.engine.llm, "close", None)
            if close is not None:
                close()
            log.info(f"unloaded {name} ({why})")

    def unload(self, name: str) -> bool:
        """Unload a loaded model by its name (or another name of it); refuse while it is generating."""
        try:
            canonical = self.canonical(name) if name else ""
        except ApiError:
            return False
        with self._guard:
            model = self.models.get(canonical)
            if model is None:
                return False
            if model.busy:
                # llama.cpp's memory cannot be freed under a running generation.
                raise ApiError(409, f"model '{model.name}' is busy ({model.busy} request(s)); try again when it is idle", "invalid_request_error", "model")
            self._unload(model.name, "stopped")
            return True

    def expire(self) -> None:
        """Unload the idle models whose keep-alive has run out."""
        now = self.clock()
        with self._guard:
            for model in list(self.models.values()):
                expiry = model.expires_at(self.settings.keep_alive)
                if model.busy == 0 and expiry is not None and now >= expiry:
                    self._unload(model.name, "keep-alive expired")

    def close(self) -> None:
        """Stop the pool's threads (queued work is dropped; running work finishes)."""
        for executor in [self.control, self._loading, *(m.executor for m in self.models.values())]:
            executor.shutdown(wait=False, cancel_futures=True)

    def ps(self) -> list[dict[str, Any]]:
        """The loaded models, as ``GET /api/ps`` answers (docs/json.md)."""
        now = self.clock()
        with self._guard:
            return [_ps_record(m, self.settings.keep_alive, now) for m in self.models.values()]


def _ps_record(model: Loaded, keep_alive: float, now: float) -> dict[str, Any]:
    expiry = model.expires_at(keep_alive)
    return {
        "name": model.name,
        "memory_bytes": model.memory,
        "n_ctx": model.engine.n_ctx,
        "n_gpu_layers": model.engine.config.n_gpu_layers,
        "busy": model.busy,
        "loaded_s_ago": round(now - model.loaded_at, 1),
        "expires_in_s": None if expiry is None else round(max(expiry - now, 0), 1),
    }
