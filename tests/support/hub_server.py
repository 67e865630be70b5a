"""A local server speaking the subset of the Hugging Face Hub's HTTP API that huggingface_hub uses.

Endpoints: model search (``/api/models``), model info with file metadata
(``/api/models/{repo}[/revision/{rev}]``), file resolve with HEAD and GET
(``/{repo}/resolve/{rev}/{path}``: a 302 to a CDN-like URL carrying
``X-Repo-Commit``, ``X-Linked-Etag``, ``X-Linked-Size``), and the CDN itself
(``/cdn/{sha256}``, with ``Range``). Errors use the Hub's ``X-Error-Code``
header so huggingface_hub raises its real exception types.

``Faults`` injects what real networks do: a connection dropped mid-file,
HTTP 500s, slow or stalled responses, corrupted bytes. Its hostile switches
(off by default) play a Hub that attacks its client: a crafted commit id, a
listing that lies about sizes, range answers that never end, answers
trickled one byte at a time, downloads that restart from byte 0 and stop
short on every request, and API answers that are not JSON. Every
hostile answer is bounded on the server side too (it stops when the client
hangs up, and after ``HOSTILE_LIMIT_S`` seconds or ``ENDLESS_LIMIT`` bytes
at most), so a test always ends on its own. Every request is logged
(method, path, Range) so tests can check what was fetched.
Run by the test fixtures on 127.0.0.1 and by ``make bench``; never reaches the
internet.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class HostedFile:
    path: str
    source: Path
    size: int
    sha256: str


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, HostedFile] = field(default_factory=dict)
    gated: bool = False
    downloads: int = 0
    likes: int = 0
    parameters: int | None = None
    extra_siblings: list[str] = field(default_factory=list)  # names listed but not served


@dataclass
class Faults:
    drop_after: int | None = None  # close the connection after sending this many bytes (once)
    errors_500: int = 0  # answer this many CDN/resolve GETs with 500 first
    delay_per_chunk: float = 0.0  # seconds between 64 KiB chunks (a slow link)
    stall_after: int | None = None  # stop sending (but keep the connection) after this many bytes
    stall_seconds: float = 0.0
    corrupt: bool = False  # flip the last byte of every file served
    ignore_range: bool = False  # answer Range requests with the whole file
    # every download GET (no Range, or an open-ended one) ends its body cleanly at this byte of the file
    # (its Content-Length says so); with ignore_range, a Hub that answers each resume from byte 0 and stops short
    cut_at: int | None = None
    # hostile answers (off by default)
    commit: str | None = None  # repo-info answers carry this as the commit id ("sha")
    claimed_size: int | None = None  # repo-info claims this size for every file; the CDN pads with zeros
    endless: bool = False  # CDN GETs answer with a body that never ends (no Content-Length)
    # requests matching this regex (searched in "METHOD /path Range", e.g. "GET /cdn/<sha> bytes=0-99"
    # or "GET /api/models None") get their answer one byte at a time, headers included
    trickle: str | None = None
    trickle_seconds: float = 0.5  # the pause between two trickled bytes
    trickle_from: int = 0  # bytes of the answer (headers first) sent at full speed before trickling
    api_body: bytes | None = None  # every /api/ request gets 200 with this body (HTML, garbage)
    retry_after: str | None = None  # every /api/ request gets 429 with this Retry-After
    # when set, a request carrying any other token gets the Hub's answer to an invalid token
    # (401, "Invalid credentials in Authorization header"); requests without a token are unaffected
    valid_tokens: tuple[str, ...] | None = None


HOSTILE_LIMIT_S = 60.0  # no hostile answer keeps a server thread longer than this
ENDLESS_LIMIT = 1 << 30  # nor sends more than this many bytes (an unbounded client shows as 1 GB RSS)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.log: list[tuple[str, str, str | None]] = []
        self.server_errors: list[str] = []
        self._sha_cache: dict[tuple[str, int, int], str] = {}
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    # --- content ---

    def add_repo(self, repo_id: str, files: dict[str, Path], **kwargs) -> Repo:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = Repo(repo_id, commit, **kwargs)
        for name, source in files.items():
            repo.files[name] = HostedFile(name, source, source.stat().st_size, self._sha(source))
        self.repos[repo_id.lower()] = repo
        return repo

    def _sha(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._sha_cache:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
            self._sha_cache[key] = digest.hexdigest()
        return self._sha_cache[key]

    def blob(self, sha: str) -> HostedFile | None:
        for repo in self.repos.values():
            for hosted in repo.files.values():
                if hosted.sha256 == sha:
                    return hosted
        return None

    def bytes_served(self, path_fragment: str = "/cdn/") -> list[str | None]:
        """The Range headers of the GETs whose path contains the fragment."""
        return [rng for method, path, rng in self.log if method == "GET" and path_fragment in path]

    # --- server ---

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.hub = hub
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def take_500(self) -> bool:
        with self._lock:
            if self.faults.errors_500 > 0:
                self.faults.errors_500 -= 1
                return True
        return False


class _QuietServer(ThreadingHTTPServer):
    """Never writes to stderr: the CLI under test shares it with this thread.

    Socket errors (a client that hangs up: the retry path closes sockets
    mid-request) are normal here; anything else is a bug in this server and
    is kept in ``hub.server_errors`` for the fixture to fail on, instead of
    being printed into the output being asserted on.
    """

    hub: "FakeHub"

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that hung up, reset, timed out: normal for fault tests
            return
        self.hub.server_errors.append(repr(exc))


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK of the headers (up to 40 ms on Linux) on every answer of a kept-alive connection.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet
        pass

    # --- helpers ---

    def _json(self, status: int, body, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _raw(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id.lower())
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    # --- routes ---

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.hub.log.append((self.command, path, self.headers.get("Range")))
        query = parse_qs(url.query)
        faults = self.hub.faults
        if faults.trickle is not None and re.search(faults.trickle, f"{self.command} {path} {self.headers.get('Range')}"):
            self.wfile = _Trickle(self.wfile, faults.trickle_seconds, faults.trickle_from)  # type: ignore[assignment]
            self.close_connection = True
        auth = self.headers.get("Authorization")
        if faults.valid_tokens is not None and auth is not None and auth.removeprefix("Bearer ") not in faults.valid_tokens:
            return self._json(401, {"error": "Invalid credentials in Authorization header"}, {"X-Error-Message": "Invalid credentials in Authorization header"})
        if faults.api_body is not None and path.startswith("/api/"):
            return self._raw(200, faults.api_body, "text/html; charset=utf-8")
        if faults.retry_after is not None and path.startswith("/api/"):
            return self._json(429, {"error": "slow down"}, {"Retry-After": faults.retry_after})
        if path == "/api/models":
            return self._search(query)
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path)
        if match:
            return self._model_info(match.group(1), match.group(2))
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            return self._resolve(match.group(1), match.group(2), match.group(3))
        match = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if match:
            return self._cdn(match.group(1))
        self._error(404, "EntryNotFound", f"no route {path}")

    def _search(self, query) -> None:
        words = (query.get("search", [""])[0]).lower()
        author = query.get("author", [None])[0]
        limit = int(query.get("limit", ["1000"])[0])
        hits = [r for r in self.hub.repos.values() if words in r.repo_id.lower() and (author is None or r.repo_id.split("/")[0].lower() == author.lower())]
        hits.sort(key=lambda r: -r.downloads)
        self._json(
            200,
            [
                {
                    "id": r.repo_id,
                    "downloads": r.downloads,
                    "likes": r.likes,
                    "lastModified": "2026-10-01T12:00:00.000Z",
                    "tags": ["gguf"],
                    "gguf": {"total": r.parameters} if r.parameters else None,
                }
                for r in hits[:limit]
            ],
        )

    def _model_info(self, repo_id: str, revision: str | None) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in (None, "main", repo.commit):
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        claimed = self.hub.faults.claimed_size
        siblings = [
            {
                "rfilename": f.path,
                "size": claimed or f.size,
                "blobId": f.sha256[:40],
                "lfs": {"sha256": f.sha256, "size": claimed or f.size, "pointerSize": 134},
            }
            for f in repo.files.values()
        ] + [{"rfilename": name, "size": 10} for name in repo.extra_siblings]
        self._json(
            200,
            {
                "id": repo.repo_id,
                "sha": self.hub.faults.commit if self.hub.faults.commit is not None else repo.commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "downloads": repo.downloads,
                "likes": repo.likes,
                "lastModified": "2026-10-01T12:00:00.000Z",
                "tags": ["gguf"],
                "siblings": siblings,
            },
        )

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if repo.gated and not self.headers.get("Authorization"):
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted; you must accept the conditions")
        hosted = repo.files.get(filename)
        if hosted is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist")
        if self.command == "GET" and self.hub.take_500():
            return self._error(500, "InternalError", "injected failure")
        self.send_response(302)
        self.send_header("Location", f"{self.hub.url}/cdn/{hosted.sha256}")
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("X-Linked-Etag", f'"{hosted.sha256}"')
        self.send_header("X-Linked-Size", str(hosted.size))
        self.send_header("ETag", f'"{hosted.sha256[:40]}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cdn(self, sha: str) -> None:
        hosted = self.hub.blob(sha)
        if hosted is None:
            return self._error(404, "EntryNotFound", "no such blob")
        if self.command == "GET" and self.hub.take_500():
            return self._error(500, "InternalError", "injected failure")
        faults = self.hub.faults
        size = faults.claimed_size or hosted.size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        partial = False
        if rng and not faults.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                partial = True
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
        if faults.endless and self.command == "GET":
            return self._endless(hosted, start, end, size, partial)
        if faults.cut_at is not None and (rng is None or rng.strip().endswith("-")):
            end = min(end, faults.cut_at - 1)
        length = max(end - start + 1, 0)
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{sha}"')
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        sent = 0
        with open(hosted.source, "rb") as fh:
            fh.seek(start)
            while sent < length:
                chunk = fh.read(min(65536, length - sent))
                if not chunk and faults.claimed_size:  # past the real file: zeros up to the claimed size
                    chunk = bytes(min(65536, length - sent))
                if not chunk:
                    break
                if faults.corrupt and start + sent + len(chunk) == hosted.size:
                    chunk = chunk[:-1] + bytes([chunk[-1] ^ 0xFF])
                if faults.drop_after is not None and start + sent + len(chunk) > faults.drop_after:
                    keep = max(faults.drop_after - start - sent, 0)
                    faults.drop_after = None
                    self.wfile.write(chunk[:keep])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:  # the client hung up first
                        pass
                    return
                if faults.stall_after is not None and start + sent + len(chunk) > faults.stall_after:
                    faults.stall_after = None
                    time.sleep(faults.stall_seconds)
                    self.close_connection = True
                    return
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                if faults.delay_per_chunk:
                    time.sleep(faults.delay_per_chunk)

    def _endless(self, hosted: HostedFile, start: int, end: int, size: int, partial: bool) -> None:
        """The file's bytes from ``start``, then zeros, for ever: no Content-Length, ended by closing.

        It stops when the client hangs up (the write fails), or at the
        server's own bounds.
        """
        self.send_response(206 if partial else 200)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        until = time.monotonic() + HOSTILE_LIMIT_S
        sent = 0
        with open(hosted.source, "rb") as fh:
            fh.seek(start)
            while sent < ENDLESS_LIMIT and time.monotonic() < until:
                chunk = fh.read(65536) or bytes(65536)
                try:
                    self.wfile.write(chunk)
                except OSError:  # the client hung up: the end of the attack
                    return
                sent += len(chunk)


class _Trickle:
    """A socket writer that sends one byte at a time, pausing between them (headers included).

    Raises ConnectionAbortedError (an OSError: the server ignores it) once it
    has run for ``HOSTILE_LIMIT_S``, so no server thread trickles for ever.
    """

    def __init__(self, raw, seconds: float, fast: int = 0) -> None:
        self._raw = raw
        self._seconds = seconds
        self._fast = fast  # bytes still to send at full speed
        self._until = time.monotonic() + HOSTILE_LIMIT_S

    def write(self, data: bytes) -> int:
        rest = data
        if self._fast:
            head, rest = data[: self._fast], data[self._fast :]
            self._raw.write(head)
            self._fast -= len(head)
        for i in range(len(rest)):
            if time.monotonic() > self._until:
                raise ConnectionAbortedError("trickled long enough")
            self._raw.write(rest[i : i + 1])
            self._raw.flush()
            time.sleep(self._seconds)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        self._raw.close()


def main() -> None:
    """``python tests/support/hub_server.py FILE...``: serve files as repo local/test-GGUF (for manual tries)."""
    import sys

    hub = FakeHub()
    hub.add_repo("local/test-GGUF", {Path(p).name: Path(p) for p in sys.argv[1:]}, downloads=1)
    print(hub.start(), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
