"""``llmctl run``: one prompt in, the model's text out — clean stdout for scripts."""

from __future__ import annotations

import json
import sys
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any, Iterable

import typer

from llmctl import output
from llmctl.commands import open_store
from llmctl.commands.generation import end_partial_line, load_feedback, overrides_from_flags, print_summary, rpc_from_flag, sampling_from_flags
from llmctl.engine import reasoning
from llmctl.engine.base import Result
from llmctl.engine.llama import grammar_for
from llmctl.engine.runner import open_model
from llmctl.errors import LlmctlError, NotFoundError, UsageError
from llmctl.options import (
    ChatFormatOpt,
    CtxOpt,
    ForceOpt,
    GpuLayersOpt,
    HideThinkingOpt,
    JsonOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelArg,
    RepeatPenaltyOpt,
    RpcOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    ThinkOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
)


def run(
    model: ModelArg,
    prompt: Annotated[str | None, typer.Argument(help="The prompt; '-' reads stdin. Piped stdin is appended to it as content.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion of the prompt text, without the chat template.")] = False,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    stop: StopOpt = None,
    ctx: CtxOpt = None,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    rpc: RpcOpt = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text only when it is complete.")] = False,
    format_: Annotated[str | None, typer.Option("--format", help="'json': constrain the output to valid JSON.")] = None,
    json_schema: Annotated[Path | None, typer.Option("--json-schema", help="Constrain the output to JSON matching this schema file.")] = None,
    chat_format: ChatFormatOpt = None,
    think: ThinkOpt = None,
    hide_thinking: HideThinkingOpt = False,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Generate a reply to one prompt; stdout carries only the model's text (or --json)."""
    sampling = sampling_from_flags(temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop)
    text = _read_prompt(prompt, file)
    response_format = _response_format(format_, json_schema)
    grammar = grammar_for(response_format)  # built once; a bad schema is a usage error before anything loads
    warnings: list[str] = []  # said on stderr as they happen; --json repeats them
    if raw:
        for flag, value in (("--system", system), ("--chat-format", chat_format), ("--think", think)):
            if value is not None:
                _warn(warnings, f"{flag} is ignored with --raw (the prompt is completed as it is, without a chat template)")
        chat_format = think = None
    think = reasoning.check_think(think, chat_format)
    overrides = overrides_from_flags(ctx, gpu_layers, threads)
    workers = rpc_from_flag(rpc)
    loaded = open_model(open_store(), model, overrides, force=force, chat_format=chat_format, feedback=load_feedback(), rpc=workers)
    warnings += loaded.notes  # already said as they arose
    engine = loaded.engine
    if raw:
        stream: Iterable[Any] = engine.complete(text, sampling, grammar=grammar)
    else:
        if not engine.has_chat_template and chat_format is None:
            _warn(warnings, "this model has no chat template; using a generic format (choose one with --chat-format, or use --raw)")
        setup, said = reasoning.apply(engine.llm, reasoning.setup_for(engine.llm, loaded.info.chat_template, think))
        for warning in said:
            _warn(warnings, warning)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        stream = reasoning.split(engine.llm, engine.chat(messages, sampling, grammar=grammar), setup.format)
    live = not (no_stream or json_output)
    reply = output.ReplyWriter()  # exact on a pipe; escape sequences neutralised on a terminal
    thinking = output.ThinkingWriter(show=not (hide_thinking or json_output))  # stderr, on a terminal only
    with closing(engine):  # llama.cpp's memory and the template renderer go as soon as the reply is done
        result = _stream_reply(stream, reply if live else None, thinking if live else None)
    no_answer = reasoning.no_answer(result)
    if no_answer:
        _warn(warnings, no_answer)
    elif result.finish_reason == "stop" and not result.text.strip():
        _warn(warnings, engine.empty_reply_advice(raw=raw))
    if json_output:
        output.emit_json(_json(loaded, result, warnings))
    elif live:
        reply.finish()
    else:
        if result.reasoning:
            thinking.write(result.reasoning)
            thinking.finish()
        reply.write(result.text)
        reply.finish(newline=False)
    if verbose:
        print_summary(result.timings)


def _stream_reply(
    stream: Iterable[str | reasoning.Thought | Result],
    reply: output.ReplyWriter | None,
    thinking: output.ThinkingWriter | None,
) -> Result:
    """Write the pieces as they come (unless ``reply`` is None; reasoning to ``thinking``); return the final Result."""
    at_line_start = True
    try:
        for piece in stream:
            if isinstance(piece, Result):
                return piece
            if isinstance(piece, reasoning.Thought):
                if thinking is not None:
                    thinking.write(piece.text)
                continue
            if thinking is not None:
                thinking.finish()
            if reply is not None and piece:
                reply.write(piece)
                at_line_start = piece.endswith("\n")
    except (KeyboardInterrupt, LlmctlError):
        end_partial_line(at_line_start)  # so "error: …" starts a line of its own
        raise
    finally:
        if thinking is not None:
            thinking.finish()
    raise AssertionError("the engine's stream ended without a Result")


def _read_prompt(prompt: str | None, file: Path | None) -> str:
    if file is not None:
        if not file.is_file():
            raise NotFoundError(f"{file}: no such file", hint="check the path given to --file")
        body = file.read_text(encoding="utf-8", errors="replace")
        return f"{prompt}\n\n{body}" if prompt and prompt != "-" else body
    piped = None
    if prompt == "-" or not sys.stdin.isatty():
        try:
            piped = sys.stdin.read()
        except OSError:  # stdin closed or unreadable: as if nothing was piped
            piped = None
    if prompt == "-":
        prompt = None
    if piped and prompt:
        return f"{prompt}\n\n{piped.rstrip()}"  # instructions, then the content they are about
    text = prompt or (piped or "").strip()
    if not text:
        raise UsageError("no prompt given", hint='pass one: llmctl run MODEL "your prompt", or pipe text in')
    return text


def _response_format(format_: str | None, schema_file: Path | None) -> dict[str, Any] | None:
    if schema_file is not None:
        if not schema_file.is_file():
            raise NotFoundError(f"{schema_file}: no such file", hint="check the path given to --json-schema")
        try:
            schema = json.loads(schema_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UsageError(f"--json-schema {schema_file}: not valid JSON ({exc})") from None
        return {"type": "json_object", "schema": schema}
    if format_ is None:
        return None
    if format_.lower() != "json":
        raise UsageError(f"--format {format_!r} is not supported", hint="use --format json")
    return {"type": "json_object"}


def _warn(warnings: list[str], message: str) -> None:
    output.warn(message)
    warnings.append(message)


def _json(loaded: Any, result: Result, warnings: list[str]) -> dict[str, Any]:
    t = result.timings
    return {
        "model": loaded.model.name,
        "text": result.text,
        "reasoning": result.reasoning,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.generated_tokens,
            "total_tokens": t.prompt_tokens + t.generated_tokens,
        },
        "timings": t.to_dict(),
        "load": {
            "n_ctx": loaded.engine.config.n_ctx,
            "n_gpu_layers": loaded.engine.config.n_gpu_layers,
            "threads": loaded.plan.threads,
            "fit": loaded.plan.chosen.fit,
        },
        "warnings": warnings,
    }
