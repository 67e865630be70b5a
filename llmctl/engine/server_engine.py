"""The ``Engine`` over a llama-server child, for a model split across llama.cpp RPC workers.

llama-cpp-python cannot use llama.cpp's RPC backend, so ``run --rpc`` and ``chat --rpc`` generate
through a ``llama-server`` child started with ``--rpc HOST:PORT,…`` (started, logged and stopped as
``serve`` starts its children: llmctl/engine/server_process.py) and talk to it over its Unix
socket with serve's small HTTP/1.1 client (llmctl/serve/upstream.py), on a private event loop.

Everything but the forward pass stays in this process, as the in-process engine has it: the
model's vocabulary is loaded alone (``load_vocab``: no weights), so llama-cpp-python renders the
chat template in llmctl's bounded renderer, picks the chat format (``--chat-format`` and the
fallbacks) and tokenises exactly as it does for an in-process run; only the prompt's token ids go
to llama-server's ``/completion``. So the prompt is byte-identical, and thinking models go through
the same code (``reasoning.apply``/``split`` read the same renderer's variables and last prompt).

Timings: the prompt's (tokens, evaluated tokens, evaluation time) are llama-server's own
(``tokens_evaluated``, ``timings.prompt_n``/``prompt_ms`` of the final chunk); generated tokens are
its ``predicted_n`` less the end-of-generation token; time to first token and generation time are
measured here, where the text arrives, as the in-process engine measures them.

Faults: the RPC client in llama.cpp aborts its process when a worker goes away ("Remote RPC server
crashed or returned malformed response", without the address). A stream that breaks, or a child
that dies, is told as ``EngineLostError`` naming the workers that no longer accept a connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llmctl.engine.base import EngineError, EngineLostError, Result, Timings, empty_reply_advice

if TYPE_CHECKING:
    from llmctl.engine.chat_template import TemplateWorker
    from llmctl.engine.sampling import SamplingSettings
    from llmctl.engine.server_process import ServerProcess, ServerSpec, Sockets
    from llmctl.plan.fit import LoadConfig, Plan

LOAD_TIMEOUT_S = 300.0  # weights travel to the workers while llama-server loads
EXIT_WAIT_S = 10.0  # for a child that aborts: llama.cpp prints a backtrace (through gdb, where installed) first
PROBE_TIMEOUT_S = 2.0


# --- the workers ----------------------------------------------------------------------------


def unreachable(endpoints: list[str], timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """The endpoints that do not accept a TCP connection now (a plain connect and close, no handshake)."""
    gone = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except OSError:
            gone.append(endpoint)
    return gone


# --- the plan, as llama-server's flags ------------------------------------------------------


def offload_to_workers(plan: Plan, layer_count: int | None, requested: int | None) -> Plan:
    """The plan with its layers on the RPC workers: all of them (and the output layer) unless
    ``--gpu-layers`` said how many. This machine's plan counts only local GPUs, so it would keep
    every layer here, and the workers would get nothing to do."""
    layers = requested if requested is not None else (layer_count or 0) + 1
    estimate = plan.chosen.estimate  # still this machine's memory: planning across workers is `fit --rpc`'s
    chosen = replace(plan.chosen, estimate=replace(estimate, config=replace(estimate.config, n_gpu_layers=layers)))
    return replace(plan, chosen=chosen)


def spec_for(name: str, paths: list[Path], config: LoadConfig, threads: int, rpc: list[str]) -> ServerSpec:
    """One slot with the plan's context, KV cache and batch, its layers on the workers."""
    from llmctl.engine.server_process import ServerSpec

    return ServerSpec(
        model=paths[0],
        alias=name,
        n_ctx=config.n_ctx,
        slots=1,
        n_gpu_layers=config.n_gpu_layers,
        threads=threads,
        n_batch=config.n_batch,
        n_ubatch=config.n_ubatch,
        type_k=config.type_k,
        type_v=config.type_v,
        flash_attn=config.flash_attn,
        swa_full=config.swa_full,
        tensor_split=config.tensor_split,
        rpc=list(rpc),
    )


# --- the engine ---------------------------------------------------------------------------------


