"""Everything that talks to the Hugging Face Hub, through huggingface_hub.

Search, repo listings and file metadata use huggingface_hub's API client
(which honours ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and proxy
variables). The transfer itself is llmctl's own, because ``hf_hub_download``
does not resume across processes: a stable ``<blob>.llmctl.partial`` file in
the Hugging Face cache, held under a lock, grown with ``Range`` requests
through huggingface_hub's HTTP session, hashed as it grows, and renamed into
the cache layout (``blobs/<sha256>`` + ``snapshots/<commit>/<file>``, kept by
``llmctl.models.hfcache``) only once its sha256 matches the Hub's. Other
tools then find the file where huggingface_hub would have put it.

Everything the Hub sends is treated as hostile: a commit id must be 40 hex
digits, file names must stay inside the repo, sizes must be plausible, and
every path written resolves inside the repo's cache folder. Every exchange
has a deadline and a byte cap (``llmctl.models.hubhttp``), except a download's
body, which is watched by the stall timeout and a minimum-progress rule.

Errors from the library and the network are translated here into
``LlmctlError``s; nothing here ever prints or logs the token.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator

from llmctl.errors import EXIT_HUB, LlmctlError, NotFoundError, UsageError
from llmctl.fileio import exclusive_lock
from llmctl.models import hfcache, hubhttp
from llmctl.models.names import check_revision, is_model_filename, is_projector_filename, pick_projector, quant_of_filename

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
MIN_PROGRESS = 1 << 20  # a download that gets less than this in LLMCTL_HUB_TIMEOUT seconds is stalled
MAX_API_BYTES = 32 << 20  # one JSON answer (search, repo info): the largest real ones are a few MB
MAX_ERROR_BYTES = 1 << 20  # the body of an error answer
# What reading one remote GGUF header may cost, retries included: the largest
# real headers (256k-token vocabularies with merges) are ~20 MB.
MAX_HEADER_BYTES = 64 << 20
MAX_HEADER_REQUESTS = 100


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


def _positive_seconds(variable: str, default: str) -> float:
    import math

    try:
        value = float(os.environ.get(variable, default))
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{variable} must be a positive number of seconds")
    return value


def read_timeout() -> float:
    """LLMCTL_HUB_TIMEOUT: the longest wait for the next bytes of an answer."""
    return _positive_seconds("LLMCTL_HUB_TIMEOUT", "30")


def deadline() -> float:
    """LLMCTL_HUB_DEADLINE: the longest one exchange with the Hub may take, start to end.

    An API answer (search, repo info, file metadata) or one remote header
    with all its range requests. A download's body has no such deadline.
    """
    return _positive_seconds("LLMCTL_HUB_DEADLINE", "120")


def _session() -> Any:
    """huggingface_hub's shared HTTP client, bounded by ``llmctl.models.hubhttp``."""
    from huggingface_hub.utils import get_session

    hubhttp.install_in_huggingface_hub()
    return get_session()


def _api_call(what: str = "the Hub's answer") -> Any:
    """The bounds of one API exchange: the deadline and a body cap for JSON."""
    return hubhttp.limited(deadline(), MAX_API_BYTES, what=what)


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
    if isinstance(exc, hubhttp.Unreachable):
        return True
    if type(exc).__name__ == "HTTPStatusError":
        return False
    module = type(exc).__module__
    return module.startswith(("httpx", "httpcore", "httpx2", "httpcore2", "h11", "ssl", "socket")) or isinstance(exc, (ConnectionError, TimeoutError))


def _cause(exc: BaseException) -> BaseException | None:
    """What an LlmctlError translated from ``exc`` is raised ``from``: the original under
    LLMCTL_DEBUG=1, so its traceback shows what the library or the network did; otherwise nothing."""
    from llmctl.config import debug_enabled

    return exc if debug_enabled() else None


