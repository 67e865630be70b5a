"""Foundation speed: GGUF header read, `llmctl --help`, `llmctl list` with 20 models.

References: the `gguf` package's GGUFReader (llama.cpp's own Python reader) on
the same file; the 0.3 s start-up budget for the two commands.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from common import Row, median_seconds, wall_of_command

from llmctl import gguf
from tools.demo_model import ensure_demo_model

LLMCTL = str(Path(sys.executable).with_name("llmctl"))


def bench_header(model: Path) -> list[Row]:
    import gguf as ggufpkg

    ours = median_seconds(lambda: gguf.read_model([model]), repeat=20, warmup=2)
    theirs = median_seconds(lambda: ggufpkg.GGUFReader(model), repeat=3, warmup=0)
    return [Row("GGUF header read, demo model", ours * 1e3, "ms", theirs * 1e3, "gguf.GGUFReader", "< 20 ms", ours < 0.020)]


def bench_startup(model: Path) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LLMCTL_HOME": str(Path(tmp) / "home"), "HF_HUB_CACHE": str(Path(tmp) / "hub")}
        help_s = wall_of_command([LLMCTL, "--help"], env)
        # 20 registered models: hard links of the demo model under different names.
        links = Path(tmp) / "models"
        links.mkdir()
        for i in range(20):
            link = links / f"model-{i:02d}.Q4_1.gguf"
            try:
                os.link(model, link)
            except OSError:
                link.symlink_to(model)
            wall_of_command([LLMCTL, "import", str(link), "--name", f"model-{i:02d}"], env, repeat=1, warmup=0)
        wall_of_command([LLMCTL, "list"], env, repeat=1)  # fills the header cache
        list_s = wall_of_command([LLMCTL, "list"], env)
    return [
        Row("llmctl --help (wall)", help_s, "s", 0.3, "budget", "< 0.3 s", help_s < 0.3),
        Row("llmctl list, 20 models (wall)", list_s, "s", 0.3, "budget", "< 0.3 s", list_s < 0.3),
    ]


def run() -> list[Row]:
    model = ensure_demo_model()
    return bench_header(model) + bench_startup(model)
