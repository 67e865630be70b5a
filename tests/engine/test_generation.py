"""run and chat on the real demo model: reproducible text, clean stdout, JSON, limits, sessions."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GREEDY = ["--temperature", "0", "--seed", "7"]


def test_run_is_reproducible_and_stdout_is_only_text(cli, demo_model: Path) -> None:
    first = cli("run", demo_model, "What is the capital of France? Answer in one word.", *GREEDY, "--max-tokens", "24")
    assert first.exit_code == 0, first.stderr
    second = cli("run", demo_model, "What is the capital of France? Answer in one word.", *GREEDY, "--max-tokens", "24")
    assert first.stdout == second.stdout
    assert "Paris" in first.stdout
    assert first.stderr == ""  # no llama.cpp log, no spinner when not a terminal


def test_run_json_fields(cli, demo_model: Path) -> None:
    r = cli("run", demo_model, "Say hello.", *GREEDY, "--max-tokens", "8", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["finish_reason"] in ("stop", "length")
    assert doc["text"] and doc["usage"]["completion_tokens"] >= 1
    assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]
    t = doc["timings"]
    assert 0 < t["load_s"] < 30 and 0 < t["ttft_s"] <= t["total_s"]
    assert t["prompt_tokens"] == doc["usage"]["prompt_tokens"] > 5
    assert doc["load"]["n_ctx"] == 8192 and doc["load"]["fit"] == "CPU only"


def test_max_tokens_and_length_finish(cli, demo_model: Path) -> None:
    doc = json.loads(cli("run", demo_model, "Count from 1 to 100.", *GREEDY, "--max-tokens", "5", "--json").stdout)
    assert doc["finish_reason"] == "length" and doc["usage"]["completion_tokens"] == 5


def test_format_json_and_schema(cli, demo_model: Path, tmp_path: Path) -> None:
    r = cli("run", demo_model, "Give a JSON object with a name and age of a person", *GREEDY, "--max-tokens", "200", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert isinstance(json.loads(r.stdout), (dict, list))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }))  # fmt: skip
    r = cli("run", demo_model, "A person as JSON.", *GREEDY, "--max-tokens", "60", "--json-schema", schema)
    doc = json.loads(r.stdout)
    assert isinstance(doc["name"], str) and isinstance(doc["age"], int)


def test_raw_completion(cli, demo_model: Path) -> None:
    r = cli("run", demo_model, "The capital of France is", "--raw", *GREEDY, "--max-tokens", "6", "--no-stream")
    assert r.exit_code == 0 and "Paris" in r.stdout


def test_a_prompt_longer_than_the_context_is_an_error(cli, demo_model: Path) -> None:
    r = cli("run", demo_model, "word " * 600, "--ctx", "256", "--max-tokens", "4")
    assert r.exit_code == 1 and "context" in r.stderr.lower() and "Traceback" not in r.stderr


# --- chat ------------------------------------------------------------------------------


def test_chat_reuses_the_prompt_prefix(demo_model: Path) -> None:
    from llmctl import gguf
    from llmctl.engine.chat import ChatSession
    from llmctl.engine.llama import Engine
    from llmctl.engine.sampling import SamplingSettings
    from llmctl.plan import hardware
    from llmctl.plan.fit import Candidate, make_plan

    info = gguf.read_model([demo_model])[1]
    plan = make_plan([Candidate("demo", info, demo_model.stat().st_size)], hardware.load_profile("laptop-8gb"))
    engine = Engine.load("demo", [demo_model], plan, threads=2)
    session = ChatSession(engine, SamplingSettings(temperature=0, max_tokens=16))
    list(session.send("Tell me about the moon."))
    list(session.send("And about the sun?"))
    first, second = session.history
    assert first.prompt_eval_tokens == first.prompt_tokens
    assert second.prompt_eval_tokens < second.prompt_tokens / 2  # only the new turn was evaluated


def test_chat_drops_old_turns_when_the_context_fills(demo_model: Path) -> None:
    from llmctl import gguf
    from llmctl.engine.chat import ChatSession, ContextError
    from llmctl.engine.llama import Engine
    from llmctl.engine.sampling import SamplingSettings
    from llmctl.plan import hardware
    from llmctl.plan.fit import Candidate, Overrides, make_plan

    info = gguf.read_model([demo_model])[1]
    plan = make_plan([Candidate("demo", info, 1)], hardware.load_profile("laptop-8gb"), Overrides(n_ctx=512))
    engine = Engine.load("demo", [demo_model], plan, threads=2)
    session = ChatSession(engine, SamplingSettings(temperature=0, max_tokens=32), system="Be brief.")
    for turn in range(6):
        list(session.send(f"Turn {turn}: " + "tell me more about rivers and mountains " * 10))
    assert any("dropped" in n for n in session.notices)
    assert session.conversation()[0] == {"role": "system", "content": "Be brief."}
    assert session.context_used() <= engine.n_ctx
    with pytest.raises(ContextError):
        list(session.send("word " * 2000))


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_chat_in_a_real_terminal(demo_model: Path, isolated: Path) -> None:
    import pexpect

    exe = str(Path(sys.executable).with_name("llmctl"))
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(exe, ["chat", str(demo_model), "--temperature", "0", "--max-tokens", "24"], env=env, encoding="utf-8", timeout=60)
    child.expect(">>>")
    child.sendline("Hello!")
    child.expect(r"tokens/s")  # the stats line after the reply
    child.expect(">>>")
    child.sendline('"""')  # a multi-line block
    child.expect(r"\.\.\.")
    child.sendline("Line one")
    child.expect(r"\.\.\.")
    child.sendline('"""')
    child.expect(r"tokens")
    child.expect(">>>")
    child.sendline("/set max_tokens 2000")
    child.expect(">>>")
    child.sendline("Write a very long story about a dragon.")
    time.sleep(1.0)
    child.sendintr()  # Ctrl-C mid-reply stops the reply, not the session
    child.expect(r"\[reply stopped\]")
    child.expect(">>>")
    child.sendline("/stats")
    child.expect("session:")
    child.expect(">>>")
    child.sendintr()
    child.expect("Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (isolated / "chat_history").read_text()
    assert "Hello!" in history and "/stats" in history


def test_a_model_without_chat_template_falls_back_with_a_warning(cli, demo_model: Path, tmp_path: Path) -> None:
    from tests.support.loadable_models import build

    model = build(demo_model, tmp_path, "tiny-llama")  # no template in its metadata
    r = cli("run", model, "hello", "--max-tokens", "3")
    assert r.exit_code == 0, r.stderr
    assert "no chat template" in r.stderr and "--chat-format" in r.stderr
    r = cli("run", model, "hello", "--max-tokens", "3", "--chat-format", "chatml")
    assert r.exit_code == 0 and "no chat template" not in r.stderr
