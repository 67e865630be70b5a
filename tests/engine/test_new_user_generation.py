"""run and chat as a new user meets them: quiet llama.cpp, empty replies explained, Ctrl-C, /set ctx and threads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.engine.base import ReloadError, Result
from llmctl.engine.chat import ChatSession
from llmctl.engine.fake import FakeEngine
from llmctl.engine.sampling import SamplingSettings
from llmctl.errors import UsageError

GREEDY = ["--temperature", "0", "--seed", "7"]


def _llmctl(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """llmctl in its own process: stderr then holds everything written to file descriptor 2, C code's too."""
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


# --- llama.cpp's own log -----------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_log_stays_quiet_on_a_sliding_window_model(demo_model: Path, tmp_path: Path) -> None:
    from tests.support.loadable_models import build

    model = build(demo_model, tmp_path, "tiny-gemma2")
    r = _llmctl("run", model, "hello", "--max-tokens", "3", "--ctx", "512")
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("warning: ")] == []
    assert "llama_" not in r.stderr
    # The model does make llama.cpp talk: LLMCTL_DEBUG=1 shows it.
    r = _llmctl("run", model, "hello", "--max-tokens", "3", "--ctx", "512", env={"LLMCTL_DEBUG": "1"})
    assert r.returncode == 0 and "llama_kv_cache_iswa" in r.stderr


def test_a_failed_load_says_what_llama_cpp_said(cli, make_gguf) -> None:
    model = make_gguf()  # readable header, but without hyperparameters llama.cpp needs
    r = cli("run", model, "hi")
    assert r.exit_code == 1
    assert "could not load" in r.stderr and "layer_norm_rms_epsilon" in r.stderr
    assert "hint: the file may be damaged" in r.stderr and "Traceback" not in r.stderr


# --- the chat session's logic, on the fake engine ----------------------------------------------


def _session(engine: FakeEngine, **kwargs) -> ChatSession:
    return ChatSession(engine, SamplingSettings(), **kwargs)


def test_stats_count_a_reply_stopped_with_ctrl_c() -> None:
    session = _session(FakeEngine(["one two three four five"], interrupt_after=2))
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.send("Tell me a story"):
            shown.append(piece)
    assert session.messages[-1] == {"role": "assistant", "content": "".join(shown)} and shown == ["one ", "two "]
    stats = session.stats()
    assert "no replies yet" not in stats and "1 replies, 2 tokens" in stats


def test_stats_count_a_reply_the_terminal_stopped_reading() -> None:
    # Ctrl-C that lands while the UI prints a piece: the UI closes the stream, the session still records the reply.
    session = _session(FakeEngine(["one two three four five"]))
    stream = session.send("Tell me a story")
    assert next(stream) == "one " and next(stream) == "two "
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": "one two "}
    assert "1 replies, 2 tokens" in session.stats()


def test_a_finished_reply_is_kept_once_even_if_interrupted_after_it() -> None:
    session = _session(FakeEngine(["all done"]))
    stream = session.send("Hi")
    pieces = [next(stream), next(stream), next(stream)]
    assert isinstance(pieces[-1], Result)
    stream.close()
    assert [m["role"] for m in session.messages] == ["user", "assistant"] and len(session.history) == 1


def test_show_names_threads_and_says_random_and_unlimited() -> None:
    session = _session(FakeEngine([]))
    shown = session.command("/show").message
    assert "None" not in shown
    assert "seed random" in shown and "max_tokens unlimited" in shown and "stop (none)" in shown
    assert "2 threads" in shown
    session.command("/set seed 5")
    session.command("/set stop END")
    shown = session.command("/show").message
    assert "seed 5" in shown and 'stop ["END"]' in shown


def test_set_threads_changes_the_engine_without_a_reload() -> None:
    engine = FakeEngine([])
    session = _session(engine, reload=lambda n_ctx: pytest.fail("threads need no reload"))
    assert session.command("/set threads 1").message == "threads = 1"
    assert engine.threads == 1 and "1 thread," not in session.describe() and "1 thread" in session.describe()
    with pytest.raises(UsageError, match="out of range"):
        session.command("/set threads 0")
    with pytest.raises(UsageError, match="whole number"):
        session.command("/set threads many")


