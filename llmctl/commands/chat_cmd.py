"""``llmctl chat``: an interactive conversation in the terminal (or line by line from a pipe)."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import replace
from typing import Annotated, Callable, Iterator

import typer

from llmctl import output
from llmctl.commands import open_store
from llmctl.commands.generation import load_feedback, overrides_from_flags, rpc_from_flag, sampling_from_flags
from llmctl.config import get_settings
from llmctl.engine import reasoning
from llmctl.engine.base import Engine, EngineLostError, ReloadError, Result
from llmctl.engine.chat import ChatSession, Command
from llmctl.engine.runner import Loaded, open_model, reload_with_context
from llmctl.errors import LlmctlError
from llmctl.options import (
    ChatFormatOpt,
    CtxOpt,
    ForceOpt,
    GpuLayersOpt,
    HideThinkingOpt,
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
)

BLOCK = '"""'


def chat(
    model: ModelArg,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Render replies as Markdown (on a terminal).")] = False,
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
    chat_format: ChatFormatOpt = None,
    think: ThinkOpt = None,
    hide_thinking: HideThinkingOpt = False,
    force: ForceOpt = False,
) -> None:
    """Chat with a model. On a terminal: line editing, history, /help for commands; piped: one turn per line."""
    sampling = sampling_from_flags(temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop)
    think = reasoning.check_think(think, chat_format)
    store = open_store()
    overrides = replace(overrides_from_flags(ctx, gpu_layers, threads), multi_turn=True)
    workers = rpc_from_flag(rpc)
    loaded = open_model(store, model, overrides, force=force, chat_format=chat_format, feedback=load_feedback(), rpc=workers)
    if not loaded.engine.has_chat_template and chat_format is None:
        output.warn("this model has no chat template; using a generic format (choose one with --chat-format)")
    current = [loaded]

    def reload(n_ctx: int) -> Engine:  # /set ctx N
        try:
            current[0] = reload_with_context(store, current[0], n_ctx, feedback=load_feedback())
        except ReloadError as exc:
            if exc.engine is not None:
                current[0] = Loaded(exc.engine, current[0].plan, current[0].model, current[0].info, current[0].planned)
            raise
        return current[0].engine

    session = ChatSession(loaded.engine, sampling, system=system, reload=reload, think=think, hide_thinking=hide_thinking)
    try:
        setup = reasoning.setup_for(loaded.engine.llm, loaded.info.chat_template, think)  # --think's usage errors
        session.thinking, said = reasoning.apply(loaded.engine.llm, setup)
        for warning in said:
            output.warn(warning)
        if sys.stdin.isatty():
            _interactive(session, markdown)
        else:
            _piped(session)
    finally:
        session.engine.close()  # llama.cpp's memory and the template renderer, now rather than at exit


# --- piped: one user turn per line --------------------------------------------------


def _piped(session: ChatSession) -> None:
    failed = 0
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        keep_going = _turn(session, line, markdown=False, interactive=False)
        failed += session.failed_turn
        if not keep_going:
            break
    if failed:
        raise typer.Exit(1)  # scripts learn that a turn failed (each error was already reported)


# --- interactive ------------------------------------------------------------------------


def _interactive(session: ChatSession, markdown: bool) -> None:
    prompt = _prompt_session()
    output.info(f"Chatting with {session.engine.name} ({session.engine.n_ctx}-token context). /help for commands, Ctrl-D to leave.")
    interrupts = 0
    while True:
        try:
            line = prompt.prompt(">>> ")
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                return
            output.info("(Ctrl-C again, /exit or Ctrl-D to leave)")
            continue
        except EOFError:
            return
        interrupts = 0
        if line.strip() == BLOCK:
            line = _read_block(prompt)
            if line is None:
                continue
        if not line.strip():
            continue
        if not _turn(session, line, markdown=markdown, interactive=True):
            return


