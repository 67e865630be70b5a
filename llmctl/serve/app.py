"""An OpenAI-compatible local server over the model store.

Why not llama-cpp-python's own server: it serves one model at a time (its
proxy swaps models per request), and has no keep-alive expiry, no LRU of
several loaded models within a memory budget, no per-model bounded queue
answering 503 + Retry-After, and no model listing from llmctl's store. So the
HTTP layer is a small FastAPI app of our own, on the same stack that server
uses (FastAPI, uvicorn, SSE), and generation goes through llmctl's Engine
(the same path as ``run``), loaded with each model's fit plan.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (streaming with server-sent events, or not),
``GET /health``, and for ``llmctl ps`` / ``llmctl stop``: ``GET /api/ps``,
``POST /api/stop``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fastapi import Request  # at module level: FastAPI resolves endpoint annotations from here

from llmctl.config import debug_enabled
from llmctl.engine.base import EngineError, Result, Timings
from llmctl.engine.llama import Engine, grammar_for
from llmctl.engine.sampling import SamplingSettings, SettingError, from_request
from llmctl.errors import AmbiguousNameError, LlmctlError, NotFoundError, UsageError
from llmctl.output import safe

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 64  # real requests (messages, JSON schemas) nest a dozen levels at most
MAX_MODEL_NAME = 256
CONTROL_THREADS = 4  # store look-ups, listings, unloads: never shared with generation or loading


@dataclass
class ServerSettings:
    keep_alive: float = 300.0  # seconds a model stays loaded after its last request; < 0: for ever
    max_loaded: int = 2
    max_queue: int = 8  # requests waiting per model before 503
    ctx: int | None = None
    api_key: str | None = None


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


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class PlannedLoader:
    """How the pool loads a model: its fit plan (whose estimate the memory budget uses), then the engine.

    A field of the pool, so tests load fake engines in its place.
    """

    def __init__(self, store: Any, ctx: int | None) -> None:
        self.store, self.ctx = store, ctx

    def plan(self, name: str) -> tuple[int, Any]:
        """The memory the model will take, and what ``load`` needs."""
        from llmctl.engine.runner import plan_model
        from llmctl.plan.fit import Overrides

        planned = plan_model(self.store, name, Overrides(n_ctx=self.ctx))
        return planned.plan.chosen.estimate.total, planned

    def load(self, planned: Any) -> Engine:
        from llmctl.engine.runner import load_planned

        return load_planned(self.store, planned).engine


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def looks_like_path(name: str) -> bool:
    """A name a client gives that could only mean a place on this machine's disk.

    The server serves models of the store by name; such names are answered as
    unknown before the store (which would look at the disk) sees them.
    """
    return name.startswith(("/", "~", ".", "\\")) or "\\" in name or bool(_DRIVE.match(name)) or ".." in name.split("/") or not name.isprintable()


class ModelPool:
    """Loaded models: on demand, kept for keep-alive, least-recently-used out when full."""

    def __init__(self, store: Any, settings: ServerSettings, loader: Any = None) -> None:
        self.store = store
        self.settings = settings
        self.loader = loader or PlannedLoader(store, settings.ctx)
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

    def _claim(self, canonical: str) -> Loaded | None:
        """Count a request on the loaded model (None if it is not loaded); 503 past the queue."""
        with self._guard:
            model = self.models.get(canonical)
            if model is not None:
                if model.busy > self.settings.max_queue:
                    raise ApiError(503, f"model '{canonical}' is busy ({model.busy} requests queued)", "server_error", headers={"Retry-After": "1"})
                model.busy += 1
                model.last_used = time.monotonic()
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
            future.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or self.release(f.result()))
            raise
        finally:
            with self._guard:
                self._waiting_loads[canonical] -= 1
                if not self._waiting_loads[canonical]:
                    del self._waiting_loads[canonical]

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
            now = time.monotonic()
            with self._guard:
                model = Loaded(canonical, engine, memory, now, now, busy=1)
                self.models[canonical] = model
                return model

    def submit(self, model: Loaded, work: Callable[[], Any]) -> Future:
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
            model.last_used = time.monotonic()

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
            log(f"unloaded {name} ({why})")

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
        now = time.monotonic()
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
        now = time.monotonic()
        with self._guard:
            return [
                {
                    "name": m.name,
                    "memory_bytes": m.memory,
                    "n_ctx": m.engine.n_ctx,
                    "n_gpu_layers": m.engine.config.n_gpu_layers,
                    "busy": m.busy,
                    "loaded_s_ago": round(now - m.loaded_at, 1),
                    "expires_in_s": None if m.expires_at(self.settings.keep_alive) is None else round(max(m.expires_at(self.settings.keep_alive) - now, 0), 1),
                }
                for m in self.models.values()
            ]


def log(message: str) -> None:
    """One line on the server's log; control, bidi and line-breaking characters from clients are escaped."""
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {safe(message)}\n")
    sys.stderr.flush()


