"""Helpers for tests that watch processes."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except OSError:
        return True


def sleeping_tool(folder, name: str):
    """An executable ``name`` in ``folder`` that writes its pid to ``name.pid`` and sleeps a minute
    (``exec``: the pid stays the sleeper's), for tests of what happens to a tool llmctl started."""
    import stat

    pid_file = folder / f"{name}.pid"
    script = folder / name
    script.write_text(f"#!/bin/sh\necho $$ > '{pid_file}'\nexec sleep 60\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, pid_file


def wait_for_pid(pid_file, timeout: float = 20.0) -> int:
    """The pid a ``sleeping_tool`` wrote, once it has."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"{pid_file.name} was never written")


def gone_within(pid: int, timeout: float = 5.0) -> bool:
    """Whether ``pid`` ends (or is a zombie) within ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def outlives_a_killed_parent(script: str, args: list[str], pid_file) -> bool:
    """Run ``script`` (Python) in a process of its own with ``args``, wait until the ``sleeping_tool``
    it starts has written ``pid_file``, SIGTERM that process (Python's default: it ends at once,
    no ``finally`` runs), and say whether the tool is still running 5 s later. The tool is killed
    either way."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    parent = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdin=subprocess.DEVNULL)
    try:
        tool = wait_for_pid(pid_file)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=10)
        return not gone_within(tool)
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
