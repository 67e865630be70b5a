"""search and pull against a local server speaking the Hub's API, through the real huggingface_hub."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.errors import EXIT_HUB, EXIT_NOT_FOUND, EXIT_USAGE

DEMO_REPO = "bartowski/SmolLM2-135M-Instruct-GGUF"
DEMO_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def resumed_from(hub) -> list[int]:
    """Start offsets of the open-ended Range GETs (resumptions) the CDN saw."""
    return [int(r[6:-1]) for r in hub.bytes_served() if r and r.endswith("-")]


def models(cli) -> list[dict]:
    return json.loads(cli("list", "--json").stdout)["models"]


def test_pull_by_catalog_name_lands_in_the_hf_cache(cli, hub, tmp_path: Path) -> None:
    r = cli("pull", "smollm2-135m-instruct")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "smollm2-135m-instruct:q4_1"  # the name to use, alone on stdout
    assert "Chose Q4_1" in r.stderr
    (entry,) = [m for m in models(cli) if m["kind"] == "registered"]
    assert entry["source"]["repo"] == DEMO_REPO and entry["source"]["type"] == "hub"
    path = Path(entry["files"][0])
    blob = Path(os.path.realpath(path))
    assert blob.name == DEMO_SHA and hashlib.sha256(blob.read_bytes()).hexdigest() == DEMO_SHA
    # huggingface_hub itself finds the file where it would have put it: no second download
    from huggingface_hub import hf_hub_download

    found = hf_hub_download(DEMO_REPO, "SmolLM2-135M-Instruct-Q4_1.gguf", cache_dir=tmp_path / "hf" / "hub", local_files_only=True)
    assert Path(found) == path
    # the pulled model answers to its repo and catalog names too
    for ref in (f"{DEMO_REPO}:Q4_1", f"hf.co/{DEMO_REPO}", "smollm2-135m-instruct"):
        r = cli("show", ref, "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "smollm2-135m-instruct:q4_1", ref
    # the remote header was read in a handful of range requests before the download
    ranges = [rng for rng in hub.bytes_served() if rng and not rng.startswith("bytes=0-") or rng == "bytes=0-1048575"]
    assert 1 <= len(ranges) <= 4


def test_second_pull_is_a_quick_no_op(cli, hub) -> None:
    assert cli("pull", DEMO_REPO).exit_code == 0
    full_gets = [r for r in hub.bytes_served() if r is None]
    hub.log.clear()
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == 0 and "already pulled" in r.stderr
    assert [r for r in hub.bytes_served() if r is None] == []
    assert len(full_gets) == 1


def test_dry_run_downloads_nothing(cli, hub) -> None:
    r = cli("pull", DEMO_REPO, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dry_run"] and doc["download_bytes"] == 98_362_432
    assert doc["plan"]["chosen"]["fit"] in ("CPU only", "full GPU offload", "partial offload")
    assert all(rng is not None for rng in hub.bytes_served())  # only range reads of the header
    assert models(cli) == []


def test_quant_choice_and_explicit_quant(cli, hub) -> None:
    r = cli("pull", "test/Tiny-GGUF", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "Q8_0" in r.stderr and "F16" in r.stderr  # every candidate shown with its fit
    r = cli("pull", "test/Tiny-GGUF:F16")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "tiny:f16"
    r = cli("pull", "test/Tiny-GGUF", "--quant", "Q2_K")
    assert r.exit_code == EXIT_NOT_FOUND
    assert "no Q2_K file" in r.stderr and "available: " in r.stderr


def test_names_in_every_accepted_form(cli, hub) -> None:
    for ref in (
        f"hf.co/{DEMO_REPO}:Q4_1",
        f"https://huggingface.co/{DEMO_REPO}",
        f"https://huggingface.co/{DEMO_REPO}/blob/main/SmolLM2-135M-Instruct-Q4_1.gguf",
        f"{DEMO_REPO}/SmolLM2-135M-Instruct-Q4_1.gguf",
    ):
        r = cli("pull", ref, "--dry-run", "--json")
        assert r.exit_code == 0, (ref, r.stderr)
        assert json.loads(r.stdout)["files"] == ["SmolLM2-135M-Instruct-Q4_1.gguf"]


def test_split_model_is_one_model(cli, hub) -> None:
    r = cli("pull", "test/Split-GGUF")
    assert r.exit_code == 0, r.stderr
    (entry,) = models(cli)
    assert len(entry["files"]) == 3 and entry["status"] == "ok"
    assert cli("show", entry["name"]).exit_code == 0


def test_dropped_connection_resumes_in_process(cli, hub) -> None:
    hub.faults.drop_after = 40_000_000
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == 0, r.stderr
    (start,) = resumed_from(hub)
    assert 35_000_000 < start <= 40_000_000  # from the last chunk written, not from 0


def test_server_errors_are_retried_then_reported(cli, hub) -> None:
    hub.faults.errors_500 = 2
    assert cli("pull", "test/Tiny-GGUF:Q8_0").exit_code == 0
    hub.faults.errors_500 = 1000
    r = cli("pull", "test/Tiny-GGUF:F16")
    assert r.exit_code == EXIT_HUB
    assert "kept failing" in r.stderr and "Traceback" not in r.stderr
    hub.faults.errors_500 = 0


def test_stalled_server_times_out_and_resumes(cli, hub, monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_HUB_TIMEOUT", "1")
    hub.faults.stall_after = 10_000_000
    hub.faults.stall_seconds = 3
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == 0, r.stderr
    (start,) = resumed_from(hub)
    assert 5_000_000 < start <= 10_000_000


def test_checksum_mismatch_fails_loudly_and_keeps_nothing(cli, hub, tmp_path: Path) -> None:
    hub.faults.corrupt = True
    r = cli("pull", "test/Tiny-GGUF:Q8_0")
    assert r.exit_code == 1
    assert "does not match the Hub's checksum" in r.stderr and "deleted" in r.stderr
    assert models(cli) == []
    leftovers = [p for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []


def test_gated_repo_needs_a_token_that_is_never_printed(cli, hub, monkeypatch) -> None:
    r = cli("pull", "test/Gated-GGUF")
    assert r.exit_code == EXIT_HUB
    assert "gated" in r.stderr and "HF_TOKEN" in r.stderr
    secret = "hf_SuperSecretToken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("LLMCTL_DEBUG", "1")
    r = cli("pull", "test/Gated-GGUF", "--json")
    assert r.exit_code == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    assert secret not in (Path(os.environ["LLMCTL_HOME"]) / "index.json").read_text()


def test_unknown_names_and_repos(cli, hub) -> None:
    r = cli("pull", "llama-2-7b-chta")
    assert r.exit_code == EXIT_NOT_FOUND and "did you mean llama-2-7b-chat" in r.stderr
    r = cli("pull", "tiny")  # not in the catalog: the Hub's search suggests repos
    assert r.exit_code == EXIT_NOT_FOUND and "did you mean test/Tiny-GGUF" in r.stderr
    r = cli("pull", "nobody/Nothing-GGUF")
    assert r.exit_code == EXIT_NOT_FOUND and "no repository" in r.stderr
    r = cli("pull", "test/NoGGUF")
    assert r.exit_code == EXIT_NOT_FOUND and "no GGUF model files" in r.stderr and "llmctl search" in r.stderr


def test_hostile_file_names_are_refused(cli, hub, tmp_path: Path) -> None:
    r = cli("pull", "test/Hostile-GGUF")
    assert r.exit_code == EXIT_HUB and "could escape" in r.stderr
    assert not list(tmp_path.rglob("escape*"))


def test_offline_and_unreachable_hub(cli, hub, monkeypatch, demo_model: Path) -> None:
    cli("import", demo_model, "--name", "local-one")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == EXIT_HUB and "HF_HUB_OFFLINE" in r.stderr
    assert cli("show", "local-one").exit_code == 0  # models already here keep working
    r = cli("search", "smollm2", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and not doc["hub_searched"] and doc["results"][0]["catalog_name"].startswith("smollm2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == EXIT_HUB and "cannot reach the Hub" in r.stderr


def test_not_enough_disk_is_refused_before_downloading(cli, hub, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("llmctl.models.pull.shutil.disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == 1 and "not enough disk space" in r.stderr
    assert all(rng is not None for rng in hub.bytes_served())  # no full download was started
    assert shutil.disk_usage  # the real one is untouched outside pull


def test_rm_of_a_pulled_model_deletes_its_blob(cli, hub, tmp_path: Path) -> None:
    cli("pull", "test/Tiny-GGUF:Q8_0")
    (entry,) = models(cli)
    blob = Path(os.path.realpath(entry["files"][0]))
    assert blob.exists()
    assert cli("rm", entry["name"], "-y").exit_code == 0
    assert not blob.exists() and not Path(entry["files"][0]).is_symlink()
    assert models(cli) == []


def test_search_merges_catalog_and_hub(cli, hub) -> None:
    r = cli("search", "smollm2")
    assert r.exit_code == 0, r.stderr
    assert DEMO_REPO in r.stdout and "smollm2-135m-instruct" in r.stdout and "5,000" in r.stdout
    doc = json.loads(cli("search", "tiny", "--json").stdout)
    repos = [h["repo"] for h in doc["results"]]
    assert "test/Tiny-GGUF" in repos and doc["hub_searched"]
    r = cli("search", "x", "--sort", "weird")
    assert r.exit_code == EXIT_USAGE


def test_search_files_and_fit_of_a_remote_repo(cli, hub) -> None:
    r = cli("search", "test/Tiny-GGUF", "--files", "--json")
    assert r.exit_code == 0, r.stderr
    files = {f["label"]: f for f in json.loads(r.stdout)["files"]}
    assert set(files) == {"Q8_0", "F16"} and all(f["fit"] for f in files.values())
    r = cli("fit", "test/Tiny-GGUF", "--hw-profile", "laptop-8gb")
    assert r.exit_code == 0, r.stderr
    assert "Q8_0" in r.stdout and "F16" in r.stdout and "CPU only" in r.stdout
    assert models(cli) == []  # nothing was downloaded


# --- processes: kill -9 and concurrency -------------------------------------------------


def _llmctl(*args: str, env: dict[str, str]) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("llmctl")
    return subprocess.Popen([str(exe), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(hub) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url}


@pytest.mark.slow
def test_kill_9_at_half_then_resume(cli, hub, tmp_path: Path) -> None:
    hub.faults.delay_per_chunk = 0.004  # ~16 MB/s: the pull takes a few seconds
    proc = _llmctl("pull", DEMO_REPO, env=_env(hub))
    blobs = tmp_path / "hf" / "hub" / "models--bartowski--SmolLM2-135M-Instruct-GGUF" / "blobs"
    partial = blobs / (DEMO_SHA + ".llmctl.partial")
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size >= 49_000_000):
        time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    have = partial.stat().st_size
    assert 40_000_000 < have < 98_362_432
    assert [m for m in models(cli) if m["kind"] == "registered"] == []  # never shown as a model
    assert json.loads(cli("list", "--json").stdout)["partial_downloads"][0]["size_bytes"] == have
    hub.faults.delay_per_chunk = 0
    hub.log.clear()
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == 0, r.stderr
    assert resumed_from(hub) == [have]  # only the remainder was fetched
    assert None not in hub.bytes_served()
    (entry,) = models(cli)
    assert hashlib.sha256(Path(entry["files"][0]).read_bytes()).hexdigest() == DEMO_SHA
    assert not partial.exists()


@pytest.mark.slow
def test_two_pulls_at_once_download_once(cli, hub) -> None:
    hub.faults.delay_per_chunk = 0.001
    procs = [_llmctl("pull", DEMO_REPO, env=_env(hub)) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(out.strip() == "smollm2-135m-instruct:q4_1" for out, _ in outs)
    assert hub.bytes_served().count(None) == 1 and resumed_from(hub) == []  # one transfer of the file
    assert len([m for m in models(cli) if m["kind"] == "registered"]) == 1


def test_rm_partials(cli, hub, tmp_path: Path) -> None:
    hub.faults.drop_after = 5_000_000
    os.environ["LLMCTL_HUB_RETRIES"] = "0"
    try:
        r = cli("pull", DEMO_REPO)
    finally:
        del os.environ["LLMCTL_HUB_RETRIES"]
    assert r.exit_code == EXIT_HUB
    assert "kept failing" in r.stderr and "resume" in r.stderr
    listing = json.loads(cli("list", "--json").stdout)
    assert len(listing["partial_downloads"]) == 1
    r = cli("rm", "--partials")
    assert r.exit_code == 0 and "Removed 1 partial" in r.stderr
    assert json.loads(cli("list", "--json").stdout)["partial_downloads"] == []


def test_a_partial_is_in_use_exactly_while_a_pull_holds_its_lock(tmp_path: Path) -> None:
    """Downloads and imports share one look at a lock: it never creates the file, and two lookers
    never take each other for a holder."""
    import fcntl

    from llmctl.fileio import exclusive_lock, lock_held
    from llmctl.models.hfcache import find_partials

    cache = tmp_path / "hub"
    blobs = cache / "models--org--Part-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / ("ab" * 32 + ".llmctl.partial")).write_bytes(b"x")
    lock = blobs / ("ab" * 32 + ".llmctl.lock")
    assert [p.in_use for p in find_partials(cache)] == [False] and not lock.exists()  # looking creates nothing
    with exclusive_lock(lock):  # what a pull holds while it downloads
        assert [p.in_use for p in find_partials(cache)] == [True]
    assert [p.in_use for p in find_partials(cache)] == [False]
    with open(lock, "rb") as looker:
        fcntl.flock(looker.fileno(), fcntl.LOCK_SH)  # another `list` looking at the same moment
        assert not lock_held(lock)


def _no_hasher_threads() -> bool:
    """No checksum thread outlives its pull (an abandoned one ends within moments)."""
    import threading

    deadline = time.time() + 5
    while time.time() < deadline:
        if not [t for t in threading.enumerate() if t.name == "llmctl-sha256"]:
            return True
        time.sleep(0.01)
    return False


def _leave_a_partial(cli, hub, tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pull that stops for good after ``size`` bytes, leaving its partial file."""
    hub.faults.drop_after = size
    monkeypatch.setenv("LLMCTL_HUB_RETRIES", "0")
    assert cli("pull", DEMO_REPO).exit_code == EXIT_HUB
    monkeypatch.delenv("LLMCTL_HUB_RETRIES")
    assert _no_hasher_threads()
    hub.faults.drop_after = None
    blobs = tmp_path / "hf" / "hub" / "models--bartowski--SmolLM2-135M-Instruct-GGUF" / "blobs"
    partial = blobs / (DEMO_SHA + ".llmctl.partial")
    assert 0 < partial.stat().st_size <= size
    return partial


