"""GGUF chat templates rendered within time, memory, output and recursion budgets.

A GGUF file brings its own Jinja chat template, and llama-cpp-python renders it
in Jinja's ImmutableSandboxedEnvironment. The sandbox stops escapes, not
resource abuse: nested ``range(100000)`` loops spin for ever, ``x ~ x`` doubling
takes gigabytes, ``'A' * 20000000000`` ends in MemoryError, and llama-cpp-python
compiles every template of a model while loading it (Jinja folds constant
expressions at compile time, so the load itself can blow up).

Here every GGUF template renders in a small worker process
(llmctl/template_worker.py) with an address-space limit, a recursion limit and
an output cap, under a wall-clock deadline the parent enforces by killing and
later respawning it. A template over the size limit is refused before it is
sent. Nothing is compiled while loading.

How it is wired in: ``install()`` replaces
``llama_cpp.llama_chat_format.Jinja2ChatFormatter`` (the class ``Llama.__init__``
builds a formatter with for each ``tokenizer.chat_template*`` entry) with
``BoundedChatFormatter``, a drop-in that stores the template and renders through
a ``TemplateWorker``. llmctl.engine.llama calls ``install()`` when it is imported,
which every command does, so every ``llama_cpp.Llama(...)`` llmctl builds is
covered: the Engine's, bench's and tune's. If llama_cpp is already imported it
is patched at once; otherwise a post-import hook on ``sys.meta_path`` patches
``llama_cpp.llama_chat_format`` as soon as it is first imported, keeping the
heavy import lazy. An Engine starts its worker while the model loads (so the
first render finds it warm) and closes it with the model; a formatter used
without an Engine starts its own at its first render. A worker never outlives
its parent: it exits at the end of its input pipe or, mid-render, when a
watchdog thread sees its parent gone, and a CPU-time limit per render backs
the parent's deadline. Messages, tools and the other variables travel to the
worker as JSON, which is what they are in every caller (chat turns, OpenAI
requests).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError

STARTUP_TIMEOUT_S = 30.0  # python + jinja2 start in ~0.1 s; this is for a machine under heavy load
HINT = "choose a known format with --chat-format, or use --raw"
WORKER_SCRIPT = Path(__file__).with_name("template_worker.py")


@dataclass(frozen=True)
class Budgets:
    """What one render may use. Real templates are up to ~17 KB (gpt-oss; Kimi K2/K3, MiroThinker and
    Gemma 4 12-16 KB; Qwen3 4 KB), compile in milliseconds and render in well under 50 ms and 30 MB:
    every limit leaves 30x or more."""

    time_s: float = 5.0  # wall clock per render, compiling included
    memory_bytes: int = 512 * 1024 * 1024  # the worker's address space
    output_chars: int = 8 * 1024 * 1024  # ~2x the text of a 1M-token context
    template_chars: int = 512 * 1024
    recursion: int = 1000  # Python frames; a Jinja macro call takes a handful

    def problem(self, kind: str) -> str:
        return {
            "time": f"rendering took longer than its {self.time_s:g} s time budget",
            "memory": f"rendering needed more than its {self.memory_bytes / 2**20:g} MiB memory budget",
            "output": f"the rendered prompt grew past its {self.output_chars:,}-character size budget",
            "recursion": f"it recursed deeper than the renderer's limit of {self.recursion} frames",
        }[kind]


DEFAULT_BUDGETS = Budgets()


class ChatTemplateError(LlmctlError):
    """The model's chat template failed, or ran past one of its budgets."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"the model's chat template failed: {problem}", hint=HINT)
        self.problem = problem


