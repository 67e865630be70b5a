"""`llmctl serve` against the llama-server it drives, started by hand with the same binary and flags.

Method: the demo model is served by `llmctl serve` (a front over one llama-server child) and by
the same llama-server binary started by hand with the child's own command line (read from
/proc), both on loopback. `bench --serve`'s client (llmctl/bench/serving.py: streaming
requests, prompts sized in the server's tokens, replies of exactly n tokens with ignore_eos)
measures both, alternating server by server for every concurrency level and round, so host
noise falls on both sides alike.

Rows:
- aggregate completion t/s, llmctl serve ÷ llama-server by hand, at 1, 4 and 8 streaming
  clients: target ≥ 0.95 each;
- TTFT added by llmctl's front (p50 at 1 client, serve − by hand): target ≤ 5 ms;
- against the in-process server llmctl had before (the last commit with it, run from a git
  worktree) at 4 clients: target ≥ 1.8× aggregate;
- the child's RSS after the load and the warm-up against `fit --serve`'s estimate (info).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from common import ROOT, Row

from tools.demo_model import ensure_demo_model

LLMCTL = str(Path(sys.executable).with_name("llmctl"))
OLD_SERVER_COMMIT = "b2963e0"  # the last commit whose `llmctl serve` generated in-process
LEVELS = (1, 4, 8)
ROUNDS = int(os.environ.get("LLMCTL_BENCH_SERVE_ROUNDS", "5"))
N_PROMPT, N_GEN = 64, 128
TTFT_PAIRS = 40
REPEATS = 2  # requests per client in one measurement: one 64-token reply (0.7 s) was mostly noise


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _child_server(serve_pid: int) -> int:
    for pid in _children(serve_pid):
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"llama-server"):
            return pid
    raise RuntimeError("llmctl serve has no llama-server child")


def _rss(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


@contextlib.contextmanager
def _by_hand(serve_child: int) -> Iterator[str]:
    """The child's own command line, on a loopback port instead of its private socket."""
    from llmctl.bench.serving import free_port

    argv = [a.decode() for a in Path(f"/proc/{serve_child}/cmdline").read_bytes().split(b"\0") if a]
    cleaned, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--host", "--port", "--api-key", "--api-key-file"):
            skip = True
            continue
        cleaned.append(arg)
    port = free_port()
    child = subprocess.Popen([*cleaned, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, child)
        yield url
    finally:
        child.terminate()
        child.wait(timeout=30)


def _wait_healthy(url: str, child: subprocess.Popen) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{url}: exited {child.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy")


def _measure(url: str, model: str, clients: int) -> tuple[float, float]:
    """(aggregate completion t/s, TTFT p50 s) of one round at ``clients`` streaming clients."""
    from llmctl.bench.run import new_run
    from llmctl.bench.serving import Server, ServingPlan, bench_server
    from llmctl.plan import hardware

    run = new_run(hardware.load_profile("laptop-8gb"))
    bench_server(run, Server.at(url), model, ServingPlan([clients], [N_PROMPT], [N_GEN], repetitions=REPEATS))
    (row,) = run.serving
    if row.failed:
        raise RuntimeError(f"{url}: {row.failed} failed requests: {row.errors}")
    return float(row.avg_ts), float(row.ttft_p50_s)


@contextlib.contextmanager
def _serve(env: dict[str, str], name: str = "demo", python_path: str | None = None) -> Iterator[tuple[str, int]]:
    from llmctl.bench.serving import free_port

    port = free_port()
    env = {**env, **({"PYTHONPATH": python_path} if python_path else {})}
    child = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "serve", "--host", "127.0.0.1", "--port", str(port), name],
        env=env,
        cwd=python_path or tempfile.gettempdir(),  # not the checkout: `-m` puts the working folder first on the path
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, child)
        yield url, child.pid
    finally:
        child.terminate()
        child.wait(timeout=30)


@contextlib.contextmanager
def _old_tree() -> Iterator[str | None]:
    folder = tempfile.mkdtemp(prefix="llmctl-old-serve-")
    added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", folder, OLD_SERVER_COMMIT], capture_output=True)
    try:
        yield folder if added.returncode == 0 else None
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", folder], capture_output=True)


def _ttft(url: str, model: str) -> float:
    """Seconds from sending one streaming completion (64-token prompt, 4 tokens) to its first event."""
    import http.client
    import json
    import time

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": model, "prompt": "hello " * 64, "max_tokens": 4, "stream": True, "temperature": 0})
    try:
        start = time.perf_counter()
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        first = None
        while line := reply.readline():
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - start
    finally:
        connection.close()
    if first is None:
        raise RuntimeError(f"{url}: the stream had no event")
    return first


