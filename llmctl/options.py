"""Options shared by several commands, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print JSON on stdout instead of a table (schema: docs/json.md)."),
]
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: a name from `llmctl list` (or a unique prefix), owner/repo[:QUANT], or a path to a .gguf file.",
        show_default=False,
        metavar="MODEL",
    ),
]
ModelsArg = Annotated[
    list[str],
    typer.Argument(help="One or more model names from `llmctl list`.", show_default=False, metavar="MODEL..."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