def test_bad_bytes_already_in_a_partial_are_caught_on_resume(cli, hub, tmp_path: Path, monkeypatch) -> None:
    partial = _leave_a_partial(cli, hub, tmp_path, 20_000_000, monkeypatch)
    have = partial.stat().st_size
    with open(partial, "r+b") as fh:  # damage left by something else: the resumed bytes are fine
        fh.seek(have // 2)
        byte = fh.read(1)
        fh.seek(have // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    hub.log.clear()
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == 1 and "does not match the Hub's checksum" in r.stderr
    assert resumed_from(hub) == [have]  # it did resume, and still checked the old bytes
    assert not partial.exists() and models(cli) == []
    assert _no_hasher_threads()
    r = cli("pull", DEMO_REPO)  # and the next pull starts clean
    assert r.exit_code == 0, r.stderr
    (entry,) = models(cli)
    assert hashlib.sha256(Path(entry["files"][0]).read_bytes()).hexdigest() == DEMO_SHA


def test_a_server_that_ignores_range_makes_the_pull_start_over(cli, hub, tmp_path: Path, monkeypatch) -> None:
    partial = _leave_a_partial(cli, hub, tmp_path, 20_000_000, monkeypatch)
    have = partial.stat().st_size
    hub.faults.ignore_range = True
    hub.log.clear()
    r = cli("pull", DEMO_REPO)
    assert r.exit_code == 0, r.stderr
    assert resumed_from(hub) == [have]  # asked for the rest, got the whole file from byte 0
    (entry,) = models(cli)
    assert hashlib.sha256(Path(entry["files"][0]).read_bytes()).hexdigest() == DEMO_SHA
    assert not partial.exists()


def test_progress_ends_at_the_file_size_after_a_restart(cli, hub, tmp_path: Path, monkeypatch) -> None:
    import itertools

    from llmctl.models import hub as hub_api

    _leave_a_partial(cli, hub, tmp_path, 20_000_000, monkeypatch)
    hub.faults.ignore_range = True
    listing = hub_api.list_repo(DEMO_REPO)
    (remote,) = listing.models[0].files
    steps: list[int] = []
    hub_api.download_file(DEMO_REPO, listing.commit, remote, tmp_path / "hf" / "hub", progress=steps.append)
    shown = list(itertools.accumulate(steps))
    assert shown[-1] == remote.size and min(shown) >= 0 and max(shown) <= remote.size


def test_hasher_covers_the_old_bytes_then_the_new_ones(tmp_path: Path) -> None:
    from llmctl.models.hub import _Hasher

    data = os.urandom(3 << 20)
    partial = tmp_path / "f.partial"
    partial.write_bytes(data[: 1 << 20])
    hasher = _Hasher(partial, 1 << 20)
    for i in range(1 << 20, len(data), 65536):
        hasher.feed(data[i : i + 65536])
    assert hasher.finish() == (hashlib.sha256(data).hexdigest(), len(data))


def test_hasher_fails_early_and_stops_at_once(tmp_path: Path) -> None:
    from llmctl.models.hub import _Hasher

    hasher = _Hasher(tmp_path / "gone.partial", 1000)  # the old bytes cannot be read
    deadline = time.time() + 5
    while hasher._error is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(FileNotFoundError):
        hasher.feed(b"x")  # the transfer stops now, not after the rest of the file
    hasher.abandon()
    big = tmp_path / "big.partial"
    big.touch()
    os.truncate(big, 256 << 20)  # sparse: as long to hash as written bytes, without writing (and later deleting) 256 MiB
    slow = _Hasher(big, 256 << 20)
    for _ in range(64):
        slow.feed(b"x")  # the queue fills while the old bytes are still being hashed
    slow.abandon()  # returns without waiting for the hashing (Ctrl-C during a large resume)
    assert _no_hasher_threads()
    assert slow.size < 256 << 20  # it stopped part-way through the old bytes


def test_quant_names_match_exactly_and_name_clashes_are_caught_early(cli, hub, make_gguf) -> None:
    assert cli("pull", "test/Quants-GGUF:Q8_0_L").exit_code == 0
    r = cli("pull", "test/Quants-GGUF:Q8_0")  # not "already pulled" because Q8_0 is inside Q8_0_L
    assert r.exit_code == 0 and "already pulled" not in r.stderr and r.stdout.strip() == "quants:q8_0"
    assert json.loads(cli("show", "test/Quants-GGUF:Q8_0", "--json").stdout)["name"] == "quants:q8_0"
    cli("import", make_gguf(), "--name", "taken")
    hub.log.clear()
    r = cli("pull", "test/Tiny-GGUF:Q8_0", "--name", "taken")
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert None not in hub.bytes_served()  # refused before downloading


def test_invalid_repo_ids_and_hub_settings(cli, hub, monkeypatch) -> None:
    r = cli("pull", "foo--x/bar")
    assert r.exit_code == 2 and "not a valid Hub repo id" in r.stderr
    monkeypatch.setenv("LLMCTL_HUB_TIMEOUT", "-1")
    r = cli("pull", "test/Tiny-GGUF")
    assert r.exit_code == 2 and "LLMCTL_HUB_TIMEOUT" in r.stderr


def test_a_taken_name_is_refused_in_the_same_words_before_and_after_downloading(cli, make_gguf) -> None:
    """plan_pull's early check and upsert_hub's final one are one check: same refusal, same message;
    an earlier pull of the same repo under the name is replaced by both."""
    from llmctl.commands import open_store
    from llmctl.errors import UsageError
    from llmctl.models.store import ModelEntry

    assert cli("import", make_gguf(), "--name", "taken").exit_code == 0
    store = open_store()
    with pytest.raises(UsageError) as early:
        store.check_pull_name("taken", "test/Tiny-GGUF")  # what plan_pull calls
    entry = ModelEntry("taken", [], {"type": "hub", "repo": "test/Tiny-GGUF"}, False, 0, [], "now")
    with pytest.raises(UsageError) as late:
        store.upsert_hub(entry)
    assert early.value.message == late.value.message == "a model named 'taken' already exists (from import)"
    assert early.value.hint == late.value.hint
    store.upsert_hub(ModelEntry("mine", [], {"type": "hub", "repo": "test/Tiny-GGUF"}, False, 0, [], "now"))
    store.check_pull_name("mine", "TEST/tiny-gguf")  # the same repo: may be replaced
    store.upsert_hub(ModelEntry("mine", [], {"type": "hub", "repo": "TEST/tiny-gguf"}, False, 1, [], "now"))
    assert store.get("mine").size == 1
