"""``llmctl rm``: forget models and delete the files llmctl owns."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from llmctl import output
from llmctl.commands import open_store
from llmctl.errors import UsageError
from llmctl.models.store import ResolvedModel, Store, find_import_partials, remove_download_partial, remove_import_partial
from llmctl.options import JsonOpt, ModelsArg, YesOpt


@dataclass
class Removal:
    resolved: ResolvedModel
    delete: list[Path]


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
        _remove_partials(store, json_output)
        return
    if not models:
        raise UsageError("name at least one model to remove", hint="see `llmctl list`, or pass --partials")
    resolved = {}
    for name in models:  # several names of one model remove it once
        model = store.resolve(name)
        resolved.setdefault(model.name, model)
    plan = [_plan(model, delete_files) for model in resolved.values()]
    for removal in plan:  # refused before anything is forgotten
        if _in_hf_cache(removal):
            store.check_hub_links(removal.delete)
    for removal in plan:
        what = ", ".join(str(p) for p in removal.delete) or "no files (they stay on disk)"
        output.info(f"{removal.resolved.name}: will delete {what}")
    if not yes:
        if not _can_ask():
            raise UsageError("refusing to remove without confirmation", hint="pass -y to confirm")
        if not typer.confirm(f"Remove {len(plan)} model(s)?", default=False, err=True):
            output.info("Nothing removed.")
            return
    for removal in plan:
        _apply(store, removal)
    if json_output:
        output.emit_json({"removed": [{"name": r.resolved.name, "deleted_files": [str(p) for p in r.delete]} for r in plan]})
    else:
        output.info(f"Removed {', '.join(r.resolved.name for r in plan)}")


def _can_ask() -> bool:
    """A person is at the keyboard to answer the confirmation."""
    return sys.stdin.isatty()


def _plan(resolved: ResolvedModel, delete_files: bool) -> Removal:
    if resolved.kind == "path":
        raise UsageError(
            f"{resolved.name} is not a registered model",
            hint="rm takes names from `llmctl list`; delete plain files with your shell",
        )
    if resolved.kind == "discovered" and not delete_files:
        raise UsageError(
            f"'{resolved.name}' is in the Hugging Face cache but was not pulled by llmctl",
            hint="pass --delete-files to delete it anyway",
        )
    entry = resolved.entry
    owned = entry is not None and entry.owned
    return Removal(resolved, resolved.paths if (owned or delete_files) else [])


def _apply(store: Store, removal: Removal) -> None:
    entry = removal.resolved.entry
    # Forget first, then delete: a crash in between leaves a stray file, never
    # an index entry pointing at half-deleted files.
    if entry is not None:
        store.remove_entry(entry.name)
    if not removal.delete:
        return
    if _in_hf_cache(removal):
        store.delete_hub_files(removal.delete)  # the snapshot links and the blobs behind them
        return
    # Files llmctl owns must lie inside its own folder; never follow a link out of it.
    inside = store.settings.models_dir if entry is not None and entry.owned else None
    store.delete_files(removal.delete, inside=inside)


def _in_hf_cache(removal: Removal) -> bool:
    entry = removal.resolved.entry
    return (entry is not None and entry.source.get("type") == "hub") or removal.resolved.kind == "discovered"


def _remove_partials(store: Store, json_output: bool) -> None:
    from llmctl.models import hub

    removed: list[tuple[Path, str | None, int]] = []  # path, repo (None: an import's copy), size
    for partial in hub.find_partials(store.settings.hf_hub_cache):
        if partial.in_use or not remove_download_partial(partial.path, hub.PARTIAL_SUFFIX):
            output.info(f"skipping {partial.path}: a pull is downloading it now")
            continue
        removed.append((partial.path, partial.repo_id, partial.size))
    for copy in find_import_partials(store.settings.models_dir):
        if not remove_import_partial(copy):  # checked and deleted under the import's lock
            output.info(f"skipping {copy.path}: an import is copying it now")
            continue
        removed.append((copy.path, None, copy.size))
    if json_output:
        output.emit_json({"removed_partials": [{"path": str(path), "repo": repo, "size_bytes": size} for path, repo, size in removed]})
    else:
        total = sum(size for _, _, size in removed)
        output.info(f"Removed {len(removed)} partial file(s) of unfinished pulls and imports, {output.human_bytes(total)}")
