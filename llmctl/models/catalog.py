"""The shipped catalog: short names for well-known GGUF repos (``catalog.json``), searchable offline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str
    description: str


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogEntry]:
    data = json.loads((Path(__file__).parent / "catalog.json").read_text(encoding="utf-8"))
    return {name: CatalogEntry(name, entry["repo"], entry.get("description", "")) for name, entry in data["models"].items()}


def aliases() -> dict[str, str]:
    """Short name → repo id: what ``names.parse_ref`` takes so that a short name means its repo."""
    return {name: entry.repo for name, entry in catalog().items()}


def search_catalog(query: str, author: str | None = None) -> list[CatalogEntry]:
    """Catalog entries matching every word of ``query``; with ``author``, only that owner's repos."""
    words = query.lower().split()
    return [
        entry
        for entry in catalog().values()
        if all(w in f"{entry.name} {entry.repo} {entry.description}".lower() for w in words)
        and (author is None or entry.repo.split("/")[0].lower() == author.lower())
    ]


def suggest(name: str) -> list[str]:
    """Up to three short names close to ``name`` (a typo's likely meaning)."""
    import difflib

    return difflib.get_close_matches(name.lower(), list(catalog()), n=3, cutoff=0.5)
