"""`llmctl bench` against native llama-bench on the same llama.cpp.

llama-bench is the one `llmctl engine install` builds (`make setup` does) from the llama.cpp
tree vendored in the pinned llama-cpp-python sdist, with the wheel's CPU options.
Both run pp512 and tg128 with 2 threads and 5 repetitions on the demo model,
flash attention off on both sides (both default to llama.cpp's "auto", on here;
off keeps the figures comparable with earlier ones),
in six rounds that alternate which of the two goes first (ABBA...). A shared
2-core machine's speed swings by 10-30% within seconds, so each round's llmctl
figure is divided by the native figure measured next to it, and the median of
those ratios is the result; the row also shows the range of the rounds.
Target: within 5%. The tg128 roofline figure is reported with the measured
memory bandwidth.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Row

from tools.demo_model import ensure_demo_model

LLMCTL = str(Path(sys.executable).with_name("llmctl"))
ROUNDS = 6


def native_binary() -> str:
    from llmctl.engine import native

    return str(native.require("llama-bench"))


def run() -> list[Row]:
    model = ensure_demo_model()
    binary = native_binary()
    native: dict[str, list[float]] = {"pp512": [], "tg128": []}
    ours: dict[str, list[float]] = {"pp512": [], "tg128": []}
    roofline, bandwidth = [], None
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LLMCTL_HOME": home}

        def run_native() -> None:
            out = subprocess.run(
                [binary, "-m", str(model), "-t", "2", "-p", "512", "-n", "128", "-r", "5", "-fa", "0", "-o", "json"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            for result in json.loads(out.stdout):
                native["pp512" if result["n_prompt"] else "tg128"].append(result["avg_ts"])

        def run_ours() -> None:
            nonlocal bandwidth
            out = subprocess.run(
                [LLMCTL, "bench", str(model), "-t", "2", "-p", "512", "-n", "128", "-r", "5", "-fa", "0", "--no-extras", "-o", "json"],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            doc = json.loads(out.stdout)
            bandwidth = doc["fingerprint"].get("bandwidth_gbs")
            for result in doc["results"]:
                ours[result["test"]].append(result["avg_ts"])
                if result["roofline_pct"] is not None:
                    roofline.append(result["roofline_pct"])

        for i in range(ROUNDS):
            for step in (run_native, run_ours) if i % 2 == 0 else (run_ours, run_native):
                step()
    rows = []
    for test in ("pp512", "tg128"):
        ratios = [a / b for a, b in zip(ours[test], native[test])]
        ratio = statistics.median(ratios)
        a, b = statistics.median(ours[test]), statistics.median(native[test])
        name = f"bench {test}, demo, 2 threads (median ratio {ratio:.3f}, rounds {min(ratios):.2f}-{max(ratios):.2f})"
        rows.append(Row(name, a, "t/s", b, "native llama-bench", "within 5%", abs(ratio - 1) <= 0.05))
    rows.append(Row(f"tg128 roofline (bandwidth {bandwidth} GB/s)", statistics.fmean(roofline), "% of bound", None, "-", "reported", None))
    return rows
