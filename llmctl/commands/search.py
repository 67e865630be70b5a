"""``llmctl search``: GGUF models on the Hub and in the catalog; ``--files`` shows each quant's fit."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmctl import output
from llmctl.config import get_settings
from llmctl.models import hub
from llmctl.models.search import find
from llmctl.options import HwProfileOpt, JsonOpt
from llmctl.output import Column


def _count(n: int | None) -> str | None:
    return None if n is None else f"{n:,}"


HIT_COLUMNS = [
    Column("REPO", lambda r: r["repo"]),
    Column("CATALOG NAME", lambda r: r["catalog_name"] or ""),
    Column("DOWNLOADS", lambda r: _count(r["downloads"]), right=True),
    Column("LIKES", lambda r: _count(r["likes"]), right=True),
    Column("UPDATED", lambda r: r["updated"]),
    Column("PARAMS", lambda r: output.human_count(r["parameters"]), right=True),
]
FILE_COLUMNS = [
    Column("FILE", lambda r: r["files"][0] + (f" (+{len(r['files']) - 1} parts)" if len(r["files"]) > 1 else "")),
    Column("QUANT", lambda r: r["label"]),
    Column("SIZE", lambda r: output.human_bytes(r["size_bytes"]), right=True),
    Column("FIT", lambda r: r["fit"]),
    Column("GPU LAYERS", lambda r: r["n_gpu_layers"], right=True),
    Column("CONTEXT", lambda r: r["n_ctx"], right=True),
]


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
    results = find(query, author=author, limit=limit, sort=sort, status=output.status)
    records = [_hit_json(h) for h in results.hits]
    if results.note and not json_output:
        output.warn(results.note)
    output.emit_records(
        records,
        HIT_COLUMNS,
        json_output=json_output,
        document={"hub_searched": results.hub_searched, "note": results.note, "results": records},
        empty=f"No GGUF models found for '{query}'.",
    )


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
    from llmctl.models.locate import read_repo
    from llmctl.models.search import find_repo
    from llmctl.plan import fit
    from llmctl.plan.hardware import get_hardware

    ref = find_repo(query)
    hw = get_hardware(get_settings(), hw_profile, with_bandwidth=True)
    repo = read_repo(ref, status=output.status)
    records = []
    for model, candidate in zip(repo.models, repo.candidates):
        plan = fit.plan_candidate(candidate, hw)
        records.append(
            {
                "label": model.label,
                "files": [f.path for f in model.files],
                "size_bytes": model.size,
                "sha256": [f.sha256 for f in model.files],
                "fit": plan.fit,
                "n_gpu_layers": plan.config.n_gpu_layers,
                "n_ctx": plan.config.n_ctx,
            }
        )
    output.emit_records(
        sorted(records, key=lambda r: r["size_bytes"]),  # the table smallest first; the JSON in the repo's order
        FILE_COLUMNS,
        json_output=json_output,
        document={"repo": repo.listing.repo_id, "revision": repo.listing.commit, "files": records},
        title=f"{repo.listing.repo_id} @ {repo.listing.commit[:12]} on {hw.source}",
    )
