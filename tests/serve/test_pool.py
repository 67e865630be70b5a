"""The model pool on fake engines and a fake clock: least recently used out, keep-alive, the memory
budget, the bounded queue and its 503s, a request's turn on its model's thread. No HTTP and no
llama.cpp; the store is real (small crafted models), and so is the log as `llmctl serve` writes it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from llmctl.engine.base import EngineError
from llmctl.engine.fake import FakeEngine
from llmctl.serve.api import ApiError
from llmctl.serve.pool import Loaded, ModelPool, ServerSettings
from tests.serve.inprocess import FakeLoader

MIB = 1024 * 1024


class Clock:
    """Seconds that pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def three(models, cli, make_gguf) -> dict[str, FakeEngine]:
    """Models a, b and c in the store, each with its fake engine."""
    r = cli("import", make_gguf("c.Q8_0.gguf"), "--name", "c")
    assert r.exit_code == 0, r.stderr
    return {name: FakeEngine(name=name) for name in ("a", "b", "c")}


@pytest.fixture
def log(capsys):
    """What the pool logged so far, as `llmctl serve` writes it on stderr."""
    from llmctl.commands.serve_cmd import log_to_stderr

    log_to_stderr()
    capsys.readouterr()
    return lambda: capsys.readouterr().err


def pool_of(engines: dict[str, FakeEngine], clock: Clock, memory: dict[str, int] | int = MIB, **settings: object) -> ModelPool:
    from llmctl.commands import open_store

    return ModelPool(open_store(), ServerSettings(**settings), FakeLoader(engines, memory), clock=clock)  # type: ignore[arg-type]


def use(pool: ModelPool, name: str) -> Loaded:
    """One request that comes and goes."""
    model = pool.acquire(name)
    pool.release(model)
    return model


def test_the_least_recently_used_idle_model_makes_room(three: dict[str, FakeEngine], log) -> None:
    clock = Clock()
    pool = pool_of(three, clock, max_loaded=2)
    use(pool, "a")
    clock.now += 1
    use(pool, "b")
    clock.now += 1
    use(pool, "a")  # a is now the more recent
    clock.now += 1
    use(pool, "c")
    assert list(pool.models) == ["a", "c"]
    assert three["b"].closed and not three["a"].closed  # unloading frees the engine at once
    assert log().splitlines()[-1].endswith(" unloaded b (making room)")
    use(pool, "b")  # loaded again on demand: a is now the least recently used
    assert list(pool.models) == ["c", "b"]
    assert pool.loader.loads == ["a", "b", "c", "b"]  # type: ignore[attr-defined]


def test_a_busy_model_is_never_unloaded_to_make_room(models, log) -> None:
    engines = {name: FakeEngine(name=name) for name in models}
    pool = pool_of(engines, Clock(), max_loaded=1)
    held = pool.acquire("a")
    with pytest.raises(ApiError) as caught:
        pool.acquire("b")
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "2"}
    assert "every loaded model is busy" in caught.value.message
    assert list(pool.models) == ["a"] and not engines["a"].closed
    pool.release(held)
    use(pool, "b")
    assert list(pool.models) == ["b"] and engines["a"].closed


