"""The local model store: an index of known models, and name resolution.

Files stay where other tools can use them. Pulled models live in the Hugging
Face cache (``HF_HUB_CACHE``) under their real names; imported models stay
where they are (or are copied under ``$LLMCTL_HOME/models`` with ``--copy``).
The index, ``$LLMCTL_HOME/index.json``, records each model's name, source,
files, size, sha256, times and a header summary keyed by (size, mtime) so that
``list`` never re-parses an unchanged file. Writes take a lock and replace the
file atomically, so a crash leaves the previous index intact.

Models found in the Hugging Face cache that llmctl did not register are
"discovered": listed and resolvable, marked as such, never deleted unless
asked explicitly.
"""

from __future__ import annotations

import difflib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmctl import gguf
from llmctl.config import Settings
from llmctl.errors import (
    AmbiguousNameError,
    NotFoundError,
    StoreError,
    UsageError,
)
from llmctl.fileio import atomic_write_text, exclusive_lock, now_iso
from llmctl.models import catalog, hfcache
from llmctl.models.names import discovered_full_name, parse_ref, quant_of_filename

INDEX_VERSION = 1


@dataclass
class ModelEntry:
    """One registered model."""

    name: str
    files: list[str]
    source: dict[str, Any]
    owned: bool
    size: int
    sha256: list[str | None]
    added: str
    last_used: str | None = None
    header: dict[str, Any] | None = None
    # The multimodal projector pulled with it: {"path", "file" (in the repo), "size", "sha256"}; absent in
    # indexes written before projectors were pulled, which read as None.
    mmproj: dict[str, Any] | None = None

    @property
    def paths(self) -> list[Path]:
        return [Path(f) for f in self.files]

    @property
    def mmproj_path(self) -> Path | None:
        path = self.mmproj.get("path") if isinstance(self.mmproj, dict) else None
        return Path(path) if isinstance(path, str) and path else None

    @property
    def source_label(self) -> str:
        return source_label(self.source)


def source_label(source: dict[str, Any]) -> str:
    """Where a registered model came from, as `list` shows it."""
    kind = source.get("type")
    if kind == "hub":
        return f"hf:{source.get('repo')}"
    if kind == "hf-cache":
        return f"hf-cache:{source.get('repo')}"
    if kind == "copy":
        return "import (copy)"
    return "import"


def _check_pull_name(name: str, taken: dict[str, Any] | None, repo: str) -> None:
    """A pull of ``repo`` may take ``name`` if it is free or holds an earlier pull of the same repo
    (which it replaces); ``taken`` is the source of the model that holds the name now, if any."""
    if taken is None or (taken.get("type") == "hub" and str(taken.get("repo", "")).lower() == repo.lower()):
        return
    raise UsageError(
        f"a model named '{name}' already exists (from {source_label(taken)})",
        hint="pull under another name with --name, or remove it with `llmctl rm`",
    )


def _name_taken(name: str) -> UsageError:
    return UsageError(
        f"a model named '{name}' already exists",
        hint="choose another with --name, or remove it with `llmctl rm`",
    )


@dataclass
class ResolvedModel:
    """What a name turned into: the files to load, and the entry if registered."""

    name: str
    paths: list[Path]
    entry: ModelEntry | None = None
    kind: str = "registered"  # registered | discovered | path


@dataclass
class Listing:
    """A row of ``list``: the entry or discovered files, their info or problem."""

    name: str
    paths: list[Path]
    source: str
    kind: str
    info: gguf.ModelInfo | None
    status: str
    size: int
    last_used: str | None = None
    entry: ModelEntry | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def projector_of(entry: ModelEntry | None, kind: str, paths: list[Path]) -> Path | None:
    """A model's multimodal projector, as recorded or found, whether or not it is still on disk: the one
    pulled with a registered model; for a model found in the Hugging Face cache, the ``mmproj`` GGUF of
    its snapshot that llama.cpp's ``-hf`` would pick; none for imported files and plain paths."""
    if entry is not None:
        return entry.mmproj_path
    if kind == "discovered" and paths:
        return hfcache.snapshot_projector(paths[0])
    return None


def mmproj_for(resolved: ResolvedModel) -> Path | None:
    """The projector to load with a resolved model (llama-server ``--mmproj``), None when it has none or
    its file is gone (the model then serves text only)."""
    path = projector_of(resolved.entry, resolved.kind, resolved.paths)
    return path if path is not None and path.is_file() else None


# --- file helpers --------------------------------------------------------------


def file_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def header_cache_entry(paths: list[Path], info: gguf.ModelInfo) -> dict[str, Any]:
    """What the index keeps of a header: the summary, keyed by each file's (size, mtime)."""
    return {"v": gguf.SUMMARY_VERSION, "key": [file_key(p) for p in paths], "info": info.to_dict()}


