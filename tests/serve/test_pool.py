"""The model pool with stand-in children and a fake clock: least recently used out, keep-alive, the
memory budget, the bounded queue (slots + --max-queue) and its 503s, children that end and start
again. No HTTP and no processes; the store is real (small crafted models), and so is the log as
`llmctl serve` writes it. The real loader's plan is checked against `fit` at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmctl.engine.server_process import Address, ServerSpec, ServerStartError
from llmctl.serve.api import ApiError
from llmctl.serve.pool import Loaded, ModelPool, ServerSettings

MIB = 1024 * 1024


class Clock:
    """Seconds that pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StubChild:
    """A child that is no process: its end is the test's to decide."""

    spec: ServerSpec
    address: Address = field(default_factory=lambda: Address(port=1))
    pid: int = 4242
    code: int | None = None
    stops: int = 0
    terminated: bool = False

    @property
    def log_path(self) -> Path:
        return Path("/logs") / f"{self.spec.alias}.log"

    def exit_code(self) -> int | None:
        return self.code

    def state(self) -> str:
        from llmctl.engine.server_process import describe_exit

        return describe_exit(self.code)

    def terminate(self) -> None:
        self.terminated = True

    def stop(self) -> None:
        self.stops += 1
        if self.code is None:
            self.code = -15


class StubLoader:
    """Children by name, ``memory`` bytes each (per name, or one figure for all), ``slots`` each;
    ``loads`` lists the names started, in order, ``children`` the latest child of each."""

    def __init__(self, memory: dict[str, int] | int = MIB, slots: int = 1, fail: str | None = None) -> None:
        self.memory, self.slots, self.fail = memory, slots, fail
        self.loads: list[str] = []
        self.children: dict[str, StubChild] = {}
        self.closed = False

    def plan(self, name: str) -> tuple[int, str]:
        return (self.memory[name] if isinstance(self.memory, dict) else self.memory), name

    def load(self, name: str) -> StubChild:
        if self.fail:
            raise ServerStartError(self.fail, hint="its log: /logs/x.log")
        self.loads.append(name)
        child = StubChild(ServerSpec(model=Path(f"/models/{name}.gguf"), alias=name, n_ctx=2048, slots=self.slots))
        self.children[name] = child
        return child

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def three(models, cli, make_gguf) -> list[str]:
    """Models a, b and c in the store."""
    r = cli("import", make_gguf("c.Q8_0.gguf"), "--name", "c")
    assert r.exit_code == 0, r.stderr
    return ["a", "b", "c"]


@pytest.fixture
def log(capsys):
    """What the pool logged so far, as `llmctl serve` writes it on stderr."""
    from llmctl.commands.serve_cmd import log_to_stderr

    log_to_stderr()
    capsys.readouterr()
    return lambda: capsys.readouterr().err


def pool_of(clock: Clock, loader: StubLoader | None = None, **settings: object) -> ModelPool:
    from llmctl.commands import open_store

    return ModelPool(open_store(), ServerSettings(**settings), loader or StubLoader(), clock=clock)  # type: ignore[arg-type]


def use(pool: ModelPool, name: str) -> Loaded:
    """One request that comes and goes."""
    model = pool.acquire(name)
    pool.release(model)
    return model


def children(pool: ModelPool) -> dict[str, StubChild]:
    return pool.loader.children  # type: ignore[attr-defined]


def test_the_least_recently_used_idle_model_makes_room(three: list[str], log) -> None:
    clock = Clock()
    pool = pool_of(clock, max_loaded=2)
    use(pool, "a")
    clock.now += 1
    use(pool, "b")
    clock.now += 1
    use(pool, "a")  # a is now the more recent
    clock.now += 1
    b = children(pool)["b"]
    use(pool, "c")
    assert list(pool.models) == ["a", "c"]
    assert b.stops == 1 and children(pool)["a"].stops == 0  # unloading stops the child at once
    assert log().splitlines()[-2].endswith(" unloaded b (making room)")
    use(pool, "b")  # loaded again on demand: a is now the least recently used
    assert list(pool.models) == ["c", "b"]
    assert pool.loader.loads == ["a", "b", "c", "b"]  # type: ignore[attr-defined]


def test_a_busy_model_is_never_unloaded_to_make_room(models, log) -> None:
    pool = pool_of(Clock(), max_loaded=1)
    held = pool.acquire("a")
    with pytest.raises(ApiError) as caught:
        pool.acquire("b")
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "2"}
    assert "every loaded model is busy" in caught.value.message
    assert list(pool.models) == ["a"] and children(pool)["a"].stops == 0
    pool.release(held)
    use(pool, "b")
    assert list(pool.models) == ["b"] and children(pool)["a"].stops == 1


