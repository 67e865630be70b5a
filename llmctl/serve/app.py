"""serve's HTTP front: the API key, body limits, model names and one log line per request; every
generation, embedding and rerank is passed to the model's ``llama-server`` child and its answer
relayed as it comes.

What the front owns it checks and refuses in OpenAI's error format (``api.py``): the key on every
route, the body's size and JSON, the model's name (404 for anything but a model of the store), a
full queue (503 + Retry-After). The request body then goes to the child as it came (answers carry
llmctl's name for the model: the child is started with it as its alias), and the child's status
code and body come back unchanged, streams event by event (``upstream.py``). A child that dies mid-answer ends a
stream with an error event (and ``data: [DONE]``), or answers 502; the next request starts it again.

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/rerank``,
``/v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic), passed through; ``GET /v1/models``
and ``/v1/models/{id}`` from the store; ``GET /health``; for ``llmctl ps`` / ``llmctl stop``:
``GET /api/ps``, ``POST /api/stop``. It logs to the "llmctl.serve.app" logger; ``llmctl serve``
writes the "llmctl.serve" loggers to stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import Request  # at module level: FastAPI resolves endpoint annotations from here
from starlette.responses import StreamingResponse

from llmctl.config import debug_enabled
from llmctl.errors import LlmctlError
from llmctl.serve.api import MAX_MODEL_NAME, ApiError, check_stop, media_parts, model_name, parse_json, stream_error
from llmctl.serve.pool import Loaded, ModelPool
from llmctl.serve.upstream import FAILURES, post

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024  # a few images, base64-encoded, in one chat request
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/messages", "/v1/messages/count_tokens")
USAGE_WINDOW = 4096  # the end of an answer, where its usage and timings are


class Guard:
    """Outermost checks and the log line, as plain ASGI (no per-chunk cost on streams): the API key
    (``Authorization: Bearer KEY``, or Anthropic's ``x-api-key: KEY``) on every route but
    ``/health``, the declared body size, an error in OpenAI's format for any failure, and one line
    per request with what the handler noted (model, tokens, time to first token)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.keys = [f"Bearer {api_key}".encode(), api_key.encode()] if api_key else []

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        if not self.keys:
            return True
        bearer, plain = self.keys
        return hmac.compare_digest(headers.get(b"authorization", b""), bearer) or hmac.compare_digest(headers.get(b"x-api-key", b""), plain)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        state = scope.setdefault("state", {})
        status = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = headers.get(b"content-length", b"")
        if scope["path"] != "/health" and not self.authorized(headers):
            await _send_error(sending, ApiError(401, "invalid or missing API key", "authentication_error"))
        elif length.isdigit() and int(length) > MAX_BODY_BYTES:
            await _send_error(sending, ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes"))
        else:
            try:
                await self.app(scope, receive, sending)
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 in OpenAI's format, logged on one line
                log.error(f"{scope['method']} {scope['path'][:200]} internal error: {type(exc).__name__}: {exc}", exc_info=debug_enabled())
                if not status[0]:
                    await _send_error(sending, ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))
        note = state.get("log")
        shown = state.get("status") or status[0]
        log.info(f"{scope['method']} {scope['path'][:200]} {shown} {time.perf_counter() - started:.3f}s" + (f" {note}" if note else ""))


async def _send_error(send: Any, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(pool: ModelPool) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        reaping = loop.create_task(reaper(pool))
        try:
            yield
        finally:
            reaping.cancel()
            log.info("shutting down: in-flight requests were given 5 s to finish")
            # Here, not only after uvicorn returns: on SIGTERM uvicorn raises the signal again once
            # it has shut down, and the process ends there.
            await loop.run_in_executor(None, pool.close)

    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, api_key=pool.settings.api_key)

    def _error(error: ApiError) -> Any:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Any:
        if exc.status >= 500 or exc.status == 499:
            request.state.log = (getattr(request.state, "log", "") + f" {exc.message}").strip()
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Any:  # unknown routes, wrong methods
        return _error(ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        guard = Guard(None, pool.settings.api_key)
        if not guard.authorized(dict(request.scope["headers"])):  # names of loaded models only for those holding the key
            return {"status": "ok"}
        return {"status": "ok", "loaded": [m["name"] for m in pool.ps()]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = await asyncio.get_running_loop().run_in_executor(pool.control, pool.names)
        return {"object": "list", "data": [_model_record(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return _model_record(await asyncio.get_running_loop().run_in_executor(pool.control, pool.canonical, model_id[: MAX_MODEL_NAME + 1]))

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        return {"models": pool.ps(), "keep_alive_s": pool.settings.keep_alive, "max_loaded": pool.settings.max_loaded, "max_queue": pool.settings.max_queue}

    @app.post("/api/stop")
    async def stop(request: Request) -> Any:
        body = parse_json(await _body(request))
        name = body.get("model")
        if not isinstance(name, str) or len(name) > MAX_MODEL_NAME:
            raise ApiError(400, f"'model' must be a string of at most {MAX_MODEL_NAME} characters", param="model")
        if not await asyncio.get_running_loop().run_in_executor(pool.control, pool.unload, name):
            raise ApiError(404, f"model '{name}' is not loaded", param="model")
        return {"stopped": name}

    async def proxy(request: Request) -> Any:
        raw = await _body(request)
        body = parse_json(raw)  # all checked before queueing or loading
        name = model_name(body)
        check_stop(body)
        path = request.url.path
        # A client that leaves while its model loads gives its place back (the load itself goes on).
        model = await _unless_client_leaves(request, pool.acquire_async(name))
        request.state.log = f"model={model.name}"
        started = time.perf_counter()
        try:
            _check_fit(path, body, model)
            upstream = await _unless_client_leaves(request, _send(pool, model, path, raw))
        except BaseException:
            pool.release(model)
            raise
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            relay = _Relay(request, pool, model, upstream, started, anthropic=path.startswith("/v1/messages"))
            return Relay(relay, status_code=upstream.status_code, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            content = await _unless_client_leaves(request, upstream.aread())
        except FAILURES as exc:  # the child went away mid-answer
            raise await _child_failed(model, exc) from None
        finally:
            await upstream.aclose()
            pool.release(model)
        request.state.log += _usage_note(content[-USAGE_WINDOW:], started, None)
        return Response(content, status_code=upstream.status_code, media_type=upstream.headers.get("content-type", "application/json"))

    for path in PROXIED:
        app.post(path)(proxy)

    return app


def _model_record(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llmctl"}


async def _body(request: Any) -> bytes:
    raw = bytearray()
    async for chunk in request.stream():  # counted as it arrives: a chunked upload has no Content-Length
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    return bytes(raw)


def _check_fit(path: str, body: dict[str, Any], model: Loaded) -> None:
    """Refuse clearly what the model cannot do, rather than with llama-server's 500s and 501s."""
    spec = model.child.spec
    if path == "/v1/rerank" and not spec.reranker:
        raise ApiError(400, f"model '{model.name}' is not a reranker (its GGUF has no 'rank' pooling); /v1/rerank needs a reranking model", param="model")
    if path in ("/v1/chat/completions", "/v1/messages") and spec.mmproj is None and media_parts(body):
        raise ApiError(
            400, f"model '{model.name}' has no multimodal projector (mmproj), so it cannot read images or audio; pull a repo that has an mmproj file",
            param="messages",
        )  # fmt: skip


async def _send(pool: ModelPool, model: Loaded, path: str, raw: bytes) -> Any:
    """The child's answer, from its head on (for a stream: as soon as it begins)."""
    try:
        return await post(model.child.address, path, raw)
    except FAILURES as exc:  # the child is gone, or not answering
        raise await _child_failed(model, exc) from None


async def _child_failed(model: Loaded, exc: BaseException) -> ApiError:
    """The error for a request whose child stopped answering; the pool hears of it at once."""
    for _ in range(25):  # the socket closes a moment before the process can be reaped
        if not model.alive:
            break
        await asyncio.sleep(0.02)
    state = model.child.state()
    if model.alive:
        why = f"the llama-server of model '{model.name}' stopped answering ({type(exc).__name__}: {exc})"
    else:
        why = f"the llama-server of model '{model.name}' {state} mid-answer; it starts again on the next request"
    return ApiError(502, why, "server_error")


class Relay(StreamingResponse):
    """The child's server-sent events, relayed; its ``finish`` runs however the response ends (the
    stream done, the client gone, the server stopping, or the response never started): that closes
    the child's request, so llama-server frees the slot at once, and gives the request's place back."""

    def __init__(self, relay: _Relay, **kwargs: Any) -> None:
        super().__init__(relay.events(), **kwargs)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.relay.finish()


class _Relay:
    """One stream from a child: passed on as whole events as they arrive; if the child fails midway,
    the part of an event it sent is dropped and an error event ends the stream."""

    def __init__(self, request: Any, pool: ModelPool, model: Loaded, upstream: Any, started: float, *, anthropic: bool) -> None:
        self.request, self.pool, self.model, self.upstream, self.started, self.anthropic = request, pool, model, upstream, started, anthropic
        self.recent = b""  # the end of what was sent, for the usage in the log line
        self.first: float | None = None
        self.ended = False
        self.failed: ApiError | None = None
        self.finished = False

    async def events(self) -> AsyncIterator[bytes]:
        tail = b""
        try:
            async for chunk in self.upstream.aiter_raw():
                data = tail + chunk if tail else chunk
                cut = data.rfind(b"\n\n") + 2
                if cut < 2:
                    tail = data
                    continue
                out, tail = data[:cut], data[cut:]
                self.recent = out[-USAGE_WINDOW:] if len(out) >= USAGE_WINDOW else (self.recent + out)[-USAGE_WINDOW:]
                if self.first is None:
                    self.first = time.perf_counter()
                yield out
            if tail:
                yield tail
        except FAILURES as exc:  # the child went away mid-answer
            self.failed = await _child_failed(self.model, exc)
            yield stream_error(self.failed, self.anthropic)
        self.ended = True

    async def finish(self) -> None:
        """Once: close the child's request, give the place back, note the log line."""
        if self.finished:
            return
        self.finished = True
        try:
            await self.upstream.aclose()
        finally:
            self.pool.release(self.model)
            state = self.request.state
            state.log = getattr(state, "log", "") + _usage_note(self.recent, self.started, self.first) + " stream"
            if self.failed is not None:
                state.status = self.failed.status
                state.log += f": {self.failed.message}"
            elif not self.ended:
                state.status = 499
                state.log += " (the client went away)"


_NUMBERS = [
    (re.compile(rb'"prompt_n":\s*(\d+)'), re.compile(rb'"predicted_n":\s*(\d+)')),  # llama-server's timings
    (re.compile(rb'"prompt_tokens":\s*(\d+)'), re.compile(rb'"completion_tokens":\s*(\d+)')),  # OpenAI's usage
    (re.compile(rb'"input_tokens":\s*(\d+)'), re.compile(rb'"output_tokens":\s*(\d+)')),  # Anthropic's usage
]


def _usage_note(end: bytes, started: float, first: float | None) -> str:
    """`` in=N out=M ttft=…`` from the end of an answer (its usage or timings), for the log line."""
    note = ""
    for prompt, generated in _NUMBERS:
        found = prompt.findall(end)
        if found:
            out = generated.findall(end)
            note = f" in={int(found[-1])}" + (f" out={int(out[-1])}" if out else "")
            break
    if first is not None:
        note += f" ttft={first - started:.3f}s"
    return note


async def _client_left(request: Any) -> None:
    """Returns when the client has closed its connection.

    Only once the body has been read: from then on the server's ``receive``
    has nothing else to give. Neither uvicorn nor Starlette cancels a request
    whose client leaves before its answer begins, so a request has to watch
    for it itself until the child's answer starts.
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
    await asyncio.gather(task, return_exceptions=True)
    if on_leave is not None:
        on_leave()
    raise ApiError(499, "the client closed the connection before the answer", "client_closed")


async def reaper(pool: ModelPool) -> None:
    """Every half second: unload what keep-alive lets go, and notice children that ended. Both are
    checked on the loop (a few microseconds); only stopping a child, which waits, takes a thread."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.5)
        expired = pool.take_expired()
        if expired:
            await loop.run_in_executor(pool.control, pool.stop_taken, expired)
        pool.check_children()


def run_server(pool: ModelPool, host: str, port: int, preload: list[str]) -> None:
    """Check the port, load the named models, then serve until Ctrl-C / SIGTERM; the children end with it."""
    import socket

    import uvicorn

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise LlmctlError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="choose another --port, or stop what uses it") from None
    try:
        for name in preload:
            try:
                model = pool.acquire(name)
            except ApiError as exc:
                raise LlmctlError(f"cannot serve '{name}': {exc.message}") from None
            pool.release(model)
        app = create_app(pool)
        log.info(f"serving on http://{host}:{port}/v1 (models: {', '.join(pool.names()) or 'none yet'})")
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        except SystemExit as exc:  # uvicorn exits on start-up failures it has already logged
            if exc.code not in (0, None):
                raise LlmctlError(f"the server could not start on {host}:{port}") from None
    finally:
        pool.close()
