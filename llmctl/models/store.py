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
import hashlib
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from llmctl import gguf
from llmctl.config import Settings
from llmctl.errors import (
    AmbiguousNameError,
    NotFoundError,
    StoreError,
    UsageError,
)
from llmctl.fileio import atomic_write_text, exclusive_lock, lock_held, now_iso, unused_lock

INDEX_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._:+-]{0,127}$")
QUANT_IN_NAME_RE = re.compile(r"[-._](?P<quant>(?:I?Q\d(?:_[0-9A-Z]+)*)|BF16|F16|F32|MXFP4(?:_MOE)?)$", re.IGNORECASE)


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

    @property
    def paths(self) -> list[Path]:
        return [Path(f) for f in self.files]

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


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def default_name(path: Path, quant: str) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``smollm2-135m-instruct:q4_1``."""
    stem = path.name
    split = gguf.SPLIT_RE.match(stem)
    stem = split["prefix"] if split else stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    match = QUANT_IN_NAME_RE.search(stem)
    if match:
        quant = match["quant"]
        stem = stem[: match.start()]
    base = re.sub(r"[^a-z0-9._+-]+", "-", stem.lower()).strip("-._") or "model"
    return f"{base}:{quant.lower()}"


def validate_name(name: str) -> str:
    normal = name.strip().lower()
    if not NAME_RE.match(normal):
        raise UsageError(
            f"invalid model name '{name}'",
            hint="use letters, digits and . _ : + - (up to 128 characters, no '/')",
        )
    return normal


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
        with self.transaction() as data:
            names = {m["name"] for m in data["models"]}
            if entry.name in names:
                raise UsageError(
                    f"a model named '{entry.name}' already exists",
                    hint="choose another with --name, or remove it with `llmctl rm`",
                )
            data["models"].append(asdict(entry))

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

    # discovery in the Hugging Face cache

    def discover(self, registered: list[ModelEntry]) -> list[tuple[str, str, str, list[Path]]]:
        """GGUF files in the HF cache not registered here: (repo, revision, filename, parts)."""
        root = self.settings.hf_hub_cache
        if not root.is_dir():
            return []
        known = {os.path.realpath(f) for e in registered for f in e.files}
        found: dict[str, tuple[str, str, str, list[Path]]] = {}
        for repo_dir in sorted(root.glob("models--*")):
            repo = repo_dir.name[len("models--") :].replace("--", "/", 1)
            snapshots = repo_dir / "snapshots"
            if not snapshots.is_dir():
                continue
            for path in sorted(snapshots.glob("*/**/*.gguf")):
                split = gguf.SPLIT_RE.match(path.name)
                if split and int(split["no"]) != 1:
                    continue
                real = os.path.realpath(path)
                if real in known or real in found:
                    continue
                revision, *rel = path.relative_to(snapshots).parts
                found[real] = (repo, revision, "/".join(rel), gguf.split_parts(path))
        return list(found.values())

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
        discovered = self.discover(entries)
        if not discovered:
            return []
        data = self._read_index()
        cache: dict[str, Any] = data["discovered_headers"]
        fresh: dict[str, Any] = {}
        rows = []
        for repo, revision, filename, parts in discovered:
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
        from llmctl.models.catalog import parse_ref

        ref = parse_ref(text)
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

    # removal

    def delete_hub_files(self, links: list[Path]) -> list[Path]:
        """Delete snapshot links in the HF cache, each blob no other snapshot still uses, and what they leave.

        A blob a pull is working on now (its lock is held) is left to that pull.
        Emptied snapshot folders go, with the refs that name them (huggingface_hub's
        cache scan counts a ref to a missing snapshot as corruption), and a repo
        folder left with no snapshot and no blob goes as a whole.
        """
        self.check_hub_links(links)
        removed = []
        repos: list[Path] = []
        for link in links:
            repo_dir = _hub_repo_dir(link)
            blob = Path(os.path.realpath(link))
            if link.is_symlink() or link.exists():
                link.unlink()
                removed.append(link)
            _prune_snapshot(link.parent, repo_dir)
            with unused_lock(blob.with_name(blob.name + LOCK_SUFFIX)) as free:
                users = [p for p in (repo_dir / "snapshots").rglob("*") if p.is_symlink() and os.path.realpath(p) == str(blob)]
                if free and not users and blob.exists():
                    blob.unlink()
                    removed.append(blob)
            if repo_dir not in repos:
                repos.append(repo_dir)
        for repo_dir in repos:
            _prune_repo(repo_dir)
        return removed

    def check_hub_links(self, links: list[Path]) -> None:
        """Refuse, before anything is forgotten or deleted, links that are not a Hugging Face cache's own.

        A link must lie in ``models--*/snapshots/`` and point into the same folder's
        ``blobs/``. The cache may be another than today's HF_HUB_CACHE: a model
        pulled before that setting changed is still removed from where it lies.
        """
        for link in links:
            repo_dir = _hub_repo_dir(link)
            if repo_dir is None:
                raise StoreError(f"refusing to delete {link}: it is not inside a Hugging Face cache's snapshots folder")
            if os.path.lexists(link) and not Path(os.path.realpath(link)).is_relative_to(Path(os.path.realpath(repo_dir)) / "blobs"):
                raise StoreError(f"refusing to delete {link}: it points outside {repo_dir}")

    def delete_files(self, entry_or_paths: ModelEntry | list[Path], *, inside: Path | None = None) -> list[Path]:
        """Delete model files; with ``inside``, refuse anything that resolves outside it."""
        paths = entry_or_paths.paths if isinstance(entry_or_paths, ModelEntry) else entry_or_paths
        removed = []
        for path in paths:
            if inside is not None:
                real = Path(os.path.realpath(path))
                if path.is_symlink() or not real.is_relative_to(Path(os.path.realpath(inside))):
                    raise StoreError(f"refusing to delete {path}: it points outside {inside}")
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot delete {path}: {exc.strerror}") from None
        if inside is not None and paths:
            folder = paths[0].parent
            if folder != inside:
                with unused_lock(folder.with_name(folder.name + LOCK_SUFFIX)) as free:
                    if free and folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
        return removed


def _hub_repo_dir(link: Path) -> Path | None:
    """The ``models--*`` folder whose ``snapshots/`` holds ``link``; None when it lies elsewhere."""
    for parent in link.parents:
        if parent.name.startswith("models--"):
            return parent if link.is_relative_to(parent / "snapshots") and link.parent != parent / "snapshots" else None
    return None


def _prune_snapshot(folder: Path, repo_dir: Path) -> None:
    """Remove ``folder`` and its parents up to ``snapshots/`` while empty; then the refs naming a removed revision."""
    snapshots = repo_dir / "snapshots"
    while folder != snapshots and folder.is_relative_to(snapshots):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone, or not ours to remove)
            if folder.exists():
                return
        if folder.parent == snapshots:
            _drop_refs(repo_dir, folder.name)
            return
        folder = folder.parent


def _drop_refs(repo_dir: Path, revision: str) -> None:
    refs = repo_dir / "refs"
    if not refs.is_dir() or refs.is_symlink():
        return
    for ref in refs.rglob("*"):
        try:
            if ref.is_file() and not ref.is_symlink() and ref.read_text(encoding="utf-8").strip() == revision:
                ref.unlink()
        except (OSError, UnicodeDecodeError):
            continue


def _prune_repo(repo_dir: Path) -> None:
    """Remove a repo's folder once it holds no snapshot and no blob (an unfinished download counts)."""
    snapshots, blobs = repo_dir / "snapshots", repo_dir / "blobs"
    if (snapshots.is_dir() and any(snapshots.iterdir())) or (blobs.is_dir() and any(blobs.iterdir())):
        return
    if repo_dir.is_symlink() or not repo_dir.is_dir():
        return
    shutil.rmtree(repo_dir, ignore_errors=True)  # refs/ and .no_exist/: bookkeeping of nothing now


