"""What serve's front checks in a request before llama-server sees it, and its errors in OpenAI's format.

The front owns the API key, the body's size, that it is JSON (an object, valid Unicode, nested at
most ``MAX_JSON_DEPTH`` deep, numbers a C++ parser holds), the model's name, and what protects a
shared child from one request (the length of ``stop`` lists); llama-server checks the rest and
answers with its own status codes. Nothing here knows HTTP or the pool.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llmctl.engine.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS

MAX_JSON_DEPTH = 64  # real requests (messages, JSON schemas, tools) nest a dozen levels at most
MAX_MODEL_NAME = 256
_INT_RANGE = (-(2**63), 2**64 - 1)  # what llama-server's JSON parser (nlohmann) holds as a number

# Content parts that need a multimodal projector: OpenAI's image and audio parts, Anthropic's image blocks.
MEDIA_PARTS = frozenset({"image_url", "input_audio", "image"})


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (JSON has no NaN or Infinity)")


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object, nested at most MAX_JSON_DEPTH deep, whose strings are all valid
    Unicode (JSON's "\\ud800" decodes to a lone surrogate no encoder accepts) and whose numbers are
    finite and fit 64 bits. The body then goes to llama-server as it came: what passes here must
    parse there the same way."""
    try:
        body = json.loads(raw or b"{}", parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:  # also bytes that are not UTF-8, and integers of more than 4,300 digits
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        value, depth, top = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            field = top if top is not None else str(key)
            for text in (key, item):
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ApiError(400, "the JSON body holds an unpaired UTF-16 surrogate (such as \\ud800), which is not text") from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1, field))
            elif isinstance(item, float) and not math.isfinite(item):
                raise ApiError(400, f"'{field}' holds a number too large for a 64-bit float", param=field)
            elif isinstance(item, int) and not isinstance(item, bool) and not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
                raise ApiError(400, f"'{field}' holds an integer that does not fit 64 bits", param=field)
    return body


def model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required", param="model")
    if len(name) > MAX_MODEL_NAME:
        raise ApiError(400, f"'model' is longer than {MAX_MODEL_NAME} characters", param="model")
    return name


def check_stop(body: dict[str, Any]) -> None:
    """``stop`` (and Anthropic's ``stop_sequences``) bounded as ``run``'s ``--stop`` is: llama-server
    checks every stop string at every token, so one request with 350,000 of them slowed every slot."""
    for key in ("stop", "stop_sequences"):
        stop = body.get(key)
        strings = [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, list):
            continue  # absent, or llama-server's to refuse
        if len(strings) > MAX_STOP_STRINGS:
            raise ApiError(400, f"{len(strings)} stop strings, more than the {MAX_STOP_STRINGS} allowed", param=key)
        for text in strings:
            if isinstance(text, str) and len(text) > MAX_STOP_CHARS:
                raise ApiError(400, f"a stop string of {len(text)} characters, longer than {MAX_STOP_CHARS}", param=key)


def media_parts(body: dict[str, Any]) -> bool:
    """Whether a chat request's messages hold images or audio (which need the model's projector)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(part, dict) and part.get("type") in MEDIA_PARTS for part in content):
            return True
    return False


def event(data: Any) -> bytes:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def stream_error(error: ApiError, anthropic: bool) -> bytes:
    """The last events of a stream that failed midway: OpenAI's error event and ``[DONE]``, or, for the
    Anthropic Messages API, its ``error`` event."""
    if anthropic:
        data = {"type": "error", "error": {"type": "api_error", "message": error.message}}
        return f"event: error\ndata: {json.dumps(data)}\n\n".encode()
    return event(error.body()) + DONE
