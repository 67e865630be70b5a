"""The allocation `fit` plans against llama.cpp's own projection (`llama-fit-params`), and the
resident figure against a real load: the anchors of docs/fit.md, on a few cases of the zoo
(make bench checks them all)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl import gguf
from llmctl.plan import fit, rpc_fit
from tests.support import loadable_models

pytestmark = pytest.mark.slow
MIB = 1024**2
ROOT = Path(__file__).resolve().parents[2]


def _projected_host(tools, model: Path, config: fit.LoadConfig) -> int:
    argv = [str(tools.path("llama-fit-params")), "-m", str(model), "-c", str(config.n_ctx), "-ngl", "0", "-b", "512", "-ub", "512",
            "-fa", "on" if config.flash_attn else "off", "-ctk", config.type_k, "-ctv", config.type_v, "-lv", "4"]  # fmt: skip
    if config.swa_full:
        argv.append("--swa-full")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    host = next((d for d in rpc_fit.parse(done.stdout + done.stderr)[0] if d.name == "Host"), None)  # fit --rpc's reader
    assert host is not None, (done.stdout + done.stderr)[-600:]
    return host.used_mib * MIB


CASES = [
    ("demo", fit.LoadConfig(n_ctx=4096, flash_attn=False)),
    ("demo", fit.LoadConfig(n_ctx=16384, flash_attn=True, type_k="q8_0", type_v="q8_0")),
    ("gemma2-swa-262k", fit.LoadConfig(n_ctx=8192, flash_attn=True, swa_full=False)),
    ("qwen2-150k", fit.LoadConfig(n_ctx=4096, flash_attn=False)),
]


@pytest.mark.parametrize(("name", "config"), CASES, ids=[f"{n}-{c.n_ctx}-fa{int(c.flash_attn)}-{c.type_k}-swafull{int(c.swa_full)}" for n, c in CASES])
def test_allocation_is_within_5_percent_of_llama_fit_params(native_tools, demo_model: Path, tmp_path_factory, name: str, config: fit.LoadConfig) -> None:
    model = demo_model if name == "demo" else loadable_models.build(demo_model, tmp_path_factory.mktemp("zoo"), name)
    cpu = fit.estimate_memory(gguf.read_model([model])[1], config).devices[0]
    projected = _projected_host(native_tools, model, config)
    assert abs(cpu.buffers / projected - 1) <= 0.05, (cpu.weights, cpu.kv_cache, cpu.compute, projected)


def test_resident_is_within_10_percent_of_a_real_load(demo_model: Path, tmp_path_factory) -> None:
    """The 262k-vocabulary model with its window cache: allocated is 3× what the process holds."""
    model = loadable_models.build(demo_model, tmp_path_factory.mktemp("zoo"), "gemma2-swa-262k")
    config = fit.LoadConfig(n_ctx=8192, flash_attn=True, swa_full=False)
    cpu = fit.estimate_memory(gguf.read_model([model])[1], config).devices[0]
    settings = {"flash_attn": True, "swa_full": False, "depth": 2048}
    out = subprocess.run([sys.executable, str(ROOT / "tests/support/measure_rss.py"), str(model), "8192", json.dumps(settings)],
                         capture_output=True, text=True, check=True, timeout=600)  # fmt: skip
    measured = json.loads(out.stdout.strip().splitlines()[-1])["rss_growth"]
    assert abs(cpu.resident / measured - 1) <= 0.10, (cpu.resident / MIB, measured / MIB)
    assert cpu.total > 2 * cpu.resident  # the logits rows for a whole micro-batch are reserved, never touched
