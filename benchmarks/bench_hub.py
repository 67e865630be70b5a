"""Download speed and remote header reads, against the local Hub server (tests/support/hub_server.py).

- Transfer: llmctl's download (``hub.download_file``: a Range-capable stream
  into the partial file, then placed in the HF cache layout) of a 512 MiB
  file with the hashing stubbed out, against ``curl`` fetching the same URL
  from the same server. Target: at least 90% of curl's rate.
- Verification: llmctl hashes on a second thread while the bytes arrive; what
  that adds is the same download with hashing, minus the transfer alone, in
  seconds per GB. Target: at most 1 s per GB. What a separate pass over the
  finished file would cost is shown for information.
- Five rounds of the three, rotating which goes first; ratios are taken within
  a round and the median reported with the rounds' range, because a shared
  2-core machine's speed swings by tens of percent from one second to the
  next (curl alone ranged 500-1700 MB/s). The local server is Python, in its
  own process, so on 2 cores it takes one core from the client.
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

from llmctl.models import hub
from tools.demo_model import ensure_demo_model

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
            [sys.executable, str(ROOT / "tests" / "support" / "hub_server.py"), str(big), str(demo)],
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


class _NoHash:
    """Stands in for ``hub._Hasher`` to time the transfer alone."""

    def __init__(self, path: Path, prefix: int, *, sha: str = "", size: int = 0) -> None:
        self.sha, self.size = sha, size

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> tuple[str, int]:
        return self.sha, self.size

    def abandon(self) -> None:
        pass


def _throughput(url: str, folder: Path, big: Path) -> list[Row]:
    listing = hub.list_repo("local/test-GGUF")
    commit = listing.commit
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    remote = hub.RemoteFile("big.bin", SIZE, sha)
    transfer, verified, theirs = [], [], []

    def _download(times: list[float], cache: Path) -> None:
        start = time.perf_counter()
        hub.download_file("local/test-GGUF", commit, remote, cache)  # transfer + sha256 check + cache layout
        times.append(time.perf_counter() - start)
        shutil.rmtree(cache)

    def _transfer_only(attempt: int) -> None:
        real = hub._Hasher
        hub._Hasher = lambda path, prefix: _NoHash(path, prefix, sha=sha, size=SIZE)
        try:
            _download(transfer, folder / f"t{attempt}")
        finally:
            hub._Hasher = real

    def _verified(attempt: int) -> None:
        _download(verified, folder / f"v{attempt}")

    def _theirs(attempt: int) -> None:
        _curl(url, commit, folder, theirs)

    steps = [_transfer_only, _theirs, _verified]
    for attempt in range(ROUNDS):
        for step in steps[attempt % 3 :] + steps[: attempt % 3]:  # rotate who goes first
            step(attempt)
    gb = SIZE / 1e9
    ratios = [t_curl / t for t, t_curl in zip(transfer, theirs)]
    ratio = statistics.median(ratios)
    rate, curl = SIZE / statistics.median(transfer) / 1e6, SIZE / statistics.median(theirs) / 1e6
    added = statistics.median((v - t) / gb for v, t in zip(verified, transfer))
    spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}"
    return [
        Row(f"download 512 MiB, transfer (median ratio {ratio:.3f}, {spread})", rate, "MB/s", curl, "curl, same server", ">= 90% of curl", ratio >= 0.9),
        Row("sha256 verification adds (hashed while downloading)", max(added, 0.0), "s/GB", 1.0, "budget", "<= 1 s/GB", added <= 1.0),
        Row("download + verify, end to end", SIZE / statistics.median(verified) / 1e6, "MB/s", curl, "curl (no verification)", "info", None),
        Row("sha256 as a separate pass would add", _separate_hash_pass(big) / gb, "s/GB", None, "-", "info", None),
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


def _curl(url: str, commit: str, folder: Path, times: list[float]) -> None:
    out = folder / "curl.bin"
    start = time.perf_counter()
    subprocess.run(["curl", "-s", "-L", "-o", str(out), f"{url}/local/test-GGUF/resolve/{commit}/big.bin"], check=True)
    times.append(time.perf_counter() - start)
    out.unlink()


def _header_reads() -> Row:
    listing = hub.list_repo("local/test-GGUF")
    model = listing.models[0]
    source = hub.HubSource("local/test-GGUF", model.files[0].path, listing.commit, model.files[0].size)
    from llmctl import gguf

    gguf.read_header(source)
    return Row("remote header read, demo model", source.requests, "requests", None, "-", "a handful (<= 4)", source.requests <= 4)
