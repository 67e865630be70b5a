"""Finding models to pull: the catalog and the Hub searched together, and the repo a query means."""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.errors import UsageError
from llmctl.models import catalog, hub
from llmctl.models.catalog import CatalogEntry
from llmctl.models.names import HubRef, parse_ref


@dataclass
class SearchResults:
    hits: list[hub.SearchHit]
    note: str | None = None  # why the Hub was not searched, when it was not

    @property
    def hub_searched(self) -> bool:
        return self.note is None


def find(query: str, *, author: str | None, limit: int, sort: hub.SearchSort, status: hub.Status = hub.silent) -> SearchResults:
    """Catalog entries and Hub repos matching ``query``, merged; catalog ones alone when the Hub cannot be searched."""
    catalog_hits = catalog.search_catalog(query, author)
    hub_hits: list[hub.SearchHit] = []
    note = None
    try:
        with status("Searching the Hub…"):
            hub_hits = hub.search_models(query, author=author, limit=limit, sort=sort)
    except hub.HubError as exc:
        note = f"the Hub was not searched ({exc.message}); showing catalog matches only"
    return SearchResults(merge_hits(catalog_hits, hub_hits, sort), note)


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


def find_repo(query: str) -> HubRef:
    """The repo a query names (a short name, ``owner/repo``, a URL), else the Hub's most downloaded match."""
    ref = parse_ref(query, catalog.aliases())
    if ref is not None:
        return ref
    hits = hub.search_models(query, author=None, limit=1, sort=hub.SearchSort.downloads)
    ref = parse_ref(hits[0].repo_id) if hits else None
    if ref is None:
        raise UsageError(f"no GGUF repo matches '{query}'", hint="give a repo as owner/repo")
    return ref
