"""bench's extras and ``bench --tune`` load through the engine's ``load_llama``, so they honour the plan's KV cache
types and flash attention as run does (before, each built its own ``llama_cpp.Llama`` and dropped both)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from llmctl import gguf
from llmctl.bench import run as benchrun
from llmctl.bench import tune
from llmctl.bench.measure import Measurement
from llmctl.config import get_settings
from llmctl.engine import llama
from llmctl.engine.fake import FakeEngine
from llmctl.plan import fit
from llmctl.plan.fit import LoadConfig
from llmctl.plan.hardware import get_hardware


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[LoadConfig, int | None]]:
    """Every load_llama call (its config and threads), with nothing loaded and every measurement 10 t/s."""
    seen: list[tuple[LoadConfig, int | None]] = []

    def load_llama(path: Any, config: LoadConfig, *, threads: int | None, **_: Any) -> object:
        seen.append((config, threads))
        return object()

    monkeypatch.setattr(llama, "load_llama", load_llama)
    monkeypatch.setattr(benchrun, "measure", lambda llm, **_: Measurement("t", [10.0]))
    monkeypatch.setattr(tune, "measure", lambda llm, **_: Measurement("t", [10.0]))
    return seen


def test_extras_load_as_run_does_and_the_measured_context_as_llama_bench_does(cli, make_gguf, loads, monkeypatch) -> None:
    engines: list[FakeEngine] = []

    def engine(llm: object, name: str, config: LoadConfig, load_s: float, notes: list[str], **kwargs: Any) -> FakeEngine:
        engines.append(FakeEngine(["a b c d"], name=name, config=config, **kwargs))
        return engines[-1]

    monkeypatch.setattr(llama, "Engine", engine)
    r = cli("bench", make_gguf("good.Q8_0.gguf"), "-p", "16", "-n", "4", "-r", "1", "-t", "2", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    (bench, _), (extras, threads) = loads
    assert (bench.type_k, bench.type_v, bench.flash_attn, bench.swa_full) == ("q8_0", "q8_0", True, False)
    assert (extras.type_k, extras.type_v, extras.flash_attn, extras.swa_full) == ("q8_0", "q8_0", True, False)  # run keeps only the window too
    assert replace(extras, swa_full=False) == bench and threads == 2
    (extra,) = json.loads(r.stdout)["extras"]
    assert extra["e2e_tokens_per_second"] == 100.0 and engines[0].closed  # the fake's rate; its memory freed


def test_tune_loads_every_trial_as_the_plan_says(make_gguf, loads, monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_HW_PROFILE", "laptop-8gb")
    plan_candidate = fit.plan_candidate

    def planned_with_a_quantised_cache(*args: Any, **kwargs: Any) -> fit.CandidatePlan:
        plan = plan_candidate(*args, **kwargs)
        plan.estimate.config = replace(plan.config, type_k="q8_0", type_v="q4_0", flash_attn=True)
        return plan

    monkeypatch.setattr(fit, "plan_candidate", planned_with_a_quantised_cache)
    hw = get_hardware(get_settings())
    path = make_gguf("good.Q8_0.gguf")
    _, info = gguf.read_model([path])
    profile = tune.tune(benchrun.BenchModel("good", [path], info), hw)
    assert len(loads) >= len(tune.thread_candidates(hw)) + 4
    assert {(c.type_k, c.type_v, c.flash_attn, c.n_ctx) for c, _ in loads} == {("q8_0", "q4_0", True, 1024)}
    assert [c.n_batch for c, _ in loads[len(tune.thread_candidates(hw)) :][:4]] == [256, 512, 1024, 2048]
    assert {threads for _, threads in loads[: len(tune.thread_candidates(hw))]} == set(tune.thread_candidates(hw))
    assert profile["threads"] == tune.thread_candidates(hw)[0]  # every trial measured the same: the first stays
