"""``bench --serve``: a serving benchmark, measured from the client's side of an OpenAI-compatible
server (``llmctl serve``, ``llama-server``, or any server that streams OpenAI's API).

The method:

- The server is one already running at a URL, or a fresh ``llmctl serve`` started for the run on a
  free loopback port (``fresh_server``) and stopped after it. ``LLMCTL_API_KEY``, when set, is sent
  as a Bearer token (and a fresh server, which inherits the environment, requires it).
- Prompts are words of a fixed text, as many as make ``n_prompt`` tokens in the server's own count:
  a few non-streaming one-token requests read ``usage.prompt_tokens`` until the count is met
  (``calibrate``), so chat templates and BOS tokens count too and any tokenizer is right. Each
  request's prompt starts at a different word of the text, so that no request finds its prompt in
  the server's prompt cache (llama-server reuses the longest common prefix of a slot's last prompt).
  ``prompt_tokens`` in the results is the mean the server reported for the timed requests.
- Generation asks ``max_tokens`` = ``n_gen`` with ``ignore_eos`` (llama-server honours it), so
  every request generates exactly ``n_gen`` tokens; a server that refuses the field is asked again
  without it, and ``completion_tokens`` (from the usage chunk, else the content events) tells what
  was generated. Greedy sampling (temperature 0).
- A warm-up request (streaming, the first level's prompt) precedes the levels: it loads the model
  on a server that loads on demand, and checks that streaming works.
- A level is ``concurrency`` clients × ``n_prompt`` × ``n_gen``, run ``repetitions`` times: each
  round starts ``concurrency`` streaming requests at once (one connection each) and ends when the
  last one does. Per round, the aggregate rate is every completion token of the round ÷ the round's
  wall time; per request, TTFT runs from sending the request to the first content token, and its
  generation rate is the tokens after the first ÷ first to last content token. A level reports the
  rounds' mean aggregate rate ± their standard deviation, TTFT p50 and p95 over all its requests,
  and the mean per-request rate.
- A request that fails (an HTTP error, an error event in the stream, a stream that ends without
  its end, a dropped connection, a timeout, no tokens) is counted and its reason kept; it is left
  out of every figure, and the level's status says how many failed and why.

httpx is huggingface_hub's own (``httpx2`` under huggingface_hub 2, ``httpx`` under 1), imported
when a benchmark runs. Redirects are not followed (the API key stays with the server named), and
proxy settings from the environment are not used (a benchmark measures the server, not a proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from llmctl.bench.choices import Endpoint
from llmctl.bench.measure import test_name
from llmctl.bench.run import BenchRun, ServingRow
from llmctl.errors import LlmctlError, NotFoundError, UsageError
from llmctl.fileio import now_iso

FRESH_COMMAND = [sys.executable, "-m", "llmctl", "serve"]
STARTUP_TIMEOUT_S = 120.0
MAX_ERROR_TEXT = 300

# A fixed text, so that prompts are the same from run to run: common words, each one token (after a space)
# in the usual tokenizers, so that a prompt of N words starting at any word is about as long as any other.
TEXT = (
    "the old man lived in a house by the sea and every night he went up to the top of the tower to light the lamp "
    "he knew each step by the sound it made under his feet and he could find his way up in the dark "
    "from the top he could see the town and the boats coming home with their lights on and the long line of the land "
    "on clear nights the light could be seen far out at sea and the men on the boats would look for it and think of him as a friend "
    "he kept a book of every ship that went past and the weather at each hour and the small things he had to fix in the tower "
    "in the cold months the wind came in hard from the west and the water hit the walls and the whole tower would shake "
    "those were the nights he liked best when his work was most needed and the light stayed on while the sea did all it could to put it out "
    "in the warm months people came to see the tower and the children wanted to go up the stairs and look at the great glass "
    "he let them and told them how the light was made to turn and how the glass made it into one strong line "
    "and how for a hundred years no ship had been lost on the rocks below while a man was there to keep the light"
).split()
WORD_STEP = 37  # each request's prompt starts this many words after the last one's (prime to the text's 253 words)


PATHS = {Endpoint.completions: "/v1/completions", Endpoint.chat: "/v1/chat/completions"}


@dataclass
class ServingPlan:
    """What to measure: every (prompt length, generation length, concurrency), ``repetitions`` rounds each."""

    concurrency: list[int]
    n_prompt: list[int]
    n_gen: list[int]
    repetitions: int = 3
    endpoint: Endpoint = Endpoint.completions
    request_timeout_s: float = 600.0  # longest wait for the next bytes of an answer (queued requests wait too)

    def levels(self) -> list[tuple[int, int, int]]:
        """(n_prompt, n_gen, concurrency) of every level, in the order they run."""
        return [(p, g, c) for p in self.n_prompt for g in self.n_gen for c in self.concurrency]


@dataclass
class Server:
    """The server benchmarked: its base URL (without ``/v1``), the key to send, whether it was started for the run."""

    url: str
    api_key: str | None = None
    fresh: bool = False

    @classmethod
    def at(cls, url: str, *, fresh: bool = False) -> Server:
        """The server at ``url``, with the key from ``LLMCTL_API_KEY``."""
        url = url.rstrip("/")
        if "://" not in url:
            url = "http://" + url
        return cls(url.removesuffix("/v1"), os.environ.get("LLMCTL_API_KEY") or None, fresh)


@dataclass
class RequestResult:
    """One streaming request; times in seconds from the start of its round."""

    sent_s: float
    ended_s: float
    first_s: float | None = None  # first content token
    last_s: float | None = None  # last content token
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.sent_s

    @property
    def generation_ts(self) -> float | None:
        """Tokens after the first ÷ first to last content token."""
        if self.first_s is None or self.last_s is None or self.completion_tokens < 2 or self.last_s <= self.first_s:
            return None
        return (self.completion_tokens - 1) / (self.last_s - self.first_s)


# --- figures ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the two nearest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(row: ServingRow, rounds: list[list[RequestResult]]) -> None:
    """Fill ``row``'s figures from its rounds' requests (the module docstring says how)."""
    done = [r for results in rounds for r in results]
    good = [r for r in done if r.ok]
    row.requests, row.failed = len(done), len(done) - len(good)
    reasons = Counter(r.error for r in done if r.error)
    row.errors = [f"{count} × {reason}" for reason, count in reasons.most_common()]
    rates = []
    for results in rounds:
        wall = max((r.ended_s for r in results), default=0.0)
        tokens = sum(r.completion_tokens for r in results if r.ok)
        if wall > 0 and tokens:
            rates.append(tokens / wall)
    row.samples_ts = [round(v, 3) for v in rates]
    if rates:
        row.avg_ts = round(statistics.fmean(rates), 3)
        row.stddev_ts = round(statistics.stdev(rates), 3) if len(rates) > 1 else 0.0
        row.noisy = row.avg_ts > 0 and row.stddev_ts / row.avg_ts > 0.10
    ttfts = [t for r in good if (t := r.ttft_s) is not None]
    row.samples_ttft_s = [round(t, 5) for t in ttfts]
    if ttfts:
        row.ttft_p50_s = round(percentile(ttfts, 50), 5)
        row.ttft_p95_s = round(percentile(ttfts, 95), 5)
    per_request = [v for r in good if (v := r.generation_ts) is not None]
    row.samples_request_ts = [round(v, 3) for v in per_request]
    row.request_ts = round(statistics.fmean(per_request), 3) if per_request else None
    prompts = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
    row.prompt_tokens = round(statistics.fmean(prompts), 1) if prompts else None
    row.completion_tokens = round(statistics.fmean(r.completion_tokens for r in good), 1) if good else None
    if row.failed:
        row.status = f"failed: {row.failed} of {row.requests} requests ({reasons.most_common(1)[0][0]})"


# --- prompts ------------------------------------------------------------------------------------


def prompt_text(n_words: int, offset: int = 0) -> str:
    """``n_words`` words of the fixed text, starting at word ``offset`` (cycled)."""
    return " ".join(TEXT[(offset + i) % len(TEXT)] for i in range(n_words))


async def calibrate(count: Callable[[int], Awaitable[int | None]], target: int, *, tries: int = 8) -> tuple[int, int | None]:
    """The number of words whose prompt the server counts as ``target`` tokens (or the nearest it
    found, fewer preferred), and that count; ``count`` returns the server's count for a number of
    words, None when the server does not report usage (the words are then a guess, ¾ of a word a token)."""
    words = max(1, round(target * 0.75))
    seen: dict[int, int] = {}
    for _ in range(tries):
        tokens = await count(words)
        if tokens is None:
            return words, None
        seen[words] = tokens
        if tokens == target:
            break
        points = sorted(seen.items())
        if len(points) > 1:  # the slope of the two tries nearest the target
            (w1, t1), (w2, t2) = sorted(points, key=lambda p: abs(p[1] - target))[:2]
            slope = (t2 - t1) / (w2 - w1) if w2 != w1 and t2 != t1 else tokens / words
        else:
            slope = tokens / words
        step = round((target - tokens) / max(slope, 0.05))
        step = step or (1 if tokens < target else -1)
        nxt = max(1, words + step)
        if nxt in seen:
            nxt = max(1, words + (1 if tokens < target else -1))
        if nxt in seen:
            break
        words = nxt
    best = min(seen.items(), key=lambda p: (abs(p[1] - target), p[1] > target))
    return best


# --- the client ---------------------------------------------------------------------------------


def _httpx() -> Any:
    """huggingface_hub's httpx: httpx2 under huggingface_hub 2, httpx under 1."""
    try:
        return importlib.import_module("httpx2")
    except ImportError:
        return importlib.import_module("httpx")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


