"""Bounds on every HTTP exchange with the Hub: an overall deadline and a byte cap.

httpx's timeouts apply to each socket operation ("no data for N seconds"),
so a server that sends one byte every few seconds, in its headers or its
body, is never timed out, and nothing stops an answer that never ends. A
hostile or broken Hub (or a proxy or captive portal in front of it) could
keep llmctl waiting for ever or fill its memory. So each exchange runs
under :func:`limited`:

- a **deadline**: every socket operation's timeout is clamped to the time
  left, so the exchange ends by then whatever the server does (headers
  included); past it, :class:`LimitExceeded` is raised. It is raised from
  the socket layer, so huggingface_hub's own retry loop (which retries
  timeouts) does not retry it;
- a **byte cap** on the answer's body, checked as the bytes arrive (and
  against ``Content-Length`` before the first one). Answers under a cap are
  asked for without compression, so the cap bounds what is kept in memory.

The limits are per thread (remote headers are read by a few threads at
once) and apply to huggingface_hub's own calls too: :func:`install` routes
the shared client's connections through a network backend that applies
them, and adds a response hook that caps bodies and Retry-After waits.
A connection that cannot be made at all (refused, no such host, no route)
raises :class:`Unreachable` from the same layer, for the same reason:
huggingface_hub retries connection errors five times with sleeps of
1+2+4+8+8 s, so an endpoint that refuses connections took 23 s to report,
where an immediate retry would only be refused again.

Outside :func:`limited` (the download transfer loop) nothing changes: a
large file takes as long as it takes, watched by the stall timeout and the
transfer loop's own progress rule instead.

The network backend is set on the client's connection pools, which httpx
does not expose publicly (``_transport._pool._network_backend``); where a
version lacks them the deadline is still enforced between body chunks, and
the byte cap everywhere.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

MAX_RETRY_AFTER_S = 30.0  # the longest Retry-After a Hub answer can make llmctl sleep


class LimitExceeded(Exception):
    """An exchange with the Hub ran past its deadline or its byte cap."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class Unreachable(Exception):
    """No connection to the Hub's host could be made: refused, no such host, or no route to it."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"{host}:{port}: {reason}")
        self.reason = reason


def unreachable_reason(exc: BaseException) -> str | None:
    """Why a connection attempt failed, when retrying at once cannot help; None otherwise.

    httpcore raises ConnectError ``from`` the socket's OSError; a timeout
    (a slow or overloaded server) is not one of these and stays retried.
    """
    import errno
    import socket

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, socket.gaierror):
            return "no such host (DNS lookup failed)"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "no route to the host (network unreachable)"
        if isinstance(cause, TimeoutError):
            return None
        cause = cause.__cause__ or cause.__context__
    return None


@dataclass
class Limits:
    deadline: float | None  # time.monotonic() by which the exchange must be over
    max_bytes: int | None  # the most bytes the body of one answer may have
    seconds: float | None  # the deadline as a duration, for messages
    what: str  # "the Hub's answer", "reading the header of X": for messages

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        left = self.left()
        return left is not None and left <= 0

    def overrun(self) -> LimitExceeded:
        return LimitExceeded(
            f"{self.what} took longer than {self.seconds:g} s",
            hint="the server stalls or is very slow; try again later, or raise LLMCTL_HUB_DEADLINE",
        )

    def lift_deadline(self) -> None:
        """From here on, only the stall timeout applies (a download's body)."""
        self.deadline = None


_local = threading.local()


def current() -> Limits | None:
    return getattr(_local, "limits", None)


@contextmanager
def limited(seconds: float | None = None, max_bytes: int | None = None, *, what: str = "the Hub's answer", deadline: float | None = None) -> Iterator[Limits]:
    """Run the requests made in this block (by this thread) under a deadline and a body cap.

    ``deadline`` (a ``time.monotonic()`` value) shares one deadline between
    several blocks, such as all the range requests of one header read.
    """
    if deadline is None and seconds is not None:
        deadline = time.monotonic() + seconds
    elif deadline is not None and seconds is None:
        seconds = max(deadline - time.monotonic(), 0.0)
    outer = current()
    if outer is not None and outer.deadline is not None and (deadline is None or outer.deadline < deadline):
        deadline, seconds, what = outer.deadline, outer.seconds, outer.what  # a nested block never extends
    limits = Limits(deadline, max_bytes, seconds, what)
    _local.limits = limits
    try:
        yield limits
    finally:
        _local.limits = outer


def _clamp(timeout: float | None) -> float | None:
    """The socket timeout to use now: the stall timeout, or less when the deadline is nearer."""
    limits = current()
    left = limits.left() if limits is not None else None
    if left is None:
        return timeout
    if left <= 0:
        raise limits.overrun()  # type: ignore[union-attr]
    return left if timeout is None else min(timeout, left)


def _raise_if_expired() -> None:
    """A socket timeout that the deadline caused is reported as the deadline (and not retried)."""
    limits = current()
    if limits is not None and limits.expired():
        raise limits.overrun() from None


class _Stream:
    """A connection whose reads and writes end by the current thread's deadline."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._inner.read(max_bytes, _clamp(timeout))
        except Exception:
            _raise_if_expired()
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._inner.write(buffer, _clamp(timeout))
        except Exception:
            _raise_if_expired()
            raise

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> _Stream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend:
    """httpcore's network backend, with connections that obey :func:`limited`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any) -> _Stream:
        try:
            return _Stream(self._inner.connect_tcp(host, port, timeout=_clamp(timeout), **kwargs))
        except LimitExceeded:
            raise
        except Exception as exc:
            _raise_if_expired()
            reason = unreachable_reason(exc)
            if reason is not None:  # not httpcore's ConnectError: huggingface_hub would retry that for 23 s
                raise Unreachable(host, port, reason) from exc
            raise

    def connect_unix_socket(self, path: str, timeout: float | None = None, **kwargs: Any) -> _Stream:
        return _Stream(self._inner.connect_unix_socket(path, timeout=_clamp(timeout), **kwargs))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


_STREAM_CLASSES: dict[type, type] = {}


def _capped_stream_class(base: type) -> type:
    """A body stream of the client's own httpx package (httpx or httpx2) that enforces the cap."""
    if base not in _STREAM_CLASSES:

        class Capped(base):
            def __init__(self, inner: Any, limits: Limits) -> None:
                self._inner = inner
                self._limits = limits

            def __iter__(self) -> Iterator[bytes]:
                got = 0
                for chunk in self._inner:
                    got += len(chunk)
                    if self._limits.max_bytes is not None and got > self._limits.max_bytes:
                        raise too_large(self._limits.max_bytes)
                    if self._limits.expired():
                        raise self._limits.overrun()
                    yield chunk

            def close(self) -> None:
                self._inner.close()

        _STREAM_CLASSES[base] = Capped
    return _STREAM_CLASSES[base]


def too_large(max_bytes: int) -> LimitExceeded:
    return LimitExceeded(
        f"the Hub's answer is larger than the {max_bytes:,} bytes llmctl accepts for it",
        hint="check that HF_ENDPOINT points at the Hub or a faithful mirror, and any proxy in between",
    )


def cap_body(response: Any, max_bytes: int) -> None:
    """Cap the body of ``response`` (not read yet), whatever limits are in force."""
    _cap(response, Limits(None, max_bytes, None, "the Hub's answer"))


def _cap(response: Any, limits: Limits) -> None:
    length = response.headers.get("content-length")
    if limits.max_bytes is not None and length is not None and length.isdigit() and int(length) > limits.max_bytes:
        response.close()
        raise too_large(limits.max_bytes)
    package = sys.modules[type(response).__module__.split(".")[0]]
    response.stream = _capped_stream_class(package.SyncByteStream)(response.stream, limits)


def _on_request(request: Any) -> None:
    limits = current()
    if limits is not None and limits.max_bytes is not None:
        request.headers["Accept-Encoding"] = "identity"  # the cap is on what is kept, not on what arrives


def _on_response(response: Any) -> None:
    limits = current()
    if response.status_code == 429 or response.status_code >= 500:
        _shorten_waits(response, limits)
    if limits is not None and (limits.max_bytes is not None or limits.deadline is not None):
        if limits.max_bytes is not None and response.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            response.close()
            raise LimitExceeded(
                f"the Hub answered with {response.headers['content-encoding']}-compressed data although none was asked for",
                hint="check that HF_ENDPOINT points at the Hub or a faithful mirror, and any proxy in between",
            )
        _cap(response, limits)


def _shorten_waits(response: Any, limits: Limits | None) -> None:
    """huggingface_hub sleeps as long as Retry-After (or RateLimit) says: never longer than the deadline allows."""
    ceiling = MAX_RETRY_AFTER_S
    left = limits.left() if limits is not None else None
    if left is not None:
        ceiling = max(min(ceiling, left), 0.0)
    for name in ("ratelimit", "ratelimit-policy"):
        if name in response.headers:
            del response.headers[name]
    value = response.headers.get("retry-after")
    if value is not None:
        try:
            wait = float(value)
        except ValueError:  # an HTTP date: let the library wait its own default instead
            del response.headers["retry-after"]
            return
        if not wait <= ceiling:  # also NaN
            response.headers["retry-after"] = str(int(ceiling))


def install(client: Any) -> Any:
    """Make ``client`` (huggingface_hub's shared httpx client) obey :func:`limited`; returns it."""
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is not None and not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
    hooks = client.event_hooks
    client.event_hooks = {
        "request": [*hooks.get("request", []), _on_request],
        "response": [*hooks.get("response", []), _on_response],
    }
    return client


_installed = threading.Lock()
_done = False


def install_in_huggingface_hub() -> None:
    """Every client huggingface_hub makes from now on (it remakes it after some errors) obeys the limits."""
    global _done
    with _installed:
        if _done:
            return
        from huggingface_hub.utils import _http, get_session, set_client_factory

        base = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or getattr(_http, "default_client_factory", None)
        if base is not None:
            set_client_factory(lambda: install(base()))
        else:  # pragma: no cover - a version without a factory: limit the live client
            install(get_session())
        _done = True
