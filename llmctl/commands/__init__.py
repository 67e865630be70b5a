"""One module per subcommand: parse, call the core, render. No heavy imports at module level."""

from __future__ import annotations

from llmctl.config import get_settings
from llmctl.models.store import Store


def open_store() -> Store:
    return Store(get_settings())
