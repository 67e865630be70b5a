"""From a model name to a loaded engine: resolve, read the header, plan, load, record use."""

from __future__ import annotations

from dataclasses import dataclass

from llmctl import gguf, output
from llmctl.config import debug_enabled, get_settings
from llmctl.engine import Engine
from llmctl.fit import Candidate, Overrides, Plan, make_plan
from llmctl.hardware import get_hardware
from llmctl.store import ResolvedModel, Store


@dataclass
class Loaded:
    engine: Engine
    plan: Plan
    model: ResolvedModel
    info: gguf.ModelInfo


def open_model(
    store: Store,
    name: str,
    overrides: Overrides,
    *,
    force: bool = False,
    chat_format: str | None = None,
) -> Loaded:
    resolved = store.resolve(name)
    _, info = gguf.read_model(resolved.paths)  # validates before llama.cpp sees the file
    hw = get_hardware(get_settings())
    size = sum(p.stat().st_size for p in resolved.paths)
    plan = make_plan([Candidate(resolved.name, info, size, str(resolved.paths[0]))], hw, overrides, force=force)
    for warning in plan.warnings:
        output.warn(warning)
    with output.status(f"Loading {resolved.name}…"):
        engine = Engine.load(
            resolved.name,
            resolved.paths,
            plan,
            threads=overrides.threads,
            verbose=debug_enabled(),  # llama.cpp's own log; --verbose is the timing summary
            chat_format=chat_format,
        )
    for note in engine.notes:
        output.warn(note)
    if resolved.entry is not None:
        try:
            store.touch(resolved.entry.name)
        except OSError:
            pass  # a read-only store still runs
    return Loaded(engine, plan, resolved, info)