def test_set_ctx_reloads_and_keeps_the_conversation_that_fits() -> None:
    old = FakeEngine(["first reply here", "second reply here"], n_ctx=4096)
    loaded: list[int] = []

    def reload(n_ctx: int) -> FakeEngine:
        loaded.append(n_ctx)
        old.close()
        return FakeEngine([], n_ctx=n_ctx)

    session = _session(old, reload=reload)
    list(session.send("word " * 100))
    list(session.send("word " * 100))
    said = session.command("/set ctx 2048").message
    assert loaded == [2048] and session.engine.n_ctx == 2048 and old.closed
    assert "model reloaded" in said and "was kept" in said and len(session.messages) == 4
    assert session.command("/set ctx 2048").message == "the context is already 2048 tokens" and loaded == [2048]
    # A context too small for all of it: the oldest exchange goes, the newest stays.
    said = session.command("/set context 256").message
    assert "dropped the 2 oldest message(s)" in said and len(session.messages) == 2
    assert session.context_used() <= session.engine.n_ctx
    with pytest.raises(UsageError, match="out of range"):
        session.command("/set ctx 100")


def test_set_ctx_that_fails_to_load_keeps_the_previous_size() -> None:
    restored = FakeEngine([], n_ctx=4096)

    def reload(n_ctx: int) -> FakeEngine:
        raise ReloadError("llama.cpp could not load fake; kept the 4096-token context", "try a shorter --ctx", restored)

    session = _session(FakeEngine([], n_ctx=4096), reload=reload)
    with pytest.raises(ReloadError):
        session.command("/set ctx 999999")
    assert session.engine is restored
    without = _session(FakeEngine([]))
    with pytest.raises(UsageError, match="cannot change"):
        without.command("/set ctx 1024")


def test_an_empty_reply_says_what_to_try() -> None:
    engine = FakeEngine(["   "])
    engine.has_chat_template = False
    session = _session(engine)
    list(session.send("Hello"))
    (notice,) = session.notices
    assert "reply is empty" in notice and "generic chat format" in notice and "--chat-format" in notice
    assert "--raw" not in notice  # chat has no --raw


def test_stopped_reply_line_ends_only_where_the_reader_sees_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.commands.generation import end_partial_line

    # stdout and stderr different files: stdout keeps the model's exact text, stderr gets nothing either.
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        out.write("partial")
        end_partial_line(False)
    assert (tmp_path / "out").read_text() == "partial" and (tmp_path / "err").read_text() == ""
    # The same file (2>&1): the newline goes through stderr, so the error starts its own line.
    with open(tmp_path / "both", "w") as out, open(tmp_path / "both", "a") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        out.write("partial")
        out.flush()
        end_partial_line(False)
        end_partial_line(True)  # already at a line start: nothing
    assert (tmp_path / "both").read_text() == "partial\n"


# --- on the real demo model ---------------------------------------------------------------------


@pytest.mark.slow
def test_an_empty_reply_is_explained_in_run_and_chat(cli, demo_model: Path) -> None:
    # The demo model, prompted in a format it does not know, ends its reply before any text.
    args = ("Hello", *GREEDY, "--max-tokens", "16", "--chat-format", "gemma")
    r = cli("run", demo_model, *args, "--json")
    assert r.exit_code == 0, r.stderr  # an empty reply is the model's answer, not a failure
    doc = json.loads(r.stdout)
    assert doc["text"] == "" and doc["finish_reason"] == "stop"
    (warning,) = doc["warnings"]
    assert "reply is empty" in warning and "'gemma'" in warning and "--raw" in warning
    assert r.stderr.count("warning: the reply is empty") == 1
    r = cli("chat", demo_model, "--temperature", "0", "--max-tokens", "16", "--chat-format", "gemma", input="Hello\n")
    assert r.exit_code == 0 and r.stdout.strip() == ""
    assert "warning: the reply is empty" in r.stderr and "restarting chat with another --chat-format" in r.stderr
    # A reply with text carries no warning, and --json says so with an empty list.
    doc = json.loads(cli("run", demo_model, "Say hello.", *GREEDY, "--max-tokens", "8", "--json").stdout)
    assert doc["text"] and doc["warnings"] == []


