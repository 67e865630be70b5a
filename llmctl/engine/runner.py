"""From a model name to a loaded engine: resolve, read the header, plan, load, record use.

Nothing here prints: what the user should hear (the plan's warnings, what the loader had to
change) comes back as ``Loaded.notes`` and, as it happens, through ``LoadFeedback``, which
the commands fill with ``output``'s functions. Engines are made by ``engine_factory``
(llama.cpp's ``Engine.load``); tests put ``llmctl.engine.fake.FakeFactory`` there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from llmctl import gguf
from llmctl.config import debug_enabled, get_settings
from llmctl.engine.base import Engine, EngineFactory, ReloadError
from llmctl.errors import LlmctlError
from llmctl.models.locate import Located
from llmctl.models.store import ResolvedModel, Store
from llmctl.plan.fit import Overrides, Plan, make_plan
from llmctl.plan.hardware import get_hardware
from llmctl.plan.tuned import apply_tuned


def load_llama_engine(name: str, paths: list[Path], plan: Plan, *, rpc: list[str] | None = None, **options: Any) -> Engine:
    """llama.cpp's engine, imported when a model is loaded: in this process (``llmctl.engine.llama``),
    or, with RPC workers (``rpc``), in a llama-server child (``llmctl.engine.server_engine``)."""
    if rpc:
        from llmctl.engine.server_engine import ServerEngine

        return ServerEngine.load(name, paths, plan, rpc=rpc, **options)
    from llmctl.engine.llama import Engine as LlamaEngine

    return LlamaEngine.load(name, paths, plan, **options)


# Where run, chat and serve's pool get their engines; a field tests swap for a fake's factory.
engine_factory: EngineFactory = load_llama_engine


def _quiet(_text: str) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass
class LoadFeedback:
    """How a load reports as it goes: ``note`` for each warning when it arises, ``progress`` around the
    load itself (a spinner on a terminal). The default says nothing."""

    note: Callable[[str], None] = lambda _text: None
    progress: Callable[[str], AbstractContextManager[None]] = _quiet


@dataclass
class Planned:
    plan: Plan
    model: ResolvedModel
    info: gguf.ModelInfo
    # Not plan.threads: None lets the engine take the plan's count, and after chat's `/set threads`
    # it is the live count, which a model restored by reload_with_context must keep.
    threads: int | None
    overrides: Overrides | None = None  # what the plan was made with (the user's, then the tuned profile's)
    force: bool = False
    rpc: list[str] | None = None  # llama.cpp RPC workers: the model runs in a llama-server child, its layers on them


@dataclass
class Loaded:
    engine: Engine
    plan: Plan
    model: ResolvedModel
    info: gguf.ModelInfo
    planned: Planned | None = None
    notes: list[str] = field(default_factory=list)  # the plan's warnings, then what the loader changed


def plan_model(store: Store, name: str, overrides: Overrides, *, force: bool = False, rpc: list[str] | None = None) -> Planned:
    """Resolve, read the header (llama.cpp never sees a file we reject) and plan; nothing is loaded.
    With ``rpc`` workers the plan's layers go to them (``server_engine.offload_to_workers``)."""
    return _plan_resolved(store.resolve(name), overrides, force=force, rpc=rpc)


def _plan_resolved(resolved: ResolvedModel, overrides: Overrides, *, force: bool, rpc: list[str] | None = None) -> Planned:
    located = Located.of(resolved)
    hw = get_hardware(get_settings())
    overrides = apply_tuned(overrides, resolved.paths)
    if not rpc:
        plan = make_plan([located.candidate()], hw, overrides, force=force)
        return Planned(plan, resolved, located.info, overrides.threads, overrides, force, rpc)
    from llmctl.engine.server_engine import offload_to_workers

    # The weights go to the workers: this machine's memory does not decide; the workers' does.
    plan = offload_to_workers(make_plan([located.candidate()], hw, overrides, elsewhere=True), located.info.layer_count, overrides.n_gpu_layers)
    _check_workers_fit(located, plan, rpc, force)
    return Planned(plan, resolved, located.info, overrides.threads, overrides, force, rpc)


