"""Small file-system tools shared by the store, pulls and bench: atomic writes,
timestamps and cross-process locks.

Locks are ``flock`` on a ``*.llmctl.lock`` file beside what they guard. A lock
file may be deleted while held (``unused_lock``: ``rm`` cleans up), so a
process that opened it before the deletion re-locks the path afresh
(``exclusive_lock`` checks the file it locked is still the one named). On
Windows there is no cross-process lock: the functions do nothing.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextmanager
def exclusive_lock(lock_path: Path, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold ``lock_path`` exclusively; yields False (holding nothing) when busy and not waiting.

    ``on_wait`` is called once before waiting for another holder.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield True
        return
    waited = False
    while True:
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if on_wait and not waited:
                    on_wait()
                    waited = True
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if not still_named(handle.fileno(), lock_path):
                continue  # `rm` deleted the file between our open and our lock: lock the one there now
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return


def still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (a lock file deleted and re-created is another lock)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def unused_lock(lock_path: Path) -> Iterator[bool]:
    """Hold a lock file if nobody does and delete it on the way out; False (holding nothing) when in use.

    The file goes while still held, so a process that opened it meanwhile finds
    it unlinked once it gets the lock, and locks the path afresh (``exclusive_lock``).
    A missing lock file means nobody holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock, nothing is deleted
        yield True
        return
    try:
        handle = open(lock_path, "rb")
    except FileNotFoundError:
        yield True
        return
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            if still_named(handle.fileno(), lock_path):
                try:
                    lock_path.unlink()
                except OSError:
                    pass
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_held(lock_path: Path) -> bool:
    """Whether a process holds ``lock_path`` (an import's or a download's lock) now.

    Only looks: the file is opened read-only and never created (``list`` runs
    this), and locked shared for an instant, so two lookers never see each
    other as holders; every holder locks exclusively. A missing lock file
    means nobody holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        return False
    try:
        handle = open(lock_path, "rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False