LONG = ["Write a very long story about a dragon who learns to sing.", "--temperature", "0", "--max-tokens", "3000"]


def _spawn_in_pty(args: list[str], columns: int = 120):
    """llmctl in a pseudo-terminal (pexpect)."""
    import gc

    import pexpect

    # pexpect runs Python in the forked child before exec: objects that earlier in-process tests left
    # for the garbage collector are finalised here first, not there, where a lock another thread
    # held at the fork would never be released.
    gc.collect()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": str(columns), "PROMPT_TOOLKIT_NO_CPR": "1"}
    return pexpect.spawn(sys.executable, ["-m", "llmctl", *args], env=env, encoding="utf-8", timeout=90)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_ctrl_c_during_run_puts_the_error_on_a_line_of_its_own(demo_model: Path) -> None:
    import pexpect

    child = _spawn_in_pty(["run", str(demo_model), *LONG])
    child.expect(r"[A-Za-z]{3}")  # the reply has started
    time.sleep(0.3)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    seen = re.sub(r"\x1b\[[0-9;]*m", "", child.before)  # bold, even without colour
    assert child.exitstatus == 130, seen
    (line,) = [line for line in seen.splitlines() if "error: interrupted" in line]
    assert line.strip() == "error: interrupted", seen[-300:]


@pytest.mark.slow
def test_ctrl_c_during_run_with_both_streams_in_one_pipe(demo_model: Path) -> None:
    import signal

    child = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "run", str(demo_model), *LONG],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        first = os.read(child.stdout.fileno(), 64)  # type: ignore[union-attr]
        time.sleep(0.3)
        child.send_signal(signal.SIGINT)
        rest, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    seen = (first + rest).decode("utf-8", errors="replace")
    assert child.returncode == 130, seen
    assert seen.endswith("\nerror: interrupted\n"), seen[-300:]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_chat_ctrl_c_stats_show_multiline_history_and_set_ctx(demo_model: Path, isolated: Path) -> None:
    import pexpect
    from prompt_toolkit.history import FileHistory

    child = _spawn_in_pty(["chat", str(demo_model), "--temperature", "0", "--ctx", "2048", "--threads", "2"], columns=160)
    child.expect(">>>")
    child.sendline("Write a very long story about a dragon who learns to sing.")
    time.sleep(1.5)
    child.sendintr()  # the first reply, stopped
    child.expect(r"\[reply stopped\]")
    child.expect(">>>")
    child.sendline("/stats")
    child.expect(r"session: +1 replies")
    child.expect(">>>")
    child.sendline("/show")
    child.expect(r"0 GPU layers, KV cache f16/f16, 2 threads")
    child.expect(r"seed random, max_tokens unlimited")
    child.expect(">>>")
    child.sendline("/set max_tokens 8")
    child.expect(">>>")
    child.sendline('"""')
    child.expect(r"\.\.\.")
    child.sendline("Line one")
    child.expect(r"\.\.\.")
    child.sendline("Line two")
    child.expect(r"\.\.\.")
    child.sendline('"""')
    child.expect(r"tokens")
    child.expect(">>>")
    child.sendline("/set ctx 1024")
    child.expect(r"context = 1024 tokens \(model reloaded\); the conversation \(\d+ tokens\) was kept")
    child.expect(">>>")
    child.sendline("/set threads 1")
    child.expect("threads = 1")
    child.expect(">>>")
    child.sendline("/show")
    child.expect(r"of 1024 tokens used")
    child.expect(r"1 thread\b")
    child.expect(">>>")
    child.sendline("And now?")
    child.expect(r"tokens")  # the reloaded model still replies
    child.expect(">>>")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    entries = list(FileHistory(str(isolated / "chat_history")).load_history_strings())
    assert "Line one\nLine two" in entries  # one entry for the whole message
    assert '"""' not in entries and "Line one" not in entries and "Line two" not in entries
