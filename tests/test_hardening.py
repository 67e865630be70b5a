"""Hostile files, faults mid-download, concurrency and secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl import gguf
from llmctl.errors import InvalidModelError, NotFoundError
from tests.support.examples import examples
from tests.support.gguf_factory import RawGGUF
from tests.test_gguf_reader import VARIANTS

DEMO_REPO = "bartowski/SmolLM2-135M-Instruct-GGUF"
DEMO_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EXE = str(Path(sys.executable).with_name("llmctl"))


# --- hostile and broken model files ------------------------------------------------------

COMMANDS = {
    "import": lambda p: ["import", p],
    "show": lambda p: ["show", p],
    "fit": lambda p: ["fit", p],
    "run": lambda p: ["run", p, "hi", "--max-tokens", "2"],
    "chat": lambda p: ["chat", p],
    "bench": lambda p: ["bench", p, "-r", "1", "--no-extras"],
}


def test_the_corpus_is_large_enough() -> None:
    assert len(VARIANTS) >= 30


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_command_refuses_every_broken_file(cli, tmp_path: Path, variant: str) -> None:
    data, _ = VARIANTS[variant]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    for command, argv in COMMANDS.items():
        r = cli(*argv(str(path)), input="hello\n")
        assert r.exit_code == 1, (command, r.stdout, r.stderr)
        lines = r.stderr.splitlines()
        assert lines[0].startswith("error: ") and "not a valid GGUF model" in lines[0], (command, r.stderr)
        assert len(lines) <= 2 and "Traceback" not in r.stderr, (command, r.stderr)
    # in the Hugging Face cache it is listed with its problem, and the listing still works
    snapshot = tmp_path / "hf" / "hub" / "models--evil--Repo-GGUF" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "evil-Q8_0.gguf").write_bytes(data)
    r = cli("list", "--json")
    assert r.exit_code == 0
    (model,) = json.loads(r.stdout)["models"]
    assert model["status"].startswith("invalid")


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_headers_never_crash_the_reader(tmp_path_factory, data) -> None:
    """Random byte flips, truncations and insertions: a clean result or InvalidModelError, nothing else."""
    original = bytearray(RawGGUF.minimal().build())
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "u64"]))
        at = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if kind == "flip" and mutated:
            mutated[at] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del mutated[at:]
        elif kind == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "u64" and len(mutated) >= at + 8:
            mutated[at : at + 8] = data.draw(st.sampled_from([b"\xff" * 8, (2**63).to_bytes(8, "little"), (2**32).to_bytes(8, "little")]))
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    path.write_bytes(bytes(mutated))
    try:
        _, info = gguf.read_model([path])
    except (InvalidModelError, NotFoundError):
        return
    assert info.tensor_count >= 0


@pytest.fixture(scope="module")
def hostile_template_model(tmp_path_factory, demo_model: Path) -> Path:
    from tests.support.loadable_models import build

    template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(tmp_path_factory.getbasetemp() / "pwned") + "').read() }}"
    )
    return build(demo_model, tmp_path_factory.mktemp("hostile-template"), "tiny-llama", chat_template=template)


@pytest.mark.slow
def test_a_hostile_chat_template_runs_in_a_sandbox(cli, hostile_template_model: Path, tmp_path_factory) -> None:
    r = cli("run", hostile_template_model, "hello", "--max-tokens", "2")
    assert r.exit_code == 1
    assert "chat template failed" in r.stderr and "SecurityError" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path_factory.getbasetemp() / "pwned").exists()
    r = cli("run", hostile_template_model, "hello", "--max-tokens", "2", "--raw")  # the template is not needed
    assert r.exit_code == 0


# --- download faults -----------------------------------------------------------------------


def _models(cli) -> list[dict]:
    return [m for m in json.loads(cli("list", "--json").stdout)["models"] if m["kind"] == "registered"]


@pytest.mark.slow
def test_sigint_mid_pull_leaves_a_resumable_partial(cli, hub, tmp_path: Path) -> None:
    hub.faults.delay_per_chunk = 0.004
    proc = subprocess.Popen([EXE, "pull", DEMO_REPO], env={**os.environ, "HF_ENDPOINT": hub.url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "hf" / "hub" / "models--bartowski--SmolLM2-135M-Instruct-GGUF" / "blobs" / (DEMO_SHA + ".llmctl.partial")
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 20_000_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    error, hint = err.strip().splitlines()[-2:]
    assert error == "error: interrupted" and hint.startswith("hint: run `llmctl pull") and "Traceback" not in err
    assert partial.exists() and _models(cli) == []
    hub.faults.delay_per_chunk = 0
    assert cli("pull", DEMO_REPO).exit_code == 0
    assert not partial.exists() and len(_models(cli)) == 1


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


@pytest.mark.slow
def test_disk_filling_up_mid_download(cli, hub, tmp_path: Path, monkeypatch) -> None:
    small = tmp_path / "small-disk"
    if not _mount_tmpfs(small, "40m"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and mount rights)")
    try:
        monkeypatch.setenv("HF_HUB_CACHE", str(small))
        r = cli("pull", DEMO_REPO)  # 98 MB into 40 MB: refused before downloading
        assert r.exit_code == 1 and "not enough disk space" in r.stderr
        monkeypatch.setattr("llmctl.models.pull.check_disk", lambda *_a: None)  # as if the disk filled up meanwhile
        r = cli("pull", DEMO_REPO)
        assert r.exit_code == 1 and "No space left on device" in r.stderr and "Traceback" not in r.stderr
        assert _models(cli) == []
        assert json.loads(cli("list", "--json").stdout)["partial_downloads"]  # resumable once there is room
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# --- concurrency ------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_pulls_lists_and_a_run_during_rm(cli, hub, demo_model: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    hub.faults.delay_per_chunk = 0.001
    procs = [subprocess.Popen([EXE, "pull", DEMO_REPO], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    procs += [subprocess.Popen([EXE, "list", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    for out, _ in outs[3:]:
        json.loads(out)  # every listing was a consistent document
    assert hub.bytes_served().count(None) == 1  # one download
    (entry,) = _models(cli)
    # a model removed while it runs: the run keeps working from its open file
    run = subprocess.Popen(
        [EXE, "run", entry["name"], "Tell a long story.", "--max-tokens", "200"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    first = run.stdout.read(1)  # the model is loaded and generating (however busy the machine)
    assert cli("rm", entry["name"], "-y").exit_code == 0
    out, err = run.communicate(timeout=300)  # 200 tokens on a shared 2-core machine
    assert run.returncode == 0 and len(first + out) > 20, err
    assert _models(cli) == []


# --- secrets -------------------------------------------------------------------------------


@pytest.mark.slow
def test_token_never_printed_even_with_debug(hub) -> None:
    secret = "hf_TopSecretTokenValue0987654321"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": secret, "LLMCTL_DEBUG": "1"}
    for argv in (["pull", "nobody/Missing-GGUF"], ["pull", "test/Hostile-GGUF"], ["search", "tiny", "--json"], ["hwinfo", "--json"]):
        r = subprocess.run([EXE, *argv], env=env, capture_output=True, text=True, timeout=120)
        assert secret not in r.stdout + r.stderr, argv
