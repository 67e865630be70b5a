"""docs/reliability.md names, for each attack, the test that plays it: every name must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_test_named_in_the_reliability_table_exists() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    sources = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        sources.setdefault(path.name, []).append(path.read_text(encoding="utf-8"))
    named = set(re.findall(r"(test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)", text))
    assert len(named) > 50
    missing = [f"{file}::{test}" for file, test in sorted(named) if not any(re.search(rf"^\s*def {test}\(", s, re.M) for s in sources.get(file, []))]
    assert missing == []
