"""The command line as a whole: help, exit codes, error format, the installed entry point, config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl import config
from llmctl.errors import EXIT_CODES, EXIT_NOT_FOUND, EXIT_USAGE


def test_help_lists_every_command(cli) -> None:
    r = cli("--help")
    assert r.exit_code == 0
    for command in ("list", "show", "import", "rm"):
        assert command in r.stdout


def test_version(cli) -> None:
    from llmctl import __version__

    r = cli("--version")
    assert r.stdout.strip() == f"llmctl {__version__}"


def test_usage_errors_are_one_line_with_a_hint(cli) -> None:
    r = cli("list", "--no-such-flag")
    assert r.exit_code == EXIT_USAGE
    assert r.stderr == "error: no such option: --no-such-flag\nhint: see `llmctl list --help`\n"
    r = cli("frobnicate")
    assert r.exit_code == EXIT_USAGE and r.stderr.startswith("error: no such command 'frobnicate'")


def test_not_found_exit_code_and_no_traceback(cli) -> None:
    r = cli("show", "does-not-exist")
    assert r.exit_code == EXIT_NOT_FOUND
    assert r.stdout == ""
    assert r.stderr.splitlines()[0] == "error: no model named 'does-not-exist'"


def test_exit_codes_are_documented() -> None:
    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in text


def _llmctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("llmctl")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)


@pytest.mark.slow
def test_installed_entry_point_and_python_m(demo_model: Path) -> None:
    r = _llmctl("show", str(demo_model), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["info"]["quant"] == "Q4_1"
    r = subprocess.run([sys.executable, "-m", "llmctl", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("llmctl ")


@pytest.mark.slow
def test_debug_shows_traceback_only_when_asked(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    quiet = _llmctl("show", str(bad))
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    loud = _llmctl("show", str(bad), env={"LLMCTL_DEBUG": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr


# What start-up must not pay for: native and network libraries, schemas, locks, and the standard
# library's event loop, TLS and HTTP client (each costs tens of milliseconds on every command).
HEAVY = ("llama_cpp", "huggingface_hub", "cpuinfo", "numpy", "pynvml", "pydantic", "filelock", "httpx", "fastapi", "uvicorn", "asyncio", "ssl", "http.client")


@pytest.mark.slow
def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from llmctl.cli import app; "
        "from typer.testing import CliRunner; CliRunner().invoke(app, ['list']); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.load_settings().hf_hub_cache == tmp_path / "xdg" / "huggingface" / "hub"  # default
    (home / "config.toml").write_text(f'hf_hub_cache = "{tmp_path / "from-config"}"\n')
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    assert config.load_settings().hf_hub_cache == tmp_path / "from-config"  # config beats default
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert config.load_settings().hf_hub_cache == tmp_path / "hfhome" / "hub"  # env beats config
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert config.load_settings().hf_hub_cache == tmp_path / "direct"
    assert config.load_settings(home=str(tmp_path / "flag")).home == tmp_path / "flag"  # flag beats env


def test_bad_config_file_is_a_usage_error(cli, isolated: Path) -> None:
    isolated.mkdir(parents=True)
    (isolated / "config.toml").write_text("colour = 3\n")
    r = cli("list")
    assert r.exit_code == EXIT_USAGE and "unknown key 'colour'" in r.stderr
    (isolated / "config.toml").write_text("hf_hub_cache = [\n")
    r = cli("list")
    assert r.exit_code == EXIT_USAGE and "cannot be read" in r.stderr


def test_debug_and_no_color_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_DEBUG", "1")
    monkeypatch.delenv("NO_COLOR")
    assert config.load_settings().debug and config.debug_enabled()
    assert not config.no_color()


def test_safe_escapes_terminal_controls() -> None:
    from llmctl.output import safe

    assert safe("plain") == "plain"
    assert safe("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert safe("rtl\u202eoverride") == "rtl\\u202eoverride"
    assert safe("two\nlines\tx", keep_layout=True) == "two\nlines\tx"
    assert safe("two\nlines") == "two\\x0alines"


def test_docs_command_reference_is_current() -> None:
    from tools.gen_commands import render

    root = Path(__file__).parent.parent

    assert (root / "docs" / "commands.md").read_text() == render(), "run `make docs`"


def test_ps_without_a_server_is_one_clean_line(cli) -> None:
    for server in ("foo", "http://127.0.0.1:9"):
        r = cli("ps", "--server", server)
        assert r.exit_code == 1 and r.stderr.startswith("error: no llmctl server") and "Traceback" not in r.stderr
