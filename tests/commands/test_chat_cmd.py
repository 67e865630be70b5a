"""``llmctl chat`` piped, on the fake engine: turns and slash commands, and /set ctx reloading through the engine factory.

The real demo model in a real terminal is tested in tests/engine/test_generation.py and
tests/engine/test_new_user_generation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.engine.base import EngineError
from llmctl.engine.fake import FakeEngine


def test_piped_chat_turns_and_commands(cli, make_gguf, fake_engines, tmp_path: Path) -> None:
    fake_engines.add(FakeEngine(["Hello Bob.", "Your name is Bob."]))
    saved = tmp_path / "conversation.json"
    script = f"My name is Bob.\n/set max_tokens 12\nWhat is my name?\n/save {saved}\n/clear\n/load {saved}\n/show\n/exit\nnever sent\n"
    r = cli("chat", make_gguf(), "--temperature", "0", "--max-tokens", "20", input=script)
    assert r.exit_code == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if line.strip()] == ["Hello Bob.", "Your name is Bob."]
    conversation = json.loads(saved.read_text())
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert "4 messages" in r.stderr and "tokens used" in r.stderr
    engine = fake_engines.last
    assert [call.sampling.max_tokens for call in engine.calls] == [20, 12]  # /set applies from the next turn
    assert engine.calls[1].messages[-1] == {"role": "user", "content": "What is my name?"} and len(engine.calls) == 2
    assert engine.closed


def test_set_ctx_reloads_through_the_engine_factory(cli, make_gguf, fake_engines) -> None:
    fake_engines.add(FakeEngine(["first"]), FakeEngine(["second"]))
    r = cli("chat", make_gguf(n_ctx=4096), "--ctx", "2048", input="Hi\n/set ctx 1024\nAgain\n")
    assert r.exit_code == 0, r.stderr
    assert "context = 1024 tokens (model reloaded)" in r.stderr and r.stdout.split() == ["first", "second"]
    old, new = fake_engines.made
    assert old.closed and (old.n_ctx, new.n_ctx) == (2048, 1024)
    assert new.calls[0].messages[-1]["content"] == "Again" and len(new.calls[0].messages) == 3  # the conversation was kept


def test_a_reload_that_fails_keeps_chatting_on_the_previous_size(cli, make_gguf, fake_engines) -> None:
    fake_engines.add(FakeEngine(["first"]), EngineError("out of memory"), FakeEngine(["still here"]))
    r = cli("chat", make_gguf(n_ctx=4096), "--ctx", "2048", input="Hi\n/set ctx 4096\nAgain\n")
    assert r.exit_code == 1 and r.stderr == "error: out of memory; kept the 2048-token context\n"  # piped: a failed line fails the script
    assert r.stdout.split() == ["first", "still", "here"] and fake_engines.last.n_ctx == 2048
