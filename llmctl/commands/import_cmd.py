"""``llmctl import``: register a GGUF file that is already on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl import gguf, output
from llmctl.commands import open_store
from llmctl.models.importer import import_model
from llmctl.options import JsonOpt


def import_(
    path: Annotated[Path, typer.Argument(help="A .gguf file (for a split model, any of its parts).", show_default=False, metavar="PATH")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Name to register it under (default: from the file name).")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the file(s) into llmctl's store instead of using them in place.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Register an existing GGUF model (split files too) after checking it."""
    store = open_store()
    parts = gguf.split_parts(path.expanduser())
    total = sum(p.stat().st_size for p in parts if p.is_file())
    verb = "Copying" if copy else "Hashing"
    with output.ByteProgress(f"{verb} {path.name}", total) as progress:
        entry, info = import_model(
            store,
            path,
            name=name,
            copy=copy,
            progress=lambda _f, n: progress.advance(n),
            on_wait=lambda: output.info("another import is copying into the same folder; waiting for it to finish"),
        )
    if json_output:
        output.emit_json({"name": entry.name, "files": entry.files, "sha256": entry.sha256, "owned": entry.owned})
        return
    output.info(
        f"Imported {output.human_count(info.parameter_count)} {info.architecture} {info.quant} "
        f"model as '{entry.name}'" + (" (copied into the store)" if copy else "")
    )
