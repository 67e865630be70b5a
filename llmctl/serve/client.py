"""The client side of ``llmctl ps`` and ``llmctl stop``: one running server, its answers as data,
its failures as ``LlmctlError``s.

The API key (``LLMCTL_API_KEY``) goes to the server named and nowhere else: redirects are not
followed. Only the standard library is imported here (``urllib`` when a call is made), so the
CLI's start-up does not pay for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from llmctl.errors import LlmctlError, NotFoundError, UsageError

DEFAULT_PORT = 8080
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"
MAX_ANSWER_BYTES = 4 * 1024 * 1024


@dataclass
class ServerClient:
    """A running ``llmctl serve`` at ``url``, called with ``api_key`` when there is one."""

    url: str
    api_key: str | None = None

    @classmethod
    def at(cls, url: str) -> ServerClient:
        """The server at ``url``, with the key from ``LLMCTL_API_KEY``."""
        return cls(url, os.environ.get("LLMCTL_API_KEY") or None)

    def loaded(self) -> dict[str, Any]:
        """What ``GET /api/ps`` answers (docs/json.md): ``models``, one record each, and the server's settings."""
        data = self.call("GET", "/api/ps")
        models = data.get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise LlmctlError(f"{self.url} is not an llmctl server", hint="check --server / LLMCTL_SERVER")
        return data

    def stop(self, model: str) -> None:
        """Unload ``model``; NotFoundError if it is not loaded, UsageError while it is busy."""
        self.call("POST", "/api/stop", {"model": model})

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; its JSON answer, which must be an object."""
        import urllib.error
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None  # urllib then raises HTTPError with the 3xx

        server = self.url
        try:
            request = urllib.request.Request(server.rstrip("/") + path, method=method, data=json.dumps(body).encode() if body else None)
            request.add_header("Content-Type", "application/json")
            if self.api_key:
                request.add_unredirected_header("Authorization", f"Bearer {self.api_key}")
            with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
                raw = response.read(MAX_ANSWER_BYTES + 1)
            if len(raw) > MAX_ANSWER_BYTES:
                raise ValueError(f"an answer larger than {MAX_ANSWER_BYTES} bytes")
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an llmctl answer")
            return data
        except urllib.error.HTTPError as exc:
            raise _refusal(server, exc) from None
        except ValueError as exc:  # a malformed address, or something that is not an llmctl server answering
            raise LlmctlError(f"no llmctl server at {server} ({exc})", hint="check --server / LLMCTL_SERVER") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LlmctlError(
                f"no llmctl server at {server} ({getattr(exc, 'reason', exc)})", hint="start one with `llmctl serve`, or set --server / LLMCTL_SERVER"
            ) from None


def _refusal(server: str, exc: Any) -> LlmctlError:
    """An HTTP error status as the error a user reads: the server's own message where it sent one."""
    if 300 <= exc.code < 400:
        target = str(exc.headers.get("Location", "elsewhere") if exc.headers else "elsewhere")[:200]
        return LlmctlError(
            f"{server} answered with a redirect (HTTP {exc.code}) to {target}; llmctl does not follow it, so the API key stays with {server}",
            hint="point --server / LLMCTL_SERVER at the llmctl server itself",
        )
    try:
        message = json.loads(exc.read(MAX_ANSWER_BYTES))["error"]["message"]
        if not isinstance(message, str):
            raise TypeError(message)
    except (ValueError, KeyError, TypeError, OSError):
        message = f"HTTP {exc.code}"
    if exc.code == 404:
        return NotFoundError(message)
    if exc.code == 409:
        return UsageError(message, hint="wait for its requests to finish")
    return LlmctlError(f"the server answered: {message}")