class ServerEngine:
    """One model in a llama-server child; the same surface as ``llmctl.engine.llama.Engine``."""

    def __init__(
        self,
        llm: Any,
        name: str,
        config: LoadConfig,
        notes: list[str],
        template_worker: TemplateWorker | None,
        *,
        spec: ServerSpec,
        start: Callable[[ServerSpec], ServerProcess],
        chat_format: str | None = None,
    ) -> None:
        self.llm = llm  # the vocabulary alone: chat templates and tokens (``load_vocab``)
        self.name = name
        self.config = config
        self.notes = notes
        self.chat_format = chat_format
        self.spec = spec
        self.threads: int | None = spec.threads
        self.last_timings: Timings | None = None
        self.template_worker = template_worker
        self._start = start
        self._first = True
        self._final: dict[str, Any] = {}  # the last chunk llama-server sent for the current reply
        began = time.perf_counter()
        self.child: ServerProcess | None = start(spec)
        self.load_s = time.perf_counter() - began
        self._loop = asyncio.new_event_loop()
        llm.create_completion = self._remote_completion  # what llama-cpp-python's chat handlers call

    @classmethod
    def load(
        cls,
        name: str,
        paths: list[Path],
        plan: Plan,
        *,
        rpc: list[str],
        threads: int | None = None,
        verbose: bool = False,
        chat_format: str | None = None,
        command: list[str] | None = None,
    ) -> ServerEngine:
        """Start llama-server with ``--rpc`` and the plan; the vocabulary loads here meanwhile."""
        from llmctl.engine import chat_template
        from llmctl.engine.chat_template import TemplateWorker
        from llmctl.engine.llama import load_vocab
        from llmctl.engine.server_process import Sockets

        spec = spec_for(name, paths, plan.config, threads or plan.threads, rpc)
        sockets = Sockets()
        starter = _Starter(name, sockets, command)
        worker = TemplateWorker()
        if chat_format is None:
            worker.start()
        try:
            llm = load_vocab(paths[0], chat_format=chat_format, verbose=verbose)
        except (ValueError, RuntimeError, OSError) as exc:
            worker.close()
            sockets.close()
            raise EngineError(f"llama.cpp could not read the vocabulary of {name}: {exc}", hint="the file may be damaged") from None
        attached = chat_template.attach(llm, worker)
        try:
            return cls(llm, name, plan.config, [], attached, spec=spec, start=starter, chat_format=chat_format)
        except BaseException:
            if attached is not None:
                attached.close()
            llm.close()
            sockets.close()
            raise

    # --- what the Engine protocol asks --------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.spec.n_ctx

    @property
    def has_chat_template(self) -> bool:
        return "tokenizer.chat_template" in (self.llm.metadata or {})

    @property
    def log_path(self) -> Path | None:
        return self.child.log_path if self.child is not None else None

    def count_tokens(self, text: str) -> int:
        """Counted with the model's own tokenizer, loaded here (the same ids llama-server would make)."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def set_threads(self, threads: int) -> None:
        """llama-server cannot change its threads while it runs: the child is started again with
        ``threads`` (the weights travel to the workers again; the conversation is kept by the caller)."""
        if threads == self.spec.threads:
            return
        previous = self.spec
        self._stop_child()
        try:
            self.child = self._start(replace(previous, threads=threads, threads_batch=None))
        except EngineError as exc:
            try:
                self.child = self._start(previous)
            except EngineError:
                raise EngineLostError(f"{exc.message}; and it could not be started again with {previous.threads} threads", exc.hint) from None
            raise EngineError(f"{exc.message}; kept {previous.threads} threads", exc.hint) from None
        self.spec = replace(previous, threads=threads, threads_batch=None)
        self.threads = threads

    def empty_reply_advice(self, *, raw: bool = False, command: str = "run") -> str:
        return empty_reply_advice(self.chat_format, self.has_chat_template, raw=raw, command=command)

    def close(self) -> None:
        """Stop the child and the template renderer; free the vocabulary."""
        self._stop_child()
        if self.template_worker is not None:
            self.template_worker.close()
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
        if not self._loop.is_closed():
            self._loop.close()
        close_sockets = getattr(self._start, "close", None)
        if close_sockets is not None:
            close_sockets()

    def _stop_child(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    # --- generation ---------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, str]], sampling: SamplingSettings, *, grammar: Any = None) -> Iterator[str | Result]:
        """Stream a chat reply: llama-cpp-python's chat handler renders and tokenises here, then
        calls ``create_completion`` (``_remote_completion``); text pieces, then one ``Result``."""
        from llmctl.engine.llama import sampling_kwargs

        kwargs = sampling_kwargs(sampling)
        if grammar is not None:
            kwargs["grammar"] = grammar
        return self._stream(
            lambda: self.llm.create_chat_completion(messages, stream=True, **kwargs),
            lambda chunk: chunk["choices"][0]["delta"].get("content") or "",
        )

    def complete(self, prompt: str, sampling: SamplingSettings, *, grammar: Any = None) -> Iterator[str | Result]:
        """Plain completion of raw text, without a chat template."""
        from llmctl.engine.llama import sampling_kwargs

        kwargs = sampling_kwargs(sampling)
        if grammar is not None:
            kwargs["grammar"] = grammar
        return self._stream(
            lambda: self._remote_completion(prompt, stream=True, **kwargs),
            lambda chunk: chunk["choices"][0].get("text") or "",
        )

    def _stream(self, start_call: Callable[[], Iterator[dict[str, Any]]], text_of: Callable[[dict[str, Any]], str]) -> Iterator[str | Result]:
        from llmctl.engine.llama import relay_stream

        self._final = {}
        timings = self.last_timings = Timings(load_s=self.load_s if self._first else 0.0)
        self._first = False
        yield from relay_stream(start_call, text_of, timings, self._fill)

    def _fill(self, timings: Timings, finish: str) -> None:
        final = self._final
        measured = final.get("timings") or {}
        predicted = int(measured.get("predicted_n", final.get("tokens_predicted", 0)) or 0)
        # A reply that ended on its own ended with an end-of-generation token, which is not text.
        timings.generated_tokens = max(predicted - (1 if final.get("stop_type") == "eos" else 0), 0)
        timings.prompt_tokens = int(final.get("tokens_evaluated", 0) or 0)
        timings.prompt_eval_tokens = int(measured.get("prompt_n", 0) or 0)
        timings.prompt_eval_s = float(measured.get("prompt_ms", 0.0) or 0.0) / 1000

    def _remote_completion(self, prompt: str | list[int], *, stream: bool = False, **options: Any) -> Iterator[dict[str, Any]]:
        """``Llama.create_completion``'s streamed chunks, from llama-server's ``/completion``.

        ``prompt`` is token ids (a chat handler's) or text, tokenised here as llama-cpp-python
        tokenises a completion's prompt (the vocabulary's BOS, special tokens parsed)."""
        if not stream:
            raise EngineError("the server engine only streams")  # run and chat always stream
        tokens = list(prompt) if not isinstance(prompt, str) else self.llm.tokenize(prompt.encode("utf-8"), special=True)
        return self._events(request_body(tokens, options))

    def _events(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        from llmctl.serve import upstream

        if self.child is None:
            raise EngineLostError(f"llama-server for {self.name} is not running", hint="start the command again")
        created = int(time.time())
        ident = f"cmpl-{created}"
        response = None
        events = None
        try:
            try:
                response = self._run(upstream.post(self.child.address, "/completion", json.dumps(body).encode()))
                if response.status_code != 200:
                    raise answer_error(response.status_code, self._run(response.aread()))
                events = response.aiter_raw()
                buffer = b""
                while True:
                    try:
                        data = self._run(events.__anext__())
                    except StopAsyncIteration:
                        break
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        event = parse_event(line)
                        if event is None:
                            continue
                        self._final = event
                        done = bool(event.get("stop"))
                        yield {
                            "id": ident,
                            "object": "text_completion",
                            "created": created,
                            "model": self.name,
                            "choices": [
                                {
                                    "text": "" if done else event.get("content", ""),
                                    "index": 0,
                                    "logprobs": None,
                                    "finish_reason": finish_of(event) if done else None,
                                }
                            ],
                        }
                        if done:
                            return
                raise upstream.ChildClosed("the answer ended before its last chunk")
            except upstream.FAILURES as exc:
                raise self._lost(exc) from None
        finally:
            self._settle(response, events)

    def _run(self, awaitable: Any) -> Any:
        return self._loop.run_until_complete(awaitable)

    def _settle(self, response: Any, events: Any) -> None:
        """Close the connection (a child still generating sees its client gone and stops) and
        finish what a Ctrl-C left pending on the loop."""
        if self._loop.is_closed():
            return
        pending = [task for task in asyncio.all_tasks(self._loop) if not task.done()]
        for task in pending:
            task.cancel()
        try:
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            if events is not None:
                self._loop.run_until_complete(events.aclose())
            if response is not None:
                self._loop.run_until_complete(response.aclose())
        except Exception:  # noqa: BLE001 - the connection is gone either way
            pass

    def _lost(self, exc: BaseException) -> EngineLostError:
        """What a broken stream means: a worker gone (named), or llama-server itself gone."""
        from llmctl.engine.server_process import describe_exit

        child = self.child
        assert child is not None
        deadline = time.monotonic() + EXIT_WAIT_S
        while child.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = child.exit_code()
        child.log.join(timeout=1.0)
        said = child.log.last_error()
        gone = unreachable(self.spec.rpc)
        hint = f"llama-server's log: {child.log_path}"
        self._stop_child()
        if gone:
            which = ", ".join(gone)
            plural = "s" if len(gone) > 1 else ""
            return EngineLostError(
                f"the RPC worker{plural} {which} went away" + (" during generation" if code is not None else ""),
                hint=f"restart the worker{plural} (ggml-rpc-server, or `llmctl rpc-server`) and run the command again; {hint}",
            )
        state = describe_exit(code) if code is not None else "stopped answering"
        why = f": {said}" if said and code is not None else f" ({exc})" if str(exc) else ""
        cause = " (all RPC workers answer now; one may have restarted)" if self.spec.rpc else ""
        return EngineLostError(f"llama-server {state} while generating{why}{cause}", hint=hint)


class _Starter:
    """Starts the child for a spec (the first start and ``set_threads``' restarts), under one
    private sockets folder; a start that fails with an unreachable worker names it."""

    def __init__(self, name: str, sockets: Sockets, command: list[str] | None) -> None:
        self.name = name
        self.sockets = sockets
        self.command = command

    def __call__(self, spec: ServerSpec) -> ServerProcess:
        from llmctl.config import get_settings
        from llmctl.engine import native
        from llmctl.engine.rpc import parse_endpoints, preflight
        from llmctl.engine.server_process import ServerStartError, log_path_for, start_server

        command = self.command or [str(native.require("llama-server"))]
        # llama.cpp aborts on a worker it cannot reach or that runs another build: check each first.
        if spec.rpc:
            preflight(parse_endpoints(",".join(spec.rpc)))
        try:
            return start_server(
                self.name,
                spec,
                command=command,
                address=self.sockets.next(),
                log_path=log_path_for(get_settings().home / "logs", f"{self.name}.rpc"),
                deadline_s=LOAD_TIMEOUT_S,
            )
        except ServerStartError as exc:
            gone = unreachable(spec.rpc)
            if gone:
                raise EngineError(
                    f"cannot reach the RPC worker{'s' if len(gone) > 1 else ''} {', '.join(gone)}",
                    hint="start ggml-rpc-server (or `llmctl rpc-server`) there, and check the address and any firewall or SSH tunnel",
                ) from None
            raise EngineError(exc.message, exc.hint) from None

    def close(self) -> None:
        self.sockets.close()


# --- llama-server's /completion -------------------------------------------------------------


def request_body(tokens: list[int], options: dict[str, Any]) -> dict[str, Any]:
    """``/completion``'s request for ``create_completion``'s arguments (as ``sampling_kwargs`` and
    the chat handlers give them): the samplers llmctl sets, the others left at llama.cpp's defaults,
    which are llama-cpp-python's too."""
    body: dict[str, Any] = {"prompt": tokens, "stream": True, "cache_prompt": True}
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty"):
        if options.get(name) is not None:
            body[name] = options[name]
    seed = options.get("seed")
    body["seed"] = seed if seed is not None else -1  # -1: a random seed
    max_tokens = options.get("max_tokens")
    body["n_predict"] = max_tokens if max_tokens is not None and max_tokens > 0 else -1
    stop = options.get("stop") or []
    body["stop"] = [stop] if isinstance(stop, str) else [s for s in stop if s]
    grammar = options.get("grammar")
    if grammar is not None:
        text = getattr(grammar, "_grammar", grammar)  # llama_cpp.LlamaGrammar keeps its GBNF text
        if not isinstance(text, str):
            raise EngineError("this grammar cannot be sent to llama-server")
        body["grammar"] = text
    return body


def parse_event(line: bytes) -> dict[str, Any] | None:
    """One server-sent event's JSON (``data: {...}``), or None for blank lines and comments; an
    error event becomes an EngineError."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    try:
        event = json.loads(line[5:])
    except ValueError:
        raise EngineError(f"llama-server sent something that is not JSON: {line[:80]!r}") from None
    if not isinstance(event, dict):
        return None
    if "error" in event:
        raise error_of(event["error"])
    return event


def finish_of(event: dict[str, Any]) -> str:
    """llama-cpp-python's finish reason for llama-server's ``stop_type``."""
    return "length" if event.get("stop_type") == "limit" else "stop"


def answer_error(status: int, raw: bytes) -> EngineError:
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return EngineError(f"llama-server answered {status}: {raw[:200].decode('utf-8', 'replace')}")
    return error_of(error)


def error_of(error: Any) -> EngineError:
    if not isinstance(error, dict):
        return EngineError(f"llama-server: {error}")
    message = str(error.get("message") or error)
    if error.get("type") == "exceed_context_size_error":
        return EngineError(message, hint="shorten the input or raise --ctx")
    return EngineError(f"llama-server: {message}")
