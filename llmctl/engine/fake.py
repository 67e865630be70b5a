"""A fake engine for tests (like simonw/llm's MockModel): deterministic text and timings, no model.

Replies come from a queue (``FakeEngine(["Hello there"])`` or ``enqueue``), then from ``echo``
(the last user message or prompt) or ``default``. A reply streams word by word ("Hello ",
"there"), or in the exact pieces given as a list. ``sampling.max_tokens`` cuts it (finish
reason ``length``, one piece counting as one token) and ``sampling.stop`` ends it at a stop
string, as llama.cpp would. Timings are computed, not measured: one token per word, prompts
evaluated at 1 ms a token, replies written at 10 ms a token.

For the paths around the engine: ``interrupt_after`` raises KeyboardInterrupt after N pieces
(Ctrl-C); ``fail`` raises an exception after ``fail_after`` pieces; ``wait`` holds every reply
until ``gate`` is set; ``delay`` sleeps before each piece. ``calls`` records what was asked,
``started`` and ``pieces`` count replies begun and pieces sent (serve's tests read them from
another thread).

``FakeFactory`` has ``Engine.load``'s signature, to put where engines are made
(``llmctl.engine.runner.engine_factory``; the ``fake_engines`` test fixture does).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from llmctl.engine.base import EngineError, Result, Timings, empty_reply_advice
from llmctl.plan.fit import LoadConfig

if TYPE_CHECKING:
    from llmctl.engine.sampling import SamplingSettings
    from llmctl.plan.fit import Plan

PROMPT_S_PER_TOKEN = 0.001
GENERATION_S_PER_TOKEN = 0.01
_PIECE = re.compile(r"\s*\S+\s*|\s+")


@dataclass
class FakeCall:
    """One request to the fake: ``kind`` is "chat" (``messages``) or "complete" (``prompt``)."""

    kind: str
    messages: list[dict[str, str]] | None
    prompt: str | None
    sampling: Any
    grammar: Any = None


@dataclass
class FakeLlama:
    """Stands in for ``llama_cpp.Llama`` where run and chat reach through the engine (template metadata, tokens)."""

    metadata: dict[str, str] = field(default_factory=dict)
    closed: bool = False
    _vocab: dict[str, int] = field(default_factory=dict)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        words = text.decode("utf-8", errors="replace").split()
        return [self._vocab.setdefault(word, len(self._vocab) + 1) for word in words]

    def detokenize(self, tokens: Iterable[int]) -> bytes:
        names = {number: word for word, number in self._vocab.items()}
        return " ".join(names.get(token, "") for token in tokens).encode("utf-8")

    def close(self) -> None:
        self.closed = True


def split_pieces(text: str) -> list[str]:
    """A reply as the fake streams it: each word with the white space after it (leading space kept on the first)."""
    return _PIECE.findall(text)


class FakeEngine:
    """A loaded model that replies from a queue; the same surface as ``llmctl.engine.llama.Engine``."""

    def __init__(
        self,
        replies: Iterable[str | list[str]] = (),
        *,
        name: str = "fake",
        n_ctx: int = 2048,
        default: str | list[str] = "hello world",
        echo: bool = False,
        interrupt_after: int | None = None,
        fail: BaseException | None = None,
        fail_after: int = 0,
        wait: bool = False,
        delay: float = 0.0,
        has_chat_template: bool = True,
        chat_template: str | None = None,
        chat_format: str | None = None,
        threads: int | None = 2,
        config: LoadConfig | None = None,
        notes: Iterable[str] = (),
        load_s: float = 0.0,
    ) -> None:
        self.replies: list[str | list[str]] = list(replies)
        self.name = name
        self._n_ctx = n_ctx
        self.default = default
        self.echo = echo
        self.interrupt_after = interrupt_after
        self.fail = fail
        self.fail_after = fail_after
        self.wait = wait
        self.gate = threading.Event()
        self.delay = delay
        self.has_chat_template = has_chat_template
        self.chat_format = chat_format
        self.threads = threads
        self.config = config or LoadConfig(n_ctx=n_ctx)
        self.notes = list(notes)
        self.load_s = load_s
        self.llm = FakeLlama({"tokenizer.chat_template": chat_template} if chat_template else {})
        self.last_timings: Timings | None = None
        self.calls: list[FakeCall] = []
        self.started = 0
        self.pieces = 0
        self.closed = False
        self._first = True
        self._lock = threading.Lock()

    def enqueue(self, replies: Iterable[str | list[str]]) -> FakeEngine:
        """Add replies to the queue (returns the engine, for chaining)."""
        self.replies.extend(replies)
        return self

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def empty_reply_advice(self, *, raw: bool = False, command: str = "run") -> str:
        return empty_reply_advice(self.chat_format, self.has_chat_template, raw=raw, command=command)

    def close(self) -> None:
        self.closed = True
        self.llm.close()

    def chat(self, messages: list[dict[str, str]], sampling: SamplingSettings, *, grammar: Any = None) -> Iterator[str | Result]:
        self.calls.append(FakeCall("chat", [dict(m) for m in messages], None, sampling, grammar))
        users = [m["content"] for m in messages if m.get("role") == "user"]
        prompt_tokens = sum(self.count_tokens(m.get("content", "")) for m in messages)
        return self._stream(users[-1] if users else "", prompt_tokens, sampling)

    def complete(self, prompt: str, sampling: SamplingSettings, *, grammar: Any = None) -> Iterator[str | Result]:
        self.calls.append(FakeCall("complete", None, prompt, sampling, grammar))
        return self._stream(prompt, self.count_tokens(prompt), sampling)

    def _next_reply(self, asked: str) -> list[str]:
        with self._lock:
            if self.replies:
                reply = self.replies.pop(0)
            else:
                reply = asked if self.echo else self.default
        return list(reply) if isinstance(reply, list) else split_pieces(reply)

    def _stream(self, asked: str, prompt_tokens: int, sampling: SamplingSettings) -> Iterator[str | Result]:
        if prompt_tokens > self.n_ctx:
            raise EngineError(f"Requested tokens ({prompt_tokens}) exceed context window of {self.n_ctx}", hint="shorten the input or raise --ctx")
        pieces, finish = _cut(self._next_reply(asked), sampling)
        timings = Timings(load_s=self.load_s if self._first else 0.0, prompt_tokens=prompt_tokens, prompt_eval_tokens=prompt_tokens)
        self._first = False
        with self._lock:
            self.started += 1
        sent: list[str] = []
        try:
            if self.wait and not self.gate.wait(60):
                raise EngineError("the fake engine's gate was never opened")
            for index, piece in enumerate(pieces):
                if self.fail is not None and index == self.fail_after:
                    raise self.fail
                if index == self.interrupt_after:
                    raise KeyboardInterrupt
                if self.delay:
                    time.sleep(self.delay)
                sent.append(piece)
                with self._lock:
                    self.pieces += 1
                yield piece
            if self.fail is not None and self.fail_after >= len(pieces):
                raise self.fail
        except (KeyboardInterrupt, GeneratorExit):
            finish = "interrupted"
            raise
        finally:
            self.last_timings = _timings(timings, len(sent))
        yield Result("".join(sent), finish, self.last_timings)


def _cut(pieces: list[str], sampling: Any) -> tuple[list[str], str]:
    """The pieces llama.cpp would send under ``max_tokens`` and ``stop``, and the finish reason."""
    text = "".join(pieces)
    for stop in getattr(sampling, "stop", None) or []:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    if text != "".join(pieces):
        kept, length = [], 0
        for piece in pieces:
            if length + len(piece) > len(text):
                if len(text) > length:
                    kept.append(text[length:])
                break
            kept.append(piece)
            length += len(piece)
        pieces = kept
    limit = getattr(sampling, "max_tokens", None)
    if limit is not None and len(pieces) > limit:
        return pieces[:limit], "length"
    return pieces, "stop"


def _timings(timings: Timings, generated: int) -> Timings:
    timings.prompt_eval_s = timings.prompt_eval_tokens * PROMPT_S_PER_TOKEN
    timings.ttft_s = timings.prompt_eval_s + (GENERATION_S_PER_TOKEN if generated else 0.0)
    timings.generated_tokens = generated
    timings.generation_s = max(generated - 1, 0) * GENERATION_S_PER_TOKEN
    timings.total_s = timings.ttft_s + timings.generation_s
    return timings


class FakeFactory:
    """A stand-in for ``Engine.load`` (``runner.engine_factory``): hands out the queued engines in order, then
    new ``FakeEngine(**defaults)``; a queued exception is raised instead, as a failed load.

    Each engine takes the name, load config, context size, threads and chat format it is
    loaded with, as a real load gives them; ``made`` lists the engines handed out.
    """

    def __init__(self, *engines: FakeEngine | BaseException, **defaults: Any) -> None:
        self.queue: list[FakeEngine | BaseException] = list(engines)
        self.defaults = defaults
        self.made: list[FakeEngine] = []

    def add(self, *engines: FakeEngine | BaseException) -> FakeFactory:
        self.queue.extend(engines)
        return self

    @property
    def last(self) -> FakeEngine:
        return self.made[-1]

    def __call__(self, name: str, paths: list[Path], plan: Plan, *, threads: int | None = None, chat_format: str | None = None, **_: Any) -> FakeEngine:
        item = self.queue.pop(0) if self.queue else FakeEngine(**self.defaults)
        if isinstance(item, BaseException):
            raise item
        item.name = name
        item.config = plan.config
        item._n_ctx = plan.config.n_ctx
        item.threads = threads or plan.threads
        item.chat_format = chat_format
        self.made.append(item)
        return item