def _check_workers_fit(located: Located, plan: Plan, rpc: list[str], force: bool) -> None:
    """llama.cpp's own projection of ``plan`` across the workers (``fit --rpc``'s): refused (exit 4)
    when a device would need more than it has free, unless ``force``. Each worker is checked first:
    llama.cpp aborts on one it cannot reach."""
    from llmctl.engine.rpc import parse_endpoints
    from llmctl.plan import rpc_fit

    cfg = plan.config
    _, projection = rpc_fit.check_workers(str(located.name), located.paths[0], parse_endpoints(",".join(rpc)),
                                          layer_count=(located.info.layer_count or 0) + 1, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers,
                                          type_k=cfg.type_k, type_v=cfg.type_v, flash_attn=cfg.flash_attn)  # fmt: skip
    if not projection.fits:
        if not force:
            raise rpc_fit.refusal(projection)
        plan.warnings.append(f"{located.name} does not fit on the RPC workers; loading anyway because of --force")


def check_chat_format(name: str | None) -> None:
    """An unknown --chat-format is a usage error before anything loads."""
    if name is None:
        return
    from llama_cpp import llama_chat_format

    known = sorted(llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers)
    if name not in known:
        from llmctl.errors import UsageError

        raise UsageError(f"--chat-format {name!r} is not a known chat format", hint="one of: " + ", ".join(known))


def load_planned(store: Store, planned: Planned, *, chat_format: str | None = None, feedback: LoadFeedback | None = None) -> Loaded:
    """Load what ``plan_model`` planned, record its use; ``feedback`` hears the warnings as they arise."""
    feedback = feedback or LoadFeedback()
    notes = list(planned.plan.warnings)
    for warning in notes:
        feedback.note(warning)  # before loading, which may take long or fail
    resolved = planned.model
    where = f" on {len(planned.rpc)} RPC worker{'s' if len(planned.rpc) > 1 else ''}" if planned.rpc else ""
    with feedback.progress(f"Loading {resolved.name}{where}…"):
        engine = engine_factory(
            resolved.name,
            resolved.paths,
            planned.plan,
            threads=planned.threads,
            verbose=debug_enabled(),  # llama.cpp's own log; --verbose is the timing summary
            chat_format=chat_format,
            **({"rpc": planned.rpc} if planned.rpc else {}),
        )
    for note in engine.notes:
        feedback.note(note)
    notes += engine.notes
    if resolved.entry is not None:
        try:
            store.touch(resolved.entry.name)
        except OSError:
            pass  # a read-only store still runs
    return Loaded(engine, planned.plan, resolved, planned.info, planned, notes)


def reload_with_context(store: Store, loaded: Loaded, n_ctx: int, *, feedback: LoadFeedback | None = None) -> Loaded:
    """The same model with another context size, for chat's ``/set ctx``.

    The new size is planned first: one that does not fit is refused while the
    current model stays loaded. Then the current model is freed (two copies
    might not fit) and the new one loaded; if that fails, the previous size is
    loaded again and ReloadError carries it.
    """
    before = loaded.planned or Planned(loaded.plan, loaded.model, loaded.info, loaded.engine.threads)
    threads = loaded.engine.threads or before.threads
    overrides = replace(before.overrides or Overrides(), n_ctx=n_ctx, threads=threads)
    planned = _plan_resolved(loaded.model, overrides, force=before.force, rpc=before.rpc)
    chat_format = loaded.engine.chat_format
    previous_ctx = loaded.engine.n_ctx
    loaded.engine.close()
    try:
        return load_planned(store, planned, chat_format=chat_format, feedback=feedback)
    except LlmctlError as exc:
        failure = exc
    before = replace(before, threads=threads)
    try:
        restored = load_planned(store, before, chat_format=chat_format, feedback=feedback)
    except LlmctlError:
        raise ReloadError(f"{failure.message}; the previous {previous_ctx}-token context could not be loaded again either", failure.hint, None) from None
    raise ReloadError(f"{failure.message}; kept the {previous_ctx}-token context", failure.hint, restored.engine)


def open_model(
    store: Store,
    name: str,
    overrides: Overrides,
    *,
    force: bool = False,
    chat_format: str | None = None,
    feedback: LoadFeedback | None = None,
    rpc: list[str] | None = None,
) -> Loaded:
    """Resolve, plan and load ``name`` (``plan_model`` then ``load_planned``); ``rpc``: on these llama.cpp RPC workers."""
    check_chat_format(chat_format)
    return load_planned(store, plan_model(store, name, overrides, force=force, rpc=rpc), chat_format=chat_format, feedback=feedback)