@contextmanager
def hub_errors(repo_id: str | None = None, *, answer: bool = False) -> Iterator[None]:
    """Translate huggingface_hub and network exceptions into LlmctlErrors.

    With ``answer=True`` (only around a library call, none of llmctl's own
    code) an answer the library cannot parse (HTML, invalid UTF-8, JSON of
    the wrong shape) becomes a HubError too.
    """
    from huggingface_hub import errors as hf

    what = repo_id or "the Hub"
    try:
        with _rejected_token():
            yield
    except LlmctlError:
        raise
    except hubhttp.LimitExceeded as exc:
        raise HubError(exc.message, hint=exc.hint) from _cause(exc)
    except hubhttp.Unreachable as exc:
        raise HubError(
            f"cannot reach the Hub at {endpoint()}: {exc.reason}",
            hint="check your connection, HTTPS_PROXY or HF_ENDPOINT; models already pulled keep working",
        ) from _cause(exc)
    except hf.HFValidationError as exc:
        raise UsageError(f"'{what}' is not a valid Hub repo id: {exc}", hint="repo ids look like owner/name") from _cause(exc)
    except hf.GatedRepoError as exc:
        raise HubError(
            f"{what} is gated: its licence must be accepted on the Hub",
            hint=f"open {endpoint()}/{repo_id}, accept the terms, then set HF_TOKEN to a token of that account",
        ) from _cause(exc)
    except hf.RepositoryNotFoundError as exc:
        raise NotFoundError(
            f"no repository '{what}' on the Hub (or it is private)",
            hint="check the name with `llmctl search`; for a private repo set HF_TOKEN",
        ) from _cause(exc)
    except hf.RevisionNotFoundError as exc:
        raise NotFoundError(f"{what}: no such revision", hint="check the branch, tag or commit") from _cause(exc)
    except hf.EntryNotFoundError as exc:
        raise NotFoundError(f"{what}: no such file", hint=f"list its files with `llmctl search {what} --files`") from _cause(exc)
    except hf.OfflineModeIsEnabled as exc:
        raise HubError("HF_HUB_OFFLINE is set, so the Hub cannot be reached", hint="unset HF_HUB_OFFLINE") from _cause(exc)
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(
            f"the Hub answered HTTP {status} for {what}",
            hint="try again later; `LLMCTL_DEBUG=1` shows details",
        ) from _cause(exc)
    except Exception as exc:  # noqa: BLE001 - network failures arrive as many types
        if _is_network_error(exc):
            raise HubError(
                f"cannot reach the Hub at {endpoint()}: {type(exc).__name__}",
                hint="check your connection, HTTPS_PROXY or HF_ENDPOINT; models already pulled keep working",
            ) from _cause(exc)
        if answer and isinstance(exc, (ValueError, KeyError, TypeError, AttributeError)):
            # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise HubError(
                f"the Hub at {endpoint()} answered with something that is not the JSON it should be ({type(exc).__name__})"
                + (f" for {repo_id}" if repo_id else ""),
                hint="check that HF_ENDPOINT points at the Hub or a faithful mirror (a proxy or login page may be answering)",
            ) from _cause(exc)
        raise


@contextmanager
def _rejected_token() -> Iterator[None]:
    """A 401 to a request that carried a token means the token itself was refused.

    Without a token the Hub answers 401 for gated, private and missing repos
    alike (huggingface_hub raises its gated or not-found errors); with one, a
    gated repo whose terms are not accepted gets 403, so a 401 says the token
    itself is invalid, expired or revoked.
    """
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.HfHubHTTPError as exc:
        response = exc.response
        if response is None or response.status_code != 401:
            raise
        try:
            sent = "authorization" in response.request.headers
        except RuntimeError:  # a response without its request
            sent = False
        if not sent:
            raise
        raise HubError(
            "the Hub rejected the token llmctl sent (invalid, expired or revoked)",
            hint=f"check or refresh HF_TOKEN (or the token saved by `hf auth login`); new tokens: {endpoint()}/settings/tokens",
        ) from _cause(exc)


def _api() -> Any:
    from huggingface_hub import HfApi

    _quiet_library()
    hubhttp.install_in_huggingface_hub()
    return HfApi(endpoint=endpoint(), token=_token())


def _quiet_library() -> None:
    """huggingface_hub logs its retries as warnings; llmctl reports failures itself."""
    from llmctl.config import debug_enabled

    if not debug_enabled():
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


