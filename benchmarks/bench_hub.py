"""Download speed and remote header reads, against the local Hub server (tests/hub_server.py).

- Throughput: llmctl's whole download (``hub.download_file``: a Range-capable
  stream into the partial file, its sha256 computed on a second thread as the
  bytes arrive, then placed in the HF cache layout) of a 512 MiB file, against
  ``curl`` fetching the same URL from the same server and checking nothing.
  Five rounds, alternating which goes first; the result is the median of the
  per-round ratios, because a shared 2-core machine's speed swings by tens of
  percent from one second to the next (curl alone ranged 500-1700 MB/s).
  Target: at least 90% of curl's rate.
- What a separate sha256 pass over the finished file would have added, in
  seconds per GB (information: llmctl hashes while downloading instead).
- Remote header read of the demo model: the number of range requests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Row
from demo_model import ensure_demo_model

from llmctl import hub

SIZE = 512 * 1024 * 1024
ROUNDS = 5


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
    ours, theirs = [], []

    def _ours(attempt: int) -> None:
        cache = folder / f"cache{attempt}"
        start = time.perf_counter()
        hub.download_file("local/test-GGUF", commit, remote, cache)  # transfer + sha256 check + cache layout
        ours.append(SIZE / (time.perf_counter() - start) / 1e6)
        shutil.rmtree(cache)

    def _theirs(attempt: int) -> None:
        _curl(url, commit, folder, theirs)

    for attempt in range(ROUNDS):
        for step in (_ours, _theirs) if attempt % 2 == 0 else (_theirs, _ours):
            step(attempt)
    ratios = [a / b for a, b in zip(ours, theirs)]
    ratio = statistics.median(ratios)
    mine, curl = statistics.median(ours), statistics.median(theirs)
    spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}"
    hash_s_per_gb = _separate_hash_pass(big) / (SIZE / 1e9)
    return [
        Row(f"download 512 MiB, verified (median ratio {ratio:.3f}, {spread})", mine, "MB/s", curl, "curl, same server, no check", ">= 90% of curl", ratio >= 0.9),
        Row("sha256 pass after a download (avoided)", hash_s_per_gb, "s/GB", None, "-", "info", None),
    ]


def _separate_hash_pass(path: Path) -> float:
    """What verifying a finished file in a second pass would cost (median of 3)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(4 << 20):
                digest.update(chunk)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
