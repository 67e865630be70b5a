"""Shared fixtures: an isolated home for every test, the demo model, a CLI runner, GGUF builders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from llmctl import config
from tools.demo_model import ensure_demo_model

# Resolved before any test changes HOME or XDG_CACHE_HOME.
_DEMO_ENV = os.environ.get("LLMCTL_DEMO_MODEL")
# llama.cpp's tools, built once per machine (`make setup` builds them; see llmctl/engine/native.py)
_ENGINE_DIR = os.environ.get("LLMCTL_ENGINE_DIR") or str(Path.home() / ".cache" / "llmctl-dev" / "engine")
_EXAMPLES = pytest.StashKey[str]()  # "full" or "fast": how many examples property tests draw


def pytest_configure(config: pytest.Config) -> None:
    """Property tests draw their full example counts unless the slow tests are left out (tests/support/examples.py)."""
    from tests.support import examples

    config.stash[_EXAMPLES] = examples.choose(config.getoption("markexpr") or "")


def pytest_report_header(config: pytest.Config) -> str:
    from tests.support import examples

    if config.stash[_EXAMPLES] == "full":
        return "property tests: full example counts"
    return f"property tests: 1/{examples.FAST_SHARE} of their example counts (a full run, or {examples.ENV}=full, draws them all)"


@pytest.fixture(scope="session")
def _bandwidth_once() -> dict[tuple[int, int], float | None]:
    """Memory bandwidth measured once per test session for each array size and repeat count."""
    return {}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _bandwidth_once: dict[tuple[int, int], float | None]) -> Iterator[Path]:
    """A fresh LLMCTL_HOME and Hugging Face cache, no colour, fixed width.

    Every fresh home has a cold hardware cache, so each live probe that wants
    the bandwidth would measure it again (a pass over 512 MiB): here the real
    measurement runs once per session and later probes in this process reuse
    its figure, as a warm cache would give them. Subprocesses measure for real.
    """
    from llmctl.plan import hardware

    measure = hardware.measure_bandwidth_gbs

    def measure_once(size_mib: int = 512, repeats: int = 5) -> float | None:
        if (size_mib, repeats) not in _bandwidth_once:
            _bandwidth_once[size_mib, repeats] = measure(size_mib, repeats)
        return _bandwidth_once[size_mib, repeats]

    monkeypatch.setattr(hardware, "measure_bandwidth_gbs", measure_once)
    home = tmp_path / "llmctl-home"
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LLMCTL_ENGINE_DIR", _ENGINE_DIR)
    for var in ("LLMCTL_DEBUG", "LLMCTL_CONFIG", "HF_TOKEN", "LLMCTL_LLAMA_BIN"):
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


@pytest.fixture(scope="session")
def native_tools():
    """llama.cpp's own tools for this machine (llama-server, ggml-rpc-server, llama-bench,
    llama-fit-params): `make setup` builds them once per machine; built here if it has not."""
    from llmctl.engine import native

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMCTL_ENGINE_DIR", _ENGINE_DIR)
        patch.delenv("LLMCTL_LLAMA_BIN", raising=False)
        return native.locate() or native.install()


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def cli_command():
    """The Click command Typer builds from llmctl's app, built once: the build (every
    command's signature turned into parameters) costs more than most commands' work."""
    import typer.main

    from llmctl.cli import app

    return typer.main.get_command(app)


@pytest.fixture
def cli(cli_command, monkeypatch: pytest.MonkeyPatch):
    """Run llmctl in-process through Typer's runner; returns exit code, stdout, stderr."""
    import typer.testing

    from llmctl.cli import app

    runner = CliRunner()
    # The runner builds the command from the app on every call; give it the one built once.
    monkeypatch.setattr(typer.testing, "_get_command", lambda typer_app: cli_command if typer_app is app else typer.main.get_command(typer_app))

    def invoke(*args: str, input: str | None = None) -> Result:
        config.set_settings(None)
        result = runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)
        return Result(result.exit_code, result.stdout, result.stderr)

    return invoke


