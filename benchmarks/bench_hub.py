"""Download speed and remote header reads, against the local Hub server (tests/hub_server.py).

- Throughput: llmctl's transfer (``hub.download_file``: Range-capable stream,
  sha256 computed while downloading, placed in the HF cache layout) of a
  512 MiB file, against ``curl`` fetching the same URL from the same server.
  Target: at least 90% of curl's rate. Best of 3 each.
- Verification: llmctl hashes while it downloads, so verifying adds no pass
  over the file; the table shows what a separate pass would cost (s per GB).
- Remote header read of the demo model: the number of range requests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Row
from demo_model import ensure_demo_model

from llmctl import hub

SIZE = 512 * 1024 * 1024


def run() -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big = folder / "big.bin"
        with open(big, "wb") as fh:
            for _ in range(SIZE // (1 << 24)):
                fh.write(os.urandom(1 << 24))
        demo = ensure_demo_model()
        # The server runs in its own process, as a real one would: no GIL shared with the client.
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "hub_server.py"), str(big), str(demo)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = server.stdout.readline().strip()
            os.environ["HF_ENDPOINT"] = url
            rows = _throughput(url, folder, big)
            rows.append(_header_reads())
        finally:
            server.terminate()
            server.wait()
    return rows


def _throughput(url: str, folder: Path, big: Path) -> list[Row]:
    listing = hub.list_repo("local/test-GGUF")
    commit = listing.commit
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    remote = hub.RemoteFile("big.bin", SIZE, sha)
    ours, theirs, verify = [], [], []
    real_hash = hub._hash_existing

    def timed_hash(path: Path):  # download_file = transfer + this verifying sha256 pass
        start = time.perf_counter()
        try:
            return real_hash(path)
        finally:
            verify.append(time.perf_counter() - start)

    hub._hash_existing = timed_hash
    try:
        for attempt in range(3):
            cache = folder / f"cache{attempt}"
            start = time.perf_counter()
            hub.download_file("local/test-GGUF", commit, remote, cache)
            total = time.perf_counter() - start
            ours.append(SIZE / (total - verify[-1]) / 1e6)
            shutil.rmtree(cache)
            _curl(url, commit, folder, theirs)
    finally:
        hub._hash_existing = real_hash
    verify_s_per_gb = min(verify) / (SIZE / 1e9)
    best, curl = max(ours), max(theirs)
    return [
        Row("download 512 MiB, transfer", best, "MB/s", curl, "curl, same server", ">= 90% of curl", best >= 0.9 * curl),
        Row("sha256 verification pass", verify_s_per_gb, "s/GB", 1.0, "budget", "<= 1 s/GB", verify_s_per_gb <= 1.0),
        Row("download + verify, end to end", 1 / (1 / best + verify_s_per_gb / 1000), "MB/s", curl, "curl (no verification)", "info", None),
    ]


def _curl(url: str, commit: str, folder: Path, rates: list[float]) -> None:
    out = folder / "curl.bin"
    start = time.perf_counter()
    subprocess.run(["curl", "-s", "-L", "-o", str(out), f"{url}/local/test-GGUF/resolve/{commit}/big.bin"], check=True)
    rates.append(SIZE / (time.perf_counter() - start) / 1e6)
    out.unlink()


def _header_reads() -> Row:
    listing = hub.list_repo("local/test-GGUF")
    model = listing.models[0]
    source = hub.HubSource("local/test-GGUF", model.files[0].path, listing.commit, model.files[0].size)
    from llmctl import gguf

    gguf.read_header(source)
    return Row("remote header read, demo model", source.requests, "requests", None, "-", "a handful (<= 4)", source.requests <= 4)