# What a caller shows while waiting on the Hub (a spinner with this text): the core prints nothing itself.
Status = Callable[[str], AbstractContextManager[Any]]


def silent(_message: str) -> AbstractContextManager[Any]:
    """A Status that shows nothing."""
    return nullcontext()


# --- search --------------------------------------------------------------------------


class SearchSort(str, Enum):
    """``search --sort``: what orders the results (largest or newest first)."""

    downloads = "downloads"
    likes = "likes"
    updated = "updated"
    trending = "trending"


_HUB_SORT_KEY = {SearchSort.downloads: "downloads", SearchSort.likes: "likes", SearchSort.updated: "last_modified", SearchSort.trending: "trending_score"}


@dataclass
class SearchHit:
    repo_id: str
    downloads: int | None
    likes: int | None
    updated: str | None
    parameters: int | None
    catalog_name: str | None = None


def search_models(query: str, *, author: str | None, limit: int, sort: SearchSort) -> list[SearchHit]:
    _check_online()
    api = _api()
    with hub_errors(answer=True), _api_call("the Hub's search answer"):
        models = list(
            api.list_models(
                search=query or None,
                author=author,
                filter="gguf",
                sort=_HUB_SORT_KEY[sort],
                limit=limit,
                expand=["downloads", "likes", "lastModified", "gguf"],
            )
        )
    hits = []
    for model in models:
        if not isinstance(model.id, str):
            raise HubError(f"the Hub's search answer holds a repo id that is not text: {model.id!r:.60}", hint="check HF_ENDPOINT")
        gguf_meta = getattr(model, "gguf", None) or {}
        last_modified: Any = getattr(model, "last_modified", None)
        hits.append(
            SearchHit(
                repo_id=model.id,
                downloads=_count(model.downloads),
                likes=_count(model.likes),
                updated=last_modified.date().isoformat() if hasattr(last_modified, "date") else None,
                parameters=_count(gguf_meta.get("total")) if isinstance(gguf_meta, dict) else None,
            )
        )
    return hits


def _count(value: object) -> int | None:
    """A count from the Hub's JSON, or None when it is not a plain non-negative integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


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
    projectors: list[RemoteFile] = field(default_factory=list)  # multimodal projectors (``mmproj`` GGUFs)

    def projector_for(self, model: RemoteModel) -> RemoteFile | None:
        """The projector a pull of ``model`` fetches with it (``names.pick_projector``), if the repo has one."""
        chosen = pick_projector(model.files[0].path, [p.path for p in self.projectors])
        return next((p for p in self.projectors if p.path == chosen), None)


_UNSAFE = re.compile(r"(^|/)\.\.?(/|$)|\\|^/|//|[\x00-\x1f]")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_FILE_SIZE = 4 << 40  # 4 TiB: over ten times the largest single GGUF file on the Hub


def check_safe_filename(path: str) -> None:
    """Refuse repo paths that could write outside the cache (``..``, absolute, backslashes)."""
    if not isinstance(path, str) or not path or _UNSAFE.search(path) or ":" in path.split("/")[0] or len(path) > 1024:
        raise HubError(f"refusing a file name from the Hub that could escape the cache: {path!r:.200}", hint="report the repo")


def check_commit(commit: object, repo_id: str) -> str:
    """A commit id from the Hub, which becomes a folder name: exactly 40 lowercase hex digits."""
    if not isinstance(commit, str) or not hfcache.COMMIT_RE.fullmatch(commit):
        raise HubError(
            f"the Hub answered with an invalid commit id for {repo_id}: {commit!r:.80}",
            hint="check that HF_ENDPOINT points at the Hub or a faithful mirror; report the repo if it does",
        )
    return commit


def list_repo(repo_id: str, revision: str | None = None) -> RepoListing:
    """The repo's GGUF models (split files grouped) and projectors at a commit, with sizes and LFS sha256."""
    from llmctl.gguf import SPLIT_RE

    check_revision(revision)
    _check_online()
    api = _api()
    with hub_errors(repo_id, answer=True), _api_call(f"the Hub's answer for {repo_id}"):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    commit = check_commit(info.sha, repo_id)
    files: dict[str, RemoteFile] = {}
    others, projectors = [], []
    for sibling in info.siblings or []:
        name = sibling.rfilename
        if not isinstance(name, str):
            raise HubError(f"the Hub lists a file name of {repo_id} that is not text: {name!r:.60}", hint="check HF_ENDPOINT")
        if not (is_model_filename(name) or is_projector_filename(name)):
            others.append(name)  # not GGUF, or an importance matrix
            continue
        check_safe_filename(name)  # a model or projector file's name becomes a path in the cache
        lfs = sibling.lfs
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        size = getattr(lfs, "size", None) if lfs is not None else None
        remote = RemoteFile(name, _checked_size(size if size is not None else sibling.size or 0, repo_id, name), _checked_sha(sha, repo_id, name))
        if is_projector_filename(name):
            projectors.append(remote)  # loaded beside a model (llama-server --mmproj), never as one
        else:
            files[name] = remote
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
    return RepoListing(repo_id, commit, models, bool(info.gated), others, sorted(projectors, key=lambda p: p.path))