def discovered_full_name(repo: str, revision: str, filename: str) -> str:
    """``owner/repo/FILE@REVISION`` (12 hex digits): names one file of one snapshot, whatever else is there."""
    return f"{repo}/{filename}@{revision[:12]}"


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
    from llmctl.models.catalog import quant_of_filename

    quant = quant.lower()
    if row.name.lower().endswith(":" + quant):
        return True
    return any((quant_of_filename(p.name) or "").lower() == quant for p in row.paths)


# --- import --------------------------------------------------------------------
#
# ``import --copy`` writes each part to ``<part>.llmctl.partial`` inside
# ``$LLMCTL_HOME/models/<name>/`` and renames it when complete. The whole copy
# and the registration run under ``models/<name>.llmctl.lock``: a second import
# into the same folder waits for the first and then finds the name taken, and
# ``list`` / ``rm --partials`` can tell a partial that a running import is
# writing from one a killed import left behind.

IMPORT_PARTIAL_SUFFIX = ".llmctl.partial"
LOCK_SUFFIX = ".llmctl.lock"  # also the suffix of a pull's lock on a blob (hub.LOCK_SUFFIX)
IMPORT_LOCK_SUFFIX = LOCK_SUFFIX
COPY_CHUNK = 4 * 1024 * 1024

