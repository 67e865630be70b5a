"""`llmctl ps` and `llmctl stop` against a server in this process (fake llama-servers), and the log lines
`llmctl serve` writes."""

from __future__ import annotations

import json
import logging
import re

from llmctl import output
from tests.serve.inprocess import serving

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def test_ps_lists_loaded_models_as_a_table_or_as_the_servers_json(models, cli) -> None:
    with serving(keep_alive=-1, parallel=2, ctx=512) as client:
        url = f"http://127.0.0.1:{client.port}"
        r = cli("ps", "--server", url)
        assert r.exit_code == 0 and r.stdout == "" and "No models loaded." in r.stderr.splitlines()  # the server's log shares stderr here
        assert client.call("POST", "/v1/chat/completions", CHAT)[0] == 200
        r = cli("ps", "--server", url)
        assert r.exit_code == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["NAME", "MEMORY", "CONTEXT", "GPU", "LAYERS", "SLOTS", "BUSY", "STATE", "EXPIRES"]
        memory = client.ps()[0]["memory_bytes"]
        assert lines[-1].split() == ["a", *output.human_bytes(memory).split(), "512", "0", "2", "0", "ready", "never"]
        r = cli("ps", "--server", url, "--json")
        assert r.exit_code == 0, r.stderr
        answer = client.call("GET", "/api/ps")[1]
        answer["models"][0]["loaded_s_ago"] = json.loads(r.stdout)["models"][0]["loaded_s_ago"]  # the one field that moves
        assert r.stdout == json.dumps(answer, indent=2, ensure_ascii=False) + "\n"  # the server's answer, as it is
        record = json.loads(r.stdout)["models"][0]
        assert record == {
            "name": "a", "memory_bytes": memory, "n_ctx": 512, "n_gpu_layers": 0, "slots": 2, "busy": 0, "state": "ready",
            "pid": client.stats("a")["pid"], "log": record["log"], "loaded_s_ago": answer["models"][0]["loaded_s_ago"], "expires_in_s": None,
        }  # fmt: skip
        assert record["log"].endswith("/logs/a.log") and "fake llama-server for a" in open(record["log"]).read()
        r = cli("stop", "a", "--server", url)
        assert r.exit_code == 0 and "Stopped a" in r.stderr.splitlines()
        assert client.ps() == []
        r = cli("stop", "a", "--server", url)
        assert r.exit_code != 0 and "model 'a' is not loaded" in r.stderr and "Traceback" not in r.stderr


def test_ps_refuses_an_answer_that_is_not_an_llmctl_servers(cli, monkeypatch) -> None:
    from llmctl.serve import client as client_module

    for answer in ({"models": 5}, {"models": [5]}, {"status": "ok"}):
        monkeypatch.setattr(client_module.ServerClient, "call", lambda self, method, path, body=None, _a=answer: _a)
        r = cli("ps", "--server", "http://127.0.0.1:9")
        assert r.exit_code == 1 and r.stderr.startswith("error: http://127.0.0.1:9 is not an llmctl server"), (answer, r.stderr)


def test_log_lines_are_stamped_and_escaped(capsys) -> None:
    from llmctl.commands.serve_cmd import log_to_stderr

    log_to_stderr()
    log_to_stderr()  # once, however often it is called
    logger = logging.getLogger("llmctl.serve.app")
    logger.info("GET /x\x1b[2J\u202e\nforged 200")
    logger.warning("fell back to 0 GPU layers")  # what a load had to change
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.error("internal error", exc_info=True)  # what LLMCTL_DEBUG=1 logs
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d GET /x\\x1b\[2J\\u202e\\x0aforged 200", lines[0]), lines[0]
    assert re.fullmatch(r"\d\d:\d\d:\d\d warning: fell back to 0 GPU layers", lines[1]), lines[1]
    assert re.fullmatch(r"\d\d:\d\d:\d\d internal error", lines[2]) and lines[3] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom" and err.endswith("\n")


def test_serve_without_llama_server_is_one_error_line_with_the_way_to_get_it(cli, models, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_ENGINE_DIR", str(tmp_path / "no-engine"))
    r = cli("serve", "a", "--port", "9")
    assert r.exit_code == 1 and r.stderr.startswith("error: llama.cpp's llama-server is not installed"), r.stderr
    assert "llmctl engine install" in r.stderr and "Traceback" not in r.stderr