def _checked_size(size: object, repo_id: str, name: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
        raise HubError(
            f"the Hub lists {repo_id}/{name} with an impossible size: {size!r:.40}",
            hint=f"llmctl accepts files up to {MAX_FILE_SIZE >> 40} TiB; check HF_ENDPOINT, or report the repo",
        )
    return size


def _checked_sha(sha: object, repo_id: str, name: str) -> str | None:
    if sha is None:
        return None
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
        raise HubError(f"the Hub lists {repo_id}/{name} with an invalid sha256: {sha!r:.80}", hint="check HF_ENDPOINT, or report the repo")
    return sha.lower()


# --- remote headers -----------------------------------------------------------------


class HubSource:
    """A file on the Hub as a ByteSource: HTTP range requests, following redirects.

    Bounded as a whole: one deadline (LLMCTL_HUB_DEADLINE) for all its
    requests together, at most ``MAX_HEADER_REQUESTS`` requests (retries
    included) and ``MAX_HEADER_BYTES`` received, and each answer read only
    up to the bytes asked for. A server that claims a huge file and serves
    anything it is asked for cannot make a header read walk on.
    """

    def __init__(self, repo_id: str, path: str, commit: str, size: int) -> None:
        from huggingface_hub import hf_hub_url

        self.name = f"{repo_id}/{path}"
        self.size = size
        self.url = hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint())
        self.requests = 0
        self.received = 0
        self._seconds = deadline()
        self._deadline = time.monotonic() + self._seconds

    def read_at(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers

        end = min(offset + length, self.size) - 1
        if end < offset:
            return b""
        want = end - offset + 1
        if self.received + want > MAX_HEADER_BYTES:
            raise self._too_big()
        headers = build_hf_headers(token=_token())
        headers["Range"] = f"bytes={offset}-{end}"
        headers["Accept-Encoding"] = "identity"
        what = f"reading the header of {self.name}"
        for attempt in range(max_retries() + 1):
            if self.requests >= MAX_HEADER_REQUESTS:
                raise self._too_big()
            try:
                self.requests += 1
                with (
                    hubhttp.limited(self._seconds, deadline=self._deadline, what=what),
                    _session().stream("GET", self.url, headers=headers, follow_redirects=True, timeout=read_timeout()) as response,
                ):
                    if response.status_code == 206:
                        _check_content_range(response, offset, self.name)
                        body = self._read(response, want)
                        if len(body) < want:
                            raise _Retryable(f"a short answer ({len(body)} of {want} bytes)")
                        return body
                    if response.status_code == 200:  # a server that ignores Range: read only as far as needed
                        return self._read(response, end + 1)[offset : end + 1]
                    if response.status_code < 500:
                        hubhttp.cap_body(response, MAX_ERROR_BYTES)
                        response.read()
                        _raise_for_status(response)
                        raise HubError(f"unexpected HTTP {response.status_code} while reading {self.name}")
            except Exception as exc:  # noqa: BLE001
                if not (isinstance(exc, _Retryable) or _is_network_error(exc)) or attempt == max_retries():
                    if isinstance(exc, _Retryable):
                        raise HubError(f"the Hub kept failing while reading {self.name} ({exc})", hint="try again later") from None
                    with hub_errors(self.name):
                        raise
            _backoff(attempt)
        raise HubError(f"the Hub kept failing while reading {self.name}", hint="try again later")

    def _read(self, response: Any, most: int) -> bytes:
        """The body, up to ``most`` bytes: a 206 that goes on past them is refused; a 200 is cut there."""
        body = bytearray()
        for chunk in response.iter_raw():
            self.received += len(chunk)
            body += chunk
            if len(body) > most and response.status_code == 206:
                raise HubError(
                    f"the Hub sent more than the {most:,} bytes asked for while reading {self.name}",
                    hint="check that HF_ENDPOINT points at the Hub or a faithful mirror, and any proxy in between",
                )
            if len(body) >= most and response.status_code != 206:
                break  # the rest of a whole file that was sent instead of a range
            if self.received > MAX_HEADER_BYTES:
                raise self._too_big()
        return bytes(body[:most])

    def _too_big(self) -> HubError:
        return HubError(
            f"reading the header of {self.name} needs more than {MAX_HEADER_BYTES >> 20} MiB "
            f"or {MAX_HEADER_REQUESTS} requests; llmctl reads no more than that from the Hub",
            hint="no real model's header is that large: the file or the server is broken",
        )


def _check_content_range(response: Any, offset: int, name: str) -> None:
    """A 206 must be the bytes asked for: where it says which, they must start at ``offset``."""
    value = response.headers.get("content-range")
    if value is None:
        return
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if match is None or int(match[1]) != offset:
        raise HubError(
            f"the Hub answered a range request for {name} with other bytes ({value[:80]!r})",
            hint="check that HF_ENDPOINT points at the Hub or a faithful mirror, and any proxy in between",
        )


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
            while (queued := self._queue.get()) is not None:
                if not self._stop.is_set():
                    self._digest.update(queued)
                    self.size += len(queued)
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
    resumed: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Path:
    """Fetch one file into the HF cache layout, resuming a partial; returns the snapshot path.

    ``progress(n)`` is told of bytes this run moves; ``resumed(n)`` of bytes already on disk
    (a partial, or a blob another pull finished), which count towards the total but not the rate.
    """
    from huggingface_hub import hf_hub_url

    check_safe_filename(remote.path)
    check_commit(commit, repo_id)
    _check_size(remote)
    _check_online()
    url = hf_hub_url(repo_id, remote.path, revision=commit, endpoint=endpoint())
    sha = (remote.sha256 or "").lower()
    if not _SHA256.fullmatch(sha):
        from huggingface_hub import get_hf_file_metadata

        with hub_errors(repo_id, answer=True), _api_call(f"the Hub's answer for {repo_id}/{remote.path}"):
            hubhttp.install_in_huggingface_hub()
            meta = get_hf_file_metadata(url, token=_token(), timeout=read_timeout())
        sha = (meta.etag or "").lower()
        if not _SHA256.fullmatch(sha):
            raise HubError(f"{repo_id}/{remote.path} has no sha256 on the Hub; refusing an unverifiable download")
    at = hfcache.file_paths(cache, repo_id, commit, remote.path, sha)
    with exclusive_lock(at.lock, on_wait=on_wait):
        if not (at.blob.exists() and at.blob.stat().st_size == remote.size):
            _transfer(url, at.partial, remote, sha, progress, resumed or progress)
            os.replace(at.partial, at.blob)
        elif resumed:
            resumed(remote.size)
        hfcache.link_snapshot(at.snapshot, at.blob, at.folder)  # under the lock: a second pull of the same file waits for it
    return at.snapshot


def _check_size(remote: RemoteFile) -> None:
    if not 0 <= remote.size <= MAX_FILE_SIZE:
        raise HubError(f"{remote.path}: an impossible size from the Hub ({remote.size})", hint="report the repo")


def _transfer(
    url: str,
    partial: Path,
    remote: RemoteFile,
    sha: str,
    progress: Callable[[int], None] | None,
    resumed: Callable[[int], None] | None = None,
) -> None:
    """Grow ``partial`` to the full file with Range requests, verifying its sha256 as it grows.

    The hash runs on a second thread (``_Hasher``), over the bytes already in
    the file and then over each chunk as it is written, so resumed bytes are
    covered the same way and no second pass over the file is needed.

    No total deadline cuts a download (a large file on a slow link takes as
    long as it takes): each answer must begin within LLMCTL_HUB_DEADLINE, no
    read may wait longer than LLMCTL_HUB_TIMEOUT, and less than
    ``MIN_PROGRESS`` in any LLMCTL_HUB_TIMEOUT seconds counts as a stall, so
    a server trickling a byte at a time is retried and then given up on
    like one that stopped.
    """
    from huggingface_hub.utils import build_hf_headers

    _tune_read_size()
    stall = read_timeout()
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > remote.size:
        partial.unlink()
        have = 0
    if resumed and have:
        resumed(have)
    partial.touch()  # exists even for a 0-byte file, which no chunk will create
    hasher = _Hasher(partial, have)  # from here on, given every byte the file gains
    # The retry budget counts consecutive answers that did not move the download on. Only growth past
    # the largest size the file has had (its high-water mark), by at least MIN_PROGRESS or to the end,
    # refills it: a server that answers every resumed request from byte 0 with a short body
    # re-sends the same bytes for ever, and must run out of retries like one that fails outright.
    largest = have
    attempt = 0
    try:
        while have < remote.size:
            restarted = False
            headers = build_hf_headers(token=_token())
            headers["Accept-Encoding"] = "identity"
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                with (
                    hubhttp.limited(deadline(), what=f"the Hub's answer for {remote.path}") as limits,
                    _session().stream("GET", url, headers=headers, follow_redirects=True, timeout=read_timeout()) as response,
                ):
                    # The answer has begun within the deadline; its body may take as long as it needs
                    # while it keeps moving (the stall timeout and the progress rule below).
                    limits.lift_deadline()
                    if response.status_code == 200 and have:  # the server ignored Range: start over
                        if resumed:
                            resumed(-have)  # the bar goes back to 0 with the file; what moved still moved
                        have = 0
                        restarted = True
                        mode = "wb"
                        hasher.abandon()
                        hasher = _Hasher(partial, 0)
                    elif response.status_code in (200, 206):
                        mode = "ab" if have else "wb"
                    elif response.status_code >= 500 or response.status_code == 429:
                        raise _Retryable(f"HTTP {response.status_code}")
                    else:
                        with hub_errors(remote.path):
                            hubhttp.cap_body(response, MAX_ERROR_BYTES)
                            response.read()
                            _raise_for_status(response)
                        raise HubError(f"unexpected HTTP {response.status_code} for {remote.path}")
                    window_start, window_bytes = time.monotonic(), 0
                    with open(partial, mode) as out:
                        for chunk in response.iter_raw():  # as received: no re-chunking copies
                            out.write(chunk)
                            hasher.feed(chunk)
                            have += len(chunk)
                            if progress:
                                progress(len(chunk))
                            if have > remote.size:
                                break
                            window_bytes += len(chunk)
                            if time.monotonic() - window_start >= stall:
                                if window_bytes < MIN_PROGRESS:  # a trickle: as good as a stall
                                    raise _Retryable(f"less than {MIN_PROGRESS >> 20} MiB in {stall:g} s")
                                window_start, window_bytes = time.monotonic(), 0
                grew = have - largest
                largest = max(largest, have)
                if have < remote.size:
                    if restarted:  # counts against the budget even when it got further than before
                        raise _Retryable(f"the server ignored Range, sent the file from byte 0 and stopped at byte {have}")
                    if grew < MIN_PROGRESS:
                        raise _Retryable(f"the answer ended with {max(grew, 0)} new bytes")
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
                largest = max(largest, have)
        digest, size = hasher.finish()
    except BaseException:
        hasher.abandon()
        raise
    if have != remote.size or size != remote.size or digest != sha:
        partial.unlink(missing_ok=True)
        raise ChecksumError(
            f"{remote.path}: downloaded file does not match the Hub's checksum (sha256 {digest[:16]}…, expected {sha[:16]}…); it was deleted",
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
