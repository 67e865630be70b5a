"""run and chat as a new user meets them: quiet llama.cpp, empty replies explained, Ctrl-C, /set ctx and threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GREEDY = ["--temperature", "0", "--seed", "7"]


def _llmctl(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """llmctl in its own process: stderr then holds everything written to file descriptor 2, C code's too."""
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


# --- llama.cpp's own log -----------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_log_stays_quiet_on_a_sliding_window_model(demo_model: Path, tmp_path: Path) -> None:
    from loadable_models import build

    model = build(demo_model, tmp_path, "tiny-gemma2")
    r = _llmctl("run", model, "hello", "--max-tokens", "3", "--ctx", "512")
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("warning: ")] == []
    assert "llama_" not in r.stderr
    # The model does make llama.cpp talk: LLMCTL_DEBUG=1 shows it.
    r = _llmctl("run", model, "hello", "--max-tokens", "3", "--ctx", "512", env={"LLMCTL_DEBUG": "1"})
    assert r.returncode == 0 and "llama_kv_cache_iswa" in r.stderr


def test_a_failed_load_says_what_llama_cpp_said(cli, make_gguf) -> None:
    model = make_gguf()  # readable header, but without hyperparameters llama.cpp needs
    r = cli("run", model, "hi")
    assert r.exit_code == 1
    assert "could not load" in r.stderr and "layer_norm_rms_epsilon" in r.stderr
    assert "hint: the file may be damaged" in r.stderr and "Traceback" not in r.stderr
