"""Fixtures for serve's tests: small crafted models in the test's store."""

from __future__ import annotations

import pytest


@pytest.fixture
def models(cli, make_gguf) -> list[str]:
    """Two small models in the test's store: a and b."""
    for name in ("a", "b"):
        r = cli("import", make_gguf(f"{name}.Q8_0.gguf"), "--name", name)
        assert r.exit_code == 0, r.stderr
    return ["a", "b"]
