"""``llmctl completion``: the shell completion script for bash, zsh or fish.

The script calls ``llmctl`` back with ``_LLMCTL_COMPLETE`` set (Typer's protocol);
``cli.LlmctlGroup`` answers those calls. Model arguments complete from ``llmctl list``.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from llmctl import output

PROG_NAME = "llmctl"
COMPLETE_VAR = "_LLMCTL_COMPLETE"


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion(
    shell: Annotated[Shell, typer.Argument(help="The shell: bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the shell completion script for bash, zsh or fish.

    Install it with one command, then open a new shell:

      bash: llmctl completion bash >> ~/.bashrc

      zsh:  llmctl completion zsh >> ~/.zshrc

      fish: llmctl completion fish > ~/.config/fish/completions/llmctl.fish
    """
    from typer.completion import get_completion_script

    output.emit_text(get_completion_script(prog_name=PROG_NAME, complete_var=COMPLETE_VAR, shell=shell.value))


def complete_model_names(incomplete: str) -> list[str]:
    """Model names from the store that start with what was typed; nothing (never an error) if it cannot be read."""
    from llmctl.commands import open_store

    try:
        store = open_store()
        rows = store.listing_for_resolution(store.entries())
    except Exception:  # noqa: BLE001 - a completion must never print a traceback into the shell
        return []
    typed = incomplete.lower()
    return [row.name for row in rows if row.name.lower().startswith(typed)]
