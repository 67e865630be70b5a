"""Generation speed of `run` and `chat` on the demo model.

- run's generation rate (tokens after the first ÷ time from first to last
  token, from `llmctl run --json`, median of 3) against the engine's raw decode
  rate measured with llama-bench's tg128 method (llmctl.bench.measure, 5 repetitions
  after a warm-up), same threads. Target >= 95%.
- Command start to first token for a short prompt (wall clock from spawning
  `llmctl run` to its first byte on stdout), with its breakdown: interpreter
  and imports, model load, prompt (time to first token inside the engine).
  Target < 0.8 s.
- Chat: the second turn's time to first token against the first; the KV prefix
  of the conversation is reused, so only the new message is evaluated.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import Row

from tools.demo_model import ensure_demo_model

LLMCTL = str(Path(sys.executable).with_name("llmctl"))
THREADS = 2


def _run_json(model: Path, prompt: str, *args: str) -> dict:
    out = subprocess.run(
        [LLMCTL, "run", str(model), prompt, "--json", "--temperature", "0", "--threads", str(THREADS), *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def _raw_tg(model: Path) -> float:
    import llama_cpp

    from llmctl.bench.measure import measure

    # With what `run` loads by default (flash attention on, as the planner chooses), or the two would differ by it.
    llm = llama_cpp.Llama(str(model), n_ctx=1024, n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, verbose=False)
    return measure(llm, n_gen=128, repetitions=5).avg_ts


def _first_byte_wall(model: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [LLMCTL, "run", str(model), "Hi", "--temperature", "0", "--max-tokens", "8", "--threads", str(THREADS)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.communicate()
    return elapsed


def _imports_wall() -> float:
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import llmctl.cli, llama_cpp"], check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _chat_turns(model: Path) -> tuple[float, float, int, int]:
    from llmctl import gguf
    from llmctl.engine.chat import ChatSession
    from llmctl.engine.llama import Engine
    from llmctl.engine.sampling import SamplingSettings
    from llmctl.plan import hardware
    from llmctl.plan.fit import Candidate, make_plan

    info = gguf.read_model([model])[1]
    plan = make_plan([Candidate("demo", info, model.stat().st_size)], hardware.load_profile("laptop-8gb"))
    engine = Engine.load("demo", [model], plan, threads=THREADS)
    session = ChatSession(engine, SamplingSettings(temperature=0, max_tokens=64))
    long_question = "Here is some context about the solar system. " * 40 + "Summarise it."
    list(session.send(long_question))
    list(session.send("And what about Mars?"))
    first, second = session.history
    return first.ttft_s, second.ttft_s, first.prompt_eval_tokens, second.prompt_eval_tokens


def run() -> list[Row]:
    model = ensure_demo_model()
    os.environ.setdefault("LLMCTL_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "llmctl-bench-home"))
    raw = _raw_tg(model)
    rates = [_run_json(model, "Count from 1 to 300, separated by commas.", "--max-tokens", "128")["timings"]["generation_tokens_per_second"] for _ in range(3)]
    run_rate = statistics.median(rates)
    walls = [_first_byte_wall(model) for _ in range(3)]
    first_token = statistics.median(walls)
    timing = _run_json(model, "Hi", "--max-tokens", "8")["timings"]
    imports = _imports_wall()
    t1, t2, p1, p2 = _chat_turns(model)
    return [
        Row("run generation rate, demo, 2 threads", run_rate, "t/s", raw, "raw decode, tg128 method", ">= 95%", run_rate >= 0.95 * raw),
        Row("run: start to first token (wall)", first_token, "s", 0.8, "budget", "< 0.8 s", first_token < 0.8),
        Row("  of which interpreter + imports", imports, "s", None, "-", "info", None),
        Row("  of which model load", timing["load_s"], "s", None, "-", "info", None),
        Row("  of which prompt to first token", timing["ttft_s"], "s", None, "-", "info", None),
        Row(f"chat turn 2 TTFT ({p2} new tokens)", t2, "s", t1, f"turn 1 TTFT ({p1} tokens)", "faster (prefix reuse)", t2 < t1),
    ]
