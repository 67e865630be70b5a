"""Everything that talks to the Hugging Face Hub, through huggingface_hub.

Search, repo listings and file metadata use huggingface_hub's API client
(which honours ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and proxy
variables). The transfer itself is llmctl's own, because ``hf_hub_download``
does not resume across processes: a stable ``<blob>.llmctl.partial`` file in
the Hugging Face cache, held under a lock, grown with ``Range`` requests
through huggingface_hub's HTTP session, hashed as it grows, and renamed into
the cache layout (``blobs/<sha256>`` + ``snapshots/<commit>/<file>``) only
once its sha256 matches the Hub's. Other tools then find the file where
huggingface_hub would have put it.

Errors from the library and the network are translated here into
``LlmctlError``s; nothing here ever prints or logs the token.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from llmctl.errors import EXIT_HUB, LlmctlError, NotFoundError, UsageError

DEFAULT_ENDPOINT = "https://huggingface.co"
PARTIAL_SUFFIX = ".llmctl.partial"
LOCK_SUFFIX = ".llmctl.lock"
CHUNK = 1 << 20


class HubError(LlmctlError):
    """The Hub could not be reached, or answered with an error."""

    exit_code = EXIT_HUB


class ChecksumError(LlmctlError):
    """A downloaded file is not what the Hub says it should be."""


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def read_timeout() -> float:
    import math

    try:
        value = float(os.environ.get("LLMCTL_HUB_TIMEOUT", "30"))
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise UsageError("LLMCTL_HUB_TIMEOUT must be a positive number of seconds")
    return value


def max_retries() -> int:
    try:
        value = int(os.environ.get("LLMCTL_HUB_RETRIES", "5"))
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError("LLMCTL_HUB_RETRIES must be a whole number, 0 or more")
    return value


def _check_online() -> None:
    if offline():
        raise HubError(
            "HF_HUB_OFFLINE is set, so the Hub cannot be reached",
            hint="unset HF_HUB_OFFLINE to download; models already pulled keep working",
        )


def _raise_for_status(response: Any) -> None:
    """huggingface_hub's own status check, so gated/missing repos raise its typed errors."""
    from huggingface_hub.utils import hf_raise_for_status

    hf_raise_for_status(response)


def _is_network_error(exc: BaseException) -> bool:
    if type(exc).__name__ == "HTTPStatusError":
        return False
    module = type(exc).__module__
    return module.startswith(("httpx", "httpcore", "httpx2", "httpcore2", "h11", "ssl", "socket")) or isinstance(
        exc, (ConnectionError, TimeoutError)
    )