def _error_message(status: int, raw: bytes) -> str:
    """An HTTP error as one line: the status and the server's own message where it sent one."""
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error") or data["detail"]
    except (ValueError, KeyError, TypeError, AttributeError):
        message = raw.decode("utf-8", "replace")
    return _short(f"HTTP {status}: {message}" if message else f"HTTP {status}")


class _Client:
    """The requests of one benchmark against one server and model."""

    def __init__(self, server: Server, model: str, plan: ServingPlan, max_connections: int) -> None:
        httpx = self.httpx = _httpx()
        headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
        self.server, self.model, self.plan = server, model, plan
        self.ignore_eos = True
        self.client = httpx.AsyncClient(
            base_url=server.url,
            headers=headers,
            timeout=httpx.Timeout(plan.request_timeout_s, connect=10.0, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            trust_env=False,
        )

    async def close(self) -> None:
        await self.client.aclose()

    def _unreachable(self, exc: Exception) -> LlmctlError:
        reason = str(exc) or type(exc).__name__
        hint = "is the server still running?" if self.server.fresh else "start one with `llmctl serve`, or leave out --server to start a fresh one"
        return LlmctlError(f"no server at {self.server.url} ({_short(reason)})", hint=hint)

    def _refusal(self, status: int, raw: bytes) -> LlmctlError:
        """A request the server refused before the benchmark began, as the error a user reads."""
        url = self.server.url
        if status in (401, 403):
            if self.server.api_key:
                return LlmctlError(f"{url} refused the API key (HTTP {status})", hint="set LLMCTL_API_KEY to the server's key")
            return LlmctlError(f"{url} needs an API key (HTTP {status})", hint="set LLMCTL_API_KEY to the server's key")
        if status == 404:
            return NotFoundError(f"{url} has no model '{self.model}' ({_error_message(status, raw)})", hint="its models: GET /v1/models")
        return LlmctlError(f"{url} refused a request: {_error_message(status, raw)}")

    async def get(self, path: str) -> tuple[int, Any]:
        """GET ``path``: its status and JSON answer (None if not JSON); unreachable servers raise."""
        try:
            response = await self.client.get(path)
        except self.httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def models(self) -> list[str]:
        """The server's model names (``GET /v1/models``); auth and unreachable servers raise."""
        status, data = await self.get("/v1/models")
        if status in (401, 403) or (status >= 400 and status != 404):
            raise self._refusal(status, json.dumps(data).encode() if data is not None else b"")
        items = data.get("data") if isinstance(data, dict) else None
        return [str(m["id"]) for m in items if isinstance(m, dict) and "id" in m] if isinstance(items, list) else []

    async def props(self) -> tuple[str | None, int | None]:
        """llama-server's build and number of slots (``GET /props``), where the server tells them."""
        with contextlib.suppress(LlmctlError):
            status, data = await self.get("/props")
            if status == 200 and isinstance(data, dict):
                slots = data.get("total_slots")
                build = data.get("build_info")
                return (str(build) if build else None), (slots if isinstance(slots, int) else None)
        return None, None

    def body(self, text: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if self.plan.endpoint is Endpoint.chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def count_prompt(self, words: int) -> int | None:
        """The server's count of the prompt of ``words`` words (one generated token, not streamed)."""
        path = PATHS[self.plan.endpoint]
        try:
            response = await self.client.post(path, json=self.body(prompt_text(words), 1, stream=False))
            if response.status_code == 400 and self.ignore_eos:  # perhaps a server that refuses ignore_eos: ask without it
                self.ignore_eos = False
                retry = await self.client.post(path, json=self.body(prompt_text(words), 1, stream=False))
                if retry.status_code == 200:
                    response = retry
                else:
                    self.ignore_eos = True
        except self.httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code != 200:
            raise self._refusal(response.status_code, response.content)
        try:
            usage = response.json().get("usage") or {}
        except (ValueError, AttributeError):
            raise LlmctlError(f"{self.server.url}{path} did not answer with JSON", hint="is it an OpenAI-compatible server?") from None
        tokens = usage.get("prompt_tokens")
        return tokens if isinstance(tokens, int) else None

    async def stream(self, text: str, max_tokens: int, round_start: float) -> RequestResult:
        """One streaming request, timed from ``round_start``; failures end up in ``error``, never raised."""
        now = time.perf_counter
        result = RequestResult(sent_s=now() - round_start, ended_s=0.0)
        events, finished = 0, False
        try:
            async with self.client.stream("POST", PATHS[self.plan.endpoint], json=self.body(text, max_tokens, stream=True)) as response:
                if response.status_code != 200:
                    result.error = _error_message(response.status_code, (await response.aread())[:4096])
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            finished = True
                            break
                        chunk = json.loads(data)
                        if not isinstance(chunk, dict):
                            continue
                        if chunk.get("error"):
                            error = chunk["error"]
                            result.error = _short("error event: " + str(error.get("message", error) if isinstance(error, dict) else error))
                            break
                        if _content(chunk):
                            stamp = now() - round_start
                            if result.first_s is None:
                                result.first_s = stamp
                            result.last_s = stamp
                            events += 1
                        if any(isinstance(c, dict) and c.get("finish_reason") for c in chunk.get("choices") or []):
                            finished = True  # a server that ends without [DONE] after its last choice
                        usage = chunk.get("usage")
                        if isinstance(usage, dict):
                            result.completion_tokens = int(usage.get("completion_tokens") or 0)
                            prompt = usage.get("prompt_tokens")
                            result.prompt_tokens = prompt if isinstance(prompt, int) else None
        except self.httpx.TimeoutException:
            result.error = f"timed out (no answer for {self.plan.request_timeout_s:g} s)"
        except self.httpx.HTTPError as exc:
            result.error = _short(f"connection lost: {str(exc) or type(exc).__name__}")
        except ValueError as exc:  # a data line that is not JSON
            result.error = _short(f"malformed stream: {exc}")
        result.ended_s = now() - round_start
        if not result.completion_tokens:
            result.completion_tokens = events
        if result.error is None and not finished:
            result.error = "the stream ended before its end ([DONE])"
        if result.error is None and result.first_s is None:
            result.error = "no tokens generated"
        return result


def _content(chunk: dict[str, Any]) -> bool:
    """Whether a stream chunk carries generated text (completions' ``text``, chat's ``content`` or ``reasoning_content``)."""
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
            return True
    return False


# --- a run ----------------------------------------------------------------------------------------


async def _bench_model(
    run: BenchRun, server: Server, model: str, plan: ServingPlan, on_row: Callable[[ServingRow], None] | None, on_step: Callable[[str], None] | None
) -> None:
    client = _Client(server, model, plan, max(plan.concurrency) + 1)
    try:
        build, slots = await client.props()
        offset = 0
        warm = False
        for p in plan.n_prompt:
            if on_step:
                on_step(f"{model}: sizing a {p}-token prompt")
            words, _ = await calibrate(client.count_prompt, p)
            if not warm:
                if on_step:
                    on_step(f"{model}: warm-up request")
                first = await client.stream(prompt_text(words), min(plan.n_gen[0], 16), time.perf_counter())
                if not first.ok:
                    raise LlmctlError(f"{server.url}: the warm-up request failed: {first.error}")
                warm = True
            for g in plan.n_gen:
                for c in plan.concurrency:
                    row = ServingRow(model, server.url, plan.endpoint.value, c, p, g, test_name(p, g), now_iso(), plan.repetitions,
                                     fresh=server.fresh, server_build=build, server_slots=slots, ignore_eos=client.ignore_eos)  # fmt: skip
                    if on_step:
                        on_step(f"{model}: {row.test}, {c} client{'s' if c > 1 else ''}")
                    rounds = []
                    for _ in range(plan.repetitions):
                        start = time.perf_counter()
                        texts = [prompt_text(words, (offset + i) * WORD_STEP) for i in range(c)]
                        offset += c
                        rounds.append(list(await asyncio.gather(*(client.stream(t, g, start) for t in texts))))
                    summarise(row, rounds)
                    run.serving.append(row)
                    if on_row:
                        on_row(row)
    finally:
        await client.close()


def bench_server(
    run: BenchRun,
    server: Server,
    model: str,
    plan: ServingPlan,
    *,
    on_row: Callable[[ServingRow], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Every level of ``plan`` for ``model`` on ``server``, appended to ``run.serving`` as each finishes.
    An unreachable server, a refused key, an unknown model or a failed warm-up raise ``LlmctlError``;
    failed requests during the levels are counted in the rows."""
    asyncio.run(_bench_model(run, server, model, plan, on_row, on_step))


def bench_serving(
    run: BenchRun,
    models: list[str],
    plan: ServingPlan,
    *,
    url: str | None = None,
    serve_args: list[str] | None = None,
    command: list[str] | None = None,
    on_row: Callable[[ServingRow], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> None:
    """``bench --serve``: every model on the server at ``url``, or on a fresh ``llmctl serve`` (started
    with ``serve_args``; ``command`` stands in for ``llmctl serve`` in tests). With no model named, the
    first the server lists. With several, one the server does not know is recorded in
    ``run.failed_models`` and the others run."""
    if url is None and not models:
        raise UsageError("name the models to benchmark on a fresh `llmctl serve`", hint="e.g. llmctl bench smollm2 --serve")
    opened = fresh_server(serve_args, command=command) if url is None else contextlib.nullcontext(Server.at(url))
    with opened as server:
        names = models or server_models(server)[:1]
        if not names:
            raise UsageError(f"{server.url} lists no model in GET /v1/models", hint="name the model: llmctl bench MODEL --server URL")
        for name in names:
            try:
                bench_server(run, server, name, plan, on_row=on_row, on_step=on_step)
            except NotFoundError as exc:
                if len(names) == 1:
                    raise
                run.fail_model(name, exc.message, exc.hint)


def server_models(server: Server) -> list[str]:
    """The names ``GET /v1/models`` lists (raises when the server is unreachable or refuses the key)."""

    async def ask() -> list[str]:
        client = _Client(server, "", ServingPlan([1], [1], [1]), 1)
        try:
            return await client.models()
        finally:
            await client.close()

    return asyncio.run(ask())


# --- a fresh server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:  # noqa: S310 - our own loopback server
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


@contextlib.contextmanager
def fresh_server(args: list[str] | None = None, *, command: list[str] | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[Server]:
    """A ``llmctl serve`` (or ``command``) started on a free loopback port with ``args``, ready
    (``/health`` answers 200) when it is yielded, and stopped after; its log is shown if it dies."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-serve-") as folder:
        log_path = Path(folder) / "serve.log"
        with open(log_path, "wb") as log:
            argv = [*(command or FRESH_COMMAND), "--host", "127.0.0.1", "--port", str(port), *(args or [])]
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _healthy(url):
                if child.poll() is not None:
                    raise LlmctlError(
                        f"the fresh `llmctl serve` exited ({child.returncode}) before it answered: {_tail(log_path) or 'no output'}",
                        hint="run `llmctl serve` by hand to see why",
                    )
                if time.monotonic() > deadline:
                    raise LlmctlError(
                        f"the fresh `llmctl serve` did not answer on {url} within {startup_timeout_s:g} s", hint="run `llmctl serve` by hand to see why"
                    )
                time.sleep(0.1)
            try:
                yield Server.at(url, fresh=True)
            except LlmctlError:
                if child.poll() is None:
                    raise
                died = True
            else:
                died = child.poll() is not None
            if died:
                raise LlmctlError(f"the fresh `llmctl serve` exited ({child.returncode}) during the benchmark: {_tail(log_path) or 'no output'}")
        finally:
            _stop(child)


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
