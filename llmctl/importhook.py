"""Run a function right after a module is first imported, whoever imports it.

llmctl adjusts two parts of llama-cpp-python (its chat-template formatter and
its llama.cpp log callback) without importing llama_cpp itself, which would
cost every command ~0.2 s: a finder on ``sys.meta_path`` wraps the module's
loader and calls the function once the module has executed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Callable

_pending: dict[str, list[Callable[[ModuleType], None]]] = {}


def after_import(name: str, action: Callable[[ModuleType], None]) -> None:
    """Call ``action(module)`` now if ``name`` is imported already, else right after its first import."""
    module = sys.modules.get(name)
    if module is not None:
        action(module)
        return
    actions = _pending.setdefault(name, [])
    if action not in actions:
        actions.append(action)
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenAct(spec.loader, fullname)
        return spec


class _ThenAct(importlib.abc.Loader):
    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        for action in _pending.pop(self._name, []):
            action(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, … for tracebacks and inspect
        return getattr(self._loader, name)
