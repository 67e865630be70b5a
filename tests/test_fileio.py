"""Cross-process locks (filelock underneath): waiting, trying, looking, and deleting a lock file that is free."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from llmctl.fileio import exclusive_lock, lock_held, unused_lock

HOLD = """
import sys, time
from pathlib import Path
from llmctl.fileio import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(lock: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding ``lock`` for ``seconds``, once it says so."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_busy_lock_is_tried_or_waited_for_once_announced(tmp_path: Path) -> None:
    lock = tmp_path / "sub" / "x.llmctl.lock"
    holder = _holder(lock, 0.5)
    with exclusive_lock(lock, wait=False) as got:
        assert got is False
    assert lock_held(lock)
    waits: list[float] = []
    start = time.monotonic()
    with exclusive_lock(lock, on_wait=lambda: waits.append(time.monotonic())) as got:
        got_at = time.monotonic()
    assert got is True and got_at - start > 0.25  # only once the holder let go (it holds for 0.5 s)
    assert len(waits) == 1 and waits[0] - start < 0.25  # announced before waiting
    holder.wait(5)
    assert lock.exists() and not lock_held(lock)  # the file stays for the next holder; nobody holds it


def test_a_free_lock_is_taken_without_waiting_and_within_one_process_excludes_another_holder(tmp_path: Path) -> None:
    lock = tmp_path / "x.llmctl.lock"
    with exclusive_lock(lock, on_wait=lambda: (_ for _ in ()).throw(AssertionError("no wait"))) as got:
        assert got is True and lock_held(lock)
        with exclusive_lock(lock, wait=False) as again:  # another taker, even in this process, finds it busy
            assert again is False
    assert not lock_held(lock)


def test_looking_creates_nothing_and_two_lookers_do_not_see_each_other(tmp_path: Path) -> None:
    import fcntl

    lock = tmp_path / "x.llmctl.lock"
    assert not lock_held(lock) and not lock.exists()
    lock.touch()
    with open(lock, "rb") as looker:
        fcntl.flock(looker.fileno(), fcntl.LOCK_SH)
        assert not lock_held(lock)


def test_unused_lock_deletes_a_free_lock_file_and_leaves_a_held_one(tmp_path: Path) -> None:
    lock = tmp_path / "x.llmctl.lock"
    with unused_lock(lock) as free:  # no lock file: nobody holds it, and none is made
        assert free is True and not lock.exists()
    holder = _holder(lock, 30)
    try:
        with unused_lock(lock) as free:
            assert free is False
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait(5)
    with unused_lock(lock) as free:
        assert free is True and lock.exists()  # held while the caller cleans up
    assert not lock.exists()


def test_a_lock_file_this_user_cannot_write_is_still_locked_read_only(tmp_path: Path, monkeypatch) -> None:
    """rm in a shared cache: another user's lock file (mode 644) cannot be opened for writing, yet a
    free one is taken (and deleted) and a held one is left, as before filelock."""
    import filelock

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.lock_file))

    lock = tmp_path / "x.llmctl.lock"
    lock.write_bytes(b"")
    holder = _holder(lock, 30)
    monkeypatch.setattr(filelock.FileLock, "acquire", refused)
    try:
        with unused_lock(lock) as free:
            assert free is False
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait(5)
    with unused_lock(lock) as free:
        assert free is True and lock.exists()
    assert not lock.exists()


def test_a_waiter_whose_lock_file_was_deleted_locks_the_path_afresh(tmp_path: Path) -> None:
    """rm deletes a lock file while a pull waits on it: the pull must lock the file the path names,
    or a third process would lock a new file at the same path and both would hold "the" lock."""
    lock = tmp_path / "x.llmctl.lock"
    lock.touch()
    waiting = threading.Event()
    inside: list[bool] = []

    def pull() -> None:
        with exclusive_lock(lock, on_wait=waiting.set):
            inside.append(lock_held(lock))  # the path names the file this holds
            with exclusive_lock(lock, wait=False) as third:
                inside.append(third)

    with unused_lock(lock) as free:
        assert free is True
        waiter = threading.Thread(target=pull)
        waiter.start()
        assert waiting.wait(5)
        time.sleep(0.1)  # the waiter has the deleted file open
    waiter.join(10)
    assert inside == [True, False]
