"""``llmctl run``'s own logic on the fake engine: the prompt it builds, stdout and --json, warnings, errors before loading.

What llama.cpp does with the prompt (the text, token counts, limits, grammars) is tested on the
real demo model in tests/engine/test_generation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.engine.fake import FakeEngine
from llmctl.errors import EXIT_USAGE


def test_stdout_is_only_the_reply(cli, make_gguf, fake_engines) -> None:
    fake_engines.add(FakeEngine(["Paris is the capital."]))
    r = cli("run", make_gguf(), "What is the capital of France?", "--system", "Be brief.")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Paris is the capital.\n" and r.stderr == ""  # no spinner when not a terminal
    (call,) = fake_engines.last.calls
    assert call.kind == "chat" and call.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert fake_engines.last.closed  # the model is freed once the reply is done


def test_json_reports_text_usage_timings_and_load(cli, make_gguf, fake_engines) -> None:
    fake_engines.add(FakeEngine(["one two three"], load_s=0.5))
    r = cli("run", make_gguf(n_ctx=4096), "Say hello.", "--ctx", "1024", "--max-tokens", "2", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["text"] == "one two " and doc["finish_reason"] == "length" and doc["warnings"] == []
    assert doc["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert doc["timings"]["load_s"] == 0.5 and doc["timings"]["generation_tokens_per_second"] == 100.0
    assert doc["load"]["n_ctx"] == 1024 and doc["load"]["fit"] == "CPU only"


def test_piped_stdin_is_content_after_the_instruction(cli, make_gguf, fake_engines) -> None:
    model = make_gguf()
    alone = json.loads(cli("run", model, "Summarise:", "--json").stdout)
    piped = json.loads(cli("run", model, "Summarise:", "--json", input="A long text about cats and dogs.\n").stdout)
    assert piped["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 5
    assert fake_engines.last.calls[0].messages[-1]["content"] == "Summarise:\n\nA long text about cats and dogs."
    only = cli("run", model, "-", input="Hello there")
    assert only.exit_code == 0 and only.stdout.strip()
    assert fake_engines.last.calls[0].messages[-1]["content"] == "Hello there"


def test_raw_completes_the_prompt_and_says_what_it_ignores(cli, make_gguf, fake_engines) -> None:
    model = make_gguf()
    r = cli("run", model, "The capital of France is", "--raw", "--system", "Be terse.", "--chat-format", "chatml", "--json")
    assert r.exit_code == 0, r.stderr
    assert "warning: --system is ignored with --raw" in r.stderr
    assert "warning: --chat-format is ignored with --raw" in r.stderr
    assert len(json.loads(r.stdout)["warnings"]) == 2
    (call,) = fake_engines.last.calls
    assert call.kind == "complete" and call.prompt == "The capital of France is" and fake_engines.last.chat_format is None
    r = cli("run", model, "The capital of France is", "--raw")
    assert r.exit_code == 0 and r.stderr == ""


def test_load_notes_are_said_once_and_repeated_in_json(cli, make_gguf, fake_engines) -> None:
    fake_engines.add(FakeEngine(notes=["loaded with 0 GPU layers and context 2048"]))
    r = cli("run", make_gguf(), "Hi", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("warning: loaded with 0 GPU layers") == 1
    assert json.loads(r.stdout)["warnings"] == ["loaded with 0 GPU layers and context 2048"]


def test_bad_input(cli, make_gguf, fake_engines) -> None:
    model = make_gguf()
    r = cli("run", model, "x", "--temperature", "-1")
    assert r.exit_code == EXIT_USAGE and "--temperature" in r.stderr
    r = cli("run", model, "x", *["--stop", "x"] * 17)  # every token is checked against each
    assert r.exit_code == EXIT_USAGE and "--stop: 17 stop strings, more than the 16 allowed" in r.stderr
    r = cli("run", model, "x", "--stop", "x" * 257)
    assert r.exit_code == EXIT_USAGE and "--stop: a stop string of 257 characters" in r.stderr
    r = cli("run", model, "x", "--format", "yaml")
    assert r.exit_code == EXIT_USAGE and "--format" in r.stderr
    r = cli("run", model, input="")
    assert r.exit_code == EXIT_USAGE and "no prompt" in r.stderr
    r = cli("run", "no-such-model", "x")
    assert r.exit_code == 3
    assert fake_engines.made == []  # all refused before anything loaded


def test_bad_generation_options_fail_before_loading(cli, make_gguf, fake_engines, tmp_path: Path) -> None:
    model = make_gguf()
    r = cli("run", model, "hi", "--chat-format", "bogus")
    assert r.exit_code == EXIT_USAGE and "chat format" in r.stderr
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "foo"}')
    r = cli("run", model, "hi", "--json-schema", schema)
    assert r.exit_code == EXIT_USAGE and "JSON schema" in r.stderr
    r = cli("run", model, "--file", tmp_path / "missing.txt")
    assert r.exit_code == 3
    assert fake_engines.made == []


def test_verbose_prints_the_timing_summary(cli, make_gguf, fake_engines) -> None:
    fake_engines.add(FakeEngine(["a b c d e"], load_s=0.25))
    r = cli("run", make_gguf(), "Hi", "--verbose")
    assert r.exit_code == 0
    for line in ("load duration:        0.250s", "prompt eval count:    1 token(s) of 1", "prompt eval rate:     1000.00 tokens/s", "eval count:           5 token(s)",
                 "eval rate:            100.00 tokens/s", "time to first token:  0.011s"):  # fmt: skip
        assert line in r.stderr


def test_last_used_is_recorded(cli, make_gguf, fake_engines) -> None:
    cli("import", make_gguf(), "--name", "demo")
    cli("run", "demo", "Hi")
    (model,) = json.loads(cli("list", "--json").stdout)["models"]
    assert model["last_used"] is not None and fake_engines.last.name == "demo"
