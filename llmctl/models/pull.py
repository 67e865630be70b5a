"""Pulling a model: resolve the name, plan the quant from remote headers, download, verify, register."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from llmctl.errors import EXIT_INTERRUPTED, InvalidModelError, LlmctlError, NotFoundError, StoreError
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


def remote_candidates(listing: hub.RepoListing, models: list[hub.RemoteModel], *, mmproj: bool = False) -> list[fit.Candidate]:
    """Read each model's header with range requests (a few in parallel) and make planner candidates;
    with ``mmproj``, each counts the projector a pull would fetch with it."""

    def one(model: hub.RemoteModel) -> fit.Candidate:
        info = hub.remote_model_info(listing.repo_id, listing.commit, model)
        projector = listing.projector_for(model) if mmproj else None
        return fit.Candidate(model.label, info, model.size, f"{listing.repo_id}/{model.files[0].path}", projector.size if projector else 0)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, models))


@dataclass
class PullPlan:
    ref: HubRef
    listing: hub.RepoListing
    plan: fit.Plan
    model: hub.RemoteModel
    name: str
    to_download: int  # bytes not yet in the cache, the projector's included
    projector: hub.RemoteFile | None = None  # the multimodal projector fetched with the model

    @property
    def files(self) -> list[hub.RemoteFile]:
        """What the pull downloads: the projector first (small, and a bad one fails before the model's
        gigabytes), then the model's files."""
        return ([self.projector] if self.projector else []) + self.model.files

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def plan_pull(
    store: Store,
    ref: HubRef,
    hw: HardwareInfo,
    *,
    quant: str | None = None,
    overrides: fit.Overrides | None = None,
    force: bool = False,
    name: str | None = None,
    mmproj: bool = True,
) -> PullPlan:
    """What pulling ``ref`` takes: the quant the planner chooses, the repo's projector for it (unless
    ``mmproj`` is off; its bytes count in the plan, as serve loads it), and the bytes still to fetch."""
    listing = hub.list_repo(ref.repo_id, ref.revision)
    models = pick_models(ref, listing, quant)
    candidates = remote_candidates(listing, models, mmproj=mmproj)
    plan = fit.make_plan(candidates, hw, overrides, force=force)
    model = next(m for m in models if m.label == plan.chosen.candidate.label)
    final_name = validate_name(name) if name else default_pull_name(ref, model.label)
    store.check_pull_name(final_name, ref.repo_id)
    projector = listing.projector_for(model) if mmproj else None
    pull_plan = PullPlan(ref, listing, plan, model, final_name, 0, projector)
    cache = store.settings.hf_hub_cache
    pull_plan.to_download = sum(f.size - hfcache.present_bytes(cache, ref.repo_id, f.sha256, f.size) for f in pull_plan.files)
    return pull_plan


class PullInterrupted(LlmctlError):
    """Ctrl-C during a download: what arrived is kept, and the same pull resumes from there."""

    exit_code = EXIT_INTERRUPTED


