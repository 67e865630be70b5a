"""The fake engine keeps its word: queued, echoed and default replies, llama.cpp's cuts, timings, failures, the factory."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmctl.engine.base import Engine, EngineError, Result, Timings
from llmctl.engine.fake import FakeEngine, FakeFactory
from llmctl.engine.sampling import SamplingSettings
from llmctl.plan.fit import LoadConfig

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something nice"}]


def _all(stream) -> tuple[list[str], Result]:
    pieces = list(stream)
    *text, result = pieces
    assert isinstance(result, Result) and all(isinstance(p, str) for p in text)
    return text, result


def test_replies_come_from_the_queue_then_echo_or_the_default() -> None:
    engine = FakeEngine(["Hello there, friend"]).enqueue([["exact", " pieces"]])
    assert _all(engine.chat(USER, SamplingSettings()))[0] == ["Hello ", "there, ", "friend"]
    assert _all(engine.complete("x", SamplingSettings()))[0] == ["exact", " pieces"]
    assert _all(engine.chat(USER, SamplingSettings()))[1].text == "hello world"
    echo = FakeEngine(echo=True)
    assert _all(echo.chat(USER, SamplingSettings()))[1].text == "Say something nice"
    assert _all(echo.complete("Once upon", SamplingSettings()))[1].text == "Once upon"
    assert [c.kind for c in engine.calls] == ["chat", "complete", "chat"] and engine.calls[1].prompt == "x"
    assert engine.calls[0].messages == USER


def test_max_tokens_and_stop_cut_the_reply_as_llama_cpp_does() -> None:
    engine = FakeEngine(["one two three four", "alpha beta STOP gamma"])
    text, result = _all(engine.chat(USER, SamplingSettings(max_tokens=2)))
    assert text == ["one ", "two "] and result.finish_reason == "length" and result.timings.generated_tokens == 2
    text, result = _all(engine.chat(USER, SamplingSettings(stop=["STOP"])))
    assert "".join(text) == "alpha beta " and result.finish_reason == "stop"


def test_timings_are_computed_not_measured() -> None:
    engine = FakeEngine(["a b c d e"], load_s=1.5)
    _, first = _all(engine.chat(USER, SamplingSettings()))
    assert first.timings == Timings(load_s=1.5, prompt_tokens=5, prompt_eval_tokens=5, prompt_eval_s=0.005, generated_tokens=5,
                                    generation_s=0.04, ttft_s=0.015, total_s=0.055)  # fmt: skip
    assert first.timings.generation_tokens_per_second == pytest.approx(100.0)
    _, second = _all(engine.chat(USER, SamplingSettings()))
    assert second.timings.load_s == 0.0 and engine.last_timings is second.timings


def test_ctrl_c_and_a_closed_stream_record_what_was_sent() -> None:
    engine = FakeEngine(["one two three"], interrupt_after=1)
    stream = engine.chat(USER, SamplingSettings())
    assert next(stream) == "one "
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    assert engine.last_timings is not None and engine.last_timings.generated_tokens == 1
    engine = FakeEngine(["one two three"])
    stream = engine.chat(USER, SamplingSettings())
    next(stream)
    next(stream)
    stream.close()
    assert engine.last_timings is not None and engine.last_timings.generated_tokens == 2


def test_failures_a_gate_and_the_context() -> None:
    engine = FakeEngine(fail=EngineError("llama_decode failed"), fail_after=1)
    stream = engine.chat(USER, SamplingSettings())
    assert next(stream) == "hello "
    with pytest.raises(EngineError, match="llama_decode"):
        next(stream)
    gated = FakeEngine(wait=True)
    results: list[Result] = []
    worker = threading.Thread(target=lambda: results.append(_all(gated.chat(USER, SamplingSettings()))[1]))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive() and gated.started == 1 and gated.pieces == 0
    gated.gate.set()
    worker.join(5)
    assert results[0].text == "hello world" and gated.pieces == 2
    with pytest.raises(EngineError, match="exceed context window of 4"):
        list(FakeEngine(n_ctx=4).complete("one two three four five", SamplingSettings()))


def test_the_surface_matches_the_engine_protocol() -> None:
    engine: Engine = FakeEngine(has_chat_template=False, chat_format="chatml")
    assert engine.count_tokens("three little words") == 3 and engine.n_ctx == 2048
    assert "the chat format 'chatml'" in engine.empty_reply_advice(command="chat")
    engine.set_threads(3)
    engine.close()
    assert engine.threads == 3 and engine.llm.closed


def test_the_factory_loads_as_the_plan_says_and_fails_when_told(tmp_path: Path) -> None:
    plan = SimpleNamespace(config=LoadConfig(n_ctx=1024, type_k="q8_0"), threads=6)  # what a load reads of a Plan
    queued = FakeEngine(["hi"])
    factory = FakeFactory(queued, EngineError("no memory"), echo=True)
    engine = factory("demo", [tmp_path / "m.gguf"], plan, chat_format="chatml")
    assert engine is queued and (engine.name, engine.n_ctx, engine.threads, engine.chat_format) == ("demo", 1024, 6, "chatml")
    assert engine.config.type_k == "q8_0"
    with pytest.raises(EngineError, match="no memory"):
        factory("demo", [tmp_path / "m.gguf"], plan)
    fresh = factory("other", [tmp_path / "m.gguf"], plan, threads=2)
    assert fresh.echo and fresh.threads == 2 and factory.made == [queued, fresh] and factory.last is fresh
