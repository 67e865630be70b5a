"""bench --serve: the figures against a fake server of known delays, real concurrency, failures
counted, errors a user can act on, a fresh server started and stopped, the CLI's formats and history.
Then the real thing: llama-server and `llmctl serve` on the demo model (slow)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.bench import report as benchreport
from llmctl.bench import run as benchrun
from llmctl.bench import serving
from llmctl.bench.choices import Endpoint
from llmctl.bench.serving import RequestResult, Server, ServingPlan
from llmctl.errors import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_USAGE, LlmctlError, NotFoundError, UsageError
from tests.support.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMCTL_API_KEY", raising=False)


def _run() -> benchrun.BenchRun:
    return benchrun.BenchRun("20260101-000000-abcd", "2026-01-01T00:00:00+00:00", {"cpu_info": "Test CPU", "llmctl_version": "0.1.0"})


def _bench(url: str, plan: ServingPlan, model: str = "fake") -> benchrun.BenchRun:
    run = _run()
    serving.bench_server(run, Server.at(url), model, plan)
    return run


# --- figures ------------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [0.4, 0.1, 0.3, 0.2, 0.5]
    assert serving.percentile(values, 50) == 0.3
    assert serving.percentile(values, 0) == 0.1 and serving.percentile(values, 100) == 0.5
    assert serving.percentile(values, 95) == pytest.approx(0.48)  # rank 3.8: 0.4 + 0.8 × 0.1
    assert serving.percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        serving.percentile([], 50)


def test_summarise_by_hand() -> None:
    row = benchrun.ServingRow("m", "http://x", "completions", 2, 16, 11, "pp16+tg11", "t", 2)
    rounds = [
        # round 1: both requests 11 tokens, the last ends at 2.0 s: 22 tokens / 2.0 s
        [RequestResult(0.0, 1.0, first_s=0.1, last_s=1.1, completion_tokens=11, prompt_tokens=16),
         RequestResult(0.0, 2.0, first_s=0.3, last_s=1.3, completion_tokens=11, prompt_tokens=18)],
        # round 2: one failed request, left out of every figure; 11 tokens / 1.0 s
        [RequestResult(0.0, 1.0, first_s=0.2, last_s=0.7, completion_tokens=11, prompt_tokens=16),
         RequestResult(0.0, 0.5, error="HTTP 503: server busy")],
    ]  # fmt: skip
    serving.summarise(row, rounds)
    assert row.samples_ts == [11.0, 11.0] and row.avg_ts == 11.0 and row.stddev_ts == 0.0
    assert row.requests == 4 and row.failed == 1 and row.errors == ["1 × HTTP 503: server busy"]
    assert row.status == "failed: 1 of 4 requests (HTTP 503: server busy)" and not row.ok
    assert row.samples_ttft_s == [0.1, 0.3, 0.2] and row.ttft_p50_s == 0.2
    assert row.ttft_p95_s == pytest.approx(0.29)
    assert row.samples_request_ts == [10.0, 10.0, 20.0] and row.request_ts == pytest.approx(13.333, abs=1e-3)
    assert row.prompt_tokens == pytest.approx(16.7, abs=0.05) and row.completion_tokens == 11


def test_calibrate_meets_the_servers_count() -> None:
    import asyncio

    def counter(per_word: float, overhead: int):
        tries: list[int] = []

        async def count(words: int) -> int:
            tries.append(words)
            return overhead + math.ceil(words * per_word)

        return count, tries

    for per_word, overhead, target in ((1.0, 1, 128), (1.3, 1, 128), (1.3, 30, 512), (0.9, 6, 64), (2.0, 1, 9)):
        count, tries = counter(per_word, overhead)
        words, tokens = asyncio.run(serving.calibrate(count, target))
        assert tokens is not None and abs(tokens - target) <= math.ceil(per_word), (per_word, overhead, target, tries)
        assert len(tries) <= 5, tries
    count, _ = counter(1.0, 30)  # a chat template longer than the prompt asked for: the shortest prompt
    assert asyncio.run(serving.calibrate(count, 8)) == (1, 31)

    async def no_usage(words: int) -> None:
        return None

    assert asyncio.run(serving.calibrate(no_usage, 100)) == (75, None)  # ¾ of a word a token


# --- against the fake server -----------------------------------------------------------------------


def test_timings_match_the_servers_delays_and_clients_run_at_once() -> None:
    # 21 tokens: 0.1 s to the first, then 20 × 0.01 s: TTFT 0.1 s, 100 t/s per request
    with FakeOpenAI(ttft_s=0.1, token_s=0.01) as fake:
        run = _bench(fake.url, ServingPlan([1, 4], [16], [21], repetitions=2))
    one, four = run.serving
    assert (one.concurrency, four.concurrency) == (1, 4)
    for row in (one, four):
        assert row.ok and row.failed == 0 and row.ignore_eos
        assert row.completion_tokens == 21 and row.prompt_tokens == 16  # the prompt sized in the server's own count
        assert 0.095 <= row.ttft_p50_s <= 0.2, row.samples_ttft_s
        assert 60 <= row.request_ts <= 101, row.samples_request_ts
        assert row.server_build == "b0-fake" and row.server_slots == 99
    assert one.requests == 2 and four.requests == 8
    assert fake.max_active == 4
    # four clients at once: four times the tokens in about the same wall time (≈ 21 / 0.3 s against 84 / 0.3 s)
    assert 40 <= one.avg_ts <= 71 and four.avg_ts > 2.5 * one.avg_ts, (one.samples_ts, four.samples_ts)
    timed = [b for b in fake.bodies if b.get("stream")][1:]  # after the warm-up
    assert all(b["max_tokens"] == 21 and b["ignore_eos"] is True and b["temperature"] == 0 for b in timed)
    starts = [tuple(b["prompt"].split()[:5]) for b in timed]
    assert len(set(starts)) == len(starts), "every prompt starts at its own word: no prompt-cache hits"


def test_fewer_slots_than_clients_queue_and_show_in_ttft() -> None:
    with FakeOpenAI(ttft_s=0.05, token_s=0.005, slots=1) as fake:
        run = _bench(fake.url, ServingPlan([1, 3], [8], [11], repetitions=1))
    one, three = run.serving
    assert fake.max_active == 1 and three.ok and three.server_slots == 1
    # the third client waits for two whole replies (0.1 s each) before its own first token
    assert three.ttft_p95_s > 2.5 * one.ttft_p50_s, (one.samples_ttft_s, three.samples_ttft_s)
    assert three.avg_ts < 1.6 * one.avg_ts


def test_failed_requests_are_counted_and_said_never_hidden() -> None:
    # streamed requests 4, 8, … are answered 503; 3, 6, … drop their connection after 3 tokens
    with FakeOpenAI(ttft_s=0.01, token_s=0.002, fail_every=4, drop_every=3, drop_after=3) as fake:
        run = _bench(fake.url, ServingPlan([3], [8], [10], repetitions=3))
    (row,) = run.serving
    assert row.requests == 9 and not row.ok
    # streamed requests 2-10 are the timed ones: 4 and 8 answered 503; 3, 6 and 9 dropped
    assert row.failed == 5, row.errors
    assert any(e.startswith("2 × HTTP 503: server busy") for e in row.errors), row.errors
    assert sum(int(e.split(" × ")[0]) for e in row.errors) == 5
    assert row.status.startswith("failed: 5 of 9 requests")
    assert row.completion_tokens == 10  # the figures are the successful requests'
    assert len(row.samples_ttft_s) == 4


def test_a_server_that_refuses_ignore_eos_is_asked_without_it() -> None:
    with FakeOpenAI(refuse_ignore_eos=True, natural_tokens=5) as fake:
        run = _bench(fake.url, ServingPlan([2], [8], [12], repetitions=1))
    (row,) = run.serving
    assert row.ok and not row.ignore_eos and row.completion_tokens == 5
    assert "ignore_eos refused" in benchreport.serving_summary(run)[0]


def test_chat_endpoint_counts_the_template_and_skips_the_role_chunk() -> None:
    with FakeOpenAI(ttft_s=0.05, token_s=0.005, template_tokens=6) as fake:
        run = _bench(fake.url, ServingPlan([2], [32], [6], repetitions=1, endpoint=Endpoint.chat))
    (row,) = run.serving
    assert row.ok and row.endpoint == "chat" and row.prompt_tokens == 32 and row.completion_tokens == 6
    assert row.ttft_p50_s >= 0.045
    assert all("messages" in b for b in fake.bodies)


def test_without_usage_the_content_events_are_counted() -> None:
    with FakeOpenAI(usage=False) as fake:
        run = _bench(fake.url, ServingPlan([1], [8], [7], repetitions=1))
    assert run.serving[0].completion_tokens == 7 and run.serving[0].prompt_tokens is None


def test_errors_a_user_can_act_on(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = ServingPlan([1], [8], [4], repetitions=1)
    with pytest.raises(LlmctlError, match=r"^no server at http://127\.0\.0\.1:\d+ \("):
        _bench(f"http://127.0.0.1:{serving.free_port()}", plan)
    with FakeOpenAI(api_key="sesame") as fake:
        with pytest.raises(LlmctlError, match="needs an API key") as no_key:
            _bench(fake.url, plan)
        assert no_key.value.hint and "LLMCTL_API_KEY" in no_key.value.hint
        monkeypatch.setenv("LLMCTL_API_KEY", "wrong")
        with pytest.raises(LlmctlError, match=r"refused the API key \(HTTP 401\)"):
            _bench(fake.url, plan)
        monkeypatch.setenv("LLMCTL_API_KEY", "sesame")
        assert _bench(fake.url, plan).serving[0].ok  # the key is sent as a Bearer token
        assert serving.server_models(Server.at(fake.url)) == ["fake"]
        with pytest.raises(NotFoundError, match="has no model 'nope'"):
            _bench(fake.url, plan, model="nope")
    with FakeOpenAI(max_prompt_tokens=16) as fake:
        with pytest.raises(LlmctlError, match=r"refused a request: HTTP 400: the request exceeds the available context size$"):
            _bench(fake.url, ServingPlan([1], [64], [4]))


def test_several_models_one_unknown_the_others_run() -> None:
    with FakeOpenAI(models=("a", "b")) as fake:
        run = _run()
        serving.bench_serving(run, ["a", "nope", "b"], ServingPlan([1], [4], [3], repetitions=1), url=fake.url)
        assert [s.model for s in run.serving] == ["a", "b"]
        assert [f["model"] for f in run.failed_models] == ["nope"]
        run = _run()
        serving.bench_serving(run, [], ServingPlan([1], [4], [3], repetitions=1), url=fake.url)  # no name: the first listed
        assert [s.model for s in run.serving] == ["a"]


# --- a fresh server -----------------------------------------------------------------------------------


FAKE_COMMAND = [sys.executable, "-m", "tests.support.fake_openai"]


def test_a_fresh_server_is_started_used_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    run = _run()
    urls = []
    serving.bench_serving(run, ["fake"], ServingPlan([2], [8], [5], repetitions=1), command=FAKE_COMMAND, serve_args=["--ttft", "0.03"],
                          on_row=lambda row: urls.append(row.server))  # fmt: skip
    (row,) = run.serving
    assert row.ok and row.fresh and row.ttft_p50_s >= 0.03
    assert urls == [row.server] and row.server.startswith("http://127.0.0.1:")
    assert not serving._healthy(row.server), "the fresh server is stopped after the benchmark"
    with pytest.raises(UsageError, match="name the models"):
        serving.bench_serving(run, [], ServingPlan([1], [8], [5]), command=FAKE_COMMAND)


def test_a_fresh_server_that_dies_is_reported_with_its_last_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    plan = ServingPlan([1], [8], [5], repetitions=3)
    died_at_once = [sys.executable, "-c", "import sys; print('cannot bind: address in use'); sys.exit(3)"]
    with pytest.raises(LlmctlError, match=r"exited \(3\) before it answered: cannot bind: address in use"):
        serving.bench_serving(_run(), ["fake"], plan, command=died_at_once)
    run = _run()
    with pytest.raises(LlmctlError, match=r"exited \(0\) during the benchmark"):  # it stops serving after 2 streamed requests
        serving.bench_serving(run, ["fake"], plan, command=FAKE_COMMAND, serve_args=["--exit-after", "2"])


# --- the command ------------------------------------------------------------------------------------


def test_cli_formats_history_and_compare(cli, isolated: Path) -> None:
    with FakeOpenAI(ttft_s=0.02, token_s=0.002) as fake:
        args = ["bench", "--server", fake.url, "-c", "1,2", "-p", "8", "-n", "6", "-r", "2"]
        r = cli(*args, "-o", "json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["results"] == [] and [s["concurrency"] for s in doc["serving"]] == [1, 2]
        first = doc["serving"][0]
        for field in benchreport.SERVING_FIELDS:
            assert field in first
        assert first["kind"] == "serving" and first["model"] == "fake" and first["server"] == fake.url and first["n_gen"] == 6
        assert first["completion_tokens"] == 6 and first["prompt_tokens"] == 8 and len(first["samples_ts"]) == 2
        assert "saved as run" in r.stderr and "fake pp8+tg6 × 2:" in r.stderr
        table = cli(*args)
        assert table.exit_code == 0
        header = table.stdout.splitlines()[0].split()
        assert header[:4] == ["model", "test", "clients", "prompt"] and "p95" in header
        assert f"{fake.url}: /v1/completions, 2 repetitions per level, build b0-fake, 99 slots" in table.stderr
        md = cli(*args, "-o", "md").stdout
        assert md.startswith("| model | test | clients |") and "| fake | pp8+tg6 | 2 |" in md
        rows = list(csv.DictReader(io.StringIO(cli(*args, "-o", "csv").stdout)))
        assert [r["concurrency"] for r in rows] == ["1", "2"] and rows[0]["samples_ts"].count(";") == 1
        lines = [json.loads(line) for line in cli(*args, "-o", "jsonl").stdout.splitlines()]
        assert [(r["kind"], r["concurrency"]) for r in lines] == [("serving", 1), ("serving", 2)]
    history = cli("bench", "--history")
    assert history.exit_code == 0 and history.stdout.count("2 serving") == 5
    docs = json.loads(cli("bench", "--history", "-o", "json").stdout)["runs"]
    assert [(d["models"], d["tests"], d["serving"]) for d in docs] == [(["fake"], 0, 2)] * 5
    compared = cli("bench", "--compare", docs[0]["run_id"], "last", "-o", "json")
    assert compared.exit_code == 0, compared.stderr
    pairs = json.loads(compared.stdout)["serving"]
    assert [p["concurrency"] for p in pairs] == [1, 2] and all(p["ratio"] > 0 for p in pairs)
    table = cli("bench", "--compare", docs[0]["run_id"], "last")
    assert table.exit_code == 0 and "ratio" in table.stdout and "pp8+tg6 c2" in table.stderr


def test_cli_refuses_mixed_options_and_reports_failures(cli, isolated: Path) -> None:
    r = cli("bench", "fake", "--serve", "-t", "2")
    assert r.exit_code == EXIT_USAGE and "--threads sets up llama.cpp in this process" in r.stderr
    r = cli("bench", "fake", "-c", "2")
    assert r.exit_code == EXIT_USAGE and "--concurrency is for serving benchmarks" in r.stderr
    r = cli("bench", "fake", "--server", "http://127.0.0.1:1", "--serve-args=--parallel 4")
    assert r.exit_code == EXIT_USAGE
    r = cli("bench", "no-such-model", "--serve")  # a fresh server: the name is checked in the store before it starts
    assert r.exit_code == EXIT_NOT_FOUND
    r = cli("bench", "--server", f"http://127.0.0.1:{serving.free_port()}")
    assert r.exit_code == EXIT_ERROR and "error: no server at" in r.stderr
    with FakeOpenAI(ttft_s=0.01, token_s=0.001, fail_every=3) as fake:
        r = cli("bench", "fake", "--server", fake.url, "-c", "2", "-p", "8", "-n", "4", "-r", "2")
        assert r.exit_code == EXIT_ERROR
        assert "1 of 4 requests failed, in 1 of 1 levels (first: pp8+tg4 × 2: 1 × HTTP 503: server busy)" in r.stderr
        assert "warning: fake pp8+tg4 × 2: 1 × HTTP 503: server busy" in r.stderr
        assert "3/4" not in r.stdout and "1/4" in r.stdout  # failed / requests
        assert "saved as run" in r.stderr  # what was measured is kept
        r = cli("bench", "nope", "--server", fake.url, "-n", "4", "-c", "1", "-r", "1")
        assert r.exit_code == EXIT_NOT_FOUND and "has no model 'nope'" in r.stderr


# --- the real thing (slow) -----------------------------------------------------------------------------


@pytest.mark.slow
def test_against_llama_server_on_the_demo_model(native_tools, demo_model: Path) -> None:
    port = serving.free_port()
    server = subprocess.Popen(
        [str(native_tools.path("llama-server")), "-m", str(demo_model), "--host", "127.0.0.1", "--port", str(port), "-np", "2", "-t", "2", "-c", "2048"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not serving._healthy(url):
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        run = _run()
        serving.bench_serving(run, [], ServingPlan([1, 2], [64], [16], repetitions=2), url=url)
    finally:
        server.terminate()
        server.wait(15)
    one, two = run.serving
    for row in (one, two):
        assert row.ok, row.errors
        assert row.ignore_eos and row.completion_tokens == 16  # llama-server honours ignore_eos: exactly n_gen
        assert abs(row.prompt_tokens - 64) <= 3  # sized at the first prompt; the others start at other words
        assert row.server_slots == 2 and row.server_build
        assert 0 < row.ttft_p50_s <= row.ttft_p95_s and row.request_ts > 0 and row.avg_ts > 0
    assert two.requests == 4


@pytest.mark.slow
def test_against_a_fresh_llmctl_serve_on_the_demo_model(cli, native_tools, demo_model: Path, isolated: Path) -> None:
    assert cli("import", demo_model, "--name", "demo").exit_code == 0
    r = cli("bench", "demo", "--serve", "-c", "1,2", "-p", "32", "-n", "8", "-r", "1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    levels = json.loads(r.stdout)["serving"]
    assert [s["concurrency"] for s in levels] == [1, 2]
    for level in levels:
        assert level["fresh"] and level["status"] == "ok" and level["failed"] == 0
        assert 1 <= level["completion_tokens"] <= 8 and level["ttft_p50_s"] > 0
        assert abs(level["prompt_tokens"] - 32) <= 3
