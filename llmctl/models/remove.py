"""Removing models: for each, its index entry and the files llmctl owns (others only when asked),
its multimodal projector among them unless a model that stays uses it; and the unfinished downloads
and copies that pulls and imports left behind.

Removal is planned first and refused as a whole (a path, a discovered model
without ``delete_files``, a link outside a Hugging Face cache) before anything
is forgotten or deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import UsageError
from llmctl.models import hfcache, importer
from llmctl.models.names import is_projector_filename
from llmctl.models.store import ResolvedModel, Store, projector_of


@dataclass
class Removal:
    """One model to remove, and the files that go with it (none: they stay on disk)."""

    model: ResolvedModel
    delete: list[Path]

    @property
    def in_hf_cache(self) -> bool:
        """Its files are snapshot links in a Hugging Face cache (a pull's, or found there)."""
        entry = self.model.entry
        return (entry is not None and entry.source.get("type") == "hub") or self.model.kind == "discovered"


def plan_removal(store: Store, names: list[str], *, delete_files: bool) -> list[Removal]:
    """What removing these models takes, checked before anything goes; several names of one model remove it once.

    A model llmctl owns takes its files; other files (imported in place, found in
    the Hugging Face cache) go only with ``delete_files``, and a model found in
    the cache is refused without it.
    """
    resolved: dict[str, ResolvedModel] = {}
    for name in names:
        model = store.resolve(name)
        resolved.setdefault(model.name, model)
    plan = [_removal(model, delete_files) for model in resolved.values()]
    _keep_shared_projectors(store, plan)
    for removal in plan:
        if removal.in_hf_cache:
            hfcache.check_snapshot_links(removal.delete)
    return plan


def _removal(model: ResolvedModel, delete_files: bool) -> Removal:
    if model.kind == "path":
        raise UsageError(
            f"{model.name} is not a registered model",
            hint="rm takes names from `llmctl list`; delete plain files with your shell",
        )
    if model.kind == "discovered" and not delete_files:
        raise UsageError(
            f"'{model.name}' is in the Hugging Face cache but was not pulled by llmctl",
            hint="pass --delete-files to delete it anyway",
        )
    owned = model.entry is not None and model.entry.owned
    if not (owned or delete_files):
        return Removal(model, [])
    projector = projector_of(model.entry, model.kind, model.paths)
    return Removal(model, model.paths + ([projector] if projector is not None and os.path.lexists(projector) else []))


def _keep_shared_projectors(store: Store, plan: list[Removal]) -> None:
    """Leave a projector that a model staying behind also uses (two quants of one repo pulled at one
    commit share its snapshot link; a model found in the same snapshot picks it up)."""
    projectors = {os.path.abspath(p) for r in plan for p in r.delete if is_projector_filename(p.name)}
    if not projectors:
        return
    going = {os.path.abspath(p) for r in plan for p in r.model.paths}
    staying = set()
    for row in store.listing_for_resolution(store.entries()):
        if not going.intersection(os.path.abspath(p) for p in row.paths):
            projector = projector_of(row.entry, row.kind, row.paths)
            if projector is not None:
                staying.add(os.path.abspath(projector))
    for removal in plan:
        removal.delete = [p for p in removal.delete if os.path.abspath(p) not in staying]


def remove(store: Store, removal: Removal) -> None:
    """Forget the model, then delete its files: a crash in between leaves a stray file, never an
    index entry pointing at half-deleted files."""
    entry = removal.model.entry
    if entry is not None:
        store.remove_entry(entry.name)
    if not removal.delete:
        return
    if removal.in_hf_cache:
        hfcache.delete_snapshot_links(removal.delete)  # the snapshot links and the blobs behind them
        return
    # Files llmctl owns must lie inside its own folder; never follow a link out of it.
    inside = store.settings.models_dir if entry is not None and entry.owned else None
    importer.delete_files(removal.delete, inside=inside)


@dataclass
class PartialFile:
    """An unfinished download or ``import --copy`` file, and whether it was removed."""

    path: Path
    repo: str | None  # None: an import's copy
    size: int
    removed: bool  # False: a pull or an import is writing it now


def remove_partials(store: Store) -> list[PartialFile]:
    """Delete every unfinished download and import copy that nothing is writing now."""
    found = []
    for partial in hfcache.find_partials(store.settings.hf_hub_cache):
        removed = not partial.in_use and hfcache.remove_partial(partial)
        found.append(PartialFile(partial.path, partial.repo_id, partial.size, removed))
    for copy in importer.find_import_partials(store.settings.models_dir):
        # checked and deleted under the import's lock
        found.append(PartialFile(copy.path, None, copy.size, importer.remove_import_partial(copy)))
    return found