def test_the_memory_budget_unloads_before_max_loaded_is_reached(models, log, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 1 GiB free keeps 512 MiB for itself: two models of 300 MiB do not fit together."""
    profile = tmp_path / "machine.json"
    profile.write_text(json.dumps({"cpu": {"physical_cores": 2}, "ram": {"total_gb": 4, "available_gb": 1}}))
    monkeypatch.setenv("LLMCTL_HW_PROFILE", str(profile))
    engines = {name: FakeEngine(name=name) for name in models}
    pool = pool_of(engines, Clock(), memory=300 * MIB, max_loaded=4)
    use(pool, "a")
    use(pool, "b")
    assert list(pool.models) == ["b"]
    assert log().splitlines()[-1].endswith(" unloaded a (making room in memory)")
    assert [m["memory_bytes"] for m in pool.ps()] == [300 * MIB]


def test_keep_alive_unloads_idle_models_when_it_runs_out(models, log) -> None:
    clock = Clock()
    engines = {name: FakeEngine(name=name) for name in models}
    pool = pool_of(engines, clock, keep_alive=10)
    use(pool, "a")
    busy = pool.acquire("b")  # a request still running when its keep-alive would end
    clock.now += 9.9
    pool.expire()
    assert [(m["name"], m["expires_in_s"]) for m in pool.ps()] == [("a", 0.1), ("b", 0.1)]
    clock.now += 0.1
    pool.expire()
    assert list(pool.models) == ["b"] and engines["a"].closed
    assert log().splitlines()[-1].endswith(" unloaded a (keep-alive expired)")
    clock.now += 100
    pool.expire()
    assert list(pool.models) == ["b"]  # busy: kept however long it runs
    pool.release(busy)  # its keep-alive starts now
    assert [m["expires_in_s"] for m in pool.ps()] == [10]
    clock.now += 10
    pool.expire()
    assert pool.models == {}


def test_keep_alive_minus_one_keeps_models_for_ever(models) -> None:
    clock = Clock()
    pool = pool_of({"a": FakeEngine(name="a")}, clock, keep_alive=-1)
    use(pool, "a")
    clock.now += 10**9
    pool.expire()
    assert [(m["name"], m["expires_in_s"], m["loaded_s_ago"]) for m in pool.ps()] == [("a", None, 10**9)]


def test_requests_past_the_queue_are_refused_with_503_and_retry_after(models) -> None:
    """--max-queue 2: one request runs and two wait; the fourth is refused at once."""
    pool = pool_of({"a": FakeEngine(name="a")}, Clock(), max_queue=2)
    held = [pool.acquire("a") for _ in range(3)]
    with pytest.raises(ApiError) as caught:
        pool.acquire("a")
    assert caught.value.status == 503 and caught.value.kind == "server_error" and caught.value.headers == {"Retry-After": "1"}
    assert caught.value.message == "model 'a' is busy (3 requests queued)"
    assert [m["busy"] for m in pool.ps()] == [3]  # the refused one took no place
    pool.release(held.pop())
    held.append(pool.acquire("a"))  # a place came free
    for model in held:
        pool.release(model)
    assert [m["busy"] for m in pool.ps()] == [0]


def test_requests_take_turns_on_their_model_and_give_their_place_back(models) -> None:
    """One generation at a time per model; a request cancelled before its turn never runs and frees its place."""
    pool = pool_of({"a": FakeEngine(name="a")}, Clock())
    first, second, third = (pool.acquire("a") for _ in range(3))
    gate = threading.Event()
    ran: list[str] = []
    running = pool.submit(first, lambda: gate.wait(10) and ran.append("first"))
    waiting = pool.submit(second, lambda: ran.append("second"))
    cancelled = pool.submit(third, lambda: ran.append("third"))
    assert cancelled.cancel()
    assert [m["busy"] for m in pool.ps()] == [2]
    gate.set()
    running.result(10)
    waiting.result(10)
    assert ran == ["first", "second"]
    assert [m["busy"] for m in pool.ps()] == [0]
    pool.close()


def test_stop_unloads_an_idle_model_and_refuses_a_busy_one(models, log) -> None:
    engines = {"a": FakeEngine(name="a")}
    pool = pool_of(engines, Clock())
    held = pool.acquire("a")
    with pytest.raises(ApiError) as caught:
        pool.unload("a")
    assert caught.value.status == 409 and "busy" in caught.value.message
    assert not engines["a"].closed
    pool.release(held)
    assert pool.unload("a") and engines["a"].closed and pool.models == {}
    assert log().splitlines()[-1].endswith(" unloaded a (stopped)")
    assert not pool.unload("a") and not pool.unload("b") and not pool.unload("/etc/passwd")


def test_a_model_that_fails_to_load_is_a_500_and_holds_nothing(models) -> None:
    class Failing(FakeLoader):
        def load(self, name: str) -> FakeEngine:
            raise EngineError("llama.cpp could not load the file")

    from llmctl.commands import open_store

    pool = ModelPool(open_store(), ServerSettings(), Failing({}), clock=Clock())
    with pytest.raises(ApiError) as caught:
        pool.acquire("a")
    assert caught.value.status == 500 and caught.value.message == "model 'a' failed to load: llama.cpp could not load the file"
    assert pool.models == {} and pool.ps() == []


def test_the_planned_loader_weighs_the_fit_plan_and_loads_where_run_does(models, fake_engines, log) -> None:
    """The loader in use: the plan's estimate is the memory the budget weighs, the engine comes from
    runner.engine_factory (a fake here) with the plan's context, and what the load had to change is
    logged as a warning."""
    from llmctl.commands import open_store
    from llmctl.engine.runner import plan_model
    from llmctl.plan.fit import Overrides

    fake_engines.add(FakeEngine(notes=["fell back to 0 GPU layers"]))
    store = open_store()
    pool = ModelPool(store, ServerSettings(ctx=1024), clock=Clock())
    model = use(pool, "a")
    assert fake_engines.made == [model.engine] and model.engine.name == "a"
    assert model.memory == plan_model(store, "a", Overrides(n_ctx=1024)).plan.chosen.estimate.total > 0
    assert [(m["name"], m["n_ctx"], m["memory_bytes"]) for m in pool.ps()] == [("a", 1024, model.memory)]
    assert log().splitlines()[-1].endswith(" warning: fell back to 0 GPU layers")
