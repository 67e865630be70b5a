"""The Hugging Face cache layout (``HF_HUB_CACHE``), as huggingface_hub writes and reads it.

One folder per repo, ``models--OWNER--NAME``, holding ``blobs/<sha256>`` (the
bytes), ``snapshots/<commit>/<path in the repo>`` (links to the blobs) and
``refs/<branch>`` (the commit a branch pointed at). A download in progress is
``blobs/<sha256>.llmctl.partial``, grown under ``blobs/<sha256>.llmctl.lock``.

This module knows where things lie in that layout and changes it safely: every
path it writes resolves inside the repo's folder, links are replaced only when
a pull made them, and deleting a model takes its blobs (unless another
snapshot uses them), the snapshot folders it empties, the refs naming them and
finally the repo's folder. It finds unfinished downloads and GGUF files other
tools put there. It never talks to the Hub and imports no huggingface_hub.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llmctl import gguf
from llmctl.errors import StoreError
from llmctl.fileio import lock_held, unused_lock
from llmctl.models.names import check_revision, is_model_filename, is_projector_filename, pick_projector

PARTIAL_SUFFIX = ".llmctl.partial"
LOCK_SUFFIX = ".llmctl.lock"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")  # a commit id, which becomes a folder name
_REPO_PREFIX = "models--"


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / (_REPO_PREFIX + repo_id.replace("/", "--"))


def _repo_id(folder: Path) -> str:
    """``models--owner--name`` → ``owner/name``."""
    return folder.name[len(_REPO_PREFIX) :].replace("--", "/", 1)


def inside(root: Path, path: Path, *, follow_last: bool = True) -> Path:
    """``path``, once sure that it resolves inside ``root``, symlinked parents included.

    Lexical checks on Hub data stop ``..`` and absolute names; this stops a
    symlink already in the cache (a snapshot folder, a partial) from sending
    a write elsewhere. With ``follow_last=False`` the last component itself
    may be a link (a snapshot entry pointing at its blob).
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path) if follow_last else os.path.join(os.path.realpath(path.parent), path.name)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise StoreError(
            f"refusing to write {path}: it resolves to {real}, outside {root}",
            hint=f"a symlink inside {root} points elsewhere; remove it and pull again",
        )
    return path


# --- one file of one commit ------------------------------------------------------------


@dataclass(frozen=True)
class FilePaths:
    """Where one file of a repo at one commit lies in the cache, and where its download grows."""

    folder: Path  # the repo's folder
    blob: Path
    snapshot: Path  # the link to the blob, under the file's path in the repo
    partial: Path
    lock: Path


def file_paths(cache: Path, repo_id: str, commit: str, filename: str, sha256: str) -> FilePaths:
    """The paths of a file whose name, commit and sha256 are already checked; each must also resolve
    inside the repo's folder."""
    folder = repo_folder(cache, repo_id)
    blob = inside(folder, folder / "blobs" / sha256)
    return FilePaths(
        folder=folder,
        blob=blob,
        snapshot=inside(folder, folder / "snapshots" / commit / PurePosixPath(filename), follow_last=False),
        partial=inside(folder, blob.with_name(sha256 + PARTIAL_SUFFIX)),
        lock=inside(folder, blob.with_name(sha256 + LOCK_SUFFIX)),
    )


def present_bytes(cache: Path, repo_id: str, sha256: str | None, size: int) -> int:
    """Bytes of a file already on disk: the complete blob, or a partial download."""
    if not sha256:
        return 0
    blobs = repo_folder(cache, repo_id) / "blobs"
    blob = blobs / sha256
    if blob.exists() and blob.stat().st_size == size:
        return size
    partial = blobs / (sha256 + PARTIAL_SUFFIX)
    return min(partial.stat().st_size, size) if partial.exists() else 0


