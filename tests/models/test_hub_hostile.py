"""A hostile Hub: crafted commit ids, symlinks in the cache, endless and trickled answers, absurd sizes, non-JSON.

Each test plays the attack with tests/hub_server.py (its hostile switches)
against the real huggingface_hub client, and asserts the bounded outcome:
the exit code, one error line without a traceback, nothing written outside
the cache and, where time or memory is the attack, the wall time and the
peak RSS of an ``llmctl`` process.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from llmctl.errors import EXIT_HUB, EXIT_USAGE, LlmctlError, StoreError, UsageError
from llmctl.models import hfcache
from llmctl.models import hub as hub_api
from tests.support import measure_rss
from tests.support.measure_rss import Run

TINY = "test/Tiny-GGUF"
TINY_FOLDER = "models--test--Tiny-GGUF"


def one_error(stderr: str, *needles: str) -> None:
    """The run failed with one `error:` line (and at most a hint), naming the problem, without a traceback."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and "unexpected" not in stderr, stderr
    assert len(lines) <= 3, stderr  # the error, a hint, perhaps a status line before them
    for needle in needles:
        assert needle in errors[0], (needle, stderr)


def tiny_commit(hub) -> str:
    return hub.repos[TINY.lower()].commit


def full_downloads(hub) -> list[str | None]:
    """Range headers of the CDN GETs that were transfers (no Range, or an open-ended one), not header reads."""
    return [r for r in hub.bytes_served() if r is None or r.endswith("-")]


def run_llmctl(*args: str, timeout: float = 90, **env: str) -> Run:
    # a described machine: the live probe's one-off bandwidth test would take 512 MiB of the peak
    return measure_rss.run_llmctl(*args, timeout=timeout, **{"LLMCTL_HW_PROFILE": "laptop-8gb", **env})


# --- 1. Hub data used as a path ------------------------------------------------------------


@pytest.mark.parametrize(
    "commit",
    ["../../../outside", "../../../outside/" + "0" * 24, "0" * 39 + "/", "A" * 40, "0" * 41, "", 12345],
    ids=["dotdot", "dotdot-long", "slash", "upper", "41", "empty", "number"],
)
def test_a_crafted_commit_id_is_refused_before_anything_is_written(cli, hub, tmp_path: Path, commit) -> None:
    outside = tmp_path / "hf" / "outside"  # where "snapshots/../../../outside" lands
    outside.mkdir(parents=True)
    victim = outside / "Tiny-Q8_0.gguf"
    victim.write_text("precious")
    hub.faults.commit = commit
    for args in (["pull", f"{TINY}:Q8_0"], ["search", TINY, "--files"], ["fit", TINY]):
        r = cli(*args)
        assert r.exit_code == EXIT_HUB, (args, r.stderr)
        one_error(r.stderr, "invalid commit id")
    assert victim.read_text() == "precious" and not victim.is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["Tiny-Q8_0.gguf"]
    assert full_downloads(hub) == []  # refused before any download
    cache = tmp_path / "hf" / "hub"
    assert not (cache / TINY_FOLDER / "snapshots").exists()


def test_a_snapshot_folder_that_links_out_of_the_cache_is_refused(cli, hub, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = outside / "Tiny-Q8_0.gguf"
    victim.write_text("precious")
    snapshots = tmp_path / "hf" / "hub" / TINY_FOLDER / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / tiny_commit(hub)).symlink_to(outside, target_is_directory=True)
    r = cli("pull", f"{TINY}:Q8_0")
    assert r.exit_code == 1
    one_error(r.stderr, "refusing to write", "outside")
    assert victim.read_text() == "precious" and not victim.is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["Tiny-Q8_0.gguf"]
    assert full_downloads(hub) == []  # refused before the download


