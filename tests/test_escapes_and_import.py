"""Untrusted text never drives the terminal; `import` refuses what is not a file, cleans up after
kill -9 and stays consistent when two imports race; `bench` fails when every test failed."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl import output
from llmctl.bench import report as benchreport
from llmctl.bench import run as benchrun
from llmctl.errors import EXIT_USAGE
from llmctl.models.importer import sha256_file
from tests.support.examples import examples

EXE = str(Path(sys.executable).with_name("llmctl"))

# What a hostile model file or model can write: CSI and OSC sequences (colour, title,
# OSC 52 clipboard), BEL, C1 CSI (U+009B), NEL, bidi overrides and isolates, the
# Unicode line and paragraph separators, DEL, a zero-width space.
HOSTILE = "\x1b[31m\x1b]0;pwned\x07\x1b]52;c;aGk=\x07\x9b2J\x85\u202egnp.exe\u2066x\u2069\u2028\u2029\x7f\u200b"
C1 = {chr(c) for c in range(0x80, 0xA0)}
BIDI = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
FORBIDDEN = C1 | BIDI | {"\u2028", "\u2029", "\x7f"} | {chr(c) for c in range(0x20) if chr(c) not in "\n\t"}


def raw_controls(text: str, allowed: str = "") -> set[str]:
    """The characters a terminal could act on that appear raw in ``text``."""
    return {ch for ch in text if ch in FORBIDDEN and ch not in allowed}


# --- safe(), the JSON text and the streaming filter, as units ---------------------------


@pytest.mark.parametrize(
    ("char", "shown"),
    [("\x1b", "\\x1b"), ("\x07", "\\x07"), ("\x7f", "\\x7f"), ("\x85", "\\x85"), ("\x9b", "\\x9b"), ("\u202e", "\\u202e"),
     ("\u2066", "\\u2066"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\U000e0041", "\\U000e0041")],
)  # fmt: skip
def test_safe_escapes_c0_c1_bidi_and_separators(char: str, shown: str) -> None:
    assert output.safe(f"a{char}b") == f"a{shown}b"
    assert output.safe(f"a{char}b\n", keep_layout=True) == f"a{shown}b\n"
    assert output.safe_reply(f"a{char}b") == f"a{shown}b"
    assert output.safe("ünïcödé 漢字 🙂") == "ünïcödé 漢字 🙂"  # ordinary text untouched


@settings(max_examples=examples(300), deadline=None)
@given(st.text())
def test_json_text_is_inert_and_exact(value: str) -> None:
    text = output.json_text({"v": value, "list": [value]})
    assert not raw_controls(text, allowed="\n")  # only the indentation's newlines
    assert not any(unicodedata.category(ch) in {"Cf", "Zl", "Zp", "Cs"} for ch in text)
    assert json.loads(text) == {"v": value, "list": [value]}


def test_json_text_keeps_readable_text_readable() -> None:
    assert output.json_text({"name": "Café 漢字 🙂"}, indent=None) == '{"name": "Café 漢字 🙂"}'
    assert output.json_text({"name": HOSTILE}, indent=None) == json.dumps({"name": HOSTILE})  # all escaped


def _terminal(pieces: list[str]) -> str:
    writer = output.ReplyWriter(terminal=True)
    return "".join(writer.filter(p) for p in pieces) + ("\\x0d" if writer._held_cr else "")


def test_reply_filter_neutralises_each_piece_without_splitting_sequences() -> None:
    pieces = ["Hi \x1b", "[31mred", "\x1b]52;c;aGk=", "\x07", "\u202e", "gnp.exe\tok\r", "\nnext\r", "over 👩\u200d💻", "\u2028"]
    shown = _terminal(pieces)
    assert shown == "Hi \\x1b[31mred\\x1b]52;c;aGk=\\x07\\u202egnp.exe\tok\nnext\\x0dover 👩\u200d💻\\u2028"
    assert not raw_controls(shown, allowed="\n\t")
    piped = output.ReplyWriter(terminal=False)
    assert "".join(piped.filter(p) for p in pieces) == "".join(pieces)  # a pipe gets the exact text


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(["\x1b", "[", "m", "\r", "\n", "\t", "a", "\x9b", "\u202e", "\u2028", "\u200d", "é"])), max_size=12))
def test_reply_filter_never_lets_a_control_through_however_pieces_split(pieces: list[str]) -> None:
    shown = _terminal(pieces)
    assert not raw_controls(shown, allowed="\n\t")
    # the same text in one piece shows the same: splitting changes nothing
    assert shown == _terminal(["".join(pieces)])


# --- metadata: show and bench ------------------------------------------------------------


def test_show_json_escapes_c1_bidi_and_separators_yet_decodes_exactly(cli, make_gguf) -> None:
    path = make_gguf(model_name="evil" + HOSTILE, extra={"general.description": HOSTILE, "general.size_label": "1B\u202e"})
    r = cli("show", path, "--json")
    assert r.exit_code == 0, r.stderr
    assert not raw_controls(r.stdout, allowed="\n"), raw_controls(r.stdout, allowed="\n")
    doc = json.loads(r.stdout)
    assert doc["info"]["name"] == "evil" + HOSTILE and doc["info"]["size_label"] == "1B\u202e"
    assert doc["metadata"]["general.description"] == HOSTILE
    r = cli("show", path)  # the table for people: escaped
    assert r.exit_code == 0 and not raw_controls(r.stdout, allowed="\n")
    assert "evil\\x1b[31m" in r.stdout and "\\u202egnp.exe" in r.stdout


def _hostile_run() -> benchrun.BenchRun:
    run = benchrun.BenchRun("20260101-000000-abcd", "2026-01-01T00:00:00+00:00", {"cpu_info": "=cmd|' /C calc'!A0", "build_commit": "b\x1b[2J"})
    row = benchrun.Row("@SUM(1+1)", "/m/x\x1b]0;t\x07.gguf", "llama " + HOSTILE + " |Q8_0", 1, 2, "CPU", 2, 0, 2048, 512,
                       False, "f16", "f16", 0, 8, 0, "tg8", "t", samples_ts=[10.0], avg_ts=10.0, stddev_ts=0.0)  # fmt: skip
    row.bandwidth_gbs = -1.0  # a number stays a number, even negative
    run.rows.append(row)
    run.extras.append(benchrun.ModelExtras("-evil\u202e", load_cold_s=0.1))
    run.fingerprint["bandwidth_gbs"] = 1.0
    return run


def test_bench_md_and_csv_escape_metadata_and_guard_formulas() -> None:
    run = _hostile_run()
    md = benchreport.to_markdown(run)
    assert not raw_controls(md, allowed="\n")
    assert "\\x1b[31m" in md and "\\u202egnp.exe" in md and "\\|Q8_0" in md and "b\\x1b[2J" in md
    header, _, first_row = md.splitlines()[:3]
    assert first_row.count("|") - first_row.count("\\|") == header.count("|")  # the '|' in the metadata split no cell
    text = benchreport.to_csv(run)
    assert not raw_controls(text, allowed="\n")
    (rec,) = csv.DictReader(io.StringIO(text))
    assert rec["model"] == "'@SUM(1+1)" and rec["cpu_info"].startswith("'=cmd")
    assert rec["model_type"].startswith("llama \\x1b[31m") and rec["bandwidth_gbs"] == "-1.0"
    doc = json.loads(benchreport.to_json(run))  # JSON stays exact, and ASCII
    assert doc["results"][0]["model_type"] == "llama " + HOSTILE + " |Q8_0" and benchreport.to_json(run).isascii()
    svg = benchreport.svg_chart([("x\x1b[31m", 1.0)], "t\u202e")
    assert "\x1b" not in svg and "\u202e" not in svg


def _with_strings(src: Path, dst: Path, strings: dict[str, str]) -> Path:
    """A copy of a loadable GGUF with some string metadata set (as gguf's gguf_new_metadata does)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in strings:
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for key, value in strings.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return dst


@pytest.fixture
def tiny_model(demo_model: Path, tmp_path: Path) -> Path:
    """A model llama.cpp loads in a blink (random weights, the demo model's tokenizer)."""
    from tests.support.loadable_models import build

    return build(demo_model, tmp_path, "tiny-llama")


@pytest.mark.slow
def test_bench_md_and_csv_of_a_model_with_hostile_metadata(cli, tiny_model: Path, tmp_path: Path) -> None:
    hostile = _with_strings(tiny_model, tmp_path / "evil\x1b[31m\u202e.gguf", {"general.size_label": HOSTILE + "|=1+1"})
    for fmt in ("md", "csv"):
        r = cli("bench", hostile, "-p", "8", "-n", "2", "-r", "1", "-t", "1", "--no-extras", "-o", fmt)
        assert r.exit_code == 0, r.stderr
        assert not raw_controls(r.stdout, allowed="\n"), (fmt, raw_controls(r.stdout, allowed="\n"))
        assert not raw_controls(r.stderr, allowed="\n"), (fmt, r.stderr)
        assert "\\x1b]0;pwned\\x07" in r.stdout
    assert "evil\\x1b[31m\\u202e.gguf" in r.stdout  # the file name, in csv's model and model_filename
    r = cli("bench", hostile, "-p", "8", "-n", "2", "-r", "1", "-t", "1", "--no-extras", "-o", "json")
    assert json.loads(r.stdout)["results"][0]["model_type"].startswith("llama " + HOSTILE)  # exact in JSON


# --- model replies: run and chat on a terminal and on a pipe -----------------------------

PIECES = ["Hi \x1b", "[31mred\x1b]52;c;aGk=\x07", "\x9b2J\x85", "\u202egnp.exe\u2066", "\u2028next", "\ttab\r", "\nline2 \r",
          "over 👩\u200d💻"]  # fmt: skip
REPLY = "".join(PIECES)

# The real command line, with llama.cpp's chat completion replaced by one that streams PIECES:
# everything from the engine's stream loop to stdout is the real code.
FAKE_STREAM = """
import json, sys
import llama_cpp
pieces = json.loads(sys.argv.pop(1))
def fake(self, messages, stream=True, **kwargs):
    for piece in pieces:
        yield {"choices": [{"delta": {"content": piece}, "finish_reason": None}]}
    yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}
llama_cpp.Llama.create_chat_completion = fake
from llmctl.cli import main
sys.argv[0] = "llmctl"
main()
"""


def _llmctl_with_fake_stream(args: list[str], *, stdin: str, tty: bool) -> tuple[int, bytes, str]:
    """Run llmctl with stdout on a pseudo-terminal (or a pipe); returns (exit code, stdout bytes, stderr)."""
    cmd = [sys.executable, "-c", FAKE_STREAM, json.dumps(PIECES), *args]
    if not tty:
        done = subprocess.run(cmd, input=stdin.encode(), capture_output=True, timeout=120)
        return done.returncode, done.stdout, done.stderr.decode()
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(stdin.encode())
    proc.stdin.close()
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    err = proc.stderr.read().decode()
    return proc.wait(timeout=30), seen, err


def _assert_neutralised(out: bytes) -> None:
    text = out.decode("utf-8")
    assert not raw_controls(text.replace("\r\n", "\n"), allowed="\n\t"), raw_controls(text.replace("\r\n", "\n"), allowed="\n\t")
    for shown in ("Hi \\x1b[31mred\\x1b]52;c;aGk=\\x07", "\\x9b2J\\x85", "\\u202egnp.exe\\u2066", "\\u2028next", "line2 \\x0dover"):
        assert shown in text, (shown, text)
    assert "\ttab\r\nline2" in text and "👩\u200d💻" in text  # layout and emoji kept (the pty writes \n as \r\n)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_run_and_chat_replies_on_a_terminal_are_neutralised(tiny_model: Path) -> None:
    code, out, err = _llmctl_with_fake_stream(["run", str(tiny_model), "hello"], stdin="", tty=True)
    assert code == 0, err
    _assert_neutralised(out)
    code, out, err = _llmctl_with_fake_stream(["run", str(tiny_model), "hello", "--no-stream"], stdin="", tty=True)
    assert code == 0, err
    _assert_neutralised(out)
    code, out, err = _llmctl_with_fake_stream(["chat", str(tiny_model)], stdin="hello\n", tty=True)
    assert code == 0, err
    _assert_neutralised(out)


@pytest.mark.slow
def test_run_and_chat_replies_on_a_pipe_are_exact(tiny_model: Path) -> None:
    code, out, err = _llmctl_with_fake_stream(["run", str(tiny_model), "hello"], stdin="", tty=False)
    assert code == 0, err
    assert out.decode("utf-8") == REPLY + "\n"
    code, out, err = _llmctl_with_fake_stream(["chat", str(tiny_model)], stdin="hello\n", tty=False)
    assert code == 0, err
    assert out.decode("utf-8") == REPLY + "\n"
    code, out, err = _llmctl_with_fake_stream(["run", str(tiny_model), "hello", "--json"], stdin="", tty=False)
    assert code == 0, err
    text = out.decode("utf-8")
    assert not raw_controls(text, allowed="\n") and json.loads(text)["text"] == REPLY


# --- import: what is not a regular file -------------------------------------------------


@pytest.mark.slow
def test_import_of_a_fifo_is_refused_without_opening_it(make_gguf, isolated: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    start = time.monotonic()
    done = subprocess.run([EXE, "import", str(fifo)], capture_output=True, text=True, timeout=30)  # a hang fails here
    assert time.monotonic() - start < 30
    assert done.returncode == EXIT_USAGE, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"error: {fifo} is a named pipe (FIFO), not a model file" and lines[1].startswith("hint: ")
    assert len(lines) == 2
    # a split model whose second part is a FIFO: refused before any part is opened
    first = make_gguf("Big-Q8_0.gguf", split_max_tensors=7)
    parts = sorted(first.parent.glob("Big-Q8_0-*-of-*.gguf"))
    assert len(parts) >= 2
    parts[1].unlink()
    os.mkfifo(parts[1])
    done = subprocess.run([EXE, "import", str(parts[0]), "--copy"], capture_output=True, text=True, timeout=30)
    assert done.returncode == EXIT_USAGE and f"error: {parts[1]} is a named pipe (FIFO)" in done.stderr, done.stderr
    assert not (isolated / "models").exists() or not any((isolated / "models").rglob("*.gguf*"))


@pytest.mark.slow  # runs llmctl show and fit as processes, each with a timeout that turns a hang into a failure
def test_reading_a_fifo_never_blocks_whatever_the_command(tmp_path: Path) -> None:
    """The reader itself refuses non-files on the open descriptor: no window between a check and the read."""
    from llmctl.errors import InvalidModelError
    from llmctl.gguf import FileSource

    fifo = tmp_path / "swapped.gguf"
    os.mkfifo(fifo)
    with pytest.raises(InvalidModelError, match="not a regular file"):
        FileSource(fifo)  # a blocking open would hang the test here
    for command in (["show", str(fifo)], ["fit", str(fifo)]):
        done = subprocess.run([EXE, *command], capture_output=True, text=True, timeout=30)
        assert done.returncode == EXIT_USAGE and f"error: {fifo} is not a regular file" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_import_refuses_sockets_devices_and_directories(cli, tmp_path: Path) -> None:
    sock_path = tmp_path / "s.gguf"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        r = cli("import", sock_path)
        assert r.exit_code == EXIT_USAGE and "is a socket" in r.stderr
    finally:
        server.close()
    r = cli("import", "/dev/null")
    assert r.exit_code == EXIT_USAGE and "is a character device" in r.stderr
    r = cli("import", tmp_path)
    assert r.exit_code == EXIT_USAGE and "is a directory" in r.stderr
    assert json.loads(cli("list", "--json").stdout)["models"] == []


# --- import --copy: kill -9 and races ------------------------------------------------------


def _big_model(make_gguf, name: str, size: int) -> Path:
    """A valid GGUF padded (sparsely) to ``size`` bytes, so that copying it takes a while."""
    path = make_gguf(name)
    os.truncate(path, size)
    return path


def _partials(home: Path) -> list[Path]:
    return sorted((home / "models").glob("*/*.partial"))


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_during_import_copy_leaves_a_partial_that_list_and_rm_see(cli, make_gguf, isolated: Path) -> None:
    src = _big_model(make_gguf, "big.Q8_0.gguf", 1536 * 1024 * 1024)
    proc = subprocess.Popen([EXE, "import", str(src), "--copy", "--name", "big"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(p.stat().st_size > 0 for p in _partials(isolated)) or proc.poll() is not None)
        # while the copy runs, its partial is listed as in use, and rm --partials leaves it alone
        doc = json.loads(cli("list", "--json").stdout)
        assert [p["in_use"] for p in doc["partial_imports"]] == [True], (doc, proc.poll())
        r = cli("rm", "--partials", "--json")
        assert json.loads(r.stdout)["removed_partials"] == [] and "an import is copying it now" in r.stderr
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (partial,) = _partials(isolated)
    r = cli("list")
    assert "1 unfinished `import --copy` file(s)" in r.stderr and "rm --partials" in r.stderr
    doc = json.loads(cli("list", "--json").stdout)
    assert doc["models"] == []
    assert doc["partial_imports"] == [{"path": str(partial), "size_bytes": partial.stat().st_size, "in_use": False}]
    r = cli("rm", "--partials", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["removed_partials"] == [{"path": str(partial), "repo": None, "size_bytes": doc["partial_imports"][0]["size_bytes"]}]
    assert not partial.exists() and not partial.parent.exists()
    assert json.loads(cli("list", "--json").stdout)["partial_imports"] == []


def test_a_complete_copy_left_unregistered_is_copied_afresh(cli, make_gguf, isolated: Path) -> None:
    """Killed between the rename and the registration: the file is not any model's, so a new import replaces it."""
    src = make_gguf("left.Q8_0.gguf")
    leftover = isolated / "models" / "left" / src.name
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"stale")
    r = cli("import", src, "--copy", "--name", "left", "--json")
    assert r.exit_code == 0, r.stderr
    assert leftover.read_bytes() == src.read_bytes()
    # a folder shared by two names ('x:y' and 'x-y') never lets one import overwrite the other's file
    r = cli("import", src, "--copy", "--name", "left:q8")
    assert r.exit_code == 0, r.stderr
    other = make_gguf("other/left.Q8_0.gguf")
    (isolated / "models" / "left-q8").mkdir(exist_ok=True)
    r = cli("import", other, "--copy", "--name", "left-q8")
    assert r.exit_code == EXIT_USAGE and "already belongs to model 'left:q8'" in r.stderr
    assert cli("show", "left:q8").exit_code == 0


@pytest.mark.slow
def test_two_concurrent_imports_under_one_name(cli, make_gguf, isolated: Path) -> None:
    src = _big_model(make_gguf, "a.Q8_0.gguf", 400 * 1024 * 1024)
    procs = [
        subprocess.Popen([EXE, "import", str(src), "--copy", "--name", "same", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, EXIT_USAGE], results
    (winner,) = [json.loads(out) for code, out, _ in results if code == 0]
    (loser_err,) = [err for code, _, err in results if code != 0]
    errors = [line for line in loser_err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: a model named 'same' already exists"], loser_err
    assert "Traceback" not in loser_err
    # the store is consistent: one model, its file complete and intact, no leftovers
    doc = json.loads(cli("list", "--json").stdout)
    assert [(m["name"], m["status"]) for m in doc["models"]] == [("same", "ok")]
    copy = Path(winner["files"][0])
    assert sha256_file(copy) == sha256_file(src) == winner["sha256"][0]
    assert sorted(p.name for p in (isolated / "models" / "same").iterdir()) == [copy.name]
    assert doc["partial_imports"] == []


# --- bench: every test failed --------------------------------------------------------------


@pytest.mark.slow
def test_bench_where_every_test_fails_exits_1_and_saves_nothing(cli, make_gguf, isolated: Path) -> None:
    unloadable = make_gguf("unloadable.Q8_0.gguf")  # a valid header llama.cpp cannot load (no tokenizer merges)
    r = cli("bench", unloadable, "-p", "8", "-n", "2", "-r", "1", "--no-extras", "-o", "json")
    assert r.exit_code == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "every test failed" in errors[0] and "hint: " in r.stderr
    doc = json.loads(r.stdout)  # the results, with their reasons, still on stdout
    assert doc["results"] and all(x["status"].startswith("failed") for x in doc["results"])
    assert benchrun.list_runs(isolated) == [] and "saved as run" not in r.stderr


@pytest.mark.slow
def test_bench_where_some_tests_fail_still_succeeds(cli, demo_model: Path, isolated: Path) -> None:
    # a quantized V cache needs flash attention: the -fa 0 tests fail, the -fa 1 ones measure
    # (a model none of whose tests measure fails the command: tests/test_new_user_bench.py)
    r = cli("bench", demo_model, "-p", "8", "-n", "2", "-r", "1", "-t", "1", "-ctv", "q8_0", "-fa", "0,1", "--no-extras", "-o", "jsonl")
    assert r.exit_code == 0, r.stderr
    statuses = [json.loads(line)["status"] for line in r.stdout.splitlines()]
    assert statuses.count("ok") == 2 and sum(s.startswith("failed") for s in statuses) == 2
    assert len(benchrun.list_runs(isolated)) == 1
