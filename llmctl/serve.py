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
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from fastapi import Request  # at module level: FastAPI resolves endpoint annotations from here

from llmctl.engine import Engine, EngineError, Result, SamplingSettings, grammar_for
from llmctl.errors import LlmctlError, NotFoundError

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_TOKENS_LIMIT = 1_000_000


@dataclass
class ServerSettings:
    keep_alive: float = 300.0  # seconds a model stays loaded after its last request; < 0: for ever
    max_loaded: int = 2
    max_queue: int = 8  # requests waiting per model before 503
    ctx: int | None = None
    api_key: str | None = None


@dataclass
class Loaded:
    name: str
    engine: Engine
    memory: int
    loaded_at: float
    last_used: float
    busy: int = 0  # requests running or waiting
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expires_at(self, keep_alive: float) -> float | None:
        return None if keep_alive < 0 else self.last_used + keep_alive


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class ModelPool:
    """Loaded models: on demand, kept for keep-alive, least-recently-used out when full."""

    def __init__(self, store: Any, settings: ServerSettings) -> None:
        self.store = store
        self.settings = settings
        self.models: dict[str, Loaded] = {}
        self._guard = threading.Lock()  # the dict and load/unload decisions
        self._load_lock = threading.Lock()  # one load at a time

    def names(self) -> list[str]:
        return [row.name for row in self.store.listing() if row.status == "ok"]

    def _memory_budget(self) -> int:
        """What loaded models may use: RAM available now plus what the loaded ones hold, minus the margin."""
        from llmctl.config import get_settings
        from llmctl.fit import RAM_MARGIN
        from llmctl.hardware import get_hardware

        hw = get_hardware(get_settings())
        # A live probe's available RAM already excludes the loaded models; a profile's is what the
        # described machine has free before anything is loaded.
        held = sum(m.memory for m in self.models.values()) if hw.source == "live" else 0
        return hw.ram_available + held - RAM_MARGIN

    def acquire(self, name: str) -> Loaded:
        """The loaded model, loading it (and making room) if needed; counts the request as busy."""
        try:
            resolved = self.store.resolve(name)
            if resolved.kind == "path":  # a client may name models, not files on this machine
                raise NotFoundError(name)
            canonical = resolved.name
        except NotFoundError:
            raise ApiError(404, f"model '{name}' not found; available: {', '.join(self.names()) or '(none)'}", "invalid_request_error", "model") from None
        except LlmctlError as exc:
            raise ApiError(400, exc.message, param="model") from None
        with self._guard:
            model = self.models.get(canonical)
            if model is not None:
                if model.busy > self.settings.max_queue:
                    raise ApiError(503, f"model '{canonical}' is busy ({model.busy} requests queued)", "server_error", headers={"Retry-After": "1"})
                model.busy += 1
                model.last_used = time.monotonic()
                return model
        from llmctl.fit import Overrides
        from llmctl.runner import load_planned, plan_model

        with self._load_lock:
            try:
                planned = plan_model(self.store, canonical, Overrides(n_ctx=self.settings.ctx))
            except LlmctlError as exc:
                raise ApiError(500, f"model '{canonical}' cannot be loaded: {exc.message}", "server_error") from None
            memory = planned.plan.chosen.estimate.total
            with self._guard:
                model = self.models.get(canonical)
                if model is not None:
                    model.busy += 1
                    return model
                self._make_room(memory)
            try:
                engine = load_planned(self.store, planned).engine
            except LlmctlError as exc:
                raise ApiError(500, f"model '{canonical}' failed to load: {exc.message}", "server_error") from None
            now = time.monotonic()
            with self._guard:
                model = Loaded(canonical, engine, memory, now, now, busy=1)
                self.models[canonical] = model
                return model

    def release(self, model: Loaded) -> None:
        with self._guard:
            model.busy -= 1
            model.last_used = time.monotonic()

    def _make_room(self, memory: int) -> None:
        """Unload idle models, least recently used first, until one more model of ``memory`` bytes fits
        both ``--max-loaded`` and the memory budget (per the planner's estimates)."""
        budget = self._memory_budget()
        while self.models and (
            len(self.models) + 1 > self.settings.max_loaded or sum(m.memory for m in self.models.values()) + memory > budget
        ):
            idle = [m for m in self.models.values() if m.busy == 0]
            if not idle:
                raise ApiError(503, "every loaded model is busy; try again shortly", "server_error", headers={"Retry-After": "2"})
            victim = min(idle, key=lambda m: m.last_used)
            self._unload(victim.name, "making room" if len(self.models) >= self.settings.max_loaded else "making room in memory")

    def _unload(self, name: str, why: str) -> None:
        model = self.models.pop(name, None)
        if model is not None:
            close = getattr(model.engine.llm, "close", None)
            if close is not None:
                close()  # frees llama.cpp's memory now, not at garbage collection
            log(f"unloaded {name} ({why})")

    def unload(self, name: str) -> bool:
        """Unload a loaded model by its name (or another name of it); refuse while it is generating."""
        try:
            canonical = self.store.resolve(name).name if name else ""
        except LlmctlError:
            canonical = name
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
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    sys.stderr.flush()