def serve_vs_hand(name: str, env: dict[str, str], *, rounds: int = ROUNDS, on_child: Callable[[int], None] | None = None) -> list[Row]:
    """The ratio rows (1, 4, 8 clients) and the TTFT row for model ``name`` of the store in ``env``:
    `llmctl serve` against its own child's command line started by hand. ``on_child`` sees the
    child's pid after the warm-up (the load), before any measuring."""
    rows: list[Row] = []
    with _serve(env, name) as (serve_url, serve_pid):
        _measure(serve_url, name, 1)  # warm-up (and the child's load)
        child = _child_server(serve_pid)
        if on_child is not None:
            on_child(child)
        with _by_hand(child) as hand_url:
            _measure(hand_url, name, 1)
            ours: dict[int, list[tuple[float, float]]] = {c: [] for c in LEVELS}
            theirs: dict[int, list[tuple[float, float]]] = {c: [] for c in LEVELS}
            for round_ in range(rounds):
                for clients in LEVELS:
                    pair = [(ours, serve_url), (theirs, hand_url)]
                    for results, url in pair if round_ % 2 == 0 else pair[::-1]:
                        results[clients].append(_measure(url, name, clients))
            # TTFT: many single requests, alternating server by server (the throughput levels' two
            # requests per client were too few: their p50 moved by 15 ms between runs).
            _ttft(serve_url, name), _ttft(hand_url, name)
            added: list[float] = []
            for i in range(TTFT_PAIRS):
                if i % 2 == 0:
                    ours_s = _ttft(serve_url, name)
                    theirs_s = _ttft(hand_url, name)
                else:
                    theirs_s = _ttft(hand_url, name)
                    ours_s = _ttft(serve_url, name)
                added.append((ours_s - theirs_s) * 1e3)
    for clients in LEVELS:
        # The ratio is the median of each round's own ratio (the two runs of a round are back to
        # back, so slow drift of the host cancels); the t/s shown are the medians of each side.
        ratios = [o[0] / t[0] for o, t in zip(ours[clients], theirs[clients])]
        print(
            f"serve {clients} client(s): ours {[round(t, 1) for t, _ in ours[clients]]} by hand {[round(t, 1) for t, _ in theirs[clients]]} t/s",
            file=sys.stderr,
        )
        a = statistics.median(t for t, _ in ours[clients])
        b = statistics.median(t for t, _ in theirs[clients])
        ratio = statistics.median(ratios)
        rows.append(
            Row(f"serve ÷ llama-server by hand, {clients} client(s), aggregate", a, "t/s", b, "llama-server", "≥ 0.95", ratio >= 0.95, paired_ratio=ratio)
        )
    added_ms = statistics.median(added)
    rows.append(Row("serve: TTFT added by the front, p50, 1 client", added_ms, "ms", 5.0, "budget", "≤ 5 ms", added_ms <= 5.0))
    return rows


def run() -> list[Row]:
    model = ensure_demo_model()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LLMCTL_HOME": str(Path(tmp) / "home"), "HF_HUB_CACHE": str(Path(tmp) / "hub")}
        subprocess.run([LLMCTL, "import", str(model), "--name", "demo"], env=env, check=True, capture_output=True)
        os.environ.update({k: env[k] for k in ("LLMCTL_HOME", "HF_HUB_CACHE")})
        fit = subprocess.run([LLMCTL, "fit", "demo", "--serve", "--json"], env=env, check=True, capture_output=True, text=True).stdout
        import json

        estimate = int(json.loads(fit)["chosen"]["resident_bytes"])  # in use: what RSS shows
        resident: list[int] = []
        rows += serve_vs_hand("demo", env, on_child=lambda pid: resident.append(_rss(pid)))
        rows.append(
            Row("serve: llama-server child RSS after load vs fit --serve in use", resident[0] / 2**20, "MiB", estimate / 2**20, "fit, in use", "reported", None)
        )
        with _old_tree() as old:
            if old is None:
                rows.append(Row("serve vs the old in-process server, 4 clients", 0.0, "t/s", None, "git worktree unavailable", "≥ 1.8×", None))
            else:
                new_ts, old_ts = [], []
                with _serve(env) as (serve_url, _pid), _serve(env, "demo", python_path=old) as (old_url, _old_pid):
                    _measure(serve_url, "demo", 1)
                    _measure(old_url, "demo", 1)
                    for round_ in range(ROUNDS):
                        pair = [(new_ts, serve_url), (old_ts, old_url)]
                        for results, url in pair if round_ % 2 == 0 else pair[::-1]:
                            results.append(_measure(url, "demo", 4)[0])
                print(f"serve vs old, 4 clients: new {[round(t, 1) for t in new_ts]} old {[round(t, 1) for t in old_ts]} t/s", file=sys.stderr)
                a, b = statistics.median(new_ts), statistics.median(old_ts)
                ratio = statistics.median(n / o for n, o in zip(new_ts, old_ts))
                rows.append(
                    Row("serve vs the old in-process server, 4 clients, aggregate", a, "t/s", b, "in-process serve", "≥ 1.8×", ratio >= 1.8, paired_ratio=ratio)
                )
    return rows