# --- requests ----------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object, nested at most MAX_JSON_DEPTH deep, whose strings are all valid
    Unicode (JSON's "\\ud800" decodes to a lone surrogate no encoder accepts)."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:  # also bytes that are not UTF-8
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ApiError(400, "the JSON body holds an unpaired UTF-16 surrogate (such as \\ud800), which is not text") from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return body


def sampling_from(body: dict[str, Any]) -> SamplingSettings:
    """The request's sampling settings (llmctl/engine/sampling.py checks them); errors name the API's fields."""
    try:
        return from_request(body)
    except SettingError as exc:
        raise ApiError(400, exc.message + (f" ({exc.hint})" if exc.hint else ""), param=exc.setting) from None


def response_format_from(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "'response_format.type' must be text, json_object or json_schema", param="response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format.json_schema' must be an object with a 'schema' object", param="response_format")
        result = {"type": "json_object", "schema": schema}
    else:
        result = {"type": "json_object", **({"schema": fmt["schema"]} if isinstance(fmt.get("schema"), dict) else {})}
    return result


def grammar_from(body: dict[str, Any]) -> Any:
    """The request's response_format as a ready llama.cpp grammar (None for plain text): built once, here,
    so that a bad schema is a 400 before anything queues or loads, and the worker reuses it."""
    try:
        return grammar_for(response_format_from(body))
    except LlmctlError as exc:
        raise ApiError(400, exc.message, param="response_format") from None


def messages_from(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{index}] needs a role of system, user or assistant", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, dict):
                    raise ApiError(400, f"messages[{index}].content[{part_index}] must be an object", param="messages")
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{index}].content[{part_index}].text must be a string", param="messages")
                    texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
    return out


