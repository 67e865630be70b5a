"""The Typer app: registers the commands; ``main`` maps errors to messages and exit codes."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Callable, Sequence

import typer
from typer.core import TyperGroup

from llmctl import __version__
from llmctl.commands.bench_cmd import bench
from llmctl.commands.chat_cmd import chat
from llmctl.commands.completion import completion
from llmctl.commands.engine_cmd import engine_app
from llmctl.commands.fit_cmd import fit_command
from llmctl.commands.hwinfo import hwinfo
from llmctl.commands.import_cmd import import_
from llmctl.commands.list_cmd import list_models
from llmctl.commands.pull_cmd import pull_command
from llmctl.commands.rm import rm
from llmctl.commands.rpc_cmd import rpc_server
from llmctl.commands.run_cmd import run
from llmctl.commands.search import search
from llmctl.commands.serve_cmd import ps, serve, stop
from llmctl.commands.show import show
from llmctl.config import config_file_warning, debug_enabled
from llmctl.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, LlmctlError


class LlmctlGroup(TyperGroup):
    """The root command: turns every error into one message and a documented exit code.

    Living in the group (not around ``app()``) means the test runner and the
    console script take the same path.
    """

    subcommand_path: str | None = None

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        self.subcommand_path = None
        code = _guarded(
            lambda: super(LlmctlGroup, self).main(args=args, prog_name=prog_name or "llmctl", complete_var=complete_var, standalone_mode=False, **extra),
            lambda: self.subcommand_path,
        )
        if standalone_mode:
            sys.exit(code)
        return code

    def _main_shell_completion(self, ctx_args: Any, prog_name: str, complete_var: str | None = None) -> None:
        """Answer the calls of `llmctl completion`'s scripts (with Typer's completion classes, which those
        scripts are written for)."""
        from llmctl.commands.completion import COMPLETE_VAR

        if os.environ.get(complete_var or COMPLETE_VAR):
            from typer.completion import completion_init

            completion_init()
        super()._main_shell_completion(ctx_args, prog_name, complete_var or COMPLETE_VAR)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """Remember the subcommand: the parser's errors about its options (a missing value) carry no context."""
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            self.subcommand_path = f"{ctx.command_path} {name}"
        return name, command, rest


app = typer.Typer(
    name="llmctl",
    cls=LlmctlGroup,
    help="Find, pull, run, chat with and benchmark local GGUF language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from llmctl import output

        output.emit_text(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Find, pull, run, chat with and benchmark local GGUF language models."""
    problem = config_file_warning()
    if problem:
        from llmctl import output

        output.warn(problem)


app.command("search")(search)
app.command("pull")(pull_command)
app.command("run")(run)
app.command("chat")(chat)
app.command("bench")(bench)
app.command("serve")(serve)
app.command("ps")(ps)
app.command("rpc-server")(rpc_server)
app.command("stop")(stop)
app.command("list", help=list_models.__doc__)(list_models)
app.command("ls", hidden=True)(list_models)
app.command("show")(show)
app.command("import")(import_)
app.command("rm")(rm)
app.command("hwinfo")(hwinfo)
app.command("fit")(fit_command)
app.command("completion")(completion)
app.add_typer(engine_app, name="engine")


def _guarded(invoke: Callable[[], Any], subcommand: Callable[[], str | None] = lambda: None) -> int:
    """Run the command line; return its exit code, reporting any error in one message."""
    from llmctl import output

    try:
        result = invoke()
        code = result if isinstance(result, int) else 0
        if code == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into exit 130 before we see it
            output.error("interrupted")
        return code
    except LlmctlError as exc:
        if debug_enabled():
            import traceback

            traceback.print_exc()
        output.error(exc.message, exc.hint)
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        output.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`llmctl list | head`): nothing worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        if debug_enabled():
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        output.error(f"{where}{exc.strerror or exc}", "check free disk space and permissions")
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into a message
        # The parser's own usage errors (unknown option, bad value) carry an exit code.
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            message, hint = parser_error(exc, subcommand() or "llmctl")
            if message:  # empty when the help was shown for a bare `llmctl`
                output.error(message, hint)
            return int(getattr(exc, "exit_code", EXIT_USAGE))
        if debug_enabled():
            raise
        output.error(f"unexpected {type(exc).__name__}: {exc}", "rerun with LLMCTL_DEBUG=1 for details and report it")
        return EXIT_ERROR


def parser_error(exc: Any, fallback_command: str) -> tuple[str, str]:
    """A parser error in llmctl's style: a lower-case message with no full stop, and a hint naming the
    help of the command it is about (``llmctl run --help``), with the parser's suggestion if it has one."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else fallback_command
    message = exc.format_message().strip()
    suggestion = ""
    possibilities = getattr(exc, "possibilities", None)
    if possibilities:  # "No such option: --x (Possible options: --a, --b)"
        message = message.split(" (Possible options:", 1)[0]
        suggestion = f"did you mean {' or '.join(sorted(possibilities))}? "
    else:  # "No such command 'x'. Did you mean 'y'?"
        head, found, tail = message.partition(". Did you mean ")
        if found:
            message, suggestion = head, f"did you mean {tail} "
    message = message.rstrip(".")
    return message[:1].lower() + message[1:], f"{suggestion}see `{command} --help`"


def main() -> None:
    app()
