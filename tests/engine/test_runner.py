"""From a name to a loaded engine, on the fake engine: notes returned and told as they arise, the factory, /set ctx's reload."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest

from llmctl.commands import open_store
from llmctl.engine import runner
from llmctl.engine.base import EngineError, ReloadError
from llmctl.engine.fake import FakeEngine
from llmctl.plan.fit import Overrides


def _recording() -> tuple[runner.LoadFeedback, list[str]]:
    events: list[str] = []

    @contextmanager
    def progress(text: str) -> Iterator[None]:
        events.append(f"start {text}")
        try:
            yield
        finally:
            events.append("done")

    return runner.LoadFeedback(note=lambda text: events.append(f"note {text}"), progress=progress), events


def test_a_load_returns_its_notes_and_tells_them_as_they_arise(make_gguf, fake_engines) -> None:
    model = make_gguf("demo.Q8_0.gguf", n_ctx=4096)
    store = open_store()
    planned = runner.plan_model(store, str(model), Overrides(n_ctx=2048, threads=3))
    planned.plan.warnings.append("the plan's warning")
    fake_engines.add(FakeEngine(notes=["loaded with fewer GPU layers"]))
    feedback, events = _recording()
    loaded = runner.load_planned(store, planned, chat_format="chatml", feedback=feedback)
    assert events == ["note the plan's warning", f"start Loading {planned.model.name}…", "done", "note loaded with fewer GPU layers"]
    assert loaded.notes == ["the plan's warning", "loaded with fewer GPU layers"]
    engine = fake_engines.last
    assert loaded.engine is engine and (engine.n_ctx, engine.threads, engine.chat_format) == (2048, 3, "chatml")
    # Without feedback nothing is told, and the notes still come back.
    fake_engines.add(FakeEngine(notes=["a smaller context"]))
    assert runner.load_planned(store, planned).notes == ["the plan's warning", "a smaller context"]


def test_a_failed_load_has_told_the_plans_warnings_first(make_gguf, fake_engines) -> None:
    store = open_store()
    planned = runner.plan_model(store, str(make_gguf()), Overrides())
    planned.plan.warnings.append("does not fit: loading anyway (--force)")
    fake_engines.add(EngineError("llama.cpp could not load it"))
    feedback, events = _recording()
    with pytest.raises(EngineError):
        runner.load_planned(store, planned, feedback=feedback)
    assert events[0] == "note does not fit: loading anyway (--force)" and events[-1] == "done"


def test_set_ctx_that_fails_loads_the_previous_size_again(make_gguf, fake_engines) -> None:
    store = open_store()
    loaded = runner.open_model(store, str(make_gguf(n_ctx=4096)), Overrides(n_ctx=2048, threads=2))
    first = loaded.engine
    fake_engines.add(EngineError("out of memory"))  # the 4096-token load, then the previous size again
    with pytest.raises(ReloadError, match="out of memory; kept the 2048-token context") as caught:
        runner.reload_with_context(store, loaded, 4096)
    restored = caught.value.engine
    assert first.closed and restored is fake_engines.last and restored is not first
    assert restored.n_ctx == 2048 and restored.threads == 2
    reloaded = runner.reload_with_context(store, runner.Loaded(restored, loaded.plan, loaded.model, loaded.info, loaded.planned), 1024)
    assert reloaded.engine.n_ctx == 1024 and restored.closed
