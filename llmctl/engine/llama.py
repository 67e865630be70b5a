"""The engine: llama.cpp through llama-cpp-python, loaded with a fit plan, streaming with timings.

Generation uses the high-level ``Llama`` API: chat templates come from the
GGUF (rendered in a Jinja sandbox within time, memory and size budgets, in a
worker process: see llmctl/chat_template.py), JSON output is
constrained with its grammar support, and the KV cache prefix is reused
between calls automatically (a follow-up chat turn only evaluates the new
tokens). llama.cpp's own log is dropped unless ``LLMCTL_DEBUG`` is set (see
``quiet_llama_log``).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llmctl.config import debug_enabled
from llmctl.engine import chat_template
from llmctl.engine.base import EngineError, Result, Timings, empty_reply_advice
from llmctl.engine.chat_template import ChatTemplateError, TemplateWorker
from llmctl.errors import UsageError
from llmctl.importhook import after_import
from llmctl.plan.fit import LoadConfig, Plan

if TYPE_CHECKING:
    from llmctl.engine.sampling import SamplingSettings

# Every llama_cpp.Llama built in this process (by load_llama, for run, chat, serve, bench and tune)
# renders GGUF chat templates within budgets; this does not import llama_cpp.
chat_template.install()


# --- llama.cpp's own log --------------------------------------------------------------------
#
# llama-cpp-python routes llama.cpp's log through a callback that filters by level, but its
# table of ggml's levels is one off (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 in the
# bundled llama.cpp): every warning passes as an error, and context creation is outside its
# stdout/stderr suppression, so "llama_kv_cache_iswa: using full-size SWA cache" reached
# stderr on every sliding-window model. Ours replaces it for the whole process, whoever
# builds a Llama (run, chat, serve, bench, tune): everything goes to stderr with
# LLMCTL_DEBUG=1, nothing otherwise; the last error lines are kept, so a failed load can say
# what llama.cpp said.

_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5
_LOG_MODULE = "llama_cpp._logger"  # installs llama-cpp-python's callback when it is first imported
recent_llama_errors: deque[str] = deque(maxlen=4)
_log_state: dict[str, Any] = {"callback": None, "level": 0}


def quiet_llama_log() -> None:
    """Install llmctl's llama.cpp log callback (idempotent; imports llama.cpp's bindings)."""
    if _log_state["callback"] is not None:
        return
    import ctypes

    from llama_cpp import llama_cpp as lib  # the bindings alone: this may run while llama_cpp is importing

    def forward(level: int, text: bytes | None, _user_data: Any) -> None:
        try:
            if level != _GGML_LOG_CONT:
                _log_state["level"] = level
            message = (text or b"").decode("utf-8", errors="replace")
            if debug_enabled():
                sys.stderr.write(message)
                sys.stderr.flush()
            elif _log_state["level"] >= _GGML_LOG_ERROR and message.strip():
                recent_llama_errors.append(message.strip()[:300])
        except Exception:  # noqa: BLE001 - an exception must never cross into C
            pass

    callback = lib.llama_log_callback(forward)
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    _log_state["callback"] = callback  # kept alive: llama.cpp holds only the C pointer


after_import(_LOG_MODULE, lambda _module: quiet_llama_log())


def load_llama(path: Path | str, config: LoadConfig, *, threads: int | None, chat_format: str | None = None, verbose: bool = False) -> Any:
    """Build a ``llama_cpp.Llama`` with ``config``: the one place llmctl makes one (run, chat, serve, bench, tune).

    Every knob of the plan reaches llama.cpp here, the KV cache types and flash attention
    among them. ``threads`` None leaves llama.cpp's own count. llama-cpp-python's exceptions
    pass through: callers say what a failed load means for them.
    """
    import llama_cpp  # heavy: only here

    quiet_llama_log()
    return llama_cpp.Llama(
        str(path),
        n_ctx=config.n_ctx,
        n_gpu_layers=config.n_gpu_layers,
        n_batch=config.n_batch,
        n_ubatch=config.n_ubatch,
        n_threads=threads,
        n_threads_batch=threads,
        type_k=_ggml_type(config.type_k),
        type_v=_ggml_type(config.type_v),
        flash_attn=config.flash_attn,
        swa_full=config.swa_full,
        tensor_split=config.tensor_split,
        chat_format=chat_format,
        verbose=verbose,
    )


def load_vocab(path: Path | str, *, chat_format: str | None = None, verbose: bool = False) -> Any:
    """A ``llama_cpp.Llama`` of ``path``'s vocabulary alone (no weights): its tokenizer, chat templates and
    chat format, chosen as ``load_llama`` chooses them, for an engine whose forward pass runs elsewhere
    (llmctl/engine/server_engine.py). llama-cpp-python still makes a context: the smallest llama.cpp allows."""
    import llama_cpp

    quiet_llama_log()
    return llama_cpp.Llama(str(path), vocab_only=True, n_ctx=VOCAB_CONTEXT, n_batch=VOCAB_CONTEXT, n_threads=1, chat_format=chat_format, verbose=verbose)


VOCAB_CONTEXT = 256


def _is_memory_error(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in ("memory", "alloc", "oom", "cuda error", "failed to create context"))


class Engine:
    """One loaded model. Use ``Engine.load``; then ``chat`` or ``complete`` stream text."""

    def __init__(
        self,
        llm: Any,
        name: str,
        config: LoadConfig,
        load_s: float,
        notes: list[str],
        template_worker: TemplateWorker | None = None,
        *,
        chat_format: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.llm = llm
        self.name = name
        self.config = config
        self.load_s = load_s
        self.notes = notes  # what the loader had to change (fewer GPU layers, smaller context)
        self.chat_format = chat_format  # None: the model's template, or llama-cpp-python's fallback
        self.threads = threads
        self.last_timings: Timings | None = None  # the last reply's, also when it was stopped early
        self._first = True
        self._counts = {"prompt": 0, "sampled": 0}
        self._count_tokens_of(llm)
        # The renderer process of the model's chat template (None without one), warm from now on.
        self.template_worker = chat_template.attach(llm, template_worker)

    def close(self) -> None:
        """Free llama.cpp's memory and stop the template renderer now, not at garbage collection."""
        if self.template_worker is not None:
            self.template_worker.close()
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()

    def _count_tokens_of(self, llm: Any) -> None:
        """Count prompt and sampled tokens exactly, at no per-token cost.

        llama-cpp-python's completion calls ``self.generate(prompt_tokens, …)`` and
        consumes one yielded token per sampling step; an instance attribute
        wrapping it sees both. (A logits processor could count too, but costs a
        copy of the logits per token.)
        """
        original = llm.generate
        counts = self._counts

        def generate(tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
            counts["prompt"] = len(tokens)
            for token in original(tokens, *args, **kwargs):
                counts["sampled"] += 1
                yield token

        llm.generate = generate

    @classmethod
    def load(
        cls,
        name: str,
        paths: list[Path],
        plan: Plan,
        *,
        threads: int | None = None,
        verbose: bool = False,
        chat_format: str | None = None,
    ) -> Engine:
        """Load with the plan; on a memory failure retry with fewer GPU layers, then a smaller context."""
        worker = TemplateWorker()
        if chat_format is None:
            worker.start()  # warms up while the model loads; closed by attach() if the model has no template
        config = plan.config
        attempts = [config]
        if config.n_gpu_layers:
            for fraction in (0.75, 0.5, 0.25, 0.0):
                attempts.append(replace(config, n_gpu_layers=int(config.n_gpu_layers * fraction)))
        if config.n_ctx > 2048:
            attempts.append(replace(config, n_gpu_layers=0, n_ctx=max(2048, config.n_ctx // 2)))
        errors = []
        for attempt in attempts:
            start = time.perf_counter()
            recent_llama_errors.clear()
            try:
                llm = load_llama(paths[0], attempt, threads=threads or plan.threads, chat_format=chat_format, verbose=verbose)
            except (ValueError, RuntimeError, OSError) as exc:
                # llama-cpp-python says only "Failed to load model"; llama.cpp's log says why.
                reason = f"{exc} ({recent_llama_errors[0]})" if recent_llama_errors else str(exc)
                errors.append(f"{attempt.n_gpu_layers} GPU layers, context {attempt.n_ctx}: {reason}")
                if not _is_memory_error(reason) and attempt is config and not config.n_gpu_layers:
                    break
                continue
            notes = []
            if attempt is not config:
                notes.append(
                    f"loaded with {attempt.n_gpu_layers} GPU layers and context {attempt.n_ctx} "
                    f"(the plan's {config.n_gpu_layers} / {config.n_ctx} did not load: {errors[0]})"
                )
            load_s = time.perf_counter() - start
            return cls(llm, name, attempt, load_s, notes, worker, chat_format=chat_format, threads=threads or plan.threads)
        worker.close()
        if any(_is_memory_error(e) for e in errors):
            hint = "try a smaller quantisation, a shorter --ctx, or fewer --gpu-layers; LLMCTL_DEBUG=1 shows llama.cpp's log"
        else:
            hint = "the file may be damaged, or need a newer llama.cpp; LLMCTL_DEBUG=1 shows llama.cpp's log"
        raise EngineError(f"llama.cpp could not load {name}: " + "; ".join(errors[-2:]), hint=hint)

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    @property
    def has_chat_template(self) -> bool:
        return "tokenizer.chat_template" in (self.llm.metadata or {})

    def set_threads(self, threads: int) -> None:
        """Change the CPU threads of generation and prompt evaluation; no reload needed."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm._ctx.ctx, threads, threads)
        self.llm.n_threads = self.llm.n_threads_batch = threads
        self.llm.context_params.n_threads = self.llm.context_params.n_threads_batch = threads
        self.threads = threads

    def empty_reply_advice(self, *, raw: bool = False, command: str = "run") -> str:
        """What to tell a user whose reply came back without text: usually a prompt format the model does not know."""
        return empty_reply_advice(self.chat_format, self.has_chat_template, raw=raw, command=command)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def chat(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingSettings,
        *,
        grammar: Any = None,
        on_first_token: Callable[[], None] | None = None,
    ) -> Iterator[str | Result]:
        """Stream a chat reply: text pieces, then one ``Result`` with the finish reason and timings.
        ``grammar`` (from ``grammar_for``, built once where the request is checked) constrains the output."""
        kwargs = sampling_kwargs(sampling)
        if grammar is not None:
            kwargs["grammar"] = grammar
        return self._stream(
            lambda: self.llm.create_chat_completion(messages, stream=True, **kwargs),
            lambda chunk: chunk["choices"][0]["delta"].get("content") or "",
            on_first_token,
        )

    def complete(
        self,
        prompt: str,
        sampling: SamplingSettings,
        *,
        grammar: Any = None,
        on_first_token: Callable[[], None] | None = None,
    ) -> Iterator[str | Result]:
        """Plain completion of raw text, without a chat template."""
        kwargs = sampling_kwargs(sampling)
        if grammar is not None:
            kwargs["grammar"] = grammar
        return self._stream(
            lambda: self.llm.create_completion(prompt, stream=True, **kwargs),
            lambda chunk: chunk["choices"][0].get("text") or "",
            on_first_token,
        )

    def _stream(
        self,
        start_call: Callable[[], Iterator[dict[str, Any]]],
        text_of: Callable[[dict[str, Any]], str],
        on_first_token: Callable[[], None] | None,
    ) -> Iterator[str | Result]:
        import llama_cpp

        self._counts.update(prompt=0, sampled=0)
        llama_cpp.llama_perf_context_reset(self.llm._ctx.ctx)
        timings = self.last_timings = Timings(load_s=self.load_s if self._first else 0.0)
        self._first = False

        def fill(timings: Timings, finish: str) -> None:
            perf = llama_cpp.llama_perf_context(self.llm._ctx.ctx)
            # A reply that stopped on its own ended with an end-of-generation token, which is not text.
            timings.generated_tokens = max(self._counts["sampled"] - (1 if finish == "stop" else 0), 0)
            timings.prompt_tokens = self._counts["prompt"]
            timings.prompt_eval_tokens = int(perf.n_p_eval)
            timings.prompt_eval_s = perf.t_p_eval_ms / 1000

        yield from relay_stream(start_call, text_of, timings, fill, on_first_token)


def relay_stream(
    start_call: Callable[[], Iterator[dict[str, Any]]],
    text_of: Callable[[dict[str, Any]], str],
    timings: Timings,
    fill: Callable[[Timings, str], None],
    on_first_token: Callable[[], None] | None = None,
) -> Iterator[str | Result]:
    """A llama-cpp-python-shaped stream of chunks (``start_call()``; either engine's) as text pieces,
    then its ``Result``. However it ends (done, Ctrl-C, the consumer gone, an error), ``fill`` gives
    ``timings`` the engine's counts and the time to first token, generation and total are measured
    here, where the text arrives."""
    start = time.perf_counter()
    first_at = last_at = None
    finish = "stop"
    pieces = []
    stream = None
    try:
        stream = start_call()  # the chat template is rendered here (llmctl.engine.chat_template)
        for chunk in stream:
            reason = chunk["choices"][0].get("finish_reason")
            if reason:
                finish = reason
            text = text_of(chunk)
            if not text:
                continue
            now = time.perf_counter()
            if first_at is None:
                first_at = now
                if on_first_token:
                    on_first_token()
            last_at = now
            pieces.append(text)
            yield text
    except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C, or the consumer stopped reading
        finish = "interrupted"
        stop_stream(stream)
        raise
    except Exception as exc:
        translated = engine_error(exc)
        if translated is None:
            raise
        raise translated from None
    finally:
        end = time.perf_counter()
        fill(timings, finish)
        timings.ttft_s = (first_at - start) if first_at else end - start
        timings.generation_s = (last_at - first_at) if first_at and last_at else 0.0
        timings.total_s = end - start
    yield Result("".join(pieces), finish, timings)


def sampling_kwargs(s: SamplingSettings) -> dict[str, Any]:
    """``create_completion``'s sampling arguments for ``s`` (both engines hand them to llama-cpp-python's calls)."""
    return {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
        "seed": s.seed,
        "max_tokens": s.max_tokens if s.max_tokens is not None else -1,
        "stop": list(s.stop),
    }


def engine_error(exc: Exception) -> EngineError | None:
    """What a failure while rendering or generating means for the user (None: not one of ours to word)."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, ChatTemplateError):
        return EngineError(exc.message, hint=exc.hint)
    if isinstance(exc, ValueError):
        if "context" in str(exc).lower():  # "Requested tokens (N) exceed context window of M"
            return EngineError(str(exc), hint="shorten the input or raise --ctx")
        return EngineError(f"generation failed: {exc}", hint="the model's chat template may be at fault: try --chat-format or --raw")
    if type(exc).__module__.startswith("jinja2"):
        # Templates render in llama-cpp-python's Jinja sandbox; a blocked or broken one lands here.
        return EngineError(
            f"the model's chat template failed: {type(exc).__name__}: {exc}",
            hint="choose a known format with --chat-format, or use --raw",
        )
    return None


def stop_stream(stream: Any) -> None:
    """Close a half-read stream (best effort): llama-cpp-python's generator, or the server engine's connection."""
    close = getattr(stream, "close", None)
    if close:
        try:
            close()
        except Exception:  # noqa: BLE001 - best effort
            pass


def _ggml_type(name: str) -> int | None:
    if name == "f16":
        return None  # llama.cpp's default
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        raise UsageError(f"KV cache type {name!r} is not supported by this llama.cpp build")
    return int(value)


def grammar_for(response_format: dict[str, Any] | None) -> Any:
    """A llama.cpp grammar for output constrained to JSON (optionally a schema); UsageError if the schema is unusable."""
    if response_format is None:
        return None
    from llama_cpp import LlamaGrammar

    schema = response_format.get("schema")
    if schema is not None:
        import json

        if not isinstance(schema, dict):
            raise UsageError("the JSON schema must be an object", hint='e.g. {"type": "object", "properties": {…}}')
        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as exc:  # noqa: BLE001 - the converter raises assorted types for bad schemas
            raise UsageError(f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}") from None
    from llama_cpp.llama_grammar import JSON_GBNF

    return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