def interrupted(store: Store, pull_plan: PullPlan, command: str) -> PullInterrupted:
    """The error for a pull stopped by Ctrl-C, saying how much is kept and how to resume."""
    from llmctl.output import human_bytes

    cache = store.settings.hf_hub_cache
    kept = sum(hfcache.present_bytes(cache, pull_plan.listing.repo_id, f.sha256, f.size) for f in pull_plan.files)
    if kept:
        hint = f"run `{command}` again to resume ({human_bytes(kept)} of {human_bytes(pull_plan.size)} kept)"
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
    """Download what is missing (the projector first), verify it, and register the model."""
    from llmctl import gguf

    cache = store.settings.hf_hub_cache
    listing, model = pull_plan.listing, pull_plan.model
    check_disk(cache, pull_plan.to_download)
    fetched = [
        hub.download_file(listing.repo_id, listing.commit, remote, cache, progress=progress, resumed=resumed, on_wait=on_wait) for remote in pull_plan.files
    ]
    projector_path, paths = (fetched[0], fetched[1:]) if pull_plan.projector else (None, fetched)
    hfcache.write_ref(cache, listing.repo_id, pull_plan.ref.revision or "main", listing.commit)
    if projector_path is not None:
        check_projector(projector_path)
    _, info = gguf.read_model(paths)  # the downloaded bytes must read as the header did
    mmproj = _projector_record(projector_path, pull_plan.projector) if projector_path else _kept_projector(store, pull_plan)
    entry = ModelEntry(
        name=pull_plan.name,
        files=[str(p) for p in paths],
        source={
            "type": "hub",
            "repo": listing.repo_id,
            "revision": listing.commit,
            "files": [f.path for f in model.files],
            **({"alias": pull_plan.ref.alias} if pull_plan.ref.alias else {}),
            **({"mmproj": mmproj.get("file")} if mmproj else {}),
        },
        owned=True,
        size=model.size,
        sha256=[f.sha256 for f in model.files],
        added=now_iso(),
        header=header_cache_entry(paths, info),
        mmproj=mmproj,
    )
    store.upsert_hub(entry)
    return entry


def check_projector(path: Path) -> None:
    """A projector must read as a GGUF of llama.cpp's vision/audio encoders (``general.architecture``
    "clip", which libmtmd loads); anything else is refused before it is recorded."""
    from llmctl import gguf

    skip = "pull with --no-mmproj to take the model without it"
    try:
        with gguf.FileSource(path) as source:
            arch = gguf.read_header(source).metadata.get("general.architecture")
    except InvalidModelError as exc:
        exc.hint = skip
        raise
    if arch != "clip":
        raise LlmctlError(f"{path}: not a multimodal projector (general.architecture {arch!r:.40}, expected 'clip')", hint=skip)


def _projector_record(path: Path, remote: hub.RemoteFile | None) -> dict[str, Any]:
    """What the index keeps of a pulled projector: its snapshot path, its name in the repo, size and sha256."""
    assert remote is not None
    return {"path": str(path), "file": remote.path, "size": remote.size, "sha256": remote.sha256}


def _kept_projector(store: Store, pull_plan: PullPlan) -> dict[str, Any] | None:
    """A pull without a projector (``--no-mmproj``, or the repo has none now) that replaces a pull of the same
    repo at the same commit keeps the projector that pull fetched, still on disk: its files stay recorded, and
    ``rm`` deletes them with the model."""
    earlier = store.get(pull_plan.name)
    if earlier is None or earlier.mmproj_path is None or earlier.source.get("type") != "hub":
        return None
    same = str(earlier.source.get("repo", "")).lower() == pull_plan.listing.repo_id.lower() and earlier.source.get("revision") == pull_plan.listing.commit
    return earlier.mmproj if same and earlier.mmproj_path.exists() else None


def already_pulled(store: Store, ref: HubRef, commit: str, label: str | None, projector: hub.RemoteFile | None = None) -> ModelEntry | None:
    """A registered pull of this repo at this commit whose files are all present (and ``projector``, if given)."""
    for entry in store.entries():
        source = entry.source
        if source.get("type") != "hub" or str(source.get("repo", "")).lower() != ref.repo_id.lower():
            continue
        if source.get("revision") != commit or not all(Path(f).exists() for f in entry.files):
            continue
        recorded = entry.mmproj if isinstance(entry.mmproj, dict) else {}
        if projector is not None and (recorded.get("file") != projector.path or entry.mmproj_path is None or not entry.mmproj_path.exists()):
            continue  # pulled without the projector this pull fetches: pull again, which adds it
        files = [str(f) for f in source.get("files", [])]
        if ref.filename and ref.filename not in files:
            continue
        if label and not any((quant_of_filename(f) or PurePosixPath(f).name).lower() == label.lower() for f in files):
            continue
        return entry
    return None
