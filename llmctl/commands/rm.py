"""``llmctl rm``: forget models and delete the files llmctl owns."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmctl import output
from llmctl.commands import open_store
from llmctl.errors import UsageError
from llmctl.models import remove
from llmctl.options import JsonOpt, ModelsArg, YesOpt


def rm(
    models: ModelsArg = None,
    yes: YesOpt = False,
    delete_files: Annotated[
        bool,
        typer.Option("--delete-files", help="Also delete files llmctl does not own (imported in place, or found in the HF cache)."),
    ] = False,
    partials: Annotated[bool, typer.Option("--partials", help="Remove unfinished downloads and import copies (none in use).")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Remove models: their index entry, and the files llmctl owns (others only with --delete-files)."""
    store = open_store()
    if partials:
        if models:
            raise UsageError("--partials removes unfinished downloads only", hint="run it without model names")
        _remove_partials(remove.remove_partials(store), json_output)
        return
    if not models:
        raise UsageError("name at least one model to remove", hint="see `llmctl list`, or pass --partials")
    plan = remove.plan_removal(store, models, delete_files=delete_files)
    for removal in plan:
        what = ", ".join(str(p) for p in removal.delete) or "no files (they stay on disk)"
        output.info(f"{removal.model.name}: will delete {what}")
    if not yes:
        if not _can_ask():
            raise UsageError("refusing to remove without confirmation", hint="pass -y to confirm")
        if not typer.confirm(f"Remove {len(plan)} model(s)?", default=False, err=True):
            output.info("Nothing removed.")
            return
    for removal in plan:
        remove.remove(store, removal)
    if json_output:
        output.emit_json({"removed": [{"name": r.model.name, "deleted_files": [str(p) for p in r.delete]} for r in plan]})
    else:
        output.info(f"Removed {', '.join(r.model.name for r in plan)}")


def _can_ask() -> bool:
    """A person is at the keyboard to answer the confirmation."""
    return sys.stdin.isatty()


def _remove_partials(found: list[remove.PartialFile], json_output: bool) -> None:
    for partial in found:
        if not partial.removed:
            busy = "a pull is downloading it now" if partial.repo is not None else "an import is copying it now"
            output.info(f"skipping {partial.path}: {busy}")
    removed = [p for p in found if p.removed]
    if json_output:
        output.emit_json({"removed_partials": [{"path": str(p.path), "repo": p.repo, "size_bytes": p.size} for p in removed]})
    else:
        total = sum(p.size for p in removed)
        output.info(f"Removed {len(removed)} partial file(s) of unfinished pulls and imports, {output.human_bytes(total)}")
