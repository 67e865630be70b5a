"""A response format's grammar is built once per run: where run's flags are checked, then handed to
the engine as it is. Converting a JSON schema is not free, and building it again in the engine
repeated the work. (serve hands response formats to llama-server, which builds its own.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmctl.errors import EXIT_USAGE

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every grammar llama.cpp is asked to build, by kind ("schema" or "json")."""
    from llama_cpp import LlamaGrammar

    made: list[str] = []
    from_schema, from_string = LlamaGrammar.from_json_schema, LlamaGrammar.from_string

    inside = []  # from_json_schema builds through from_string: that is one build, not two

    def counted_schema(json_schema: str, verbose: bool = True) -> Any:
        made.append("schema")
        inside.append(True)
        try:
            return from_schema(json_schema, verbose=verbose)
        finally:
            inside.pop()

    def counted_string(grammar: str, verbose: bool = True) -> Any:
        if not inside:
            made.append("json")
        return from_string(grammar, verbose=verbose)

    monkeypatch.setattr(LlamaGrammar, "from_json_schema", staticmethod(counted_schema))
    monkeypatch.setattr(LlamaGrammar, "from_string", staticmethod(counted_string))
    return made


@pytest.mark.slow  # llama.cpp on the demo model, a grammar-constrained reply per case
def test_run_builds_the_grammar_once(cli, demo_model: Path, tmp_path: Path, builds: list[str]) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}')
    for extra in ((), ("--raw",)):
        builds.clear()
        r = cli("run", demo_model, "A person as JSON.", "--temperature", "0", "--max-tokens", "8", "--json-schema", schema, *extra)
        assert r.exit_code == 0, r.stderr
        assert builds == ["schema"], (extra, builds)
    builds.clear()
    r = cli("run", demo_model, "JSON please.", "--temperature", "0", "--max-tokens", "8", "--format", "json")
    assert r.exit_code == 0 and builds == ["json"], (r.stderr, builds)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "foo"}')
    r = cli("run", demo_model, "x", "--json-schema", bad)
    assert r.exit_code == EXIT_USAGE and "JSON schema" in r.stderr


def test_run_builds_the_grammar_once_and_hands_it_to_the_engine(cli, make_gguf, fake_engines, tmp_path: Path, builds: list[str]) -> None:
    """run's side of the test above on the fake engine: one build from the flags, that grammar passed down
    as it is (the real engine's own side, not building it again, is the slow test's)."""
    from llama_cpp import LlamaGrammar

    model = make_gguf()
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    for extra, kind in (((), "chat"), (("--raw",), "complete")):
        builds.clear()
        r = cli("run", model, "A person as JSON.", "--json-schema", schema, *extra)
        assert r.exit_code == 0, r.stderr
        assert builds == ["schema"], (extra, builds)
        (call,) = fake_engines.last.calls
        assert call.kind == kind and isinstance(call.grammar, LlamaGrammar)
    builds.clear()
    r = cli("run", model, "JSON please.", "--format", "json")
    assert r.exit_code == 0 and builds == ["json"], (r.stderr, builds)
    assert isinstance(fake_engines.last.calls[0].grammar, LlamaGrammar)
    builds.clear()
    assert cli("run", model, "Plain text.").exit_code == 0
    assert builds == [] and fake_engines.last.calls[0].grammar is None
    loads = len(fake_engines.made)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "foo"}')
    r = cli("run", model, "x", "--json-schema", bad)
    assert r.exit_code == EXIT_USAGE and "JSON schema" in r.stderr
    assert len(fake_engines.made) == loads  # refused before loading
