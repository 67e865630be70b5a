"""An OpenAI-compatible local server over the model store: the HTTP front (routes, the API key,
body limits, one log line per request) and the streaming of answers.

Why not llama-cpp-python's own server: it serves one model at a time (its
proxy swaps models per request), and has no keep-alive expiry, no LRU of
several loaded models within a memory budget, no per-model bounded queue
answering 503 + Retry-After, and no model listing from llmctl's store. So the
HTTP layer is a small FastAPI app of our own, on the same stack that server
uses (FastAPI, uvicorn, SSE), and generation goes through llmctl's Engine
(the same path as ``run``), loaded with each model's fit plan.

The rooms: ``api`` checks requests and shapes answers, ``pool`` holds the loaded models, this
module joins them to HTTP. It logs to the "llmctl.serve.app" logger; ``llmctl serve`` writes
the "llmctl.serve" loggers to stderr.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (streaming with server-sent events, or not),
``GET /health``, and for ``llmctl ps`` / ``llmctl stop``: ``GET /api/ps``,
``POST /api/stop``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from fastapi import Request  # at module level: FastAPI resolves endpoint annotations from here

from llmctl.config import debug_enabled
from llmctl.engine.base import EngineError, Result, Timings
from llmctl.errors import LlmctlError
from llmctl.serve.api import DONE, MAX_MODEL_NAME, ApiError, Chunks, Job, context_error, event, full_response, job_from, parse_json
from llmctl.serve.pool import Loaded, ModelPool

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024


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
                log.error(f"{request.method} {path[:200]} internal error: {type(exc).__name__}: {exc}", exc_info=debug_enabled())
                response = _error(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))
        # Completions log their own line (model, tokens, timings) when they succeed.
        if path not in ("/v1/chat/completions", "/v1/completions") or response.status_code != 200:
            log.info(f"{request.method} {path[:200]} {response.status_code} {time.perf_counter() - started:.3f}s")
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
        return full_response(job.kind, model.name, result)

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
        stream = job.generate(model.engine)
        for piece in stream:
            if isinstance(piece, Result):
                result = piece
            elif cancelled.is_set() or (sink is not None and not sink(piece)):
                _close(stream)  # the client went away: stop generating
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


def _close(stream: Any) -> None:
    """Stop a generation midway: closing its generator ends llama.cpp's loop (and records its timings)."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _log_request(kind: str, name: str, result: Result, started: float, status: int) -> None:
    t = result.timings
    log.info(f"POST /v1/{'chat/' if kind == 'chat' else ''}completions model={name} in={t.prompt_tokens} out={t.generated_tokens} "
             f"ttft={t.ttft_s:.3f}s total={time.perf_counter() - started:.3f}s {status} {result.finish_reason}")  # fmt: skip


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
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: tuple[str, Any]) -> None:
        with self.lock:
            self.items.append(item)
            waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.loop.call_soon_threadsafe(_wake, waiter)

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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


PACE_S = 0.02  # between stream events: at most ~50 events/s (smooth to the eye), tokens beyond that share an event


def _stream(request: Any, pool: ModelPool, model: Loaded, job: Job, started: float) -> Any:
    """Queue the generation on the model's thread now; return the async generator of SSE events that relays it."""
    handoff = _Handoff(asyncio.get_running_loop())
    cancelled = threading.Event()

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

    future = pool.submit(model, worker)
    return _relay(request, model, job, handoff, cancelled, future, started)


async def _relay(
    request: Any, model: Loaded, job: Job, handoff: _Handoff, cancelled: threading.Event, future: Future[None], started: float
) -> AsyncIterator[str]:
    """The SSE events of one stream. It always ends with ``data: [DONE]``, after an error event if
    generation failed, unless the client went away."""
    status = 200
    chunks = Chunks(job.kind, model.name)
    try:
        if job.kind == "chat":
            yield chunks.delta({"role": "assistant", "content": ""}, None, None)
        finished = False
        while not finished:
            items = await handoff.take(0.5)
            if not items and await request.is_disconnected():
                status = 499
                break
            text = "".join(value for what, value in items if what == "piece")
            if text:
                yield chunks.delta({"content": text}, text, None)
            for what, value in items:
                if what == "done":
                    yield chunks.delta({}, "", value.finish_reason)
                    if job.include_usage:
                        yield chunks.usage(value.timings)
                    yield DONE
                    _log_request(job.kind, model.name, value, started, 200)
                    finished = True
                elif what == "error":
                    status = value.status
                    yield event(value.body())
                    yield DONE
                    log.info(f"POST stream model={model.name} {status}: {value.message}")
                    finished = True
            if text and not finished:
                await asyncio.sleep(PACE_S)
    finally:
        cancelled.set()
        if status == 499:
            log.info(f"POST stream model={model.name} {status} (client went away)")
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
        log.info(f"loaded {model.name}")
    app = create_app(pool)

    @app.on_event("startup")
    async def _start() -> None:
        asyncio.get_running_loop().create_task(reaper(pool))

    @app.on_event("shutdown")
    async def _stop() -> None:
        log.info("shutting down: in-flight requests were given 5 s to finish")

    log.info(f"serving on http://{host}:{port}/v1 (models: {', '.join(pool.names()) or 'none yet'})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    except SystemExit as exc:  # uvicorn exits on start-up failures it has already logged
        if exc.code not in (0, None):
            raise LlmctlError(f"the server could not start on {host}:{port}") from None
    finally:
        pool.close()
