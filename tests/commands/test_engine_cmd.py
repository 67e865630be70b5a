"""``llmctl engine status|install`` and hwinfo's line about llama.cpp's tools."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from llmctl.errors import EXIT_ERROR


def test_status_without_tools_says_how_to_get_them(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_ENGINE_DIR", str(tmp_path / "engine"))
    r = cli("engine", "status")
    assert r.exit_code == 0 and "llmctl engine install" in r.stderr and r.stdout == ""
    assert json.loads(cli("engine", "status", "--json").stdout) == {"installed": False}
    r = cli("hwinfo")
    assert r.exit_code == 0 and "not installed (`llmctl engine install`)" in r.stdout
    assert json.loads(cli("hwinfo", "--json").stdout)["native_tools"] is None


def test_a_wrong_own_build_is_one_line_with_a_hint(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_LLAMA_BIN", str(tmp_path))
    r = cli("engine", "status")
    assert r.exit_code == EXIT_ERROR
    assert r.stderr.splitlines()[0] == f"error: LLMCTL_LLAMA_BIN={tmp_path} has no llama-server"
    assert r.stderr.splitlines()[1].startswith("hint: ") and "Traceback" not in r.stderr
    r = cli("hwinfo")  # hwinfo still answers, and says what is wrong
    assert r.exit_code == 0 and "not usable: LLMCTL_LLAMA_BIN" in r.stdout


def test_a_described_machine_says_nothing_about_this_machines_tools(cli) -> None:
    doc = json.loads(cli("hwinfo", "--hw-profile", "laptop-8gb", "--json").stdout)
    assert doc["native_tools"] is None
    assert "llama.cpp tools" not in cli("hwinfo", "--hw-profile", "laptop-8gb").stdout


@pytest.mark.slow
def test_the_built_tools_are_found_and_run(cli, native_tools) -> None:
    doc = json.loads(cli("engine", "status", "--json").stdout)
    assert doc["installed"] is True and doc["llama_cpp_version"].startswith("0.5.")
    assert set(doc["tools"]) == {"llama-server", "ggml-rpc-server", "llama-bench", "llama-fit-params"}
    assert "CPU" in doc["backends"] and "RPC" in doc["backends"]
    for path in doc["tools"].values():
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (path, done.stderr[-500:])
    r = cli("engine", "install", "--json")  # already built: nothing is built again
    assert r.exit_code == 0 and json.loads(r.stdout)["built"] == doc["built"]
    assert "llama.cpp 0.5." in cli("hwinfo").stdout
