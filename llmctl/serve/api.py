"""The OpenAI API as serve speaks it: errors in OpenAI's format, each request body checked whole
into a ``Job`` before anything queues or loads, and the answers' shapes.

Nothing here knows HTTP or the pool: the app reads bodies and sends what these functions build;
the pool raises ``ApiError`` for names it cannot serve and for full queues.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from llmctl.engine.base import Result, Timings
from llmctl.engine.llama import grammar_for
from llmctl.engine.sampling import SamplingSettings, SettingError, from_request
from llmctl.errors import LlmctlError

if TYPE_CHECKING:
    from llmctl.engine.base import Engine

MAX_JSON_DEPTH = 64  # real requests (messages, JSON schemas) nest a dozen levels at most
MAX_MODEL_NAME = 256


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


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

    def generate(self, engine: Engine) -> Iterator[str | Result]:
        """Start the job on ``engine``: its pieces, then one ``Result``."""
        if self.kind == "chat":
            assert self.messages is not None
            return engine.chat(self.messages, self.sampling, grammar=self.grammar)
        assert self.prompt is not None
        return engine.complete(self.prompt, self.sampling, grammar=self.grammar)


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


def context_error(exc: Exception) -> ApiError | None:
    """llama.cpp's "Requested tokens (N) exceed context window of M" as the client's fault (400)."""
    text = str(getattr(exc, "message", exc))
    if "context window" in text.lower() or "n_ctx" in text.lower():
        return ApiError(400, f"the prompt does not fit the model's context: {text}", param="messages")
    return None


# --- answers -----------------------------------------------------------------------------


def completion_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(timings: Timings) -> dict[str, int]:
    return {
        "prompt_tokens": timings.prompt_tokens,
        "completion_tokens": timings.generated_tokens,
        "total_tokens": timings.prompt_tokens + timings.generated_tokens,
    }


def full_response(kind: str, name: str, result: Result) -> dict[str, Any]:
    """A whole answer: ``chat.completion`` or ``text_completion``."""
    base = {"id": completion_id(kind), "created": int(time.time()), "model": name, "usage": usage(result.timings)}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason, "logprobs": None}
        return {**base, "object": "chat.completion", "choices": [choice]}
    return {**base, "object": "text_completion", "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}]}


class Chunks:
    """The server-sent events of one streamed answer, all under one id and creation time."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.ident = completion_id(kind)
        self.created = int(time.time())

    def delta(self, delta: dict[str, Any] | None, text: str | None, finish: str | None) -> str:
        """A piece of the answer (or its end, with ``finish``): a chat ``delta`` or a completion's ``text``."""
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
            data = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [choice]}
        else:
            data = {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}  # fmt: skip
        return event(data)

    def usage(self, timings: Timings) -> str:
        """The last event, as OpenAI sends it: no choices, the completion's own id."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return event({"id": self.ident, "object": kind, "created": self.created, "model": self.model, "choices": [], "usage": usage(timings)})


def event(data: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


DONE = "data: [DONE]\n\n"