def test_a_partial_that_links_out_of_the_cache_is_never_written_through(cli, hub, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    listing = hub_api.list_repo(TINY)
    (remote,) = next(m for m in listing.models if m.label == "Q8_0").files
    blobs = tmp_path / "hf" / "hub" / TINY_FOLDER / "blobs"
    blobs.mkdir(parents=True)
    (blobs / (remote.sha256 + hfcache.PARTIAL_SUFFIX)).symlink_to(victim)
    r = cli("pull", f"{TINY}:Q8_0")
    assert r.exit_code == 1
    one_error(r.stderr, "refusing to write", "outside")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("kind", ["file", "link-outside", "folder"])
def test_what_is_already_at_a_snapshot_path_is_only_replaced_when_a_pull_made_it(cli, hub, tmp_path: Path, kind: str) -> None:
    snapshot = tmp_path / "hf" / "hub" / TINY_FOLDER / "snapshots" / tiny_commit(hub)
    snapshot.mkdir(parents=True)
    entry = snapshot / "Tiny-Q8_0.gguf"
    victim = tmp_path / "victim.gguf"
    victim.write_text("precious")
    if kind == "file":
        entry.write_text("precious")
    elif kind == "link-outside":
        entry.symlink_to(victim)
    else:
        entry.mkdir()
        (entry / "keep").write_text("precious")
    r = cli("pull", f"{TINY}:Q8_0")
    assert r.exit_code == 1
    one_error(r.stderr, "refusing to replace", str(entry))
    assert victim.read_text() == "precious"
    if kind == "file":
        assert entry.read_text() == "precious" and not entry.is_symlink()
    elif kind == "link-outside":
        assert entry.is_symlink() and os.readlink(entry) == str(victim)
    else:
        assert (entry / "keep").read_text() == "precious"


def test_a_link_made_by_an_earlier_pull_is_still_replaced(cli, hub, tmp_path: Path) -> None:
    snapshot = tmp_path / "hf" / "hub" / TINY_FOLDER / "snapshots" / tiny_commit(hub)
    snapshot.mkdir(parents=True)
    entry = snapshot / "Tiny-Q8_0.gguf"
    entry.symlink_to("../../blobs/" + "0" * 64)  # dangling, into this repo's blobs: a pull's own link
    r = cli("pull", f"{TINY}:Q8_0")
    assert r.exit_code == 0, r.stderr
    assert Path(os.path.realpath(entry)).parent.name == "blobs" and entry.exists()


def test_revisions_that_could_become_paths_are_refused(cli, hub, tmp_path: Path) -> None:
    r = cli("pull", f"{TINY}/resolve/../Tiny-Q8_0.gguf")
    assert r.exit_code == EXIT_USAGE
    one_error(r.stderr, "not a valid branch, tag or commit name")
    assert hub.log == []  # refused before asking the Hub
    cache = tmp_path / "hf" / "hub"
    commit = tiny_commit(hub)
    for ref in ("../../escape", "/abs", "a/../../b", ".hidden", "x.lock", "a b", ""):
        with pytest.raises(UsageError):
            hfcache.write_ref(cache, TINY, ref, commit)
    with pytest.raises(StoreError):
        hfcache.write_ref(cache, TINY, "main", "../../escape")
    hfcache.write_ref(cache, TINY, "release/v1", commit)  # a real branch name with a folder is fine
    assert (cache / TINY_FOLDER / "refs" / "release" / "v1").read_text() == commit
    assert sorted(p.name for p in tmp_path.iterdir() if "escape" in p.name) == []


def test_the_containment_check_follows_symlinked_parents(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path, target_is_directory=True)
    assert hfcache.inside(root, root / "a" / "new" / "file") == root / "a" / "new" / "file"
    with pytest.raises(StoreError):
        hfcache.inside(root, root / "out" / "file")
    (root / "a" / "link").symlink_to(tmp_path / "x")
    assert hfcache.inside(root, root / "a" / "link", follow_last=False)  # the entry itself may be a link…
    with pytest.raises(StoreError):
        hfcache.inside(root, root / "a" / "link")  # …but is not written through


# --- 2. Unbounded bodies, trickles, deadlines ---------------------------------------------------

# The deadline tests' clock: a trickled answer sends a byte every TRICKLE_S, well within the stall
# timeout STALL_S, so only the DEADLINE_S deadline can end it. Each exchange waits the deadline out.
DEADLINE_S, STALL_S, TRICKLE_S = 1, 0.75, 0.1


@pytest.mark.slow
@pytest.mark.parametrize("args", [["pull", f"{TINY}:Q8_0"], ["search", TINY, "--files"]], ids=["pull", "search-files"])
def test_an_endless_range_answer_is_cut_at_the_bytes_asked_for(hub, args: list[str]) -> None:
    hub.faults.endless = True  # the fake Hub would send 1 GB before giving up
    r = run_llmctl(*args, LLMCTL_HUB_RETRIES="1")
    assert r.exit_code == EXIT_HUB, r.stderr
    one_error(r.stderr, "sent more than the", "bytes asked for")
    assert r.seconds < 30, r.seconds
    assert r.peak_rss_mb < 300, r.peak_rss_mb


@pytest.mark.slow  # waits out six deadlines; the fast suite keeps the header and metadata deadline tests below
@pytest.mark.parametrize(
    "pattern, fast",
    [("^GET /api/models", 0), ("^GET /api/models", 200)],
    ids=["headers-trickled", "body-trickled"],
)
def test_a_trickled_api_answer_ends_at_the_deadline(cli, hub, monkeypatch, pattern: str, fast: int) -> None:
    monkeypatch.setenv("LLMCTL_HUB_DEADLINE", str(DEADLINE_S))
    monkeypatch.setenv("LLMCTL_HUB_TIMEOUT", str(STALL_S))  # each byte comes sooner than this: the stall timeout never fires
    hub.faults.trickle, hub.faults.trickle_from, hub.faults.trickle_seconds = pattern, fast, TRICKLE_S
    for args in (["pull", f"{TINY}:Q8_0"], ["search", TINY, "--files"]):
        start = time.monotonic()
        r = cli(*args)
        assert r.exit_code == EXIT_HUB, (args, r.stderr)
        one_error(r.stderr, f"took longer than {DEADLINE_S} s")
        assert time.monotonic() - start < 15
    start = time.monotonic()
    r = cli("search", "tiny", "--json")  # a plain search falls back to the catalog, with the reason
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and not doc["hub_searched"] and f"took longer than {DEADLINE_S} s" in doc["note"]
    assert time.monotonic() - start < 15


def test_a_trickled_remote_header_ends_at_the_deadline(cli, hub, monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_HUB_DEADLINE", str(DEADLINE_S))
    monkeypatch.setenv("LLMCTL_HUB_TIMEOUT", str(STALL_S))
    hub.faults.trickle, hub.faults.trickle_from, hub.faults.trickle_seconds = r"^GET /cdn/\w+ bytes=\d+-\d+$", 300, TRICKLE_S
    start = time.monotonic()
    r = cli("pull", f"{TINY}:Q8_0", "--dry-run")
    assert r.exit_code == EXIT_HUB, r.stderr
    one_error(r.stderr, "reading the header of", f"took longer than {DEADLINE_S} s")
    assert time.monotonic() - start < 15


@pytest.mark.slow
def test_a_trickled_download_is_given_up_like_a_stall(hub) -> None:
    # Header reads (closed ranges) are served at full speed; the transfer (no Range, then "bytes=N-") trickles
    # after its headers and a little data: one byte every 0.2 s, never a full LLMCTL_HUB_TIMEOUT of silence.
    hub.faults.trickle, hub.faults.trickle_from, hub.faults.trickle_seconds = r"^GET /cdn/\w+ (None|bytes=\d+-)$", 2000, 0.2
    r = run_llmctl("pull", f"{TINY}:Q8_0", LLMCTL_HUB_TIMEOUT="1", LLMCTL_HUB_RETRIES="1")
    assert r.exit_code == EXIT_HUB, r.stderr
    one_error(r.stderr, "kept failing", "less than 1 MiB in 1 s")
    assert "resume" in r.stderr  # the hint: the partial is kept
    assert r.seconds < 30, r.seconds
    assert len(full_downloads(hub)) == 2  # the first try and one retry


@pytest.mark.slow
def test_a_hub_that_restarts_every_resume_from_byte_0_runs_out_of_retries(hub) -> None:
    # Every download answer is a 200 from byte 0 that ends cleanly after 2 MiB, whatever Range asked for:
    # each answer "makes progress" over the bytes it has just thrown away. Before, that refilled the
    # retry budget every time and skipped the backoff: thousands of requests a minute, for ever.
    hub.faults.ignore_range, hub.faults.cut_at = True, 2 << 20
    r = run_llmctl("pull", "bartowski/SmolLM2-135M-Instruct-GGUF", timeout=90, LLMCTL_HUB_RETRIES="2")
    assert r.exit_code == EXIT_HUB, (r.exit_code, r.stderr[-2000:])
    one_error(r.stderr, "kept failing", "ignored Range", "after 2 retries")
    assert "run the same `llmctl pull` again to resume" in r.stderr
    assert r.seconds < 60, r.seconds
    assert len(full_downloads(hub)) == 4  # the first answer, then three restarts: the first try and 2 retries


def test_answers_that_end_early_without_new_bytes_run_out_of_retries(cli, hub, monkeypatch) -> None:
    # A server that honours Range but ends every answer cleanly at the same byte: no answer adds anything.
    hub.faults.cut_at = 2 << 20
    monkeypatch.setenv("LLMCTL_HUB_RETRIES", "3")
    r = cli("pull", "bartowski/SmolLM2-135M-Instruct-GGUF")
    assert r.exit_code == EXIT_HUB, r.stderr
    one_error(r.stderr, "kept failing", "ended with 0 new bytes", "after 3 retries")
    assert full_downloads(hub) == [None] + [f"bytes={2 << 20}-"] * 4


def test_file_metadata_requests_end_at_the_deadline(hub, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMCTL_HUB_DEADLINE", str(DEADLINE_S))
    monkeypatch.setenv("LLMCTL_HUB_TIMEOUT", str(STALL_S))
    listing = hub_api.list_repo(TINY)
    (remote,) = next(m for m in listing.models if m.label == "Q8_0").files
    remote.sha256 = None  # no sha256 in the listing: the download asks for the file's metadata (HEAD)
    hub.faults.trickle, hub.faults.trickle_seconds = "^HEAD ", TRICKLE_S
    start = time.monotonic()
    with pytest.raises(hub_api.HubError, match=f"took longer than {DEADLINE_S} s"):
        hub_api.download_file(TINY, listing.commit, remote, tmp_path / "hf" / "hub")
    assert time.monotonic() - start < 15


@pytest.mark.slow
def test_a_long_retry_after_does_not_make_search_sleep(hub) -> None:
    hub.faults.retry_after = "100000000"  # huggingface_hub would sleep this long before its retry
    r = run_llmctl("search", "tiny", "--json", timeout=60, LLMCTL_HUB_DEADLINE="3")
    assert r.exit_code == 0 and not json.loads(r.stdout)["hub_searched"], r.stderr
    assert r.seconds < 20, r.seconds


# --- 3. Absurd sizes and headers that never end -------------------------------------------------


@pytest.mark.parametrize("size", [2**62, 5 << 40, -1])
def test_an_absurd_file_size_is_refused_before_any_read(cli, hub, size: int) -> None:
    hub.faults.claimed_size = size if size > 0 else None
    if size < 0:
        hub.faults.claimed_size = None
        hub.faults.api_body = json.dumps({"id": TINY, "sha": "0" * 40, "siblings": [{"rfilename": "Tiny-Q8_0.gguf", "size": -1}]}).encode()
    for args in (["pull", f"{TINY}:Q8_0"], ["search", TINY, "--files"], ["fit", TINY]):
        r = cli(*args)
        assert r.exit_code == EXIT_HUB, (args, r.stderr)
        one_error(r.stderr, "impossible size")
    assert hub.bytes_served() == []  # not one byte of the file was asked for


def _endless_vocabulary_header() -> bytes:
    """A GGUF header whose vocabulary claims 2^33 strings: with the zeros the server pads with, 64 GiB to walk."""

    def gstr(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    out += gstr("general.architecture") + struct.pack("<I", 8) + gstr("llama")
    out += gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**33)
    return out


@pytest.fixture
def endless_header_repo(hub, tmp_path: Path):
    path = tmp_path / "Endless-Q8_0.gguf"
    path.write_bytes(_endless_vocabulary_header())
    hub.add_repo("test/Endless-GGUF", {"Endless-Q8_0.gguf": path})
    hub.faults.claimed_size = 100 << 30  # plausible for a big model; the CDN serves zeros past the real bytes
    yield "test/Endless-GGUF"
    del hub.repos["test/endless-gguf"]


def test_a_header_read_has_a_budget_of_requests_and_bytes(hub, endless_header_repo: str) -> None:
    listing = hub_api.list_repo(endless_header_repo)
    (remote,) = listing.models[0].files
    source = hub_api.HubSource(endless_header_repo, remote.path, listing.commit, remote.size)
    offset = 0
    with pytest.raises(hub_api.HubError, match="needs more than 64 MiB"):
        while offset < remote.size:  # read on as the GGUF reader would, 1 MiB at a time
            offset += len(source.read_at(offset, 1 << 20))
    assert source.requests <= hub_api.MAX_HEADER_REQUESTS and source.received <= hub_api.MAX_HEADER_BYTES
    assert 60 <= len(hub.bytes_served()) <= hub_api.MAX_HEADER_REQUESTS


@pytest.mark.slow
def test_a_header_that_never_ends_is_given_up_quickly(hub, endless_header_repo: str) -> None:
    r = run_llmctl("pull", endless_header_repo, "--dry-run", LLMCTL_HUB_RETRIES="1")
    assert r.exit_code in (1, EXIT_HUB), r.stderr  # refused by the GGUF reader's own limits, or by the transport's
    one_error(r.stderr)
    assert len(hub.bytes_served()) <= hub_api.MAX_HEADER_REQUESTS
    assert r.seconds < 60 and r.peak_rss_mb < 400, (r.seconds, r.peak_rss_mb)


# --- 4. Answers that are not JSON ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"<!doctype html><html><body>Please log in</body></html>", b"\xff\xfe\x00garbage\x80\x81", b"[1, 2, 3]", b'"just a string"', b""],
    ids=["html", "invalid-utf8", "a-list", "a-string", "empty"],
)
def test_an_answer_that_is_not_json_is_a_hub_error(cli, hub, body: bytes) -> None:
    hub.faults.api_body = body
    for args in (["pull", f"{TINY}:Q8_0"], ["search", TINY, "--files"], ["search", "tiny", "--files"]):
        r = cli(*args)
        assert r.exit_code == EXIT_HUB, (args, r.stderr)
        one_error(r.stderr)
        assert "HF_ENDPOINT" in r.stderr
    r = cli("search", "tiny", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and not doc["hub_searched"] and doc["note"], r.stderr


def test_with_llmctl_debug_a_hub_error_shows_what_it_was_made_from(cli, hub, monkeypatch) -> None:
    hub.faults.api_body = b"<!doctype html><html><body>Please log in</body></html>"
    monkeypatch.setenv("LLMCTL_DEBUG", "1")
    r = cli("search", TINY, "--files")
    assert r.exit_code == EXIT_HUB, r.stderr
    assert "JSONDecodeError" in r.stderr and "direct cause" in r.stderr, r.stderr  # the library's error, then ours
    assert r.stderr.strip().splitlines()[-2].startswith("error: the Hub at "), r.stderr


def test_search_results_of_the_wrong_types_are_not_trusted(cli, hub) -> None:
    hub.faults.api_body = json.dumps([{"id": "x/y", "downloads": "many", "likes": -3, "gguf": {"total": "1e9"}}]).encode()
    r = cli("search", "y", "--json")
    assert r.exit_code == 0, r.stderr
    (hit,) = [h for h in json.loads(r.stdout)["results"] if h["repo"] == "x/y"]
    assert hit["downloads"] is None and hit["likes"] is None and hit["parameters"] is None


def test_every_hub_failure_is_an_llmctl_error(hub, monkeypatch) -> None:
    """The library-level view of the cases above: only LlmctlErrors leave hub.py."""
    monkeypatch.setenv("LLMCTL_HUB_DEADLINE", "3")
    hub.faults.api_body = b"\x80"
    with pytest.raises(LlmctlError):
        hub_api.list_repo(TINY)
    with pytest.raises(LlmctlError):
        hub_api.search_models("tiny", author=None, limit=3, sort="downloads")


def test_the_deadline_setting_is_checked(cli, hub, monkeypatch) -> None:
    for value in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv("LLMCTL_HUB_DEADLINE", value)
        r = cli("pull", f"{TINY}:Q8_0")
        assert r.exit_code == EXIT_USAGE, (value, r.stderr)
        one_error(r.stderr, "LLMCTL_HUB_DEADLINE")