def link_snapshot(snapshot: Path, blob: Path, folder: Path) -> None:
    """Point ``snapshot`` at ``blob``, as huggingface_hub does.

    Only a link into this repo's own ``blobs/`` (a link a pull made) is ever
    replaced; a file, a folder, or a link pointing elsewhere is left alone
    and the pull fails with the path to look at.
    """
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    inside(folder, snapshot, follow_last=False)  # again, now that the folders exist
    target = os.path.relpath(blob, snapshot.parent)
    if snapshot.is_symlink():
        pointed = os.path.realpath(snapshot)
        if pointed == os.path.realpath(blob):
            return
        blobs = os.path.realpath(folder / "blobs")
        if os.path.dirname(pointed) != blobs:
            raise StoreError(
                f"refusing to replace {snapshot}: it is a link to {pointed}, not to a blob of this repo",
                hint="move it away, then pull again",
            )
        snapshot.unlink()
    elif os.path.lexists(snapshot):
        if os.path.isfile(snapshot) and os.path.samefile(snapshot, blob):
            return
        raise StoreError(
            f"refusing to replace {snapshot}: it is not a link made by a pull",
            hint="move it away, then pull again",
        )
    try:
        snapshot.symlink_to(target)
    except FileExistsError:
        if os.path.realpath(snapshot) != os.path.realpath(blob):
            raise
    except OSError:  # pragma: no cover - no symlinks (Windows without developer mode)
        shutil.copyfile(blob, snapshot)


def write_ref(cache: Path, repo_id: str, ref: str, commit: str) -> None:
    """Record ``refs/<branch>`` as huggingface_hub does, so offline lookups find the commit."""
    if not COMMIT_RE.fullmatch(commit):
        raise StoreError(f"refusing to record {commit!r:.80} as the commit of {repo_id}: it is not a commit id")
    if COMMIT_RE.fullmatch(ref):
        return
    check_revision(ref)
    folder = repo_folder(cache, repo_id)
    path = inside(folder, folder / "refs" / ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    inside(folder, path)
    if path.is_dir():
        raise StoreError(f"refusing to write {path}: it is a folder", hint="move it away, then pull again")
    path.write_text(commit)


# --- unfinished downloads --------------------------------------------------------------


@dataclass
class Partial:
    path: Path
    repo_id: str
    size: int
    in_use: bool


def find_partials(cache: Path) -> list[Partial]:
    """Unfinished downloads in the HF cache, and whether a pull is working on them now."""
    found: list[Partial] = []
    if not cache.is_dir():
        return found
    for path in sorted(cache.glob(_REPO_PREFIX + "*/blobs/*" + PARTIAL_SUFFIX)):
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # finished (renamed) since the glob
            continue
        found.append(Partial(path, _repo_id(path.parent.parent), size, lock_held(_lock_of(path))))
    return found


def remove_partial(partial: Partial) -> bool:
    """Delete an unfinished download unless a pull holds its lock; False when one does. The lock
    file goes with it, and the repo's folder if nothing else is left in it."""
    with unused_lock(_lock_of(partial.path)) as free:
        if not free:
            return False
        partial.path.unlink(missing_ok=True)
    blobs = partial.path.parent
    if blobs.name == "blobs" and blobs.parent.name.startswith(_REPO_PREFIX):
        _prune_repo(blobs.parent)
    return True


def _lock_of(partial: Path) -> Path:
    return partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)] + LOCK_SUFFIX)


# --- GGUF files other tools put in the cache ---------------------------------------------


@dataclass
class CachedModel:
    """A GGUF model in a snapshot (all parts of a split one)."""

    repo: str
    revision: str
    filename: str  # the first part's path inside the repo
    parts: list[Path]


def discover(cache: Path, known: set[str]) -> list[CachedModel]:
    """GGUF models in the cache's snapshots, except those whose real path is in ``known``
    (registered ones); a blob linked from several snapshots is found once. Projectors and
    importance matrices are GGUF files too, but not models."""
    if not cache.is_dir():
        return []
    found: dict[str, CachedModel] = {}
    for folder in sorted(cache.glob(_REPO_PREFIX + "*")):
        snapshots = folder / "snapshots"
        if not snapshots.is_dir():
            continue
        for path in sorted(snapshots.glob("*/**/*.gguf")):
            if not is_model_filename(path.name):
                continue
            split = gguf.SPLIT_RE.match(path.name)
            if split and int(split["no"]) != 1:
                continue
            real = os.path.realpath(path)
            if real in known or real in found:
                continue
            revision, *rel = path.relative_to(snapshots).parts
            found[real] = CachedModel(_repo_id(folder), revision, "/".join(rel), gguf.split_parts(path))
    return list(found.values())


