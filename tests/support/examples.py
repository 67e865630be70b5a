"""How many examples a property test draws: its full count in a full run, a share in the fast suite.

``@settings(max_examples=examples(300))`` draws 300 examples in a full ``pytest`` run and a
tenth of them (at least 10) in the fast suite, ``pytest -m "not slow"``, which is for quick
feedback while editing. The full run keeps every test's thorough count, so no fuzz test is
weaker where it counts. ``LLMCTL_TEST_EXAMPLES=full`` draws the full counts in any run,
``LLMCTL_TEST_EXAMPLES=fast`` the share in any run. tests/conftest.py chooses before the
test modules are imported (their decorators read the choice); pytest's header says which.
"""

from __future__ import annotations

import os

ENV = "LLMCTL_TEST_EXAMPLES"
FAST_SHARE = 10  # the fast suite draws 1/FAST_SHARE of each full count...
FAST_MIN = 10  # ...but never fewer than this

_full = True


def choose(markexpr: str) -> str:
    """Full counts unless the run leaves the slow tests out (or LLMCTL_TEST_EXAMPLES says); returns the choice."""
    global _full
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted not in ("", "full", "fast"):
        raise ValueError(f"{ENV} must be 'full' or 'fast', not {wanted!r}")
    fast_suite = "not slow" in " ".join(markexpr.split())
    _full = wanted == "full" or (wanted != "fast" and not fast_suite)
    return "full" if _full else "fast"


def examples(full: int) -> int:
    """The number of examples to draw for a test whose thorough count is ``full``."""
    return full if _full else min(full, max(FAST_MIN, full // FAST_SHARE))
