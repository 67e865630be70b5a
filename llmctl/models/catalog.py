"""Names for models on the Hub: the shipped catalog of short names, and Hub references.

Accepted forms (what ``pull``, ``search --files`` and ``fit`` take):

- a catalog name: ``llama-2-7b-chat``, optionally ``:QUANT``
- ``owner/repo`` and ``owner/repo:QUANT`` (Ollama / llama.cpp ``-hf`` syntax)
- ``hf.co/owner/repo[:QUANT]`` and ``huggingface.co/…`` URLs of a repo, a
  ``tree/REV``, or a file (``blob/REV/f.gguf``, ``resolve/REV/f.gguf``)
- ``owner/repo/file.gguf``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str
    description: str


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub as the user named it."""

    repo_id: str
    quant: str | None = None
    filename: str | None = None
    revision: str | None = None
    alias: str | None = None  # the catalog name, when one was used


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogEntry]:
    data = json.loads((Path(__file__).parent / "catalog.json").read_text(encoding="utf-8"))
    return {name: CatalogEntry(name, entry["repo"], entry.get("description", "")) for name, entry in data["models"].items()}


def search_catalog(query: str, author: str | None = None) -> list[CatalogEntry]:
    """Catalog entries matching every word of ``query``; with ``author``, only that owner's repos."""
    words = query.lower().split()
    return [
        entry
        for entry in catalog().values()
        if all(w in f"{entry.name} {entry.repo} {entry.description}".lower() for w in words)
        and (author is None or entry.repo.split("/")[0].lower() == author.lower())
    ]


def parse_ref(text: str) -> HubRef | None:
    """A HubRef for a catalog name or a Hub reference; None if ``text`` is neither."""
    text = text.strip()
    base, _, quant = text.partition(":") if not text.lower().startswith(("http://", "https://")) else (text, "", "")
    entry = catalog().get(base.lower())
    if entry is not None:
        return HubRef(entry.repo, quant or None, alias=entry.name)
    ref = text
    for prefix in _PREFIXES:
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix) :]
            break
    ref, _, quant = ref.partition(":")
    ref = ref.split("?", 1)[0].strip("/")
    parts = ref.split("/")
    if len(parts) < 2 or not (_NAME_PART.match(parts[0]) and _NAME_PART.match(parts[1])):
        return None
    repo_id = f"{parts[0]}/{parts[1]}"
    rest = parts[2:]
    revision = None
    if rest and rest[0] in ("resolve", "blob", "tree") and len(rest) >= 2:
        revision = rest[1]
        rest = rest[2:]
    filename = "/".join(rest) or None
    if filename and not filename.lower().endswith(".gguf"):
        return None
    return HubRef(repo_id, quant or None, filename, revision)


def quant_of_filename(filename: str) -> str | None:
    """``Llama-3.2-1B-Instruct-Q4_K_M.gguf`` → ``Q4_K_M`` (split suffixes ignored)."""
    from llmctl.gguf import SPLIT_RE
    from llmctl.models.store import QUANT_IN_NAME_RE

    name = filename.rsplit("/", 1)[-1]
    split = SPLIT_RE.match(name)
    stem = split["prefix"] if split else re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    match = QUANT_IN_NAME_RE.search(stem)
    return match["quant"].upper() if match else None


def suggest(name: str) -> list[str]:
    import difflib

    return difflib.get_close_matches(name.lower(), list(catalog()), n=3, cutoff=0.5)
