"""Measuring memory in a process of its own: a model's load, and a whole ``llmctl`` command.

``python measure_rss.py MODEL N_CTX [SETTINGS]`` prints JSON: the resident-memory
growth from before the load to after a prompt (512 tokens unless SETTINGS says)
and 4 generated tokens, with llama-cpp-python's defaults otherwise (mmap, f16 KV
cache, no flash attention, n_batch = n_ubatch = 512) unless SETTINGS says. Run in its own process so nothing else
shares the measurement.

``run_llmctl(ARGS...)`` runs one ``llmctl`` command and returns its exit code,
output, wall time and peak RSS, for tests that bound what an attack may cost.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LLMCTL = str(Path(sys.executable).with_name("llmctl"))


@dataclass
class Run:
    exit_code: int  # -9: killed at the timeout
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float  # inf when the run was killed before it ended


# The peak is wait4()'s ru_maxrss, taken by a small, freshly started Python that starts llmctl.
# Not by pytest itself: at exec the kernel folds the high-water mark of the address space being
# replaced into the new program's ru_maxrss, so a child of a 600 MB pytest reports >= 600 MB
# (fork or vfork alike; measured: 626 MB for a `python -c` whose own VmHWM was 11 MB). Through
# this ~11 MB Python, the floor is ~11 MB; unlike the child's own VmHWM, ru_maxrss also covers
# the processes llmctl waits for (template workers) and needs no exit hook in the measured one.
_MEASURE = """
import os, subprocess, sys, time
start = time.monotonic()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{os.waitstatus_to_exitcode(status)} {time.monotonic() - start} {usage.ru_maxrss}")
"""


def run_llmctl(*args: str, timeout: float = 120, **env: str) -> Run:
    """``llmctl ARGS`` (with ``env`` added to the environment) in its own process: exit code,
    output, wall time and peak RSS. A run past ``timeout`` is killed with its whole process group."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report"
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, str(report), LLMCTL, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, **env},
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if not report.exists():
            return Run(-9, stdout, stderr, time.monotonic() - start, float("inf"))
        code, seconds, peak_kb = report.read_text().split()
        return Run(int(code), stdout, stderr, float(seconds), int(peak_kb) / 1024)


GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30, "iq4_nl": 20}


def main() -> None:
    """``MODEL N_CTX [SETTINGS]``: SETTINGS is JSON with any of ``depth`` (prompt tokens, default
    512), ``type_k``/``type_v`` (``f16``, ``q8_0``…), ``flash_attn`` and ``swa_full`` (booleans)."""
    import llama_cpp
    import psutil

    path, n_ctx = sys.argv[1], int(sys.argv[2])
    settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    depth = int(settings.get("depth", 512))
    kwargs = {"flash_attn": bool(settings.get("flash_attn", False))}
    for key in ("type_k", "type_v"):
        if key in settings:
            kwargs[key] = GGML_TYPES[settings[key]]
    if "swa_full" in settings:
        kwargs["swa_full"] = bool(settings["swa_full"])
    process = psutil.Process()
    before = process.memory_info().rss
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, verbose=False, **kwargs)
    after_load = process.memory_info().rss
    rng = random.Random(0)
    llm.eval([rng.randrange(100, llm.n_vocab()) for _ in range(depth)])
    for _ in range(4):
        llm.eval([llm.sample(temp=0.0)])
    after = process.memory_info().rss
    print(json.dumps({"n_ctx": n_ctx, "depth": depth, "load_growth": after_load - before, "rss_growth": after - before}))


if __name__ == "__main__":
    main()