def _prompt_session():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    class MessageHistory(FileHistory):
        """One entry per message: a \"\"\" block's lines are stored once, together, when it ends (see _read_block)."""

        holding = False

        def append_string(self, string: str) -> None:
            if not self.holding and string.strip() != BLOCK:
                super().append_string(string)

    history_file = get_settings().home / "chat_history"
    history_file.parent.mkdir(parents=True, exist_ok=True)
    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:  # Alt-Enter / Esc Enter: a new line without sending
        event.current_buffer.insert_text("\n")

    from prompt_toolkit.output import create_output

    # The prompt and the echo of what is typed go to the terminal through stderr: stdout carries
    # only the replies, so `llmctl chat m > transcript.txt` records the model's words.
    return PromptSession(
        history=MessageHistory(str(history_file)),
        key_bindings=bindings,
        multiline=False,
        output=create_output(stdout=sys.stderr),
    )


def _read_block(prompt) -> str | None:
    lines = []
    history = prompt.history
    history.holding = True  # the block's lines are not entries of their own
    try:
        while True:
            try:
                line = prompt.prompt("... ")
            except (KeyboardInterrupt, EOFError):
                return None
            if line.strip() == BLOCK:
                break
            lines.append(line)
    finally:
        history.holding = False
    text = "\n".join(lines)
    if text.strip():
        history.append_string(text)  # the whole message, recalled with one arrow press
    return text


def _turn(session: ChatSession, line: str, *, markdown: bool, interactive: bool) -> bool:
    """One line of input: a slash command or a message. False when the session should end."""
    session.failed_turn = False
    stream = None
    try:
        if line.startswith("/"):
            command: Command = session.command(line)
            if command.action == "exit":
                return False
            if command.action == "continue":
                output.info(command.message, multiline=True)
                return True
            stream = session.retry()
        else:
            stream = session.send(line)
        _show_reply(stream, markdown=markdown and interactive, interactive=interactive, hide_thinking=session.hide_thinking)
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()  # if Ctrl-C landed outside the generator: the session still keeps the partial reply
        sys.stdout.write("\n")
        output.info("[reply stopped]")
    except LlmctlError as exc:
        if isinstance(exc, EngineLostError) or (isinstance(exc, ReloadError) and exc.engine is None):
            raise  # no model is loaded any more (or its llama-server or an RPC worker died): the chat cannot go on
        session.failed_turn = True
        output.error(exc.message, exc.hint)
    for notice in session.notices:
        output.warn(notice)
    session.notices.clear()
    return True


def _route(stream: Iterator[str | reasoning.Thought | Result], thinking: output.ThinkingWriter, on_answer: Callable[[str], None]) -> Result | None:
    """Send reasoning to ``thinking`` and answer text to ``on_answer``; the stream's closing Result."""
    result: Result | None = None
    for piece in stream:
        if isinstance(piece, Result):
            result = piece
        elif isinstance(piece, reasoning.Thought):
            thinking.write(piece.text)
        else:
            thinking.finish()
            on_answer(piece)
    return result


def _show_reply(stream: Iterator[str | reasoning.Thought | Result], *, markdown: bool, interactive: bool, hide_thinking: bool = False) -> None:
    thinking = output.ThinkingWriter(show=not hide_thinking)  # stderr, on a terminal only; stdout has the answers
    with ExitStack() as stack:
        stack.callback(thinking.finish)
        if markdown:
            from rich.live import Live
            from rich.markdown import Markdown

            rendered = output.ReplyWriter(terminal=True)  # Markdown is drawn for a terminal: always neutralised
            answer = ""
            live: Live | None = None  # drawn from the first words of the answer, after any thinking

            def draw(piece: str) -> None:
                nonlocal answer, live
                if live is None:
                    live = stack.enter_context(Live(Markdown(""), console=output._make_console(stderr=False), refresh_per_second=8))
                answer += rendered.filter(piece)
                live.update(Markdown(answer))

            result = _route(stream, thinking, draw)
        else:
            reply = output.ReplyWriter()  # exact on a pipe; escape sequences neutralised on a terminal
            result = _route(stream, thinking, reply.write)
            thinking.finish()
            reply.finish()
    if result is not None and interactive:
        t = result.timings
        rate = t.generation_tokens_per_second
        hidden = " · thinking hidden (/thinking shows it)" if hide_thinking and result.reasoning else ""
        output.dim(
            (
                f"{t.generated_tokens} tokens · {rate:.1f} tokens/s · first token {t.ttft_s:.2f}s"
                if rate
                else f"{t.generated_tokens} tokens · first token {t.ttft_s:.2f}s"
            )
            + hidden
        )
