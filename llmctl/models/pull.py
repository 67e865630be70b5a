"""Pulling a model: resolve the name, plan the quant from remote headers, download, verify, register."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from llmctl.errors import EXIT_INTERRUPTED, LlmctlError, NotFoundError, StoreError
from llmctl.fileio import now_iso
from llmctl.models import catalog, hfcache, hub
from llmctl.models.names import HubRef, default_pull_name, parse_ref, quant_of_filename, validate_name
from llmctl.models.store import ModelEntry, Store, header_cache_entry
from llmctl.plan import fit
from llmctl.plan.hardware import HardwareInfo

DISK_MARGIN = 64 * 1024**2


def parse_or_suggest(name: str) -> HubRef:
    ref = parse_ref(name, catalog.aliases())
    if ref is not None:
        return ref
    base = name.split(":")[0]
    close = catalog.suggest(base)
    if not close:  # nothing near in the catalog: ask the Hub, if it can be reached
        try:
            close = [hit.repo_id for hit in hub.search_models(base, author=None, limit=3, sort=hub.SearchSort.downloads)]
        except hub.HubError:
            close = []
    raise NotFoundError(
        f"'{name}' is neither a catalog name nor a Hub repo (owner/repo)",
        hint=(f"did you mean {', '.join(close)}? " if close else "") + f"try `llmctl search {base}`",
    )


def pick_models(ref: HubRef, listing: hub.RepoListing, quant: str | None) -> list[hub.RemoteModel]:
    """The repo's models narrowed by a file name or quant the user asked for."""
    if not listing.models:
        raise NotFoundError(
            f"{listing.repo_id} has no GGUF model files",
            hint=f"search for a GGUF version with `llmctl search {listing.repo_id.split('/')[-1]}`",
        )
    if ref.filename:
        wanted = ref.filename.lower()
        chosen = [m for m in listing.models if any(f.path.lower() == wanted for f in m.files)]
        if not chosen:
            raise NotFoundError(f"{listing.repo_id} has no file {ref.filename}", hint=_available(listing))
        return chosen
    wanted_quant = quant or ref.quant
    if wanted_quant:
        chosen = [m for m in listing.models if m.label.lower() == wanted_quant.lower()]
        if not chosen:
            raise NotFoundError(f"{listing.repo_id} has no {wanted_quant.upper()} file", hint=_available(listing))
        return chosen
    return listing.models


def _available(listing: hub.RepoListing) -> str:
    return "available: " + ", ".join(m.label for m in listing.models)


def remote_candidates(listing: hub.RepoListing, models: list[hub.RemoteModel]) -> list[fit.Candidate]:
    """Read each model's header with range requests (a few in parallel) and make planner candidates."""

    def one(model: hub.RemoteModel) -> fit.Candidate:
        info = hub.remote_model_info(listing.repo_id, listing.commit, model)
        return fit.Candidate(model.label, info, model.size, f"{listing.repo_id}/{model.files[0].path}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, models))


@dataclass
class PullPlan:
    ref: HubRef
    listing: hub.RepoListing
    plan: fit.Plan
    model: hub.RemoteModel
    name: str
    to_download: int  # bytes not yet in the cache


def plan_pull(
    store: Store,
    ref: HubRef,
    hw: HardwareInfo,
    *,
    quant: str | None = None,
    overrides: fit.Overrides | None = None,
    force: bool = False,
    name: str | None = None,
) -> PullPlan:
    listing = hub.list_repo(ref.repo_id, ref.revision)
    models = pick_models(ref, listing, quant)
    candidates = remote_candidates(listing, models)
    plan = fit.make_plan(candidates, hw, overrides, force=force)
    model = next(m for m in models if m.label == plan.chosen.candidate.label)
    final_name = validate_name(name) if name else default_pull_name(ref, model.label)
    store.check_pull_name(final_name, ref.repo_id)
    cache = store.settings.hf_hub_cache
    missing = sum(f.size - hfcache.present_bytes(cache, ref.repo_id, f.sha256, f.size) for f in model.files)
    return PullPlan(ref, listing, plan, model, final_name, missing)


class PullInterrupted(LlmctlError):
    """Ctrl-C during a download: what arrived is kept, and the same pull resumes from there."""

    exit_code = EXIT_INTERRUPTED


def interrupted(store: Store, pull_plan: PullPlan, command: str) -> PullInterrupted:
    """The error for a pull stopped by Ctrl-C, saying how much is kept and how to resume."""
    from llmctl.output import human_bytes

    cache = store.settings.hf_hub_cache
    kept = sum(hfcache.present_bytes(cache, pull_plan.listing.repo_id, f.sha256, f.size) for f in pull_plan.model.files)
    if kept:
        hint = f"run `{command}` again to resume ({human_bytes(kept)} of {human_bytes(pull_plan.model.size)} kept)"
    else:
        hint = f"nothing was downloaded yet; run `{command}` again to start over"
    return PullInterrupted("interrupted", hint=hint)


def check_disk(cache: Path, needed: int) -> None:
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN > free:
        from llmctl.output import human_bytes

        raise StoreError(
            f"not enough disk space: the download needs {human_bytes(needed)}, {human_bytes(free)} is free in {probe}",
            hint="free some space, or point HF_HUB_CACHE at a larger disk",
        )


def execute(
    store: Store,
    pull_plan: PullPlan,
    *,
    progress: Callable[[int], None] | None = None,
    resumed: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> ModelEntry:
    """Download what is missing, verify it, and register the model."""
    from llmctl import gguf

    cache = store.settings.hf_hub_cache
    listing, model = pull_plan.listing, pull_plan.model
    check_disk(cache, pull_plan.to_download)
    paths = [hub.download_file(listing.repo_id, listing.commit, remote, cache, progress=progress, resumed=resumed, on_wait=on_wait) for remote in model.files]
    hfcache.write_ref(cache, listing.repo_id, pull_plan.ref.revision or "main", listing.commit)
    _, info = gguf.read_model(paths)  # the downloaded bytes must read as the header did
    entry = ModelEntry(
        name=pull_plan.name,
        files=[str(p) for p in paths],
        source={
            "type": "hub",
            "repo": listing.repo_id,
            "revision": listing.commit,
            "files": [f.path for f in model.files],
            **({"alias": pull_plan.ref.alias} if pull_plan.ref.alias else {}),
        },
        owned=True,
        size=model.size,
        sha256=[f.sha256 for f in model.files],
        added=now_iso(),
        header=header_cache_entry(paths, info),
    )
    store.upsert_hub(entry)
    return entry


def already_pulled(store: Store, ref: HubRef, commit: str, label: str | None) -> ModelEntry | None:
    """A registered pull of this repo at this commit whose files are all present."""
    for entry in store.entries():
        source = entry.source
        if source.get("type") != "hub" or str(source.get("repo", "")).lower() != ref.repo_id.lower():
            continue
        if source.get("revision") != commit or not all(Path(f).exists() for f in entry.files):
            continue
        files = [str(f) for f in source.get("files", [])]
        if ref.filename and ref.filename not in files:
            continue
        if label and not any((quant_of_filename(f) or PurePosixPath(f).name).lower() == label.lower() for f in files):
            continue
        return entry
    return None
