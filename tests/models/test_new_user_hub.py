"""search and pull as a new user meets them: an unreachable Hub, --author and --sort, a wrong token, Ctrl-C, -n."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.errors import EXIT_HUB, EXIT_INTERRUPTED, EXIT_USAGE
from llmctl.models import hubhttp

DEMO_REPO = "bartowski/SmolLM2-135M-Instruct-GGUF"
DEMO_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_PARTIAL = Path("models--bartowski--SmolLM2-135M-Instruct-GGUF") / "blobs" / (DEMO_SHA + ".llmctl.partial")


def _closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections (bound, then released; nothing listens)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _llmctl(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("llmctl")), *args],
        env={**os.environ, "LLMCTL_HW_PROFILE": "laptop-8gb", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# --- 1. a refused connection fails fast ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("retries", [None, "1"])
def test_search_against_a_refused_endpoint_answers_from_the_catalog_at_once(retries: str | None) -> None:
    # huggingface_hub retried the refused connection five times (1+2+4+8+8 s of sleeps): 23 s.
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", **({"LLMCTL_HUB_RETRIES": retries} if retries else {})}
    proc, seconds = _llmctl("search", "llama", "--json", **env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert not doc["hub_searched"] and "connection refused" in doc["note"]
    assert doc["results"] and all(r["catalog_name"] for r in doc["results"])
    assert seconds < 10, seconds  # generous for a loaded box; the retries took 23 s


@pytest.mark.slow
def test_search_files_against_a_refused_endpoint_is_one_quick_hub_error() -> None:
    proc, seconds = _llmctl("search", "x", "--files", HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    assert proc.returncode == EXIT_HUB, proc.stderr
    (error,) = _error_lines(proc.stderr)
    assert "cannot reach the Hub" in error and "connection refused" in error
    assert "Traceback" not in proc.stderr
    assert seconds < 10, seconds


def test_only_connections_that_cannot_be_made_are_unreachable() -> None:
    """What fails fast (refused, no such host, no route) and what stays retried (timeouts, resets)."""

    def connect_error(cause: BaseException) -> Exception:
        try:
            try:
                raise cause
            except OSError as exc:
                raise ConnectionError("httpcore's ConnectError") from exc
        except ConnectionError as exc:
            return exc

    assert hubhttp.unreachable_reason(connect_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))) == "connection refused"
    assert "no such host" in (hubhttp.unreachable_reason(connect_error(socket.gaierror(-2, "Name or service not known"))) or "")
    assert "no route" in (hubhttp.unreachable_reason(connect_error(OSError(errno.ENETUNREACH, "unreachable"))) or "")
    assert hubhttp.unreachable_reason(connect_error(TimeoutError("timed out"))) is None
    assert hubhttp.unreachable_reason(connect_error(ConnectionResetError(errno.ECONNRESET, "reset"))) is None


def test_a_refused_download_request_is_still_retried(cli, hub, monkeypatch) -> None:
    """Once the Hub has answered, a refused connection (a header read, a download) is a blip: retried as before."""
    from llmctl.models import hub as hubmod

    calls = {"n": 0}
    real = hubmod._session

    def flaky_session():
        calls["n"] += 1
        if calls["n"] == 1:
            raise hubhttp.Unreachable("127.0.0.1", 1, "connection refused")
        return real()

    monkeypatch.setattr(hubmod, "_session", flaky_session)
    r = cli("pull", "test/Tiny-GGUF:Q8_0")
    assert r.exit_code == 0, r.stderr
    assert calls["n"] >= 2


# --- 2. --author and --sort apply to catalog rows too ----------------------------------------


def test_author_filters_catalog_rows_by_owner(cli, hub) -> None:
    def repos(*args: str) -> list[str]:
        r = cli("search", *args, "--json")
        assert r.exit_code == 0, r.stderr
        return [h["repo"] for h in json.loads(r.stdout)["results"]]

    assert {r.split("/")[0] for r in repos("instruct")} >= {"bartowski", "Qwen"}  # catalog rows of many owners
    qwen = repos("instruct", "--author", "qwen")  # the owner matches whatever its case
    assert qwen and all(r.startswith("Qwen/") for r in qwen), qwen
    hub_only = repos("gguf", "--author", "test")  # Hub rows; no catalog repo is test's
    assert hub_only and all(r.startswith("test/") for r in hub_only), hub_only
    assert repos("instruct", "--author", "nobody-at-all") == []


def test_rows_follow_the_sort_whether_they_come_from_the_catalog_or_the_hub(cli, hub) -> None:
    # "i" matches every test repo on the Hub and many catalog entries; the demo repo is in both.
    hub.repos["test/tiny-gguf"].likes = 100  # more likes than the demo repo (40), fewer downloads
    try:
        for sort, figure in (("downloads", "downloads"), ("likes", "likes")):
            r = cli("search", "i", "--sort", sort, "--json")
            assert r.exit_code == 0, r.stderr
            results = json.loads(r.stdout)["results"]
            figures = [h[figure] for h in results]
            known = [f for f in figures if f is not None]
            assert known == sorted(known, reverse=True), (sort, figures)
            assert figures[: len(known)] == known, (sort, figures)  # rows without the figure come last
            assert results[0]["repo"] == ("bartowski/SmolLM2-135M-Instruct-GGUF" if sort == "downloads" else "test/Tiny-GGUF")
            demo = next(h for h in results if h["repo"] == DEMO_REPO)
            assert demo["catalog_name"] and demo["downloads"] == 5000  # one row, with the Hub's figures
            assert [h["repo"] for h in results].count(DEMO_REPO) == 1
    finally:
        hub.repos["test/tiny-gguf"].likes = 0


def test_catalog_rows_without_hub_figures_come_after_hub_rows() -> None:
    from llmctl.models import hub
    from llmctl.models.catalog import CatalogEntry
    from llmctl.models.search import merge_hits

    catalog = [CatalogEntry("only-here", "a/Only-GGUF", ""), CatalogEntry("both", "b/Both-GGUF", "")]
    hits = [hub.SearchHit("c/Top-GGUF", 900, 1, "2026-01-01", None), hub.SearchHit("b/Both-GGUF", 500, 9, "2026-03-01", None)]
    rows = merge_hits(catalog, hits, "likes")
    assert [(h.repo_id, h.catalog_name) for h in rows] == [("b/Both-GGUF", "both"), ("c/Top-GGUF", None), ("a/Only-GGUF", "only-here")]
    rows = merge_hits(catalog, hits, "trending")  # no figure: the Hub's order, then the catalog's
    assert [h.repo_id for h in rows] == ["c/Top-GGUF", "b/Both-GGUF", "a/Only-GGUF"]
    assert [h.repo_id for h in merge_hits(catalog, [], "downloads")] == ["a/Only-GGUF", "b/Both-GGUF"]


# --- 3. a wrong token is named as such --------------------------------------------------------


def test_a_rejected_token_gets_its_own_message(cli, hub, monkeypatch) -> None:
    good, bad = "hf_GoodToken0000000000000000000", "hf_WrongToken1234567890abcdef"
    hub.faults.valid_tokens = (good,)
    r = cli("pull", "test/Gated-GGUF")  # no token: the gated hint
    assert r.exit_code == EXIT_HUB and "gated" in r.stderr and "rejected" not in r.stderr
    monkeypatch.setenv("HF_TOKEN", bad)
    for args in (["pull", "test/Gated-GGUF"], ["pull", "test/Tiny-GGUF"], ["search", "test/Tiny-GGUF", "--files"]):
        r = cli(*args)
        assert r.exit_code == EXIT_HUB, (args, r.stderr)
        (error,) = _error_lines(r.stderr)
        assert "rejected the token" in error and "gated" not in r.stderr, r.stderr
        assert "hint:" in r.stderr and "HF_TOKEN" in r.stderr.split("hint:", 1)[1]
        assert bad not in r.stdout + r.stderr
    r = cli("search", "tiny", "--json")  # search still answers from the catalog, saying why the Hub was not
    assert r.exit_code == 0 and "rejected the token" in json.loads(r.stdout)["note"]
    monkeypatch.setenv("HF_TOKEN", good)
    assert cli("pull", "test/Gated-GGUF", "--dry-run").exit_code == 0


# --- 4. Ctrl-C during a pull says how to resume ------------------------------------------------


def _interrupt_after_20_chunks(monkeypatch) -> object:
    """Ctrl-C in the middle of a download (at its 20th chunk); returns the real feed to put back."""
    from llmctl.models import hub as hubmod

    fed = {"n": 0}
    real_feed = hubmod._Hasher.feed

    def feed_then_interrupt(self, chunk: bytes) -> None:
        real_feed(self, chunk)
        fed["n"] += 1
        if fed["n"] == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(hubmod._Hasher, "feed", feed_then_interrupt)
    return real_feed


def test_ctrl_c_during_a_pull_says_how_to_resume(cli, hub, monkeypatch, tmp_path: Path) -> None:
    from llmctl.models import hub as hubmod

    real_feed = _interrupt_after_20_chunks(monkeypatch)
    r = cli("pull", DEMO_REPO, "--quant", "Q4_1")
    assert r.exit_code == EXIT_INTERRUPTED
    partial = tmp_path / "hf" / "hub" / DEMO_PARTIAL
    kept = partial.stat().st_size
    assert kept > 0
    from llmctl.output import human_bytes

    assert f"run `llmctl pull {DEMO_REPO} --quant Q4_1` again to resume ({human_bytes(kept)} of" in r.stderr, r.stderr
    assert len(_error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr
    monkeypatch.setattr(hubmod._Hasher, "feed", real_feed)
    hub.log.clear()
    r = cli("pull", DEMO_REPO, "--quant", "Q4_1")
    assert r.exit_code == 0, r.stderr
    assert [rng for rng in hub.bytes_served() if rng and rng.endswith("-")] == [f"bytes={kept}-"]


@pytest.mark.slow
def test_sigint_during_a_pull_exits_130_with_the_resume_hint(hub, tmp_path: Path) -> None:
    hub.faults.delay_per_chunk = 0.004  # ~16 MB/s: the pull takes a few seconds
    exe = str(Path(sys.executable).with_name("llmctl"))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "LLMCTL_HW_PROFILE": "laptop-8gb"}
    proc = subprocess.Popen([exe, "pull", DEMO_REPO], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "hf" / "hub" / DEMO_PARTIAL
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size >= 5_000_000):
        time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert f"run `llmctl pull {DEMO_REPO}` again to resume" in stderr and "MiB of" in stderr, stderr
    assert "Traceback" not in stderr
    assert partial.exists()


# --- 5. -n is not pull's --name ---------------------------------------------------------------


def test_pull_has_no_short_n(cli, hub) -> None:
    r = cli("pull", "test/Tiny-GGUF:Q8_0", "-n", "mine", "--dry-run")
    assert r.exit_code == EXIT_USAGE
    r = cli("pull", "test/Tiny-GGUF:Q8_0", "--name", "mine", "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "mine"


def test_a_resumed_pull_counts_the_bytes_on_disk_apart_from_the_rate(cli, hub, monkeypatch, tmp_path: Path) -> None:
    """The rate is of bytes this run moved: a resumed partial is shown as done, not as transferred."""
    from llmctl import output
    from llmctl.models import hub as hubmod

    real_feed = _interrupt_after_20_chunks(monkeypatch)
    assert cli("pull", DEMO_REPO, "--quant", "Q4_1").exit_code == EXIT_INTERRUPTED
    kept = (tmp_path / "hf" / "hub" / DEMO_PARTIAL).stat().st_size
    monkeypatch.setattr(hubmod._Hasher, "feed", real_feed)
    seen = {"resumed": 0, "moved": 0, "total": 0}
    real_resumed, real_advance = output.ByteProgress.resumed, output.ByteProgress.advance

    def resumed(self, n: int) -> None:
        seen["resumed"] += n
        seen["total"] = self.total
        real_resumed(self, n)

    def advance(self, n: int) -> None:
        seen["moved"] += n
        real_advance(self, n)

    monkeypatch.setattr(output.ByteProgress, "resumed", resumed)
    monkeypatch.setattr(output.ByteProgress, "advance", advance)
    assert cli("pull", DEMO_REPO, "--quant", "Q4_1").exit_code == 0
    assert seen["resumed"] == kept > 0
    assert seen["moved"] == seen["total"] - kept
