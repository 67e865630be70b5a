"""The chat-template renderer process: renders GGUF chat templates within budgets.

Started by ``llmctl.engine.chat_template.TemplateWorker`` as ``python -I template_worker.py LIMITS``
and fed requests over its stdin; it answers on its stdout. Each message is an
8-byte big-endian length followed by that many bytes of UTF-8 JSON.

Jinja's sandbox stops a template from reaching Python's internals, not from
looping for ever or growing without end, and no in-process trick bounds a
single operation such as ``'A' * 10**10`` or ``'x'|center(10**10)``. Here the
operating system does: an address-space limit (a blow-up ends in MemoryError
within the budget), a recursion limit, a cap on the rendered output counted as
Jinja yields it, and a CPU-time limit per render as a backstop. The parent
enforces the wall-clock budget by killing this process.

The environment is llama-cpp-python's ``Jinja2ChatFormatter``'s, reproduced
exactly (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, the
``{% generation %}`` pass-through, loopcontrols, its ``tojson``, the same
variables), so prompts are byte-identical to what llama-cpp-python renders;
tests/test_chat_templates.py compares the two. Only the standard library and
jinja2 are imported: the process starts in ~0.1 s and holds ~20 MB.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import threading
import time
from datetime import datetime
from typing import Any, BinaryIO

HEADER = struct.Struct(">Q")
MAX_ERROR_CHARS = 400  # of an error message sent back: templates can raise huge ones
COMPILED_CACHE = 4  # templates kept compiled (a model has one to three)


class TemplateRaised(Exception):
    """``raise_exception(...)`` called by the template (llama-cpp-python raises ValueError)."""


class OutputTooLarge(Exception):
    """The rendered text grew past the output budget."""


def read_message(stream: BinaryIO) -> bytes | None:
    """One message's payload, or None when the parent closed the pipe (it is gone or done with us)."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def write_message(stream: BinaryIO, message: Any) -> None:
    payload = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
    stream.write(HEADER.pack(len(payload)) + payload)
    stream.flush()


def _environment(template: str) -> Any:
    """Compile ``template`` exactly as llama_cpp.llama_chat_format.Jinja2ChatFormatter does."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """Pass-through for HuggingFace's ``{% generation %}`` chat-template tag."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    environment = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = tojson
    return environment.from_string(template)


def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(f: str) -> str:
    return datetime.now().strftime(f)


def raise_exception(message: Any) -> None:
    raise TemplateRaised(str(message))


class Renderer:
    def __init__(self, max_output_chars: int, cpu_budget_s: float) -> None:
        self.max_output_chars = max_output_chars
        self.cpu_budget_s = cpu_budget_s
        self.compiled: dict[str, Any] = {}

    def render(self, template: str, variables: dict[str, Any]) -> str:
        _limit_cpu_from_now(self.cpu_budget_s)
        compiled = self.compiled.get(template)
        if compiled is None:
            compiled = _environment(template)  # constant folding runs here: it is inside the budgets too
            if len(self.compiled) >= COMPILED_CACHE:
                self.compiled.pop(next(iter(self.compiled)))
            self.compiled[template] = compiled
        kwargs = variables.pop("kwargs", {})
        pieces = []
        total = 0
        # The same variables, in the same order, as Jinja2ChatFormatter.__call__ passes; generate()
        # yields what render() would join, so the size is checked as the text grows.
        for piece in compiled.generate(
            messages=variables["messages"],
            eos_token=variables["eos_token"],
            bos_token=variables["bos_token"],
            raise_exception=raise_exception,
            add_generation_prompt=variables["add_generation_prompt"],
            functions=variables["functions"],
            function_call=variables["function_call"],
            tools=variables["tools"],
            tool_choice=variables["tool_choice"],
            strftime_now=strftime_now,
            **kwargs,
        ):
            total += len(piece)
            if total > self.max_output_chars:
                raise OutputTooLarge()
            pieces.append(piece)
        return "".join(pieces)

    def answer(self, payload: bytes) -> dict[str, Any]:
        try:
            request = json.loads(payload.decode("utf-8", "surrogatepass"))
            return {"prompt": self.render(request["template"], request["variables"])}
        except TemplateRaised as exc:
            return {"error": "raised", "message": str(exc)[:MAX_ERROR_CHARS]}
        except OutputTooLarge:
            return {"error": "output"}
        except MemoryError:
            return {"error": "memory"}
        except RecursionError:
            return {"error": "recursion"}
        except Exception as exc:  # noqa: BLE001 - the template's own failure, reported by type and message
            return {"error": "template", "type": type(exc).__name__, "message": _message(exc)}


def _message(exc: BaseException) -> str:
    try:
        return str(exc)[:MAX_ERROR_CHARS]
    except Exception:  # noqa: BLE001 - a message that cannot be shown
        return ""


def _limit_cpu_from_now(budget_s: float) -> None:
    """A CPU-time ceiling for this render: ends the process if the parent's kill never comes."""
    try:
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = used.ru_utime + used.ru_stime
        _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(spent + budget_s) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - no rlimits here
        pass


def _limit_memory(max_bytes: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for name in ("RLIMIT_AS", "RLIMIT_DATA"):
            limit = getattr(resource, name, None)
            if limit is not None:
                _soft, hard = resource.getrlimit(limit)
                cap = max_bytes if hard == resource.RLIM_INFINITY else min(max_bytes, hard)
                resource.setrlimit(limit, (cap, cap))
    except (ImportError, ValueError, OSError):  # pragma: no cover - macOS refuses RLIMIT_AS; Windows has none
        pass


def _exit_with(parent: int) -> None:
    """Leave as soon as the parent is gone, even in the middle of a render."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    limits = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    requests = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # nothing else may write into the reply pipe
        os.dup2(devnull, fd)
    _exit_with(limits["parent"])
    import jinja2.ext  # noqa: F401 - imported before the memory limit, so the limit is all the template's
    import jinja2.sandbox  # noqa: F401

    sys.setrecursionlimit(limits["recursion"])
    _limit_memory(limits["memory_bytes"])
    renderer = Renderer(limits["output_chars"], limits["cpu_s"])
    write_message(replies, {"ready": True})
    while True:
        payload = read_message(requests)
        if payload is None:
            return
        reply = renderer.answer(payload)
        del payload
        try:
            write_message(replies, reply)
        except MemoryError:
            write_message(replies, {"error": "memory"})


if __name__ == "__main__":
    main()