_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def require_regular_file(path: Path) -> None:
    """Refuse anything but a regular file before anything opens it: opening a FIFO blocks for ever."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file", hint="check the path") from None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path} is a directory", hint="give the path of a .gguf file")
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UsageError(f"{path} is {kind}, not a model file", hint="give the path of a .gguf file")


def _open_regular(path: Path) -> Any:
    """Open for reading without blocking on a FIFO swapped in since the check, and check again."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a regular file any more", hint="give the path of a .gguf file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass
class ImportPartial:
    """A part that ``import --copy`` began to copy and did not finish."""

    path: Path
    size: int
    in_use: bool  # a running import is writing it now


def find_import_partials(models_dir: Path) -> list[ImportPartial]:
    found: list[ImportPartial] = []
    if not models_dir.is_dir():
        return found
    for path in sorted(models_dir.glob("*/*" + IMPORT_PARTIAL_SUFFIX)):
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # finished (renamed) since the glob
            continue
        folder = path.parent
        found.append(ImportPartial(path, size, in_use=lock_held(folder.with_name(folder.name + IMPORT_LOCK_SUFFIX))))
    return found


def remove_import_partial(partial: ImportPartial) -> bool:
    """Delete a partial copy unless an import is writing it; False when one is. Its lock goes too."""
    folder = partial.path.parent
    with unused_lock(folder.with_name(folder.name + IMPORT_LOCK_SUFFIX)) as free:
        if not free:
            return False
        partial.path.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return True


def remove_download_partial(path: Path, partial_suffix: str) -> bool:
    """Delete an unfinished download (``blobs/<sha>.llmctl.partial``) unless a pull holds its lock; False when
    one does. The lock file goes with it, and the repo's folder if nothing else is left in it."""
    lock = path.with_name(path.name[: -len(partial_suffix)] + LOCK_SUFFIX)
    with unused_lock(lock) as free:
        if not free:
            return False
        path.unlink(missing_ok=True)
    if path.parent.name == "blobs" and path.parent.parent.name.startswith("models--"):
        _prune_repo(path.parent.parent)
    return True


