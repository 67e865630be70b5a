"""``llmctl list``: every model in the store, and GGUF files found in the Hugging Face cache."""

from __future__ import annotations

from typing import Any

from llmctl import output
from llmctl.commands import open_store
from llmctl.models.store import Listing, find_import_partials
from llmctl.options import JsonOpt


def list_models(json_output: JsonOpt = False) -> None:
    """List local models: registered ones and GGUF files found in the Hugging Face cache."""
    from llmctl.models import hub

    store = open_store()
    rows = store.listing()
    partials = hub.find_partials(store.settings.hf_hub_cache)
    copies = find_import_partials(store.settings.models_dir)
    if json_output:
        output.emit_json(
            {
                "models": [listing_json(row) for row in rows],
                "partial_downloads": [{"path": str(p.path), "repo": p.repo_id, "size_bytes": p.size, "in_use": p.in_use} for p in partials],
                "partial_imports": [{"path": str(p.path), "size_bytes": p.size, "in_use": p.in_use} for p in copies],
            }
        )
        return
    if partials:
        total = sum(p.size for p in partials)
        output.info(f"{len(partials)} unfinished download(s) ({output.human_bytes(total)}): resume with `llmctl pull`, or remove with `llmctl rm --partials`")
    stale = [p for p in copies if not p.in_use]
    if stale:
        total = sum(p.size for p in stale)
        output.info(f"{len(stale)} unfinished `import --copy` file(s) ({output.human_bytes(total)}): remove with `llmctl rm --partials`")
    if not rows:
        output.info("No models yet. Try `llmctl pull smollm2-135m-instruct` or `llmctl import FILE.gguf`.")
        return
    show_status = any(row.status != "ok" for row in rows)
    columns = ["NAME", "QUANT", "SIZE", "PARAMS", "ARCH", "CONTEXT", "SOURCE", "LAST USED"]
    if show_status:
        columns.append("STATUS")
    table = []
    for row in rows:
        info = row.info
        cells = [
            row.name,
            info.quant if info else "-",
            output.human_bytes(row.size),
            output.human_count(info.parameter_count) if info else "-",
            info.architecture if info else "-",
            str(info.context_length) if info and info.context_length else "-",
            row.source + (" (not pulled by llmctl)" if row.kind == "discovered" else ""),
            output.relative_time(row.last_used) if row.kind == "registered" else "-",
        ]
        if show_status:
            cells.append(row.status)
        table.append(cells)
    output.emit_table(columns, table, right_align=("SIZE", "PARAMS", "CONTEXT"))


def listing_json(row: Listing) -> dict[str, Any]:
    info = row.info
    return {
        "name": row.name,
        "kind": row.kind,
        "status": row.status,
        "source": row.entry.source if row.entry else {"type": "hf-cache", **row.extra},
        "files": [str(p) for p in row.paths],
        "size_bytes": row.size,
        "quant": info.quant if info else None,
        "parameters": info.parameter_count if info else None,
        "architecture": info.architecture if info else None,
        "context_length": info.context_length if info else None,
        "added": row.entry.added if row.entry else None,
        "last_used": row.last_used,
    }