def cached_info(cached: dict[str, Any] | None, paths: list[Path]) -> gguf.ModelInfo | None:
    """The cached summary if it still describes these files, else None."""
    if not cached or cached.get("v") != gguf.SUMMARY_VERSION:
        return None
    if cached.get("key") != [file_key(p) for p in paths]:
        return None
    return gguf.ModelInfo.from_dict(cached["info"])


# --- the store -----------------------------------------------------------------


class Store:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.index_path = settings.index_path

    # index I/O

    def _read_index(self) -> dict[str, Any]:
        try:
            text = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": INDEX_VERSION, "models": [], "discovered_headers": {}}
        except OSError as exc:
            raise StoreError(f"cannot read {self.index_path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("models"), list):
                raise ValueError("unexpected layout")
        except ValueError as exc:
            raise StoreError(
                f"model index {self.index_path} is corrupt ({exc})",
                hint="move it aside and re-import your models; model files are untouched",
            ) from None
        version = data.get("version", 0)
        if not isinstance(version, int):
            raise StoreError(
                f"model index {self.index_path} is corrupt (bad version)", hint="move it aside and re-import your models; model files are untouched"
            )
        if version > INDEX_VERSION:
            raise StoreError(
                f"model index {self.index_path} was written by a newer llmctl",
                hint="upgrade llmctl",
            )
        data.setdefault("discovered_headers", {})
        return data

    def index_stamp(self) -> tuple[int, int, int] | None:
        """What changes whenever the index is written (it is replaced whole), from a stat alone:
        callers that remember what they resolved know when to resolve again. None: no index."""
        try:
            st = self.index_path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _write_index(self, data: dict[str, Any]) -> None:
        data["version"] = INDEX_VERSION
        data["models"].sort(key=lambda m: m["name"])
        atomic_write_text(self.index_path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with exclusive_lock(self.settings.home / "index.lock"):
            yield

    @contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of the index under the lock; written only on success."""
        with self._locked():
            data = self._read_index()
            yield data
            self._write_index(data)

    def entries(self) -> list[ModelEntry]:
        fields = ModelEntry.__dataclass_fields__
        out = []
        for record in self._read_index()["models"]:
            try:
                out.append(ModelEntry(**{k: v for k, v in record.items() if k in fields}))
            except TypeError:
                raise StoreError(
                    f"model index {self.index_path} is corrupt (an entry lacks required fields)",
                    hint="move it aside and re-import your models; model files are untouched",
                ) from None
        return out

    def get(self, name: str) -> ModelEntry | None:
        for entry in self.entries():
            if entry.name == name.lower():
                return entry
        return None

    # registration

    def add(self, entry: ModelEntry) -> None:
        """Register a new model; its name must be free."""
        with self.transaction() as data:
            if any(m["name"] == entry.name for m in data["models"]):
                raise _name_taken(entry.name)
            data["models"].append(asdict(entry))

    def check_name_free(self, name: str) -> None:
        """Refuse a name already registered, before the work that ``add`` would then refuse."""
        if self.get(name) is not None:
            raise _name_taken(name)

    def upsert_hub(self, entry: ModelEntry) -> None:
        """Register a pulled model, replacing an earlier pull of the same repo under that name."""
        with self.transaction() as data:
            for index, existing in enumerate(data["models"]):
                if existing["name"] != entry.name:
                    continue
                _check_pull_name(entry.name, existing.get("source", {}), entry.source["repo"])
                entry.added = existing.get("added", entry.added)
                entry.last_used = existing.get("last_used")
                data["models"][index] = asdict(entry)
                return
            data["models"].append(asdict(entry))

    def check_pull_name(self, name: str, repo: str) -> None:
        """Refuse ``name`` for a pull of ``repo`` before downloading, as ``upsert_hub`` would after."""
        taken = self.get(name)
        _check_pull_name(name, None if taken is None else taken.source, repo)

    def remove_entry(self, name: str) -> None:
        with self.transaction() as data:
            data["models"] = [m for m in data["models"] if m["name"] != name]

    def touch(self, name: str) -> None:
        """Record that a model was just used (run, chat, bench)."""
        with self.transaction() as data:
            for m in data["models"]:
                if m["name"] == name:
                    m["last_used"] = now_iso()

    def find_by_path(self, path: Path) -> ModelEntry | None:
        real = os.path.realpath(path)
        for entry in self.entries():
            if any(os.path.realpath(f) == real for f in entry.files):
                return entry
        return None

    # header summaries

    def info(self, entry: ModelEntry) -> gguf.ModelInfo:
        """The entry's ModelInfo from the cache, re-reading the header only if the files changed."""
        info = cached_info(entry.header, entry.paths)
        if info is not None:
            return info
        _, info = gguf.read_model(entry.paths)
        entry.header = header_cache_entry(entry.paths, info)
        self._save_header(entry.name, entry.header)
        return info

    def _save_header(self, name: str, header: dict[str, Any]) -> None:
        try:
            with self.transaction() as data:
                for m in data["models"]:
                    if m["name"] == name:
                        m["header"] = header
        except OSError:
            pass  # a read-only home still lists; the cache is an optimisation

    def listing(self) -> list[Listing]:
        """Every model for ``list``: registered first, then discovered; never raises on a bad file."""
        entries = self.entries()
        rows = [self._entry_row(e) for e in entries]
        rows.extend(self._discovered_rows(entries))
        return rows

    def _entry_row(self, entry: ModelEntry) -> Listing:
        info, status = None, "ok"
        missing = [p for p in entry.paths if not p.exists()]
        if missing:
            status = f"missing: {missing[0]}"
        else:
            try:
                info = self.info(entry)
            except Exception as exc:  # noqa: BLE001 - one bad file must never break the listing
                status = f"invalid: {getattr(exc, 'problem', None) or getattr(exc, 'message', None) or exc}"
        return Listing(
            name=entry.name,
            paths=entry.paths,
            source=entry.source_label,
            kind="registered",
            info=info,
            status=status,
            size=entry.size,
            last_used=entry.last_used,
            entry=entry,
        )

    def _discovered_rows(self, entries: list[ModelEntry]) -> list[Listing]:
        discovered = hfcache.discover(self.settings.hf_hub_cache, {os.path.realpath(f) for e in entries for f in e.files})
        if not discovered:
            return []
        data = self._read_index()
        cache: dict[str, Any] = data["discovered_headers"]
        fresh: dict[str, Any] = {}
        rows = []
        for found in discovered:
            repo, revision, filename, parts = found.repo, found.revision, found.filename, found.parts
            info, status, size = None, "ok", 0
            try:
                size = sum(p.stat().st_size for p in parts)
                info = cached_info(cache.get(str(parts[0])), parts)
                if info is None:
                    _, info = gguf.read_model(parts)
                fresh[str(parts[0])] = header_cache_entry(parts, info)
            except Exception as exc:  # noqa: BLE001 - one bad file must never break the listing
                status = f"invalid: {getattr(exc, 'problem', None) or getattr(exc, 'message', None) or exc}"
            rows.append(
                Listing(
                    name=discovered_full_name(repo, revision, filename),
                    paths=parts,
                    source=source_label({"type": "hf-cache", "repo": repo}),
                    kind="discovered",
                    info=info,
                    status=status,
                    size=size,
                    extra={"repo": repo, "revision": revision, "filename": filename},
                )
            )
        _give_short_names(rows, entries)
        if fresh != cache:
            try:
                with self.transaction() as latest:
                    latest["discovered_headers"] = fresh
            except OSError:
                pass
        return rows

    # name resolution

    def resolve(self, name: str, *, paths: bool = True) -> ResolvedModel:
        """Turn what the user typed into model files.

        Order: exact registered name; an existing file path; any other name ``list``
        prints (or a discovered file's full name, ``owner/repo/FILE@REVISION``);
        ``owner/repo[:QUANT]`` (also ``hf.co/…`` and huggingface.co URLs) among
        registered and discovered models, a model llmctl pulled winning over other
        copies in a cache; a unique prefix of a name. Unknown names suggest the
        nearest ones.
        With ``paths=False`` (names from a server's clients) the file system is never
        consulted: a name is only ever a model's name.
        """
        text = name.strip()
        if not text:
            raise UsageError("empty model name", hint="run `llmctl list` to see model names")
        entries = self.entries()
        lowered = text.lower()
        for entry in entries:
            if entry.name == lowered:
                return ResolvedModel(entry.name, entry.paths, entry)

        if paths:
            path = Path(text).expanduser()
            if path.is_file():
                return self._resolve_path(path)
            if path.is_dir():
                raise UsageError(f"{text} is a directory", hint="give the path of a .gguf file")
            if path.exists():  # a pipe, socket or device: never opened
                raise UsageError(f"{text} is not a regular file", hint="give the path of a .gguf file")

        rows = self.listing_for_resolution(entries)
        # Every name `list` prints means that row, and a discovered file's full name
        # (owner/repo/FILE@REVISION) keeps meaning it once it is shown by its short name.
        names = {row.name.lower(): row for row in rows}
        full_names = {
            discovered_full_name(row.extra["repo"], row.extra["revision"], row.extra["filename"]).lower(): row for row in rows if row.kind == "discovered"
        }
        exact = names.get(lowered) or full_names.get(lowered)
        if exact is not None:
            return self._from_row(exact)
        repo_match = self._match_repo(text, rows)
        if repo_match is not None:
            return repo_match
        if lowered.endswith(".gguf") and ("/" not in text or os.path.isabs(text) or text.startswith(".")):
            raise NotFoundError(f"{text}: no such file", hint="check the path")

        candidates = [n for n in names if n.startswith(lowered)]
        if len(candidates) == 1:
            return self._from_row(names[candidates[0]])
        if len(candidates) > 1:
            raise AmbiguousNameError(text, sorted(candidates))
        close = difflib.get_close_matches(lowered, list(names), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `llmctl list` to see your models, or `llmctl pull NAME` to download one"
        raise NotFoundError(f"no model named '{text}'", hint=hint)

    def repo_models(self, name: str) -> list[ResolvedModel]:
        """Every local model of the repo ``name`` names (``owner/repo`` or a catalog name, no quant or file):
        those llmctl pulled if any, else the copies found in the Hugging Face cache. Where ``resolve`` finds
        several and cannot choose, ``fit`` compares them as ``pull`` compares a repo's quants."""
        ref = parse_ref(name.strip(), catalog.aliases())
        if ref is None or ref.quant or ref.filename:
            return []
        rows = [r for r in self.listing_for_resolution(self.entries()) if (_row_repo(r) or "").lower() == ref.repo_id.lower()]
        pulled = [r for r in rows if r.kind == "registered"]
        return [self._from_row(r) for r in (pulled or rows)]

    def listing_for_resolution(self, entries: list[ModelEntry]) -> list[Listing]:
        rows = [Listing(e.name, e.paths, e.source_label, "registered", None, "ok", e.size, entry=e) for e in entries]
        return rows + self._discovered_rows(entries)

    def _from_row(self, row: Listing) -> ResolvedModel:
        return ResolvedModel(row.name, row.paths, row.entry, row.kind)

    def _resolve_path(self, path: Path) -> ResolvedModel:
        entry = self.find_by_path(path)
        if entry is not None:
            return ResolvedModel(entry.name, entry.paths, entry)
        return ResolvedModel(str(path), gguf.split_parts(path.resolve()), None, "path")

    def _match_repo(self, text: str, rows: list[Listing]) -> ResolvedModel | None:
        """``owner/repo[:QUANT]``, hf.co/ and URL forms, or a catalog name, among local models."""
        ref = parse_ref(text, catalog.aliases())
        if ref is None:
            return None
        repo_id, quant = ref.repo_id.lower(), ref.quant
        filename = ref.filename or ""
        matches = []
        for row in rows:
            row_repo = _row_repo(row)
            if row_repo is None or row_repo.lower() != repo_id:
                continue
            if filename and not _row_has_file(row, filename):
                continue
            if quant and not _row_quant_is(row, quant):
                continue
            matches.append(row)
        if not matches:
            return None
        pulled = [r for r in matches if r.kind == "registered"]
        if len(matches) > 1 and len(pulled) == 1:
            return self._from_row(pulled[0])  # what llmctl pulled wins over other copies in a cache
        if len(matches) > 1:
            raise AmbiguousNameError(text, sorted(r.name for r in matches))
        return self._from_row(matches[0])


def _give_short_names(rows: list[Listing], entries: list[ModelEntry]) -> None:
    """Name a discovered file ``owner/repo:QUANT`` where that names nothing else: no other discovered file
    (another revision, another file of that quant) and no model llmctl pulled from the repo. The others keep
    their full name, so that every name ``list`` prints means one file (and ``resolve`` keeps accepting the full
    name of a file that later gets the short one)."""
    registered = [Listing(e.name, e.paths, e.source_label, "registered", None, "ok", e.size, entry=e) for e in entries]
    groups: dict[str, list[Listing]] = {}
    for row in rows:
        if row.info is not None:
            groups.setdefault(f"{row.extra['repo']}:{row.info.quant}".lower(), []).append(row)
    for members in groups.values():
        if len(members) != 1:
            continue
        row = members[0]
        assert row.info is not None
        repo, quant = row.extra["repo"], row.info.quant
        if any((_row_repo(r) or "").lower() == repo.lower() and _row_quant_is(r, quant) for r in registered):
            continue
        row.name = f"{repo}:{quant}"


def _row_repo(row: Listing) -> str | None:
    if row.entry is not None and row.entry.source.get("type") == "hub":
        return str(row.entry.source.get("repo"))
    return row.extra.get("repo")


def _row_has_file(row: Listing, filename: str) -> bool:
    names = [p.name.lower() for p in row.paths]
    return filename.split("/")[-1].lower() in names


def _row_quant_is(row: Listing, quant: str) -> bool:
    quant = quant.lower()
    if row.name.lower().endswith(":" + quant):
        return True
    return any((quant_of_filename(p.name) or "").lower() == quant for p in row.paths)