def import_model(
    store: Store,
    path: Path,
    *,
    name: str | None,
    copy: bool,
    progress: Callable[[str, int], Any] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> tuple[ModelEntry, gguf.ModelInfo]:
    """Validate a GGUF (all parts of a split one) and register it.

    Nothing is registered unless every part reads cleanly; a copy is written to
    a temporary name and renamed into place only when complete. ``on_wait`` is
    called when another import is copying into the same folder and this one
    waits for it.
    """
    path = path.expanduser()
    require_regular_file(path)
    parts = [p.resolve() for p in gguf.split_parts(path)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise NotFoundError(
            f"{missing[0]}: part {parts.index(missing[0]) + 1} of {len(parts)} of this split model is missing",
            hint="download every part into the same folder",
        )
    for part in parts:
        require_regular_file(part)
    _, info = gguf.read_model(parts)
    existing = store.find_by_path(parts[0])
    if existing is not None:
        raise UsageError(f"{path} is already registered as '{existing.name}'", hint="use that name")
    # Named after the path the user gave (a symlink's own name, not its hashed target).
    final_name = validate_name(name) if name else default_name(gguf.split_parts(path)[0], info.quant)
    _check_name_free(store, final_name)

    size = sum(p.stat().st_size for p in parts)
    if not copy:
        hashes = [sha256_file(p, _progress_for(progress, p)) for p in parts]
        source = {"type": "import", "path": str(parts[0])}
        entry = _new_entry(final_name, parts, source, False, size, hashes, info)
        store.add(entry)
        return entry, info
    dest_dir = store.settings.models_dir / final_name.replace(":", "-")
    with exclusive_lock(dest_dir.with_name(dest_dir.name + IMPORT_LOCK_SUFFIX), on_wait=on_wait):
        _check_name_free(store, final_name)  # a concurrent import may have taken it while this one waited
        files, hashes = _copy_parts(store, parts, dest_dir, progress)
        entry = _new_entry(final_name, files, {"type": "copy", "path": str(parts[0])}, True, size, hashes, info)
        try:
            store.add(entry)
        except BaseException:
            store.delete_files(list(files), inside=store.settings.models_dir)
            raise
    return entry, info


def _check_name_free(store: Store, name: str) -> None:
    if store.get(name) is not None:
        raise UsageError(
            f"a model named '{name}' already exists",
            hint="choose another with --name, or remove it with `llmctl rm`",
        )


def _new_entry(name: str, files: list[Path], source: dict[str, Any], owned: bool, size: int, hashes: list[str | None], info: gguf.ModelInfo) -> ModelEntry:
    return ModelEntry(
        name=name,
        files=[str(f) for f in files],
        source=source,
        owned=owned,
        size=size,
        sha256=hashes,
        added=now_iso(),
        header=header_cache_entry(files, info),
    )


def _progress_for(progress: Callable[[str, int], Any] | None, path: Path) -> Callable[[int], None] | None:
    if progress is None:
        return None
    return lambda n: progress(path.name, n)


def _copy_parts(store: Store, parts: list[Path], dest_dir: Path, progress: Callable[[str, int], Any] | None) -> tuple[list[Path], list[str | None]]:
    """Copy under the folder's lock (held by the caller), hashing as the bytes pass."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    needed = sum(p.stat().st_size for p in parts)
    free = shutil.disk_usage(dest_dir).free
    if needed > free:
        raise StoreError(
            f"not enough disk space to copy: need {needed} bytes, {free} free in {dest_dir}",
            hint="free some space or import without --copy",
        )
    files: list[Path] = []
    hashes: list[str | None] = []
    try:
        for part in parts:
            dest = dest_dir / part.name
            if dest.exists():
                owner = store.find_by_path(dest)
                if owner is not None:
                    raise UsageError(f"{dest} already belongs to model '{owner.name}'", hint="choose another --name")
                # Otherwise an import killed between its rename and its registration left it: copied afresh.
            tmp = dest.with_name(dest.name + IMPORT_PARTIAL_SUFFIX)
            digest = hashlib.sha256()
            with _open_regular(part) as src, open(tmp, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    if progress:
                        progress(part.name, len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, dest)
            files.append(dest)
            hashes.append(digest.hexdigest())
    except BaseException:
        for leftover in list(dest_dir.glob("*" + IMPORT_PARTIAL_SUFFIX)) + files:
            leftover.unlink(missing_ok=True)
        if dest_dir.is_dir() and not any(dest_dir.iterdir()):
            dest_dir.rmdir()
        raise
    return files, hashes
