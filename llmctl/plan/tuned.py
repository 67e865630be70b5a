"""Per-machine tuned settings: what ``bench --tune`` found fastest for a model, kept for run, chat, fit and show.

Profiles live in ``$LLMCTL_HOME/tuned.json``, keyed by machine (``hardware._machine_key``) then
by model (file name and size). A profile sits under the user's own overrides: a flag the user
gives wins over the tuned value.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, TypedDict, cast

from llmctl.fileio import atomic_write_text
from llmctl.plan.fit import Overrides


class TunedProfile(TypedDict):
    """One model's fastest settings on one machine, and the rates that chose them."""

    threads: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    tg_ts: float
    pp_ts: float
    created: str


def tuned_path(home: Path) -> Path:
    return home / "tuned.json"


def model_key(paths: list[Path]) -> str:
    first = paths[0]
    st = first.stat()
    return f"{first.name}|{st.st_size}"


def load_tuned(home: Path, machine: str, paths: list[Path]) -> TunedProfile | None:
    try:
        data = json.loads(tuned_path(home).read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(machine, {}).get(model_key(paths)) if isinstance(data, dict) else None
    return cast(TunedProfile, entry) if isinstance(entry, dict) else None


def tuned_here(paths: list[Path]) -> TunedProfile | None:
    """This machine's profile for the model in ``paths`` (in the configured home), if it was tuned."""
    from llmctl.config import get_settings
    from llmctl.plan.hardware import _machine_key

    return load_tuned(get_settings().home, _machine_key(), paths)


def save_tuned(home: Path, machine: str, paths: list[Path], profile: TunedProfile | dict[str, Any]) -> None:
    try:
        data = json.loads(tuned_path(home).read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault(machine, {})[model_key(paths)] = profile
    atomic_write_text(tuned_path(home), json.dumps(data, indent=1) + "\n")


def describe_tuned(profile: TunedProfile | dict[str, Any]) -> str:
    """A tuned profile in one phrase, the same wherever it is shown (bench --tune, fit, show)."""
    return (
        f"{_count(profile['threads'], 'thread')}, batch {profile['n_batch']}/{profile['n_ubatch']}, "
        f"{_count(profile['n_gpu_layers'], 'GPU layer')} (tg {profile['tg_ts']:.1f} t/s, pp {profile['pp_ts']:.1f} t/s)"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def merge_tuned(overrides: Overrides, tuned: TunedProfile | dict[str, Any] | None) -> Overrides:
    """A tuned profile (from ``load_tuned``) under the user's own overrides."""
    if not tuned:
        return overrides
    return replace(
        overrides,
        threads=overrides.threads or tuned.get("threads"),
        n_batch=overrides.n_batch or tuned.get("n_batch"),
        n_ubatch=overrides.n_ubatch or tuned.get("n_ubatch"),
        n_gpu_layers=overrides.n_gpu_layers if overrides.n_gpu_layers is not None else tuned.get("n_gpu_layers") or None,
    )


def apply_tuned(overrides: Overrides, paths: list[Path]) -> Overrides:
    """This machine's ``bench --tune`` result for the model, where the user did not say otherwise."""
    return merge_tuned(overrides, tuned_here(paths))