def test_the_memory_budget_unloads_before_max_loaded_is_reached(models, log, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 1 GiB free keeps 512 MiB for itself: two models of 300 MiB do not fit together."""
    profile = tmp_path / "machine.json"
    profile.write_text(json.dumps({"cpu": {"physical_cores": 2}, "ram": {"total_gib": 4, "available_gib": 1}}))
    monkeypatch.setenv("LLMCTL_HW_PROFILE", str(profile))
    pool = pool_of(Clock(), StubLoader(memory=300 * MIB), max_loaded=4)
    use(pool, "a")
    use(pool, "b")
    assert list(pool.models) == ["b"]
    assert " unloaded a (making room in memory)" in log()
    assert [m["memory_bytes"] for m in pool.ps()] == [300 * MIB]


def test_keep_alive_unloads_idle_models_when_it_runs_out(models, log) -> None:
    clock = Clock()
    pool = pool_of(clock, keep_alive=10)
    use(pool, "a")
    busy = pool.acquire("b")  # a request still running when its keep-alive would end
    clock.now += 9.9
    pool.expire()
    assert [(m["name"], m["expires_in_s"]) for m in pool.ps()] == [("a", 0.1), ("b", 0.1)]
    clock.now += 0.1
    pool.expire()
    assert list(pool.models) == ["b"] and children(pool)["a"].stops == 1
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
    pool = pool_of(clock, keep_alive=-1)
    use(pool, "a")
    clock.now += 10**9
    pool.expire()
    assert [(m["name"], m["expires_in_s"], m["loaded_s_ago"]) for m in pool.ps()] == [("a", None, 10**9)]


def test_requests_past_the_slots_and_the_queue_are_refused_with_503_and_retry_after(models) -> None:
    """2 slots and --max-queue 2: two requests decode, two wait; the fifth is refused at once."""
    pool = pool_of(Clock(), StubLoader(slots=2), max_queue=2)
    held = [pool.acquire("a") for _ in range(4)]
    with pytest.raises(ApiError) as caught:
        pool.acquire("a")
    assert caught.value.status == 503 and caught.value.kind == "server_error" and caught.value.headers == {"Retry-After": "1"}
    assert caught.value.message == "model 'a' is busy (2 slot(s) in use, 2 request(s) queued)"
    assert [(m["busy"], m["slots"]) for m in pool.ps()] == [(4, 2)]  # the refused one took no place
    pool.release(held.pop())
    held.append(pool.acquire("a"))  # a place came free
    for model in held:
        pool.release(model)
    assert [m["busy"] for m in pool.ps()] == [0]


def test_stop_unloads_an_idle_model_and_refuses_a_busy_one(models, log) -> None:
    pool = pool_of(Clock())
    held = pool.acquire("a")
    with pytest.raises(ApiError) as caught:
        pool.unload("a")
    assert caught.value.status == 409 and "busy" in caught.value.message
    assert children(pool)["a"].stops == 0
    pool.release(held)
    assert pool.unload("a") and children(pool)["a"].stops == 1 and pool.models == {}
    assert log().splitlines()[-1].endswith(" unloaded a (stopped)")
    assert not pool.unload("a") and not pool.unload("b") and not pool.unload("/etc/passwd")


def test_a_model_that_fails_to_load_is_a_500_and_holds_nothing(models, log) -> None:
    pool = pool_of(Clock(), StubLoader(fail="llama-server exited 1 while loading a: error loading model"))
    with pytest.raises(ApiError) as caught:
        pool.acquire("a")
    assert caught.value.status == 500 and caught.value.message == "model 'a' failed to load: llama-server exited 1 while loading a: error loading model"
    assert "/logs/x.log" not in caught.value.message  # the client is told no path of this machine
    assert pool.models == {} and pool.ps() == []
    assert "a failed to load: llama-server exited 1 while loading a: error loading model (its log: /logs/x.log)" in log()  # the operator is


def test_a_child_that_ends_is_reported_once_and_started_again_on_the_next_request(models, log) -> None:
    clock = Clock()
    pool = pool_of(clock)
    first = use(pool, "a")
    children(pool)["a"].code = -9  # kill -9 of the child
    pool.check_children()
    pool.check_children()
    warnings = [line for line in log().splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].endswith("warning: a: llama-server killed by SIGKILL; it starts again on the next request (log /logs/a.log)")
    assert [(m["name"], m["state"]) for m in pool.ps()] == [("a", "killed by SIGKILL")]  # ps shows it until then
    again = use(pool, "a")
    assert again is not first and pool.loader.loads == ["a", "a"]  # type: ignore[attr-defined]
    assert [(m["name"], m["state"]) for m in pool.ps()] == [("a", "ready")]
    assert " unloaded a (its llama-server killed by SIGKILL)" in log()


def test_a_child_that_ends_with_requests_in_flight_is_replaced_and_they_give_their_places_back(models) -> None:
    pool = pool_of(Clock())
    in_flight = pool.acquire("a")
    children(pool)["a"].code = 1
    fresh = pool.acquire("a")  # not refused as busy: the ended child's requests are failing
    assert fresh is not in_flight and [m["busy"] for m in pool.ps()] == [1]
    pool.release(in_flight)  # the failed request gives back its place on the old child
    pool.release(fresh)
    assert [m["busy"] for m in pool.ps()] == [0]
    assert pool.unload("a")


def test_close_asks_every_child_to_end_at_once_then_waits(models) -> None:
    pool = pool_of(Clock(), max_loaded=2)
    use(pool, "a")
    use(pool, "b")
    a, b = children(pool)["a"], children(pool)["b"]
    pool.close()
    assert a.terminated and b.terminated and a.stops == b.stops == 1
    assert pool.models == {} and pool.loader.closed  # type: ignore[attr-defined]


def test_the_child_loader_plans_as_fit_does_with_slots(models, log) -> None:
    """The loader in use: the serving plan's estimate is the memory the budget weighs, and the child
    is started with its slots and per-slot context (--parallel and --ctx as given)."""
    from llmctl.commands import open_store
    from llmctl.engine.server_process import plan_server
    from llmctl.plan.fit import Overrides
    from llmctl.serve.pool import ChildLoader

    store = open_store()
    loader = ChildLoader(store, ServerSettings(ctx=1024, parallel=3))
    memory, planned = loader.plan("a")
    assert memory == planned.memory == plan_server(store, "a", Overrides(n_ctx=1024, parallel=3, serving=True)).memory > 0
    assert (planned.spec.n_ctx, planned.spec.slots, planned.spec.total_ctx, planned.spec.alias) == (1024, 3, 3072, "a")
    one = ChildLoader(store, ServerSettings(ctx=1024, parallel=1)).plan("a")[0]
    assert one < memory  # three slots hold three contexts
    loader.close()