# --- requests ----------------------------------------------------------------------------

_SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float, "seed": int, "max_tokens": int}


def sampling_from(body: dict[str, Any]) -> SamplingSettings:
    settings = SamplingSettings()
    for key, kind in _SAMPLING.items():
        value = body.get(key)
        if key == "max_tokens" and value is None:
            value = body.get("max_completion_tokens")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
            raise ApiError(400, f"'{key}' must be a number", param=key)
        setattr(settings, key, kind(value))
    if settings.max_tokens is not None and not 1 <= settings.max_tokens <= MAX_TOKENS_LIMIT:
        raise ApiError(400, f"'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}", param="max_tokens")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        settings.stop = stop
    try:
        return settings.validate()
    except LlmctlError as exc:
        raise ApiError(400, exc.message + (f" ({exc.hint})" if exc.hint else "")) from None


def response_format_from(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "'response_format.type' must be text, json_object or json_schema", param="response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be an object", param="response_format")
        result = {"type": "json_object", "schema": schema}
    else:
        result = {"type": "json_object", **({"schema": fmt["schema"]} if isinstance(fmt.get("schema"), dict) else {})}
    try:
        grammar_for(result)
    except LlmctlError as exc:
        raise ApiError(400, exc.message, param="response_format") from None
    return result


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
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{index}].content must be a string", param="messages")
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
    return out


def generate(engine: Engine, kind: str, body: dict[str, Any]) -> Iterator[str | Result]:
    sampling = sampling_from(body)
    response_format = response_format_from(body)
    if kind == "chat":
        return engine.chat(messages_from(body), sampling, response_format=response_format)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string", param="prompt")
    return engine.complete(prompt, sampling, grammar=grammar_for(response_format))


def context_error(exc: Exception) -> ApiError | None:
    text = str(getattr(exc, "message", exc))
    if "context" in text.lower() or "exceed" in text.lower():
        return ApiError(400, f"the prompt does not fit the model's context: {text}", param="messages")
    return None


# --- the app -----------------------------------------------------------------------------


