"""bench --rpc: llama-bench's arguments from bench's flags, its records as bench's rows, the preflight,
a llama-bench that fails, and a real run across two ggml-rpc-servers."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from llmctl import gguf
from llmctl.bench import report as benchreport
from llmctl.bench import rpc_bench
from llmctl.bench import run as benchrun
from llmctl.bench.serving import free_port
from llmctl.engine.rpc import parse_endpoints
from llmctl.errors import EXIT_USAGE
from tests.support.rpc_workers import endpoints_of, running_workers

RECORD = {
    "build_commit": "unknown",
    "cpu_info": "AMD EPYC",
    "gpu_info": "127.0.0.1:50611, 127.0.0.1:50612",
    "backends": "RPC",
    "model_filename": "/models/demo.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 1,
    "type_k": "q8_0",
    "type_v": "f16",
    "n_gpu_layers": 31,
    "flash_attn": -1,
    "devices": "auto",
    "n_prompt": 0,
    "n_gen": 8,
    "n_depth": 0,
    "test_time": "2026-11-30T00:38:59Z",
    "avg_ns": 150000000,
    "stddev_ns": 1000,
    "avg_ts": 53.3333333,
    "stddev_ts": 0.5,
    "samples_ns": [149000000, 151000000],
    "samples_ts": [53.69, 52.98],
}


def sweep(**changes) -> benchrun.Sweep:
    base = benchrun.Sweep(threads=[1], gpu_layers=[None], batch=[2048], ubatch=[512], flash_attn=[None], type_k=["f16"], type_v=["f16"],
                          n_prompt=[32], n_gen=[8], depth=[0], repetitions=2)  # fmt: skip
    for name, value in changes.items():
        setattr(base, name, value)
    return base


@pytest.fixture
def model(make_gguf) -> benchrun.BenchModel:
    path = make_gguf(n_layers=12)
    return benchrun.BenchModel("demo", [path], gguf.read_model([path])[1])


def test_llama_bench_gets_benchs_settings_with_every_layer_on_the_workers(model) -> None:
    endpoints = parse_endpoints("127.0.0.1:50611,10.0.0.2:50052")
    args = rpc_bench.llama_bench_args(model, sweep(), endpoints)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--rpc"] == "127.0.0.1:50611,10.0.0.2:50052" and pairs["-o"] == "jsonl" and pairs["-m"] == str(model.paths[0])
    assert (pairs["-p"], pairs["-n"], pairs["-d"], pairs["-r"], pairs["-t"]) == ("32", "8", "0", "2", "1")
    assert pairs["-ngl"] == "13" and pairs["-fa"] == "on" and (pairs["-b"], pairs["-ub"], pairs["-ctk"], pairs["-ctv"]) == ("2048", "512", "f16", "f16")
    swept = rpc_bench.llama_bench_args(
        model, sweep(gpu_layers=[4, 8], flash_attn=[False, True], threads=[1, 2], type_k=["q8_0"], prompt_gen=[(64, 16)]), endpoints
    )
    pairs = dict(zip(swept[::2], swept[1::2]))
    assert pairs["-ngl"] == "4,8" and pairs["-fa"] == "off,on" and pairs["-t"] == "1,2" and pairs["-ctk"] == "q8_0" and pairs["-pg"] == "64,16"
    assert rpc_bench.expected_tests(sweep(gpu_layers=[4, 8], prompt_gen=[(64, 16)])) == 6


def test_a_llama_bench_record_becomes_a_row_naming_its_devices(model) -> None:
    row = rpc_bench.row_from_record(model, RECORD)
    assert (row.model, row.test, row.backend, row.devices, row.n_gpu_layers, row.type_k) == ("demo", "tg8", "RPC", RECORD["gpu_info"], 31, "q8_0")
    assert row.avg_ts == 53.333 and row.samples_ts == [53.69, 52.98] and row.samples_ns == RECORD["samples_ns"] and row.ok
    assert row.flash_attn is False  # -1 (auto, unresolved) is not "on"
    bench_run = benchrun.BenchRun("r1", "now", {"backends": "CPU", "gpu_info": None}, rows=[row])
    columns, cells = benchreport.table_rows(bench_run)
    assert columns[:5] == ["model", "size", "params", "backend", "devices"] and cells[0][3:5] == ["RPC", RECORD["gpu_info"]]
    record = benchreport.record(bench_run, row)
    assert record["gpu_info"] == RECORD["gpu_info"] and record["backends"] == "RPC"  # the row's devices, not this machine's
    again = benchrun.BenchRun.from_dict(json.loads(json.dumps(bench_run.to_dict())))
    assert again.rows[0].devices == RECORD["gpu_info"]  # kept in the history
    local = benchrun.BenchRun("r2", "now", {}, rows=[rpc_bench.row_from_record(model, {**RECORD, "gpu_info": ""})])
    assert "devices" not in benchreport.table_rows(local)[0]


def fake_llama_bench(tmp_path: Path, records: list[dict], *, error: str | None = None, code: int = 0) -> Path:
    """A llama-bench that prints ``records`` as JSON lines, then ``error`` on stderr, and exits ``code``."""
    script = tmp_path / "llama-bench"
    lines = "".join(json.dumps(r) + "\n" for r in records)
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.stdout.write({lines!r})\nsys.stdout.flush()\nsys.stderr.write({(error or '') + chr(10)!r})\nsys.exit({code})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_a_llama_bench_that_dies_leaves_failed_rows_with_its_reason(model, tmp_path: Path) -> None:
    said = "/ggml-rpc.cpp:600: Remote RPC server crashed or returned malformed response"
    binary = fake_llama_bench(tmp_path, [{**RECORD, "n_prompt": 32, "n_gen": 0}], error=said, code=134)
    run = benchrun.BenchRun("r", "now", {})
    seen: list[benchrun.Row] = []
    endpoints = parse_endpoints("127.0.0.1:50611")
    rpc_bench.run_model(run, model, sweep(), endpoints, binary=binary, log_path=tmp_path / "bench.log", on_row=seen.append)
    assert [r.test for r in run.rows] == ["pp32", "tg8"] and seen == run.rows
    assert run.rows[0].ok and run.rows[1].status == f"failed: {said}" and run.rows[1].devices == "127.0.0.1:50611"
    assert said in (tmp_path / "bench.log").read_text()


def test_bench_rpc_refuses_an_unreachable_worker_before_llama_bench(cli, model, monkeypatch) -> None:
    monkeypatch.setattr(rpc_bench, "run_model", lambda *a, **k: pytest.fail("llama-bench ran"))
    gone = f"127.0.0.1:{free_port()}"
    r = cli("bench", str(model.paths[0]), "--rpc", gone, "-p", "8", "-n", "4", "-r", "1")
    assert r.exit_code == 1 and f"rpc worker {gone} is unreachable" in r.stderr and "Traceback" not in r.stderr


def test_bench_rpc_is_for_the_in_process_tests(cli, model) -> None:
    r = cli("bench", str(model.paths[0]), "--rpc", "127.0.0.1:50052", "--serve")
    assert r.exit_code == EXIT_USAGE and "--serve-args='--rpc" in r.stderr
    r = cli("bench", str(model.paths[0]), "--rpc", "127.0.0.1:50052", "--tune")
    assert r.exit_code == EXIT_USAGE and "--tune" in r.stderr
    r = cli("bench", str(model.paths[0]), "--rpc", "localhost")
    assert r.exit_code == EXIT_USAGE and "has no port" in r.stderr


@pytest.mark.slow
def test_bench_rpc_across_two_real_workers_reports_and_saves_rows_naming_them(cli, native_tools, demo_model, monkeypatch) -> None:
    with running_workers(native_tools.path("ggml-rpc-server")) as workers:
        monkeypatch.setenv("LLMCTL_RPC", endpoints_of(workers))  # the environment, as the flag
        r = cli("bench", demo_model, "-p", "32", "-n", "8", "-r", "2", "-t", "1", "-o", "json")
        assert r.exit_code == 0, r.stderr
        table = cli("bench", "--history")
    doc = json.loads(r.stdout)
    rows = doc["results"]
    assert [row["test"] for row in rows] == ["pp32", "tg8"]
    for row in rows:
        assert row["backends"] == "RPC" and row["n_gpu_layers"] == 31 and row["status"] == "ok" and row["avg_ts"] > 0
        assert all(str(w.endpoint) in row["gpu_info"] for w in workers)
    assert [w["endpoint"] for w in doc["fingerprint"]["rpc"]] == [str(w.endpoint) for w in workers]
    assert doc["extras"] == [] and doc["run_id"] in table.stdout


def test_llama_bench_does_not_outlive_a_killed_llmctl(model, tmp_path: Path) -> None:
    # A llama-bench left behind would hold every worker (each serves one client at a time).
    from tests.support.processes import outlives_a_killed_parent, sleeping_tool

    binary, pid_file = sleeping_tool(tmp_path, "llama-bench")
    script = (
        "import sys\nfrom pathlib import Path\nfrom llmctl import gguf\nfrom llmctl.bench import rpc_bench, run\n"
        "from llmctl.engine.rpc import parse_endpoints\nfrom tests.bench.test_bench_rpc import sweep\n"
        "path = Path(sys.argv[1])\nmodel = run.BenchModel('demo', [path], gguf.read_model([path])[1])\n"
        "rpc_bench.run_model(run.BenchRun('r', 'now', {}), model, sweep(), parse_endpoints('127.0.0.1:50611'), binary=Path(sys.argv[2]))\n"
    )
    assert not outlives_a_killed_parent(script, [str(model.paths[0]), str(binary)], pid_file), "llama-bench kept running after llmctl was killed"
