"""The server's cost over `run`'s path, and its throughput under concurrency.

- Time to first token and generation rate for one streaming client through
  the OpenAI API (measured by a minimal HTTP client, so the figure is the
  server's cost and not a client library's: request sent → first content chunk;
  tokens from the usage chunk over first → last chunk), against the same
  request through the engine in-process (llmctl's Engine.chat, as `run` uses
  it). Same prompt, both warm, alternating 7 times, medians. Targets: at most 10 ms added to TTFT, at least 95% of the rate.
- Throughput: completion tokens per second over all clients with 1, 4 and 16
  concurrent clients, each sending 2 non-streaming requests of 32 tokens.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import Row

from tools.demo_model import ensure_demo_model

LLMCTL = str(Path(sys.executable).with_name("llmctl"))
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
TOKENS = 128


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(model: Path):
    from llmctl import gguf
    from llmctl.engine.llama import Engine
    from llmctl.plan import hardware
    from llmctl.plan.fit import Candidate, make_plan

    info = gguf.read_model([model])[1]
    plan = make_plan([Candidate("demo", info, model.stat().st_size)], hardware.load_profile("laptop-8gb"))
    return Engine.load("demo", [model], plan, threads=2)


def _in_process(engine) -> tuple[float, float]:
    from llmctl.engine.base import Result
    from llmctl.engine.sampling import SamplingSettings

    result = [p for p in engine.chat(MESSAGES, SamplingSettings(temperature=0, max_tokens=TOKENS, seed=1)) if isinstance(p, Result)][0]
    return result.timings.ttft_s, result.timings.generation_tokens_per_second


def _through_api(url: str) -> tuple[float, float]:
    """One streaming request, read with a minimal client: the server's cost, not a client library's."""
    import http.client
    import json
    from urllib.parse import urlparse

    body = {"model": "demo", "messages": MESSAGES, "temperature": 0, "max_tokens": TOKENS, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    target = urlparse(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = last = None
    tokens = 0
    while line := response.readline():
        if not line.startswith(b"data: {"):
            continue
        if b'"content": "' in line and b'"content": ""' not in line:
            now = time.perf_counter()
            first = first or now
            last = now
        elif b'"usage"' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    connection.close()
    return first - start, (tokens - 1) / (last - first)


def _throughput(url: str, clients: int) -> float:
    from openai import OpenAI

    tokens = []

    def worker() -> None:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        for _ in range(2):
            reply = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=32, temperature=0.7)
            tokens.append(reply.usage.completion_tokens)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - start)


def run() -> list[Row]:
    model = ensure_demo_model()
    engine = _engine(model)
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LLMCTL_HOME": home}
        subprocess.run([LLMCTL, "import", str(model), "--name", "demo"], env=env, check=True, capture_output=True)
        port = _port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([LLMCTL, "serve", "demo", "--port", str(port), "--max-queue", "64"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(url + "/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            _through_api(url)  # warm: the same prompt is then in both KV caches
            _in_process(engine)
            added, local_rates, api_rates = [], [], []
            for _ in range(7):  # alternate, so drift in machine speed hits both sides alike
                local_ttft, local_rate = _in_process(engine)
                api_ttft, api_rate = _through_api(url)
                added.append((api_ttft - local_ttft) * 1000)
                local_rates.append(local_rate)
                api_rates.append(api_rate)
            throughput = {n: _throughput(url, n) for n in (1, 4, 16)}
        finally:
            server.terminate()
            server.wait(timeout=30)
    added_ms = statistics.median(added)
    api_rate, local_rate = statistics.median(api_rates), statistics.median(local_rates)
    rows = [
        Row("serve: TTFT added over in-process", added_ms, "ms", 10.0, "budget", "<= 10 ms", added_ms <= 10.0),
        Row("serve: generation rate, 1 client", api_rate, "t/s", local_rate, "in-process (run path)", ">= 95%", api_rate >= 0.95 * local_rate),
    ]
    rows += [Row(f"serve: throughput, {n} concurrent clients", tps, "t/s", None, "-", "info", None) for n, tps in throughput.items()]
    return rows