@pytest.fixture
def fake_engines(monkeypatch: pytest.MonkeyPatch):
    """run, chat and serve's pool load FakeEngines (llmctl/engine/fake.py) instead of llama.cpp.

    Returns the FakeFactory: ``fake_engines.add(FakeEngine([...]))`` queues an engine (or an
    exception, as a failed load), ``fake_engines.defaults`` shapes the rest, ``made`` lists them.
    """
    from llmctl.engine import runner
    from llmctl.engine.fake import FakeFactory

    factory = FakeFactory()
    monkeypatch.setattr(runner, "engine_factory", factory)
    return factory


@pytest.fixture
def make_gguf(tmp_path: Path):
    """Write a small valid llama-style GGUF with the gguf package; returns its path."""
    from tests.support.gguf_factory import write_model

    counter = iter(range(10_000))

    def make(name: str | None = None, **kwargs) -> Path:
        path = tmp_path / "models" / (name or f"tiny-{next(counter)}.Q8_0.gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_model(path, **kwargs)

    return make


@pytest.fixture(scope="session")
def hub_files(tmp_path_factory, demo_model: Path) -> dict[str, Path]:
    """GGUF files the local hub serves: the demo model and generated variants."""
    from tests.support.gguf_factory import write_model

    folder = tmp_path_factory.mktemp("hub-files")
    files = {"demo": demo_model}
    files["q8"] = write_model(folder / "Tiny-Q8_0.gguf", file_type=7, n_embd=128, n_ff=256)
    files["f16"] = write_model(folder / "Tiny-F16.gguf", file_type=1, f16=True, n_embd=128, n_ff=256)
    split_dir = folder / "split"
    split_dir.mkdir()
    first = write_model(split_dir / "Big-Q8_0.gguf", file_type=7, split_max_tensors=7)
    for part in sorted(split_dir.glob("*.gguf")):
        files[f"split:{part.name}"] = part
    assert first.exists()
    return files


@pytest.fixture(scope="session")
def hub_server(hub_files: dict[str, Path]):
    """The local Hub, serving a handful of repos (see tests/hub_server.py)."""
    from tests.support.hub_server import FakeHub

    hub = FakeHub()
    hub.add_repo(
        "bartowski/SmolLM2-135M-Instruct-GGUF",
        {"SmolLM2-135M-Instruct-Q4_1.gguf": hub_files["demo"]},
        downloads=5000,
        likes=40,
        parameters=134515008,
    )
    hub.add_repo("test/Tiny-GGUF", {"Tiny-Q8_0.gguf": hub_files["q8"], "Tiny-F16.gguf": hub_files["f16"]}, downloads=10)
    hub.add_repo("test/Split-GGUF", {k.split(":", 1)[1]: v for k, v in hub_files.items() if k.startswith("split:")}, downloads=5)
    hub.add_repo("test/Gated-GGUF", {"Gated-Q8_0.gguf": hub_files["q8"]}, gated=True)
    hub.add_repo("test/NoGGUF", {}, extra_siblings=["README.md", "model.safetensors"])
    hub.add_repo("test/Hostile-GGUF", {"../../escape-Q8_0.gguf": hub_files["q8"]})
    hub.add_repo("test/Quants-GGUF", {"Tiny-Q8_0.gguf": hub_files["q8"], "Tiny-Q8_0_L.gguf": hub_files["f16"]})
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(hub_server, monkeypatch: pytest.MonkeyPatch):
    """The local Hub for one test: HF_ENDPOINT points at it, faults and log reset, fast retries."""
    from tests.support.hub_server import Faults

    hub_server.faults = Faults()
    hub_server.log.clear()
    hub_server.server_errors.clear()
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("LLMCTL_HUB_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("llmctl.models.hub._backoff", lambda attempt: None)
    yield hub_server
    # A bug in the fake Hub itself must not pass silently (clients hanging up
    # are expected and are not recorded).
    assert not hub_server.server_errors, hub_server.server_errors