class TemplateWorker:
    """One renderer process, started on demand, killed and respawned when a render overruns.

    Thread-safe: renders are serialised (the process answers one request at a time).
    """

    def __init__(self, budgets: Budgets = DEFAULT_BUDGETS) -> None:
        self.budgets = budgets
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._replies: queue.Queue[Any] = queue.Queue()
        self._ready = False
        self._finalizer: weakref.finalize | None = None

    # --- lifetime

    def start(self) -> None:
        """Start the process now if it is not running (returns at once; it warms up in the background)."""
        with self._lock:
            self._spawn_if_needed()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> bool:
        with self._lock:
            self._spawn_if_needed()
            try:
                self._await_ready(time.monotonic() + timeout)
            except ChatTemplateError:
                return False
            return True

    def close(self) -> None:
        """Stop the process (a later render would start a new one)."""
        if self._finalizer is not None:
            self._finalizer()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _spawn_if_needed(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        limits = {
            "parent": os.getpid(),
            "memory_bytes": self.budgets.memory_bytes,
            "output_chars": self.budgets.output_chars,
            "recursion": self.budgets.recursion,
            "cpu_s": self.budgets.time_s * 2,
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER_SCRIPT), json.dumps(limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C and job control are the parent's
            env={**os.environ, "MALLOC_ARENA_MAX": "1"},  # one malloc arena: the address-space limit is all heap
            close_fds=True,
        )
        replies: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=_read_replies, args=(proc, replies), name="chat-template-replies", daemon=True).start()
        self._proc, self._replies, self._ready = proc, replies, False
        self._finalizer = weakref.finalize(self, _stop, proc)

    def _await_ready(self, deadline: float) -> None:
        if self._ready:
            return
        reply = self._next_reply(deadline)
        if reply is _TIMEOUT:
            self.close()
            raise ChatTemplateError(f"the template renderer did not start within {STARTUP_TIMEOUT_S:g} s")
        if not isinstance(reply, dict) or not reply.get("ready"):
            raise ChatTemplateError(f"the template renderer could not start ({self._how_it_ended()})")
        self._ready = True

    def _next_reply(self, deadline: float) -> Any:
        try:
            return self._replies.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            return _TIMEOUT

    def _how_it_ended(self) -> str:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.close()
        if code is not None and code < 0:
            return f"signal {-code}"
        return f"exit status {code}"

    # --- rendering

    def render(self, template: str, variables: dict[str, Any]) -> dict[str, Any]:
        """Render in the worker; returns its answer ({"prompt": ...} or {"error": kind, ...}).

        Budget overruns, a dead worker and an unsendable request raise ChatTemplateError.
        """
        limit = self.budgets.template_chars
        if len(template) > limit:
            raise ChatTemplateError(f"the template has {len(template):,} characters, over the limit of {limit:,}")
        try:
            payload = json.dumps({"template": template, "variables": variables}, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ChatTemplateError(f"the messages cannot be passed to the template: {exc}") from None
        data = payload.encode("utf-8", "surrogatepass")
        with self._lock:
            self._spawn_if_needed()
            try:
                self._await_ready(time.monotonic() + STARTUP_TIMEOUT_S)
                assert self._proc is not None and self._proc.stdin is not None
                try:
                    self._proc.stdin.write(len(data).to_bytes(8, "big") + data)
                    self._proc.stdin.flush()
                except (BrokenPipeError, OSError):
                    raise ChatTemplateError(f"the template renderer died ({self._how_it_ended()})") from None
                reply = self._next_reply(time.monotonic() + self.budgets.time_s)
            except BaseException:
                self.close()  # Ctrl-C or anything else mid-render: the process is mid-answer, start afresh next time
                raise
            if reply is _TIMEOUT:
                self.close()
                raise ChatTemplateError(self.budgets.problem("time"))
            if not isinstance(reply, dict):
                how = self._how_it_ended()
                if how == "signal 24":  # SIGXCPU: the worker's own CPU-time backstop
                    raise ChatTemplateError(self.budgets.problem("time"))
                raise ChatTemplateError(f"the template renderer died while rendering ({how})")
            return reply


_TIMEOUT = object()


def _read_replies(proc: subprocess.Popen[bytes], replies: queue.Queue[Any]) -> None:
    """Move the worker's answers into a queue, so the parent can wait with a deadline; None at its end."""
    stream = proc.stdout
    assert stream is not None
    try:
        while True:
            header = stream.read(8)
            if len(header) < 8:
                break
            payload = stream.read(int.from_bytes(header, "big"))
            replies.put(json.loads(payload.decode("utf-8", "surrogatepass")))
    except (OSError, ValueError):
        pass
    finally:
        replies.put(None)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:  # pragma: no cover - already gone
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        pass
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:  # pragma: no cover
            pass


# --- the drop-in formatter ---------------------------------------------------------------


class BoundedChatFormatter:
    """Drop-in for llama_cpp.llama_chat_format.Jinja2ChatFormatter that renders in a TemplateWorker.

    Same constructor and call signature, same ChatFormatterResponse (prompt, stop on the EOS
    text, a stopping criterion on the stop token ids, added_special), and a template's
    ``raise_exception(...)`` still raises ValueError here. Nothing is compiled in the
    constructor, which llama-cpp-python calls while loading the model.
    """

    # Set by install(): llama-cpp-python's own class (its helpers stay reachable through this one).
    original: Any = None

    def __init__(
        self,
        template: str,
        eos_token: str,
        bos_token: str,
        add_generation_prompt: bool = True,
        stop_token_ids: list[int] | None = None,
    ) -> None:
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
        self.worker = TemplateWorker()  # no process until the first render, unless an Engine attaches its own
        # Template variables for every render, such as enable_thinking for --think (see set_variables);
        # empty unless asked, so prompts stay llama-cpp-python's.
        self.variables: dict[str, Any] = {}
        self.last_prompt: str | None = None  # where a reply starts (inside a <think> block or not)

    def render(
        self,
        messages: list[Any],
        functions: Any = None,
        function_call: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> str:
        variables = {
            "messages": messages,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "add_generation_prompt": self.add_generation_prompt,
            "functions": functions,
            "function_call": function_call,
            "tools": tools,
            "tool_choice": tool_choice,
            "kwargs": {**self.variables, **kwargs} if self.variables else kwargs,
        }
        reply = self.worker.render(self.template, variables)
        if "prompt" in reply:
            self.last_prompt = str(reply["prompt"])
            return self.last_prompt
        kind = reply.get("error")
        if kind == "raised":
            raise ValueError(reply.get("message", ""))  # as llama-cpp-python's raise_exception does
        if kind == "template":
            raise ChatTemplateError(f"{reply.get('type', 'Error')}: {reply.get('message', '')}")
        if kind in ("memory", "output", "recursion"):
            raise ChatTemplateError(self.worker.budgets.problem(kind))
        raise ChatTemplateError(f"the template renderer answered {kind!r}")

    def __call__(
        self,
        *,
        messages: list[Any],
        functions: Any = None,
        function_call: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> Any:
        from llama_cpp import llama
        from llama_cpp.llama_chat_format import ChatFormatterResponse

        prompt = self.render(messages, functions, function_call, tools, tool_choice, **kwargs)
        stopping_criteria = None
        if self.stop_token_ids is not None:
            stop_ids = self.stop_token_ids

            def stop_on_last_token(tokens: Any, logits: Any) -> bool:
                return tokens[-1] in stop_ids

            stopping_criteria = llama.StoppingCriteriaList([stop_on_last_token])
        return ChatFormatterResponse(prompt=prompt, stop=[self.eos_token], stopping_criteria=stopping_criteria, added_special=True)

    def to_chat_handler(self) -> Any:
        from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

        handler = chat_formatter_to_chat_completion_handler(self)
        handler.chat_formatter = self  # type: ignore[attr-defined]  # how attach() finds it
        return handler


def formatters_of(llm: Any) -> list[BoundedChatFormatter]:
    """The bounded formatters a Llama built from its GGUF templates."""
    handlers = getattr(llm, "_chat_handlers", None)
    if not isinstance(handlers, dict):
        return []
    found = [getattr(handler, "chat_formatter", None) for handler in handlers.values()]
    return [f for f in found if isinstance(f, BoundedChatFormatter)]


def active_formatter(llm: Any) -> BoundedChatFormatter | None:
    """The bounded formatter ``create_chat_completion`` will use, if it uses one."""
    handlers = getattr(llm, "_chat_handlers", None)
    handler = getattr(llm, "chat_handler", None) or (handlers.get(getattr(llm, "chat_format", None)) if isinstance(handlers, dict) else None)
    formatter = getattr(handler, "chat_formatter", None)
    return formatter if isinstance(formatter, BoundedChatFormatter) else None


def set_variables(llm: Any, variables: dict[str, Any]) -> bool:
    """Pass ``variables`` (``enable_thinking``, ``reasoning_effort``, …) to every render of a Llama's GGUF templates.

    False when the Llama renders no GGUF template (a built-in ``--chat-format``), which takes none.
    """
    formatters = formatters_of(llm)
    for formatter in formatters:
        formatter.variables = dict(variables)
    return active_formatter(llm) is not None


def last_prompt(llm: Any) -> str | None:
    """The prompt the Llama's GGUF template rendered last (None with a built-in format, or before any)."""
    formatter = active_formatter(llm)
    return formatter.last_prompt if formatter is not None else None


def attach(llm: Any, worker: TemplateWorker | None = None) -> TemplateWorker | None:
    """Give all of a Llama's bounded formatters one worker (``worker``, or a new one) and warm it if it will be used.

    Returns the worker, or None (after closing ``worker``) when the model renders no GGUF template.
    """
    formatters = formatters_of(llm)
    if not formatters:
        if worker is not None:
            worker.close()
        return None
    worker = worker or TemplateWorker()
    for formatter in formatters:
        if formatter.worker is not worker:
            formatter.worker.close()
            formatter.worker = worker
    if active_formatter(llm) is not None:
        worker.wait_ready()  # the first render then costs only itself; a failure to start is reported by that render
    else:
        worker.close()  # a built-in format is in use: no process until a template is rendered, if ever
    return worker


# --- installing it into llama-cpp-python -----------------------------------------------------

_TARGET = "llama_cpp.llama_chat_format"


def install() -> None:
    """Make every ``llama_cpp.Llama`` built in this process use BoundedChatFormatter for GGUF templates.

    Idempotent and cheap: it does not import llama_cpp.
    """
    from llmctl.importhook import after_import

    after_import(_TARGET, _patch)


def _patch(module: Any) -> None:
    original = getattr(module, "Jinja2ChatFormatter", None)
    if original is None or original is BoundedChatFormatter:
        return
    BoundedChatFormatter.original = original
    # The multimodal handlers reach these helpers through the module's class name.
    for helper in ("IgnoreGenerationTags", "tojson", "strftime_now"):
        if hasattr(original, helper):
            setattr(BoundedChatFormatter, helper, original.__dict__.get(helper, getattr(original, helper)))
    module.Jinja2ChatFormatter = BoundedChatFormatter
