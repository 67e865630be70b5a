"""What every engine offers and returns: the ``Engine`` protocol, its value types and its errors.

Code that only drives an engine (run, chat, the chat session, serve's pool, the fake engine for
tests) imports this module, not ``llmctl.engine.llama`` (which is the llama.cpp engine itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from llmctl.errors import LlmctlError

if TYPE_CHECKING:
    from llmctl.engine.sampling import SamplingSettings
    from llmctl.plan.fit import LoadConfig


class EngineError(LlmctlError):
    """llama.cpp could not load or run the model."""


class EngineLostError(EngineError):
    """The engine went away mid-use (its llama-server child, or an RPC worker under it, died):
    nothing more can be generated, so chat ends instead of taking the next message."""


class ReloadError(EngineError):
    """Loading a model again (another context size) failed; ``engine`` is the one loaded instead, if any."""

    def __init__(self, message: str, hint: str | None, engine: Engine | None) -> None:
        super().__init__(message, hint)
        self.engine = engine


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_tokens: int = 0  # tokens of the whole prompt
    prompt_eval_tokens: int = 0  # of which evaluated now (the rest came from the reused KV prefix)
    prompt_eval_s: float = 0.0
    generated_tokens: int = 0
    generation_s: float = 0.0  # first token to last
    ttft_s: float = 0.0  # request to first token
    total_s: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float | None:
        return self.prompt_eval_tokens / self.prompt_eval_s if self.prompt_eval_s > 0 else None

    @property
    def generation_tokens_per_second(self) -> float | None:
        if self.generated_tokens > 1 and self.generation_s > 0:
            return (self.generated_tokens - 1) / self.generation_s
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "load_s": round(self.load_s, 4),
            "ttft_s": round(self.ttft_s, 4),
            "prompt_tokens": self.prompt_tokens,
            "prompt_eval_tokens": self.prompt_eval_tokens,
            "prompt_eval_s": round(self.prompt_eval_s, 4),
            "prompt_tokens_per_second": _round(self.prompt_tokens_per_second),
            "generated_tokens": self.generated_tokens,
            "generation_s": round(self.generation_s, 4),
            "generation_tokens_per_second": _round(self.generation_tokens_per_second),
            "total_s": round(self.total_s, 4),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass
class Result:
    text: str
    finish_reason: str
    timings: Timings
    reasoning: str | None = None  # a thinking model's reasoning, when run and chat split it off (llmctl/engine/reasoning.py)


def empty_reply_advice(chat_format: str | None, has_chat_template: bool, *, raw: bool = False, command: str = "run") -> str:
    """What to tell a user whose reply came back without text: usually a prompt format the model does not know."""
    if raw:
        return "the reply is empty: the model ended the text before writing anything; try another prompt, or drop --raw"
    if chat_format:
        used = f"the chat format '{chat_format}'"
    elif has_chat_template:
        used = "the model's chat template"
    else:
        used = "the generic chat format used for a model without a chat template"
    options = "another --chat-format (e.g. chatml) or --raw" if command == "run" else "restarting chat with another --chat-format (e.g. chatml)"
    return f"the reply is empty: the model ended it before writing any text; {used} may not suit it: try {options}"


class Engine(Protocol):
    """One loaded model, as run, chat, the chat session and serve use it.

    ``chat`` and ``complete`` stream ``str`` pieces, then one ``Result`` (finish reason and
    timings); closing the stream early stops generation and still records ``last_timings``.
    ``llm`` is the llama.cpp object underneath (chat templates and reasoning markers read it);
    a fake engine gives a stand-in.
    """

    name: str
    config: LoadConfig  # how it was loaded (after any fallback)
    notes: list[str]  # what the loader had to change (fewer GPU layers, smaller context)
    chat_format: str | None  # None: the model's template, or llama-cpp-python's fallback
    threads: int | None
    load_s: float
    last_timings: Timings | None
    llm: Any

    @property
    def n_ctx(self) -> int: ...

    @property
    def has_chat_template(self) -> bool: ...

    def chat(self, messages: list[dict[str, str]], sampling: SamplingSettings, *, grammar: Any = None) -> Iterator[str | Result]: ...

    def complete(self, prompt: str, sampling: SamplingSettings, *, grammar: Any = None) -> Iterator[str | Result]: ...

    def count_tokens(self, text: str) -> int: ...

    def set_threads(self, threads: int) -> None: ...

    def empty_reply_advice(self, *, raw: bool = False, command: str = "run") -> str: ...

    def close(self) -> None: ...


# How an engine is made from a plan: ``llama.Engine.load`` in use, a fake engine's factory in tests.
EngineFactory = Callable[..., Engine]
