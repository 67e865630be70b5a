"""Small file-system tools shared by the store, pulls and bench: atomic writes,
timestamps and cross-process locks.

Locks are filelock's on a ``*.llmctl.lock`` file beside what they guard
(``flock`` on POSIX, ``LockFileEx`` on Windows). On POSIX filelock leaves a
lock file in place on release (since 3.29.7: deleting it could split waiters
over two files); ``unused_lock`` deletes one while holding it (``rm`` cleans
up), and a process that opened it before the deletion locks the path afresh,
since filelock checks that the file it locked still has a name. filelock is
imported where a lock is taken: ``list`` only looks (``lock_held``).
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

    ``on_wait`` is called once before waiting for another holder. A lock file that
    ``unused_lock`` deletes while this waits is no lock: filelock then locks the path afresh.
    """
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if not wait:
            yield False
            return
        if on_wait:
            on_wait()
        lock.acquire()
    try:
        yield True
    finally:
        lock.release()


@contextmanager
def unused_lock(lock_path: Path) -> Iterator[bool]:
    """Hold a lock file if nobody does and delete it on the way out; False (holding nothing) when in use.

    The file goes while still held, so a process that opened it meanwhile finds
    it unlinked once it gets the lock, and locks the path afresh (filelock checks
    that the file it locked still has a name). A missing lock file means nobody
    holds it, and none is made.
    """
    from filelock import FileLock, Timeout

    before = _identity(lock_path)
    if before is None:
        yield True
        return
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        yield False
        return
    except PermissionError:  # another user's lock file in a shared cache: lock it read-only, as a looker can
        with _read_only_lock(lock_path) as free:
            try:
                yield free
            finally:
                if free:
                    _unlink_if_same(lock_path, before)
        return
    try:
        yield True
    finally:
        _unlink_if_same(lock_path, before)
        lock.release()


def _unlink_if_same(path: Path, identity: tuple[int, int] | None) -> None:
    try:
        if _identity(path) == identity:  # still the file we locked, not one made since
            path.unlink()
    except OSError:
        pass


@contextmanager
def _read_only_lock(lock_path: Path) -> Iterator[bool]:
    """An exclusive ``flock`` on a lock file opened read-only (filelock opens for writing); False when busy."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: filelock's own lock is the only one
        yield False
        return
    try:
        handle = open(lock_path, "rb")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def lock_held(lock_path: Path) -> bool:
    """Whether a process holds ``lock_path`` (an import's or a download's lock) now.

    Only looks, so it is no filelock lock, which would create the file (``list``
    runs this, and writes nothing) and lock it exclusively (two lookers would
    take each other for holders): the file is opened read-only and never created,
    and locked shared for an instant with ``flock``, the call filelock's holders
    lock with on POSIX. A missing lock file means nobody holds it; on Windows
    this cannot look, and says no.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
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
        except OSError:  # a file system without flock: nothing to tell
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False