def prompt_from(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string", param="prompt")
    return prompt


@dataclass
class Job:
    """One completion request, checked whole before it queues or loads anything."""

    kind: str  # "chat" or "text"
    model: str
    sampling: SamplingSettings
    grammar: Any  # from the response_format, built once when the request is checked; None: plain text
    messages: list[dict[str, str]] | None
    prompt: str | None
    stream: bool
    include_usage: bool


def job_from(kind: str, body: dict[str, Any]) -> Job:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required", param="model")
    if len(name) > MAX_MODEL_NAME:
        raise ApiError(400, f"'model' is longer than {MAX_MODEL_NAME} characters", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", param="stream_options")
    return Job(
        kind,
        name,
        sampling_from(body),
        grammar_from(body),
        messages_from(body) if kind == "chat" else None,
        prompt_from(body) if kind == "text" else None,
        bool(stream),
        bool(include_usage),
    )


def generate(engine: Engine, job: Job) -> Iterator[str | Result]:
    if job.kind == "chat":
        assert job.messages is not None
        return engine.chat(job.messages, job.sampling, grammar=job.grammar)
    assert job.prompt is not None
    return engine.complete(job.prompt, job.sampling, grammar=job.grammar)


def context_error(exc: Exception) -> ApiError | None:
    """llama.cpp's "Requested tokens (N) exceed context window of M" as the client's fault (400)."""
    text = str(getattr(exc, "message", exc))
    if "context window" in text.lower() or "n_ctx" in text.lower():
        return ApiError(400, f"the prompt does not fit the model's context: {text}", param="messages")
    return None


# --- the app -----------------------------------------------------------------------------


def create_app(pool: ModelPool) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = pool.settings.api_key

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        supplied = request.headers.get("authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(supplied, f"Bearer {api_key}".encode())

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        path = request.url.path
        if path != "/health" and not authorized(request):
            response = _error(ApiError(401, "invalid or missing API key", "authentication_error"))
        elif (length := request.headers.get("content-length")) and length.isdigit() and int(length) > MAX_BODY_BYTES:
            response = _error(ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes"))
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 in OpenAI's format, logged on one line
                log(f"{request.method} {path[:200]} internal error: {type(exc).__name__}: {exc}")
                if debug_enabled():
                    import traceback

                    sys.stderr.write(traceback.format_exc())
                response = _error(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))
        # Completions log their own line (model, tokens, timings) when they succeed.
        if path not in ("/v1/chat/completions", "/v1/completions") or response.status_code != 200:
            log(f"{request.method} {path[:200]} {response.status_code} {time.perf_counter() - started:.3f}s")
        return response

    def _error(error: ApiError) -> Any:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Any:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Any:  # unknown routes, wrong methods
        return _error(ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not authorized(request):  # names of loaded models only for those holding the key
            return {"status": "ok"}
        return {"status": "ok", "loaded": [m["name"] for m in pool.ps()]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = await asyncio.get_running_loop().run_in_executor(pool.control, pool.names)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "llmctl"} for n in names]}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        return {"models": pool.ps(), "keep_alive_s": pool.settings.keep_alive, "max_loaded": pool.settings.max_loaded}

    @app.post("/api/stop")
    async def stop(request: Request) -> Any:
        body = await _json_body(request)
        name = body.get("model")
        if not isinstance(name, str) or len(name) > MAX_MODEL_NAME:
            raise ApiError(400, f"'model' must be a string of at most {MAX_MODEL_NAME} characters", param="model")
        if not await asyncio.get_running_loop().run_in_executor(pool.control, pool.unload, name):
            raise ApiError(404, f"model '{name}' is not loaded", param="model")
        return {"stopped": name}

    async def _json_body(request: Request) -> dict[str, Any]:
        raw = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked upload has no Content-Length
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        return parse_json(bytes(raw))

    async def completion(request: Request, kind: str) -> Any:
        job = job_from(kind, await _json_body(request))  # all checked before queueing or loading
        # A client that leaves while its model loads gives its place back (the load itself goes on).
        model = await _unless_client_leaves(request, pool.acquire_async(job.model))
        started = time.perf_counter()
        if job.stream:
            return StreamingResponse(
                _stream(request, pool, model, job, started), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )  # generation is queued now and releases the model itself, even if the client never reads
        cancelled = threading.Event()
        future = pool.submit(model, lambda: _generate_now(model, job, None, cancelled))

        def stop() -> None:
            cancelled.set()  # a running generation stops at its next token
            future.cancel()  # one still waiting for its turn never starts, and frees its place now

        try:
            result = await _unless_client_leaves(request, asyncio.wrap_future(future), on_leave=stop)
        except asyncio.CancelledError:
            stop()
            raise
        _log_request(job.kind, model.name, result, started, 200)
        return _full_response(job.kind, model.name, result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await completion(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await completion(request, "text")

    return app


async def _client_left(request: Any) -> None:
    """Returns when the client has closed its connection.

    Only once the body has been read: from then on the server's ``receive``
    has nothing else to give. Neither uvicorn nor Starlette cancels a request
    whose client leaves before its answer begins, so a non-streaming request
    has to watch for it itself.
    """
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # nothing else should come; never spin if it does


async def _unless_client_leaves(request: Any, awaitable: Any, on_leave: Callable[[], None] | None = None) -> Any:
    """``await awaitable``, unless the client leaves first: then it is cancelled, ``on_leave`` runs,
    and the answer is 499 (the client closed the request), which only the log sees."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()  # stop receiving before anything else (a stream) listens for the client
        await asyncio.gather(watcher, return_exceptions=True)
    if task.done():
        return task.result()
    task.cancel()
    if on_leave is not None:
        on_leave()
    raise ApiError(499, "the client closed the connection before the answer", "client_closed")


def _generate_now(model: Loaded, job: Job, sink: Callable[[str], bool] | None, cancelled: threading.Event) -> Result:
    """Generate on the model's thread (so one request at a time per model); feed pieces to ``sink``.

    Every failure becomes an ApiError: the model's thread and busy count come back whatever happens.
    """
    if cancelled.is_set():  # the client left while waiting for its turn
        return Result("", "cancelled", Timings())
    result = None
    try:
        stream = generate(model.engine, job)
        for piece in stream:
            if isinstance(piece, Result):
                result = piece
            elif cancelled.is_set() or (sink is not None and not sink(piece)):
                stream.close()  # the client went away: stop generating
                return Result("", "cancelled", getattr(model.engine, "last_timings", None) or Timings())
    except ApiError:
        raise
    except EngineError as exc:
        raise context_error(exc) or ApiError(500, exc.message, "server_error") from None
    except Exception as exc:  # noqa: BLE001 - reported to the client; the server lives on
        raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from None
    if result is None:
        raise ApiError(500, "generation ended without a result", "server_error")
    return result


def _log_request(kind: str, name: str, result: Result, started: float, status: int) -> None:
    t = result.timings
    log(f"POST /v1/{'chat/' if kind == 'chat' else ''}completions model={name} in={t.prompt_tokens} out={t.generated_tokens} "
        f"ttft={t.ttft_s:.3f}s total={time.perf_counter() - started:.3f}s {status} {result.finish_reason}")  # fmt: skip


def _full_response(kind: str, name: str, result: Result) -> dict[str, Any]:
    t = result.timings
    usage = {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens, "total_tokens": t.prompt_tokens + t.generated_tokens}
    base = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name, "usage": usage}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason, "logprobs": None}
        return {**base, "object": "chat.completion", "choices": [choice]}
    return {**base, "object": "text_completion", "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}]}


class _Handoff:
    """Pieces from the generation thread to the event loop, waking the loop only when it waits.

    A wake-up per token (call_soon_threadsafe) costs a syscall and a loop turn
    that compete with llama.cpp for the CPU; here the loop sleeps a few
    milliseconds between events and takes whatever arrived meanwhile.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.waiter: asyncio.Future | None = None

    def put(self, item: tuple[str, Any]) -> None:
        with self.lock:
            self.items.append(item)
            waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    async def take(self, timeout: float) -> list[tuple[str, Any]]:
        with self.lock:
            if not self.items:
                self.waiter = self.loop.create_future()
            waiter = self.waiter
        if waiter is not None:
            try:
                await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:
                pass
        with self.lock:
            self.waiter = None
            items, self.items = self.items, []
        return items


PACE_S = 0.02  # between stream events: at most ~50 events/s (smooth to the eye), tokens beyond that share an event


def _stream(request: Any, pool: ModelPool, model: Loaded, job: Job, started: float) -> Any:
    """Queue the generation on the model's thread now; return the async generator of SSE events that relays it."""
    handoff = _Handoff(asyncio.get_running_loop())
    cancelled = threading.Event()
    ident = f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def sink(piece: str) -> bool:
        handoff.put(("piece", piece))
        return not cancelled.is_set()

    def worker() -> None:
        try:
            handoff.put(("done", _generate_now(model, job, sink, cancelled)))
        except ApiError as exc:
            handoff.put(("error", exc))
        except Exception as exc:  # noqa: BLE001 - reported to the client as a stream error
            handoff.put(("error", ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")))

    def chunk(delta: dict[str, Any] | None, text: str | None, finish: str | None, usage: dict[str, int] | None = None) -> str:
        if usage is not None:  # the last event, as OpenAI sends it: no choices, the completion's own id
            kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
            data = {"id": ident, "object": kind, "created": created, "model": model.name, "choices": [], "usage": usage}
            return f"data: {json.dumps(data)}\n\n"
        if job.kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model.name, "choices": [choice]}
        else:
            data = {"id": ident, "object": "text_completion", "created": created, "model": model.name,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"

    future = pool.submit(model, worker)
    return _relay(request, model, job, handoff, cancelled, future, chunk, started)


async def _relay(request: Any, model: Loaded, job: Job, handoff: _Handoff, cancelled: threading.Event, future: Future, chunk: Any, started: float) -> Any:
    """The SSE events of one stream. It always ends with ``data: [DONE]``, after an error event if
    generation failed, unless the client went away."""
    status = 200
    try:
        if job.kind == "chat":
            yield chunk({"role": "assistant", "content": ""}, None, None)
        finished = False
        while not finished:
            items = await handoff.take(0.5)
            if not items and await request.is_disconnected():
                status = 499
                break
            text = "".join(value for what, value in items if what == "piece")
            if text:
                yield chunk({"content": text}, text, None)
            for what, value in items:
                if what == "done":
                    yield chunk({}, "", value.finish_reason)
                    if job.include_usage:
                        t = value.timings
                        usage = {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens,
                                 "total_tokens": t.prompt_tokens + t.generated_tokens}  # fmt: skip
                        yield chunk(None, None, None, usage)
                    yield "data: [DONE]\n\n"
                    _log_request(job.kind, model.name, value, started, 200)
                    finished = True
                elif what == "error":
                    status = value.status
                    yield f"data: {json.dumps(value.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    log(f"POST stream model={model.name} {status}: {value.message}")
                    finished = True
            if text and not finished:
                await asyncio.sleep(PACE_S)
    finally:
        cancelled.set()
        if status == 499:
            log(f"POST stream model={model.name} {status} (client went away)")
        if not future.cancel():  # still waiting for its turn: it never starts
            # Wait for the generation to notice, holding no thread meanwhile.
            await asyncio.wrap_future(future)


async def reaper(pool: ModelPool) -> None:
    while True:
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(pool.control, pool.expire)


def run_server(pool: ModelPool, host: str, port: int, preload: list[str]) -> None:
    """Check the port, load the named models, then serve until Ctrl-C / SIGTERM."""
    import socket

    import uvicorn

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise LlmctlError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="choose another --port, or stop what uses it") from None
    for name in preload:
        try:
            model = pool.acquire(name)
        except ApiError as exc:
            raise LlmctlError(f"cannot serve '{name}': {exc.message}") from None
        pool.release(model)
        log(f"loaded {model.name}")
    app = create_app(pool)

    @app.on_event("startup")
    async def _start() -> None:
        asyncio.get_running_loop().create_task(reaper(pool))

    @app.on_event("shutdown")
    async def _stop() -> None:
        log("shutting down: in-flight requests were given 5 s to finish")

    log(f"serving on http://{host}:{port}/v1 (models: {', '.join(pool.names()) or 'none yet'})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    except SystemExit as exc:  # uvicorn exits on start-up failures it has already logged
        if exc.code not in (0, None):
            raise LlmctlError(f"the server could not start on {host}:{port}") from None
    finally:
        pool.close()
