"""Shared fixtures: an isolated home for every test, the demo model, a CLI runner, GGUF builders."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from demo_model import ensure_demo_model  # noqa: E402

from llmctl import config  # noqa: E402

# Resolved before any test changes HOME or XDG_CACHE_HOME.
_DEMO_ENV = os.environ.get("LLMCTL_DEMO_MODEL")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LLMCTL_HOME and Hugging Face cache, no colour, fixed width."""
    home = tmp_path / "llmctl-home"
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    for var in ("LLMCTL_DEBUG", "LLMCTL_CONFIG", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    config.set_settings(None)
    yield home
    config.set_settings(None)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched and sha256-checked once)."""
    if _DEMO_ENV and Path(_DEMO_ENV).is_file():
        return Path(_DEMO_ENV)
    return ensure_demo_model()


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli():
    """Run llmctl in-process through Typer's runner; returns exit code, stdout, stderr."""
    from llmctl.cli import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        config.set_settings(None)
        result = runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)
        return Result(result.exit_code, result.stdout, result.stderr)

    return invoke


@pytest.fixture
def make_gguf(tmp_path: Path):
    """Write a small valid llama-style GGUF with the gguf package; returns its path."""
    from gguf_factory import write_model

    counter = iter(range(10_000))

    def make(name: str | None = None, **kwargs) -> Path:
        path = tmp_path / "models" / (name or f"tiny-{next(counter)}.Q8_0.gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_model(path, **kwargs)

    return make
