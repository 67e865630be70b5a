"""``llmctl import``: register a GGUF file already on disk, in place or as a copy under llmctl's home.

``import --copy`` writes each part to ``<part>.llmctl.partial`` inside
``$LLMCTL_HOME/models/<name>/`` and renames it when complete. The whole copy
and the registration run under ``models/<name>.llmctl.lock``: a second import
into the same folder waits for the first and then finds the name taken, and
``list`` / ``rm --partials`` can tell a partial that a running import is
writing from one a killed import left behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmctl import gguf
from llmctl.errors import NotFoundError, StoreError, UsageError
from llmctl.fileio import exclusive_lock, lock_held, now_iso, unused_lock
from llmctl.models.names import default_name, validate_name
from llmctl.models.store import ModelEntry, Store, header_cache_entry

PARTIAL_SUFFIX = ".llmctl.partial"
LOCK_SUFFIX = ".llmctl.lock"  # the folder's: models/<name>.llmctl.lock
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
    for path in sorted(models_dir.glob("*/*" + PARTIAL_SUFFIX)):
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # finished (renamed) since the glob
            continue
        folder = path.parent
        found.append(ImportPartial(path, size, in_use=lock_held(folder.with_name(folder.name + LOCK_SUFFIX))))
    return found


def remove_import_partial(partial: ImportPartial) -> bool:
    """Delete a partial copy unless an import is writing it; False when one is. Its lock goes too."""
    folder = partial.path.parent
    with unused_lock(folder.with_name(folder.name + LOCK_SUFFIX)) as free:
        if not free:
            return False
        partial.path.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
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
    if info.architecture == "clip":  # what llama.cpp's converter writes for every mmproj file
        raise UsageError(
            f"{path} is a multimodal projector (mmproj), not a model",
            hint="it is loaded beside its model; import the model's own GGUF (`pull` fetches a repo's projector with the model)",
        )
    existing = store.find_by_path(parts[0])
    if existing is not None:
        raise UsageError(f"{path} is already registered as '{existing.name}'", hint="use that name")
    # Named after the path the user gave (a symlink's own name, not its hashed target).
    final_name = validate_name(name) if name else default_name(gguf.split_parts(path)[0], info.quant)
    store.check_name_free(final_name)

    size = sum(p.stat().st_size for p in parts)
    if not copy:
        hashes: list[str | None] = [sha256_file(p, _progress_for(progress, p)) for p in parts]
        source = {"type": "import", "path": str(parts[0])}
        entry = _new_entry(final_name, parts, source, False, size, hashes, info)
        store.add(entry)
        return entry, info
    dest_dir = store.settings.models_dir / final_name.replace(":", "-")
    with exclusive_lock(dest_dir.with_name(dest_dir.name + LOCK_SUFFIX), on_wait=on_wait):
        store.check_name_free(final_name)  # a concurrent import may have taken it while this one waited
        files, hashes = _copy_parts(store, parts, dest_dir, progress)
        entry = _new_entry(final_name, files, {"type": "copy", "path": str(parts[0])}, True, size, hashes, info)
        try:
            store.add(entry)
        except BaseException:
            delete_files(list(files), inside=store.settings.models_dir)
            raise
    return entry, info


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
            tmp = dest.with_name(dest.name + PARTIAL_SUFFIX)
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
        for leftover in list(dest_dir.glob("*" + PARTIAL_SUFFIX)) + files:
            leftover.unlink(missing_ok=True)
        if dest_dir.is_dir() and not any(dest_dir.iterdir()):
            dest_dir.rmdir()
        raise
    return files, hashes


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def delete_files(paths: list[Path], *, inside: Path | None = None) -> list[Path]:
    """Delete model files; with ``inside`` (the folder of ``--copy`` imports), refuse anything that
    resolves outside it, and remove the model's folder once empty unless an import is copying into it."""
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