def create_app(pool: ModelPool) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = pool.settings.api_key

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        if api_key and request.url.path != "/health":
            supplied = request.headers.get("authorization", "")
            if supplied != f"Bearer {api_key}":
                return _error(ApiError(401, "invalid or missing API key", "authentication_error"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes"))
        response = await call_next(request)
        if request.url.path not in ("/v1/chat/completions", "/v1/completions"):
            log(f"{request.method} {request.url.path} {response.status_code} {time.perf_counter() - started:.3f}s")
        return response

    def _error(error: ApiError) -> Any:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Any:
        return _error(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "loaded": [m["name"] for m in pool.ps()]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = await asyncio.to_thread(pool.names)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "llmctl"} for n in names]}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        return {"models": pool.ps(), "keep_alive_s": pool.settings.keep_alive, "max_loaded": pool.settings.max_loaded}

    @app.post("/api/stop")
    async def stop(request: Request) -> Any:
        body = await _json_body(request)
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if not await asyncio.to_thread(pool.unload, name):
            raise ApiError(404, f"model '{name}' is not loaded", param="model")
        return {"stopped": name}

    async def _json_body(request: Request) -> dict[str, Any]:
        raw = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked upload has no Content-Length
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(bytes(raw) or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def completion(request: Request, kind: str) -> Any:
        body = await _json_body(request)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required", param="model")
        sampling_from(body)  # validate before queueing or loading
        response_format_from(body)
        if kind == "chat":
            messages_from(body)
        model = await asyncio.to_thread(pool.acquire, name)
        started = time.perf_counter()
        if body.get("stream"):
            return StreamingResponse(
                _stream(request, pool, model, kind, body, started), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )  # the generation thread starts now and releases the model itself, even if the client never reads
        try:
            result = await asyncio.to_thread(_run_locked, model, kind, body, None)
        finally:
            pool.release(model)
        _log_request(kind, model.name, result, started, 200)
        return _full_response(kind, model.name, result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await completion(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await completion(request, "text")

    return app


def _run_locked(model: Loaded, kind: str, body: dict[str, Any], sink: Any) -> Result:
    """Generate under the model's lock (one request at a time per model); feed pieces to ``sink``."""
    with model.lock:
        result = None
        stream = generate(model.engine, kind, body)
        try:
            for piece in stream:
                if isinstance(piece, Result):
                    result = piece
                elif sink is not None and not sink(piece):
                    stream.close()  # the client went away: stop generating
                    return Result("", "cancelled", model.engine.last_timings)
        except EngineError as exc:
            raise context_error(exc) or ApiError(500, exc.message, "server_error") from None
        assert result is not None
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


def _stream(request: Any, pool: ModelPool, model: Loaded, kind: str, body: dict[str, Any], started: float) -> Any:
    """Start generating in a thread now; return the async generator of SSE events that relays it."""
    handoff = _Handoff(asyncio.get_running_loop())
    cancelled = threading.Event()
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def sink(piece: str) -> bool:
        handoff.put(("piece", piece))
        return not cancelled.is_set()

    def worker() -> None:
        try:
            handoff.put(("done", _run_locked(model, kind, body, sink)))
        except ApiError as exc:
            handoff.put(("error", exc))
        except Exception as exc:  # noqa: BLE001 - reported to the client as a stream error
            handoff.put(("error", ApiError(500, str(exc), "server_error")))
        finally:
            pool.release(model)

    def chunk(delta: dict[str, Any] | None, text: str | None, finish: str | None) -> str:
        if kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model.name, "choices": [choice]}
        else:
            data = {"id": ident, "object": "text_completion", "created": created, "model": model.name,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    return _relay(request, model, kind, body, handoff, cancelled, thread, chunk, started)


async def _relay(request: Any, model: Loaded, kind: str, body: dict[str, Any], handoff: _Handoff, cancelled: threading.Event, thread: threading.Thread, chunk: Any, started: float) -> Any:
    status = 200
    try:
        if kind == "chat":
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
                    if (body.get("stream_options") or {}).get("include_usage"):
                        t = value.timings
                        usage = {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens,
                                 "total_tokens": t.prompt_tokens + t.generated_tokens}  # fmt: skip
                        yield f"data: {json.dumps({'id': 'usage', 'object': 'chat.completion.chunk', 'created': int(time.time()), 'model': model.name, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                    _log_request(kind, model.name, value, started, 200)
                    finished = True
                elif what == "error":
                    status = value.status
                    yield f"data: {json.dumps(value.body())}\n\n"
                    finished = True
            if text and not finished:
                await asyncio.sleep(PACE_S)
    finally:
        cancelled.set()
        await asyncio.to_thread(thread.join)
        if status != 200:
            log(f"POST stream model={model.name} {status}")


async def reaper(pool: ModelPool) -> None:
    while True:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pool.expire)


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
