"""Fit planner accuracy, on the numbers `fit` prints, against two anchors, and probe speed.

For each case of the zoo (the demo model and synthetic ones from tests/support/loadable_models.py:
GQA and MHA, tied and untied output, MoE, sliding-window layers with the window and the full-size
cache, vocabularies of 32k, 49k, 150k and 262k tokens; KV caches f16/q8_0/q4_0; flash attention
on and off), one row with both ratios:
- allocated: the CPU buffers `fit` plans (weights + KV cache + compute) ÷ llama.cpp's own
  projection, `llama-fit-params -lv 4` with the same settings (its Host line): within 5%;
- resident: `fit`'s "in use" figure ÷ the resident-memory growth of a real load with those
  settings (llama-cpp-python in a fresh process, tests/support/measure_rss.py) after a prompt
  that fills the context (at most 4096 tokens: past that only the attention mask still grows)
  and 4 generated tokens: within 10%.
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


ZOO = [
    # label, synthetic model (None: the demo model), context, settings
    ("demo, fa off", None, 4096, {"flash_attn": False}),
    ("demo, fa on", None, 4096, {"flash_attn": True}),
    ("demo, q8_0 KV", None, 16384, {"flash_attn": True, "type_k": "q8_0", "type_v": "q8_0"}),
    ("GQA 16/4 F16 untied", "llama-gqa-f16", 4096, {"flash_attn": True}),
    ("MHA 12/12 Q8_0 tied, q4_0 KV", "qwen2-mha-q8", 4096, {"flash_attn": True, "type_k": "q4_0", "type_v": "q4_0"}),
    ("MoE 8 experts, 2 used", "llama-moe-q8", 4096, {"flash_attn": True}),
    ("SWA 262k vocab, window cache", "gemma2-swa-262k", 8192, {"flash_attn": True, "swa_full": False}),
    ("SWA 262k vocab, full cache", "gemma2-swa-262k", 8192, {"flash_attn": True, "swa_full": True}),
    ("150k vocab, fa off", "qwen2-150k", 4096, {"flash_attn": False}),
    ("32k vocab", "llama-32k", 4096, {"flash_attn": True}),
]
MAX_DEPTH = 4096


def measured_rss(model: Path, n_ctx: int, settings: dict[str, object]) -> int:
    script = ROOT / "tests" / "support" / "measure_rss.py"
    argv = [sys.executable, str(script), str(model), str(n_ctx), json.dumps(settings)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_growth"]


def fit_params_host(model: Path, n_ctx: int, settings: dict[str, object]) -> int:
    """The host memory llama.cpp projects for this load (``llama-fit-params -lv 4``'s Host row), bytes."""
    from llmctl.engine import native
    from llmctl.plan import rpc_fit

    argv = [str(native.require("llama-fit-params")), "-m", str(model), "-c", str(n_ctx), "-ngl", "0", "-b", "512", "-ub", "512",
            "-fa", "on" if settings.get("flash_attn") else "off", "-ctk", str(settings.get("type_k", "f16")),
            "-ctv", str(settings.get("type_v", "f16")), "-lv", "4"]  # fmt: skip
    if settings.get("swa_full", True):
        argv.append("--swa-full")
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    host = next((d for d in rpc_fit.parse(done.stdout + done.stderr)[0] if d.name == "Host"), None)  # fit --rpc's reader
    if host is None:
        raise RuntimeError(f"llama-fit-params printed no Host projection: {(done.stdout + done.stderr)[-400:]}")
    return host.used_mib * MIB


def zoo_row(label: str, model: Path, n_ctx: int, settings: dict[str, object]) -> Row:
    info = gguf.read_model([model])[1]
    config = fit.LoadConfig(
        n_ctx=n_ctx,
        type_k=str(settings.get("type_k", "f16")),
        type_v=str(settings.get("type_v", "f16")),
        flash_attn=bool(settings.get("flash_attn")),
        swa_full=bool(settings.get("swa_full", True)),
    )
    cpu = fit.estimate_memory(info, config).devices[0]
    projected = fit_params_host(model, n_ctx, settings)
    measured = measured_rss(model, n_ctx, {**settings, "swa_full": config.swa_full, "depth": min(n_ctx - 64, MAX_DEPTH)})
    allocated_ratio = cpu.buffers / projected
    resident_ratio = cpu.resident / measured
    ok = abs(allocated_ratio - 1) <= 0.05 and abs(resident_ratio - 1) <= 0.10
    name = f"fit zoo: {label}, ctx {n_ctx}: in use vs RSS; allocated {cpu.buffers / MIB:.0f} vs fit-params {projected / MIB:.0f} MiB = {allocated_ratio:.3f}"
    return Row(name, cpu.resident / MIB, "MiB", measured / MIB, "measured RSS", "≤10% / ≤5%", ok)


def run() -> list[Row]:
    demo = ensure_demo_model()
    folder = DEFAULT_DIR / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name, n_ctx, settings in ZOO:
        model = demo if name is None else build(demo, folder, name)
        rows.append(zoo_row(label, model, n_ctx, settings))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LLMCTL_HOME": tmp}
        warm = wall_of_command([LLMCTL, "hwinfo"], env, repeat=5)
    rows.append(Row("llmctl hwinfo, warm (wall)", warm, "s", 0.5, "budget", "< 0.5 s", warm < 0.5))
    return rows
