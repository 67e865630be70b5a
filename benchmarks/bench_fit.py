"""Fit planner accuracy and probe speed.

Estimate vs measured: the process's resident-memory growth from before the
load to after a 512-token prompt batch and 4 generated tokens (llama-cpp-python
defaults otherwise), measured in a fresh process by tests/support/measure_rss.py,
against ``fit.estimate_memory(..., depth=512, n_outputs=1)`` — the estimate for
that same point. Target: within 10%. Models: the demo model at three context
sizes, and two synthetic models of other shapes and architectures.
Also: warm `llmctl hwinfo` wall time (target < 0.5 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, Row, wall_of_command

from llmctl import gguf
from llmctl.plan import fit
from tests.support.loadable_models import build
from tools.demo_model import DEFAULT_DIR, ensure_demo_model

MIB = 1024**2
LLMCTL = str(Path(sys.executable).with_name("llmctl"))


def measured_rss(model: Path, n_ctx: int) -> int:
    script = ROOT / "tests" / "support" / "measure_rss.py"
    out = subprocess.run([sys.executable, str(script), str(model), str(n_ctx)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_growth"]


def accuracy_row(label: str, model: Path, n_ctx: int) -> Row:
    info = gguf.read_model([model])[1]
    estimate = fit.estimate_memory(info, fit.LoadConfig(n_ctx=n_ctx), depth=512, n_outputs=1).total
    measured = measured_rss(model, n_ctx)
    error = abs(estimate - measured) / measured
    return Row(f"memory estimate, {label}, ctx {n_ctx}", estimate / MIB, "MiB", measured / MIB, "measured RSS", "within 10%", error <= 0.10)


def run() -> list[Row]:
    demo = ensure_demo_model()
    rows = [accuracy_row("demo Q4_1", demo, n) for n in (2048, 8192, 32768)]
    folder = DEFAULT_DIR / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("llama-gqa-f16", "qwen2-mha-q8"):
        rows.append(accuracy_row(name, build(demo, folder, name), 8192))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LLMCTL_HOME": tmp}
        warm = wall_of_command([LLMCTL, "hwinfo"], env, repeat=5)
    rows.append(Row("llmctl hwinfo, warm (wall)", warm, "s", 0.5, "budget", "< 0.5 s", warm < 0.5))
    return rows