def snapshot_projector(path: Path) -> Path | None:
    """The multimodal projector that goes with a model file in a snapshot (``snapshots/<commit>/…``):
    among the snapshot's ``mmproj`` GGUF files, the one llama.cpp's ``-hf`` would pick
    (``names.pick_projector``); None outside a snapshot or when it has none."""
    root = next((p for p in path.parents if p.parent.name == "snapshots" and p.parent.parent.name.startswith(_REPO_PREFIX)), None)
    if root is None:
        return None
    found = {p.relative_to(root).as_posix(): p for p in root.glob("**/*.gguf") if is_projector_filename(p.name) and p.is_file()}
    chosen = pick_projector(path.relative_to(root).as_posix(), list(found))
    return found[chosen] if chosen else None


# --- deleting a model --------------------------------------------------------------------


def check_snapshot_links(links: list[Path]) -> None:
    """Refuse, before anything is forgotten or deleted, links that are not a Hugging Face cache's own.

    A link must lie in ``models--*/snapshots/`` and point into the same folder's
    ``blobs/``. The cache may be another than today's HF_HUB_CACHE: a model
    pulled before that setting changed is still removed from where it lies.
    """
    for link in links:
        folder = _snapshot_repo_folder(link)
        if os.path.lexists(link) and not Path(os.path.realpath(link)).is_relative_to(Path(os.path.realpath(folder)) / "blobs"):
            raise StoreError(f"refusing to delete {link}: it points outside {folder}")


def delete_snapshot_links(links: list[Path]) -> list[Path]:
    """Delete snapshot links, each blob no other snapshot still uses, and what they leave; returns what was deleted.

    A blob a pull is working on now (its lock is held) is left to that pull.
    Emptied snapshot folders go, with the refs that name them (huggingface_hub's
    cache scan counts a ref to a missing snapshot as corruption), and a repo
    folder left with no snapshot and no blob goes as a whole.
    """
    check_snapshot_links(links)
    removed = []
    folders: list[Path] = []
    for link in links:
        folder = _snapshot_repo_folder(link)
        blob = Path(os.path.realpath(link))
        if link.is_symlink() or link.exists():
            link.unlink()
            removed.append(link)
        _prune_snapshot(link.parent, folder)
        with unused_lock(blob.with_name(blob.name + LOCK_SUFFIX)) as free:
            users = [p for p in (folder / "snapshots").rglob("*") if p.is_symlink() and os.path.realpath(p) == str(blob)]
            if free and not users and blob.exists():
                blob.unlink()
                removed.append(blob)
        if folder not in folders:
            folders.append(folder)
    for folder in folders:
        _prune_repo(folder)
    return removed


def _snapshot_repo_folder(link: Path) -> Path:
    """The ``models--*`` folder whose ``snapshots/<commit>/`` holds ``link``; refused when it lies elsewhere."""
    for parent in link.parents:
        if parent.name.startswith(_REPO_PREFIX):
            if link.is_relative_to(parent / "snapshots") and link.parent != parent / "snapshots":
                return parent
            break
    raise StoreError(f"refusing to delete {link}: it is not inside a Hugging Face cache's snapshots folder")


def _prune_snapshot(folder: Path, repo_folder: Path) -> None:
    """Remove ``folder`` and its parents up to ``snapshots/`` while empty; then the refs naming a removed revision."""
    snapshots = repo_folder / "snapshots"
    while folder != snapshots and folder.is_relative_to(snapshots):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone, or not ours to remove)
            if folder.exists():
                return
        if folder.parent == snapshots:
            _drop_refs(repo_folder, folder.name)
            return
        folder = folder.parent


def _drop_refs(repo_folder: Path, revision: str) -> None:
    refs = repo_folder / "refs"
    if not refs.is_dir() or refs.is_symlink():
        return
    for ref in refs.rglob("*"):
        try:
            if ref.is_file() and not ref.is_symlink() and ref.read_text(encoding="utf-8").strip() == revision:
                ref.unlink()
        except (OSError, UnicodeDecodeError):
            continue


def _prune_repo(repo_folder: Path) -> None:
    """Remove a repo's folder once it holds no snapshot and no blob (an unfinished download counts)."""
    snapshots, blobs = repo_folder / "snapshots", repo_folder / "blobs"
    if (snapshots.is_dir() and any(snapshots.iterdir())) or (blobs.is_dir() and any(blobs.iterdir())):
        return
    if repo_folder.is_symlink() or not repo_folder.is_dir():
        return
    shutil.rmtree(repo_folder, ignore_errors=True)  # refs/ and .no_exist/: bookkeeping of nothing now
