"""``llmctl search``: GGUF models on the Hub and in the catalog; ``--files`` shows each quant's fit."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmctl import output
from llmctl.config import get_settings
from llmctl.errors import UsageError
from llmctl.models import hub
from llmctl.models.catalog import CatalogEntry, parse_ref, search_catalog
from llmctl.options import HwProfileOpt, JsonOpt
from llmctl.plan import fit


def search(
    query: Annotated[str, typer.Argument(help="Words to search for, or a repo (owner/repo) with --files.", show_default=False, metavar="QUERY")],
    author: Annotated[str | None, typer.Option("--author", help="Only repos of this user or organisation.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="At most this many Hub results.")] = 20,
    sort: Annotated[hub.SearchSort, typer.Option("--sort", help="What orders the results, largest or newest first.")] = hub.SearchSort.downloads,
    files: Annotated[bool, typer.Option("--files", help="List each GGUF file of the repo (QUERY, or the best match) with its size and fit here.")] = False,
    hw_profile: HwProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Search the Hugging Face Hub (GGUF repos only) and llmctl's catalog."""
    if files:
        _files(query, hw_profile, json_output)
        return
    catalog_hits = search_catalog(query, author)
    hub_hits: list[hub.SearchHit] = []
    note = None
    try:
        with output.status("Searching the Hub…"):
            hub_hits = hub.search_models(query, author=author, limit=limit, sort=sort)
    except hub.HubError as exc:
        note = f"the Hub was not searched ({exc.message}); showing catalog matches only"
    rows = merge_hits(catalog_hits, hub_hits, sort)
    if json_output:
        output.emit_json({"hub_searched": note is None, "note": note, "results": [_hit_json(h) for h in rows]})
        return
    if note:
        output.warn(note)
    if not rows:
        output.info(f"No GGUF models found for '{query}'.")
        return
    output.emit_table(
        ["REPO", "CATALOG NAME", "DOWNLOADS", "LIKES", "UPDATED", "PARAMS"],
        [[h.repo_id, h.catalog_name or "", _count(h.downloads), _count(h.likes), h.updated or "-", output.human_count(h.parameters)] for h in rows],
        right_align=("DOWNLOADS", "LIKES", "PARAMS"),
    )


def merge_hits(catalog_hits: list[CatalogEntry], hub_hits: list[hub.SearchHit], sort: hub.SearchSort) -> list[hub.SearchHit]:
    """Catalog and Hub rows in one list, ordered by ``sort`` (largest or newest first).

    A catalog repo the Hub returned is one row, with the Hub's figures. A
    catalog repo it did not return (outside the first ``--limit`` results, or
    the Hub was not searched) has no figure to sort by, so it comes after
    every row that has one, in catalog order. ``trending`` has no figure in
    the answer: the Hub's own order is kept.
    """
    by_repo = {h.repo_id.lower(): h for h in hub_hits}
    rows = list(hub_hits)  # the Hub's order: the tie-break, and all there is for trending
    for entry in catalog_hits:
        hit = by_repo.get(entry.repo.lower())
        if hit is None:
            hit = hub.SearchHit(entry.repo, None, None, None, None)
            rows.append(hit)
        hit.catalog_name = entry.name

    def figure(hit: hub.SearchHit) -> tuple[int, str] | None:  # (count, ISO date): one comparable key for any sort
        value = {"downloads": hit.downloads, "likes": hit.likes, "updated": hit.updated}.get(sort)
        if value is None:
            return None
        return (value, "") if isinstance(value, int) else (0, value)

    known = [h for h in rows if figure(h) is not None]
    known.sort(key=lambda h: figure(h) or (0, ""), reverse=True)  # stable: ties keep the Hub's order
    hub_order = [h for h in rows if figure(h) is None and h.repo_id.lower() in by_repo]
    catalog_only = [h for h in rows if h.repo_id.lower() not in by_repo]
    return known + hub_order + catalog_only


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _hit_json(hit: hub.SearchHit) -> dict[str, Any]:
    return {
        "repo": hit.repo_id,
        "catalog_name": hit.catalog_name,
        "downloads": hit.downloads,
        "likes": hit.likes,
        "updated": hit.updated,
        "parameters": hit.parameters,
    }


def _files(query: str, hw_profile: str | None, json_output: bool) -> None:
    from llmctl.models import pull
    from llmctl.plan.hardware import get_hardware

    ref = parse_ref(query)
    if ref is None:
        hits = hub.search_models(query, author=None, limit=1, sort=hub.SearchSort.downloads)
        if not hits:
            raise UsageError(f"no GGUF repo matches '{query}'", hint="give a repo as owner/repo")
        ref = parse_ref(hits[0].repo_id)
    assert ref is not None
    listing = hub.list_repo(ref.repo_id, ref.revision)
    models = pull.pick_models(ref, listing, None)
    hw = get_hardware(get_settings(), hw_profile, with_bandwidth=True)
    with output.status(f"Reading GGUF headers of {ref.repo_id}…"):
        candidates = pull.remote_candidates(listing, models)
    plans = {p.candidate.label: p for p in (fit.plan_candidate(c, hw) for c in candidates)}
    if json_output:
        output.emit_json(
            {
                "repo": listing.repo_id,
                "revision": listing.commit,
                "files": [
                    {
                        "label": m.label,
                        "files": [f.path for f in m.files],
                        "size_bytes": m.size,
                        "sha256": [f.sha256 for f in m.files],
                        "fit": plans[m.label].fit,
                        "n_gpu_layers": plans[m.label].config.n_gpu_layers,
                        "n_ctx": plans[m.label].config.n_ctx,
                    }
                    for m in models
                ],
            }
        )
        return
    output.emit_table(
        ["FILE", "QUANT", "SIZE", "FIT", "GPU LAYERS", "CONTEXT"],
        [
            [
                m.files[0].path + (f" (+{len(m.files) - 1} parts)" if len(m.files) > 1 else ""),
                m.label,
                output.human_bytes(m.size),
                plans[m.label].fit,
                plans[m.label].config.n_gpu_layers,
                plans[m.label].config.n_ctx,
            ]
            for m in sorted(models, key=lambda m: m.size)
        ],
        title=f"{listing.repo_id} @ {listing.commit[:12]} on {hw.source}",
        right_align=("SIZE", "GPU LAYERS", "CONTEXT"),
    )
