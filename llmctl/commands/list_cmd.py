"""``llmctl list``: every model in the store, and GGUF files found in the Hugging Face cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl import output
from llmctl.commands import open_store
from llmctl.models.hfcache import find_partials
from llmctl.models.importer import find_import_partials
from llmctl.models.store import Listing, ModelEntry, projector_of, source_label
from llmctl.options import JsonOpt
from llmctl.output import Column

COLUMNS = [
    Column("NAME", lambda r: r["name"]),
    Column("QUANT", lambda r: r["quant"]),
    Column("SIZE", lambda r: output.human_bytes(r["size_bytes"]), right=True),
    Column("PARAMS", lambda r: output.human_count(r["parameters"]) if r["parameters"] else None, right=True),
    Column("ARCH", lambda r: r["architecture"]),
    Column("CONTEXT", lambda r: r["context_length"] or None, right=True),
    Column("SOURCE", lambda r: source_label(r["source"]) + (" (not pulled by llmctl)" if r["kind"] == "discovered" else "")),
    Column("LAST USED", lambda r: output.relative_time(r["last_used"]) if r["kind"] == "registered" else None),
]
STATUS = Column("STATUS", lambda r: r["status"])


def list_models(json_output: JsonOpt = False) -> None:
    """List local models: registered ones and GGUF files found in the Hugging Face cache."""
    store = open_store()
    rows = store.listing()
    partials = find_partials(store.settings.hf_hub_cache)
    copies = find_import_partials(store.settings.models_dir)
    records = [listing_json(row) for row in rows]
    document = {
        "models": records,
        "partial_downloads": [{"path": str(p.path), "repo": p.repo_id, "size_bytes": p.size, "in_use": p.in_use} for p in partials],
        "partial_imports": [{"path": str(p.path), "size_bytes": p.size, "in_use": p.in_use} for p in copies],
    }
    if not json_output:
        if partials:
            total = sum(p.size for p in partials)
            output.info(
                f"{len(partials)} unfinished download(s) ({output.human_bytes(total)}): resume with `llmctl pull`, or remove with `llmctl rm --partials`"
            )
        stale = [p for p in copies if not p.in_use]
        if stale:
            total = sum(p.size for p in stale)
            output.info(f"{len(stale)} unfinished `import --copy` file(s) ({output.human_bytes(total)}): remove with `llmctl rm --partials`")
    columns = COLUMNS + [STATUS] if any(row.status != "ok" for row in rows) else COLUMNS
    output.emit_records(
        records,
        columns,
        json_output=json_output,
        document=document,
        empty="No models yet. Try `llmctl pull smollm2-135m-instruct` or `llmctl import FILE.gguf`.",
    )


def listing_json(row: Listing) -> dict[str, Any]:
    info = row.info
    return {
        "name": row.name,
        "kind": row.kind,
        "status": row.status,
        "source": row.entry.source if row.entry else {"type": "hf-cache", **row.extra},
        "files": [str(p) for p in row.paths],
        "size_bytes": row.size,
        "mmproj": mmproj_json(row.entry, row.kind, row.paths),
        "quant": info.quant if info else None,
        "parameters": info.parameter_count if info else None,
        "architecture": info.architecture if info else None,
        "context_length": info.context_length if info else None,
        "added": row.entry.added if row.entry else None,
        "last_used": row.last_used,
    }


def mmproj_json(entry: ModelEntry | None, kind: str, paths: list[Path]) -> dict[str, Any] | None:
    """A model's multimodal projector for ``show`` and ``list``: its path and size (None: the file is gone)."""
    path = projector_of(entry, kind, paths)
    if path is None:
        return None
    return {"path": str(path), "size_bytes": path.stat().st_size if path.is_file() else None}