@contextmanager
def hub_errors(repo_id: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub and network exceptions into LlmctlErrors."""
    from huggingface_hub import errors as hf

    what = repo_id or "the Hub"
    try:
        yield
    except LlmctlError:
        raise
    except hf.HFValidationError as exc:
        raise UsageError(f"'{what}' is not a valid Hub repo id: {exc}", hint="repo ids look like owner/name") from None
    except hf.GatedRepoError:
        raise HubError(
            f"{what} is gated: its licence must be accepted on the Hub",
            hint=f"open {endpoint()}/{repo_id}, accept the terms, then set HF_TOKEN to a token of that account",
        ) from None
    except hf.RepositoryNotFoundError:
        raise NotFoundError(
            f"no repository '{what}' on the Hub (or it is private)",
            hint="check the name with `llmctl search`; for a private repo set HF_TOKEN",
        ) from None
    except hf.RevisionNotFoundError:
        raise NotFoundError(f"{what}: no such revision", hint="check the branch, tag or commit") from None
    except hf.EntryNotFoundError:
        raise NotFoundError(f"{what}: no such file", hint=f"list its files with `llmctl search {what} --files`") from None
    except hf.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so the Hub cannot be reached", hint="unset HF_HUB_OFFLINE") from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(
            f"the Hub answered HTTP {status} for {what}",
            hint="try again later; `LLMCTL_DEBUG=1` shows details",
        ) from None
    except Exception as exc:  # noqa: BLE001 - network failures arrive as many types
        if _is_network_error(exc):
            raise HubError(
                f"cannot reach the Hub at {endpoint()}: {type(exc).__name__}",
                hint="check your connection, HTTPS_PROXY or HF_ENDPOINT; models already pulled keep working",
            ) from None
        raise


def _api() -> Any:
    from huggingface_hub import HfApi

    _quiet_library()
    return HfApi(endpoint=endpoint(), token=_token())


def _quiet_library() -> None:
    """huggingface_hub logs its retries as warnings; llmctl reports failures itself."""
    from llmctl.config import debug_enabled

    if not debug_enabled():
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


# --- search --------------------------------------------------------------------------

SORTS = {"downloads": "downloads", "likes": "likes", "updated": "last_modified", "trending": "trending_score"}


@dataclass
class SearchHit:
    repo_id: str
    downloads: int | None
    likes: int | None
    updated: str | None
    parameters: int | None
    catalog_name: str | None = None


def search_models(query: str, *, author: str | None, limit: int, sort: str) -> list[SearchHit]:
    _check_online()
    with hub_errors():
        models = _api().list_models(
            search=query or None,
            author=author,
            filter="gguf",
            sort=SORTS[sort],
            limit=limit,
            expand=["downloads", "likes", "lastModified", "gguf"],
        )
        hits = []
        for model in models:
            gguf_meta = getattr(model, "gguf", None) or {}
            hits.append(
                SearchHit(
                    repo_id=model.id,
                    downloads=model.downloads,
                    likes=model.likes,
                    updated=model.last_modified.date().isoformat() if model.last_modified else None,
                    parameters=gguf_meta.get("total") if isinstance(gguf_meta, dict) else None,
                )
            )
    return hits


# --- repo files ---------------------------------------------------------------------------


@dataclass
class RemoteFile:
    path: str  # inside the repo
    size: int
    sha256: str | None


@dataclass
class RemoteModel:
    """One loadable model in a repo: a single GGUF or all parts of a split one."""

    label: str  # the quant, or the file name when it has none
    files: list[RemoteFile]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class RepoListing:
    repo_id: str
    commit: str
    models: list[RemoteModel]
    gated: bool = False
    other_files: list[str] = field(default_factory=list)


_UNSAFE = re.compile(r"(^|/)\.\.?(/|$)|\\|^/|//|[\x00-\x1f]")


def check_safe_filename(path: str) -> None:
    """Refuse repo paths that could write outside the cache (``..``, absolute, backslashes)."""
    if not path or _UNSAFE.search(path) or ":" in path.split("/")[0] or len(path) > 1024:
        raise HubError(f"refusing a file name from the Hub that could escape the cache: {path!r}", hint="report the repo")


def list_repo(repo_id: str, revision: str | None = None) -> RepoListing:
    """The repo's GGUF models (split files grouped) at a commit, with sizes and LFS sha256."""
    from llmctl.catalog import quant_of_filename
    from llmctl.gguf import SPLIT_RE

    _check_online()
    with hub_errors(repo_id):
        info = _api().model_info(repo_id, revision=revision, files_metadata=True)
    files: dict[str, RemoteFile] = {}
    others = []
    for sibling in info.siblings or []:
        name = sibling.rfilename
        if not name.lower().endswith(".gguf"):
            others.append(name)
            continue
        lower = name.rsplit("/", 1)[-1].lower()
        if "mmproj" in lower or "imatrix" in lower:
            others.append(name)  # vision projectors and importance matrices are not models
            continue
        lfs = sibling.lfs
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        size = getattr(lfs, "size", None) if lfs is not None else None
        files[name] = RemoteFile(name, int(size if size is not None else sibling.size or 0), sha)
    groups: dict[str, list[RemoteFile]] = {}
    for name in sorted(files):
        match = SPLIT_RE.match(name.rsplit("/", 1)[-1])
        key = (name.rsplit("/", 1)[0] + "/" if "/" in name else "") + match["prefix"] if match else name
        groups.setdefault(key, []).append(files[name])
    models = []
    for key, parts in groups.items():
        label = quant_of_filename(parts[0].path) or key.rsplit("/", 1)[-1]
        models.append(RemoteModel(label, parts))
    labels = [m.label for m in models]
    for model in models:  # two files with one quant (e.g. in folders): label them by path
        if labels.count(model.label) > 1:
            model.label = model.files[0].path
    return RepoListing(repo_id, info.sha or revision or "main", models, bool(info.gated), others)


# --- remote headers -----------------------------------------------------------------


class HubSource:
    """A file on the Hub as a ByteSource: HTTP range requests, following redirects."""

    def __init__(self, repo_id: str, path: str, commit: str, size: int) -> None:
        from huggingface_hub import hf_hub_url

        self.name = f"{repo_id}/{path}"
        self.size = size
        self.url = hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint())
        self.requests = 0

    def read_at(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session

        end = min(offset + length, self.size) - 1
        headers = build_hf_headers(token=_token())
        headers["Range"] = f"bytes={offset}-{end}"
        for attempt in range(max_retries() + 1):
            try:
                self.requests += 1
                with get_session().stream("GET", self.url, headers=headers, follow_redirects=True, timeout=read_timeout()) as response:
                    if response.status_code == 206:
                        return response.read()
                    if response.status_code == 200:  # a server that ignores Range: read only as far as needed
                        body = bytearray()
                        for chunk in response.iter_raw():
                            body += chunk
                            if len(body) > end:
                                break
                        return bytes(body[offset : end + 1])
                    if response.status_code < 500:
                        response.read()
                        _raise_for_status(response)
            except Exception as exc:  # noqa: BLE001
                if not _is_network_error(exc) or attempt == max_retries():
                    with hub_errors(self.name):
                        raise
            _backoff(attempt)
        raise HubError(f"the Hub kept failing while reading {self.name}", hint="try again later")


def remote_model_info(repo_id: str, commit: str, model: RemoteModel) -> Any:
    """Read the GGUF header(s) of a remote model with range requests; returns a ModelInfo."""
    from llmctl import gguf

    headers, budget = [], gguf.HeaderBudget()  # the parts share one budget, as for local files
    for part in model.files:
        check_safe_filename(part.path)
        with hub_errors(repo_id):
            headers.append(gguf.read_header(HubSource(repo_id, part.path, commit, part.size), budget))
    return gguf.summarize(headers)


# --- downloads ------------------------------------------------------------------------


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive lock held while one process downloads a blob; others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _backoff(attempt: int) -> None:
    time.sleep(min(0.25 * 2**attempt, 8.0))


class _Hasher:
    """sha256 of the partial file, computed on a second thread as the bytes arrive.

    It first hashes the bytes the file already holds (a resumed download, maybe
    written by an earlier process), then every chunk the transfer loop writes,
    in order, so the digest covers exactly what is in the file. The queue is
    bounded (64 chunks of at most 1 MiB): when hashing is slower than the
    network the transfer waits for it instead of memory growing. hashlib
    releases the GIL on large buffers, so with a second core the check adds
    little beyond the transfer itself, where a pass after it would add
    ~0.5-1 s per GB.
    """

    def __init__(self, path: Path, prefix: int) -> None:
        import queue
        import threading

        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self._stop = threading.Event()
        self._digest = hashlib.sha256()
        self.size = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path, prefix), name="llmctl-sha256", daemon=True)
        self._thread.start()

    def _run(self, path: Path, prefix: int) -> None:
        try:
            if prefix:
                with open(path, "rb") as fh:
                    while self.size < prefix and not self._stop.is_set():
                        chunk = fh.read(min(4 * CHUNK, prefix - self.size))
                        if not chunk:
                            break
                        self._digest.update(chunk)
                        self.size += len(chunk)
            while (chunk := self._queue.get()) is not None:
                if not self._stop.is_set():
                    self._digest.update(chunk)
                    self.size += len(chunk)
        except BaseException as exc:  # noqa: BLE001 - raised by feed()/finish(); keep draining so feed() never blocks
            self._error = exc
            while self._queue.get() is not None:
                pass

    def feed(self, chunk: bytes) -> None:
        if self._error is not None:  # fail now, not after the rest of the file
            raise self._error
        self._queue.put(chunk)

    def finish(self) -> tuple[str, int]:
        """Wait for the hashing to catch up: (hex digest, bytes hashed)."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest(), self.size

    def abandon(self) -> None:
        """Stop at once (an error, Ctrl-C, or a restart from byte 0), without waiting for the thread.

        Only the transfer loop feeds the queue, and it is the caller, so after
        the queue is emptied the end marker always fits.
        """
        import queue

        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # pragma: no cover - see above
            pass


def download_file(
    repo_id: str,
    commit: str,
    remote: RemoteFile,
    cache: Path,
    *,
    progress: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Path:
    """Fetch one file into the HF cache layout, resuming a partial; returns the snapshot path."""
    from huggingface_hub import hf_hub_url

    check_safe_filename(remote.path)
    _check_online()
    url = hf_hub_url(repo_id, remote.path, revision=commit, endpoint=endpoint())
    sha = (remote.sha256 or "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        with hub_errors(repo_id):
            from huggingface_hub import get_hf_file_metadata

            meta = get_hf_file_metadata(url, token=_token(), timeout=read_timeout())
        sha = (meta.etag or "").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise HubError(f"{repo_id}/{remote.path} has no sha256 on the Hub; refusing an unverifiable download")
    folder = repo_folder(cache, repo_id)
    blob = folder / "blobs" / sha
    snapshot = folder / "snapshots" / commit / PurePosixPath(remote.path)
    partial = blob.with_name(sha + PARTIAL_SUFFIX)
    with file_lock(blob.with_name(sha + LOCK_SUFFIX), on_wait):
        if not (blob.exists() and blob.stat().st_size == remote.size):
            _transfer(url, partial, remote, sha, progress)
            os.replace(partial, blob)
        _link_snapshot(snapshot, blob)  # under the lock: a second pull of the same file waits for it
    return snapshot


def _transfer(url: str, partial: Path, remote: RemoteFile, sha: str, progress: Callable[[int], None] | None) -> None:
    """Grow ``partial`` to the full file with Range requests, verifying its sha256 as it grows.

    The hash runs on a second thread (``_Hasher``), over the bytes already in
    the file and then over each chunk as it is written, so resumed bytes are
    covered the same way and no second pass over the file is needed.
    """
    from huggingface_hub.utils import build_hf_headers, get_session

    _tune_read_size()
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > remote.size:
        partial.unlink()
        have = 0
    if progress and have:
        progress(have)
    partial.touch()  # exists even for a 0-byte file, which no chunk will create
    hasher = _Hasher(partial, have)  # from here on, given every byte the file gains
    attempt = 0
    try:
        while have < remote.size:
            before = have
            headers = build_hf_headers(token=_token())
            headers["Accept-Encoding"] = "identity"
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=read_timeout()) as response:
                    if response.status_code == 200 and have:  # the server ignored Range: start over
                        if progress:
                            progress(-have)  # the bar goes back to 0 with the file
                        have = before = 0
                        mode = "wb"
                        hasher.abandon()
                        hasher = _Hasher(partial, 0)
                    elif response.status_code in (200, 206):
                        mode = "ab" if have else "wb"
                    elif response.status_code >= 500 or response.status_code == 429:
                        raise _Retryable(f"HTTP {response.status_code}")
                    else:
                        with hub_errors(remote.path):
                            response.read()
                            _raise_for_status(response)
                        raise HubError(f"unexpected HTTP {response.status_code} for {remote.path}")
                    with open(partial, mode) as out:
                        for chunk in response.iter_raw():  # as received: no re-chunking copies
                            out.write(chunk)
                            hasher.feed(chunk)
                            have += len(chunk)
                            if progress:
                                progress(len(chunk))
                            if have > remote.size:
                                break
                if have == before:
                    raise _Retryable("the connection closed without data")
                attempt = 0  # progress was made: the retry budget is for consecutive failures
            except (LlmctlError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - network trouble: resume after a pause
                if not (isinstance(exc, _Retryable) or _is_network_error(exc)):
                    raise
                attempt += 1
                if attempt > max_retries():
                    raise HubError(
                        f"download of {remote.path} kept failing ({_describe(exc)}) after {max_retries()} retries",
                        hint="run the same `llmctl pull` again to resume from where it stopped",
                    ) from None
                _backoff(attempt)
                have = partial.stat().st_size if partial.exists() else 0
        digest, size = hasher.finish()
    except BaseException:
        hasher.abandon()
        raise
    if have != remote.size or size != remote.size or digest != sha:
        partial.unlink(missing_ok=True)
        raise ChecksumError(
            f"{remote.path}: downloaded file does not match the Hub's checksum (sha256 {digest[:16]}…, "
            f"expected {sha[:16]}…); it was deleted",
            hint="run `llmctl pull` again; if it keeps failing, the repo or a proxy is serving bad data",
        )


def _tune_read_size() -> None:
    """Let the HTTP stack read 1 MiB per socket call instead of 64 KiB: halves the CPU per byte.

    httpcore's read size is a class attribute; where a future version lacks
    it, downloads just stay at the default speed.
    """
    for module in ("httpcore2._sync.http11", "httpcore._sync.http11"):
        try:
            import importlib

            cls = importlib.import_module(module).HTTP11Connection
        except (ImportError, AttributeError):
            continue
        if getattr(cls, "READ_NUM_BYTES", None) == 64 * 1024:
            cls.READ_NUM_BYTES = CHUNK


class _Retryable(Exception):
    pass


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _Retryable) else type(exc).__name__


def _link_snapshot(snapshot: Path, blob: Path) -> None:
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, snapshot.parent)
    if snapshot.is_symlink() or snapshot.exists():
        if os.path.realpath(snapshot) == os.path.realpath(blob):
            return
        snapshot.unlink()
    try:
        snapshot.symlink_to(target)
    except FileExistsError:
        if os.path.realpath(snapshot) != os.path.realpath(blob):
            raise
    except OSError:  # pragma: no cover - no symlinks (Windows without developer mode)
        import shutil

        shutil.copyfile(blob, snapshot)


def write_ref(cache: Path, repo_id: str, ref: str, commit: str) -> None:
    """Record ``refs/<branch>`` as huggingface_hub does, so offline lookups find the commit."""
    if re.fullmatch(r"[0-9a-f]{40}", ref):
        return
    path = repo_folder(cache, repo_id) / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)


@dataclass
class Partial:
    path: Path
    repo_id: str
    size: int
    in_use: bool


def find_partials(cache: Path) -> list[Partial]:
    """Unfinished downloads in the HF cache, and whether a pull is working on them now."""
    found = []
    if not cache.is_dir():
        return found
    for path in sorted(cache.glob("models--*/blobs/*" + PARTIAL_SUFFIX)):
        repo = path.parent.parent.name[len("models--") :].replace("--", "/", 1)
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # finished (renamed) since the glob
            continue
        found.append(Partial(path, repo, size, _locked(path.with_name(path.name.replace(PARTIAL_SUFFIX, LOCK_SUFFIX)))))
    return found


def _locked(lock: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    if not lock.exists():
        return False
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False
