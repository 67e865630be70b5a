"""bench as a new user meets it: a model that measured nothing fails the command, ``--no-extras``
means no extras, ``--compare`` honours ``-o`` and names models, llama-bench's defaults (flash
attention ``auto``), its CSV booleans, "1 thread".

Most tests swap ``benchrun.run_model`` for a stand-in (no llama.cpp), on a CPU-only hardware
profile (no probing); one loads the real llama.cpp with a stand-in ``Llama`` to see what bench
asks of it, and one runs the demo model.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

import llmctl
from llmctl.bench import report as benchreport
from llmctl.bench import run as benchrun
from llmctl.bench.measure import parse_flash_attn, resolve_flash_attn
from llmctl.errors import EXIT_USAGE, UsageError

PROFILE = Path(llmctl.__file__).parent / "plan" / "profiles" / "laptop-8gb.json"  # CPU only, 4 physical cores


@pytest.fixture(autouse=True)
def cpu_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_HW_PROFILE", str(PROFILE))


def _row(model: str, filename: str, test: str, n_prompt: int, n_gen: int, *, ts: tuple[float, ...] = (100.0, 102.0),
         status: str = "ok", flash_attn: bool = True, noisy: bool = False, threads: int = 2) -> benchrun.Row:  # fmt: skip
    row = benchrun.Row(model, filename, "llama 135M Q4_1", 98362432, 134515008, "CPU", threads, 0, 2048, 512, flash_attn,
                       "f16", "f16", n_prompt, n_gen, 0, test, "2026-01-01T00:00:00+00:00", status=status)  # fmt: skip
    if status == "ok":
        row.samples_ts = list(ts)
        row.avg_ts = sum(ts) / len(ts)
        row.stddev_ts = 1.0
        row.samples_ns = [int((n_prompt + n_gen) / s * 1e9) for s in ts]
        row.avg_ns = sum(row.samples_ns) // len(ts)
        row.noisy = noisy
    return row


@pytest.fixture
def fake_bench(monkeypatch: pytest.MonkeyPatch) -> list[benchrun.Sweep]:
    """``run_model`` without llama.cpp: every test measures, except that a model whose file name
    says "broken" fails every test; returns the sweeps it was given."""
    sweeps: list[benchrun.Sweep] = []

    def run_model(run, model, sweep, hw, *, extras=True, on_row=None) -> None:
        sweeps.append(sweep)
        broken = "broken" in model.paths[0].name
        for p, g, d in sweep.tests():
            row = _row(model.label, str(model.paths[0]), benchrun.test_name(p, g, d), p, g,
                       status="failed: failed to load model" if broken else "ok")  # fmt: skip
            run.rows.append(row)
            if on_row:
                on_row(row)
        if extras and not broken:
            run.extras.append(benchrun.ModelExtras(model.label, load_cold_s=0.2, load_warm_s=0.1, ttft_s=0.05))

    monkeypatch.setattr(benchrun, "run_model", run_model)
    return sweeps


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


QUICK = ("-p", "8", "-n", "2", "-r", "1")


# --- 1. a model that measured nothing makes bench exit 1 ----------------------------------------


def test_one_of_several_models_failing_exits_1_and_keeps_the_others(cli, make_gguf, fake_bench, isolated: Path) -> None:
    good, broken = make_gguf("good.Q8_0.gguf"), make_gguf("broken.Q8_0.gguf")
    r = cli("bench", good, broken, *QUICK, "-o", "json")
    assert r.exit_code == 1, r.stderr
    doc = json.loads(r.stdout)  # the results are still printed, in full
    statuses = {(x["model"], x["status"]) for x in doc["results"]}
    assert statuses == {(str(good), "ok"), (str(broken), "failed: failed to load model")}
    assert [f["model"] for f in doc["failed_models"]] == [str(broken)]
    (error,) = _errors(r.stderr)  # one error line, naming the model and why
    assert "1 of 2 models failed" in error and "broken.Q8_0.gguf (failed to load model)" in error and "good" not in error
    assert "hint: " in r.stderr and "Traceback" not in r.stderr
    (saved,) = benchrun.list_runs(isolated)  # and they are saved
    assert saved.run_id in error and [f["model"] for f in saved.failed_models] == [str(broken)]


def test_a_model_that_cannot_be_found_among_several_exits_1(cli, make_gguf, fake_bench, isolated: Path) -> None:
    good = make_gguf("good.Q8_0.gguf")
    r = cli("bench", good, "no-such-model", *QUICK, "-o", "jsonl")
    assert r.exit_code == 1, r.stderr
    assert {json.loads(line)["model"] for line in r.stdout.splitlines()} == {str(good)}
    assert "warning: no-such-model: no model named 'no-such-model'" in r.stderr
    (error,) = _errors(r.stderr)
    assert "1 of 2 models failed: no-such-model (no model named 'no-such-model')" in error
    assert len(benchrun.list_runs(isolated)) == 1


def test_every_model_measuring_exits_0_and_every_test_failing_still_saves_nothing(cli, make_gguf, fake_bench, isolated: Path) -> None:
    r = cli("bench", make_gguf("good.Q8_0.gguf"), make_gguf("also-good.Q8_0.gguf"), *QUICK, "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["failed_models"] == [] and not _errors(r.stderr)
    r = cli("bench", make_gguf("broken.Q8_0.gguf"), make_gguf("broken-too.Q8_0.gguf"), *QUICK, "-o", "json")
    assert r.exit_code == 1
    (error,) = _errors(r.stderr)
    assert "every test failed" in error
    assert len(benchrun.list_runs(isolated)) == 1  # only the first run


# --- 2. --no-extras prints no extras table --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["table", "md"])
def test_no_extras_prints_no_extras_table(cli, make_gguf, fake_bench, fmt: str) -> None:
    good = make_gguf("good.Q8_0.gguf")
    with_extras = cli("bench", good, "no-such-model", *QUICK, "-o", fmt)
    assert "load cold" in with_extras.stdout  # what the option is to leave out
    r = cli("bench", good, "no-such-model", *QUICK, "-o", fmt, "--no-extras")
    assert r.exit_code == 1 and "pp8" in r.stdout
    assert "load cold" not in r.stdout and "TTFT" not in r.stdout and "status" not in r.stdout
    r = cli("bench", good, *QUICK, "-o", "json", "--no-extras")
    assert json.loads(r.stdout)["extras"] == []


# --- 3. --compare honours -o and names models -----------------------------------------------------


def _saved_pair(home: Path) -> tuple[benchrun.BenchRun, benchrun.BenchRun]:
    runs = []
    for run_id, speed in (("20260101-000000-aaaa", 100.0), ("20260102-000000-bbbb", 110.0)):
        run = benchrun.BenchRun(run_id, "2026-01-01T00:00:00+00:00", {"cpu_info": "Test CPU"})
        run.rows += [_row("smollm2", "/m/SmolLM2-135M-Instruct.Q4_1.gguf", "pp512", 512, 0, ts=(speed * 3,)),
                     _row("smollm2", "/m/SmolLM2-135M-Instruct.Q4_1.gguf", "tg128", 0, 128, ts=(speed,))]  # fmt: skip
        benchrun.save_run(home, run)
        runs.append(run)
    return runs[0], runs[1]


def test_compare_honours_every_output_format(cli, isolated: Path) -> None:
    a, b = _saved_pair(isolated)
    r = cli("bench", "--compare", a.run_id, b.run_id, "-o", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["run_a"]["run_id"] == a.run_id and doc["run_b"]["run_id"] == b.run_id
    assert [(x["model"], x["test"], x["ratio"]) for x in doc["results"]] == [("smollm2", "pp512", 1.1), ("smollm2", "tg128", 1.1)]
    assert doc["results"][1]["avg_ts_a"] == 100.0 and doc["results"][1]["avg_ts_b"] == 110.0
    assert "█" not in r.stderr  # no chart around machine-readable output
    lines = [json.loads(line) for line in cli("bench", "--compare", a.run_id, "last", "-o", "jsonl").stdout.splitlines()]
    assert [x["test"] for x in lines] == ["pp512", "tg128"] and {x["run_b"] for x in lines} == {b.run_id}
    rows = list(csv.DictReader(io.StringIO(cli("bench", "--compare", a.run_id, "last", "-o", "csv").stdout)))
    assert [(x["model"], x["test"], x["ratio"], x["flash_attn"]) for x in rows] == [("smollm2", "pp512", "1.1", "1"), ("smollm2", "tg128", "1.1", "1")]
    md = cli("bench", "--compare", a.run_id, "last", "-o", "md").stdout.splitlines()
    assert md[0] == f"| model | test | threads | {a.run_id} t/s | {b.run_id} t/s | ratio |"
    assert md[2] == "| smollm2 | pp512 | 2 | 300.00 | 330.00 | 1.100 |"


def test_compare_table_names_models_not_files(cli, isolated: Path) -> None:
    a, b = _saved_pair(isolated)
    r = cli("bench", "--compare", a.run_id, b.run_id)
    assert r.exit_code == 0, r.stderr
    assert "smollm2" in r.stdout and "SmolLM2-135M-Instruct.Q4_1.gguf" not in r.stdout
    assert r.stdout.count("1.100") == 2 and "█" in r.stderr


# --- 4. llama-bench's defaults ----------------------------------------------------------------------


def test_defaults_are_llama_benchs(cli, make_gguf, fake_bench) -> None:
    r = cli("bench", make_gguf("good.Q8_0.gguf"), "-o", "json")
    assert r.exit_code == 0, r.stderr
    (sweep,) = fake_bench
    # llama-bench: -p 512 -n 128 -d 0 -r 5 -b 2048 -ub 512 -ctk f16 -ctv f16 -fa auto -t <physical cores>
    assert (sweep.n_prompt, sweep.n_gen, sweep.depth, sweep.repetitions) == ([512], [128], [0], 5)
    assert (sweep.batch, sweep.ubatch, sweep.type_k, sweep.type_v) == ([2048], [512], ["f16"], ["f16"])
    assert sweep.flash_attn == [None] and sweep.threads == [4]


def test_flash_attn_values() -> None:
    assert parse_flash_attn("auto") == [None] and parse_flash_attn("-1") == [None]
    assert parse_flash_attn("0,1,auto") == [False, True, None] and parse_flash_attn("on,off,ON") == [True, False]
    with pytest.raises(UsageError):
        parse_flash_attn("maybe")
    assert resolve_flash_attn(None) is True  # what llama.cpp makes of auto on the CPU
    assert resolve_flash_attn(False) is False and resolve_flash_attn(True) is True


def test_bad_flash_attn_is_a_usage_error(cli, make_gguf, fake_bench) -> None:
    r = cli("bench", make_gguf("good.Q8_0.gguf"), "-fa", "maybe")
    assert r.exit_code == EXIT_USAGE and _errors(r.stderr) == ["error: --flash-attn 'maybe': 'maybe' is not on, off or auto"]
    assert not fake_bench


@pytest.mark.parametrize(("flag", "flash_attn"), [((), True), (("-fa", "auto"), True), (("-fa", "0"), False)])
def test_llama_cpp_gets_llama_benchs_context(cli, make_gguf, monkeypatch, flag: tuple[str, ...], flash_attn: bool) -> None:
    """What bench asks llama.cpp for: flash attention resolved from auto, sliding-window caches kept to
    the window (swa_full off), llama-bench's batch sizes, cache types and thread count."""
    import llama_cpp

    from llmctl.engine.llama import _ggml_type

    seen: list[dict] = []

    class Llama:
        def __init__(self, path: str, **kwargs) -> None:
            seen.append(kwargs)
            raise ValueError("stand-in: not loading")

    monkeypatch.setattr(llama_cpp, "Llama", Llama)
    r = cli("bench", make_gguf("good.Q8_0.gguf"), *QUICK, *flag, "--no-extras", "-o", "json")
    assert r.exit_code == 1 and "every test failed" in r.stderr  # nothing loaded, as intended
    (kwargs,) = seen
    assert kwargs["flash_attn"] is flash_attn and kwargs["swa_full"] is False
    assert (kwargs["n_batch"], kwargs["n_ubatch"], kwargs["n_threads"], kwargs["n_threads_batch"]) == (2048, 512, 4, 4)
    assert kwargs["type_k"] == kwargs["type_v"] == _ggml_type("f16")
    assert {x["flash_attn"] for x in json.loads(r.stdout)["results"]} == {int(flash_attn)}


# --- 5. CSV booleans, numbers as llama-bench writes them; "1 thread" ------------------------------


def test_csv_booleans_and_flash_attn_as_llama_bench_writes_them() -> None:
    run = benchrun.BenchRun("20260101-000000-abcd", "2026-01-01T00:00:00+00:00", {"cpu_info": "Test CPU"})
    run.rows += [_row("demo", "/m/demo.gguf", "pp512", 512, 0, noisy=True, flash_attn=False),
                 _row("demo", "/m/demo.gguf", "tg128", 0, 128, noisy=False, flash_attn=True)]  # fmt: skip
    text = benchreport.to_csv(run)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(x["flash_attn"], x["noisy"]) for x in rows] == [("0", "1"), ("1", "0")]
    assert "True" not in text and "False" not in text
    results = json.loads(benchreport.to_json(run))["results"]  # llama-bench's flash_attn is a number
    assert [x["flash_attn"] for x in results] == [0, 1] and all(type(x["flash_attn"]) is int for x in results)
    assert results[0]["noisy"] is True  # llmctl's own fields keep JSON's booleans
    columns, table = benchreport.table_rows(run)  # a swept fa column shows 0/1 as llama-bench's does
    assert "flash_attn" in columns and [row[columns.index("flash_attn")] for row in table] == ["0", "1"]


def test_tune_says_1_thread(cli, make_gguf, monkeypatch) -> None:
    from llmctl.bench import tune

    profile = {"threads": 1, "n_batch": 512, "n_ubatch": 512, "n_gpu_layers": 1, "tg_ts": 10.0, "pp_ts": 50.0, "created": "x"}
    monkeypatch.setattr(tune, "tune", lambda model, hw, on_step=None: profile)
    r = cli("bench", make_gguf("good.Q8_0.gguf"), "--tune")
    assert r.exit_code == 0, r.stderr
    assert "Saved for this machine: 1 thread, batch 512/512, 1 GPU layer (tg" in r.stderr and "1 threads" not in r.stderr


def test_fit_and_show_say_1_thread_of_a_tuned_profile(cli, make_gguf, isolated: Path) -> None:
    from llmctl.plan.hardware import _machine_key
    from llmctl.plan.tuned import save_tuned

    model = make_gguf("good.Q8_0.gguf")
    profile = {"threads": 1, "n_batch": 512, "n_ubatch": 512, "n_gpu_layers": 1, "tg_ts": 10.0, "pp_ts": 50.0, "created": "x"}
    save_tuned(isolated, _machine_key(), [model], profile)
    fit_out, show_out = cli("fit", model).stdout, cli("show", model).stdout
    assert "tuned on this machine by `bench --tune`: 1 thread, batch 512" in fit_out
    assert "1 thread, batch 512/512, 1 GPU layer (tg" in show_out
    assert "1 threads" not in fit_out + show_out and "1 GPU layers" not in show_out


# --- the real thing ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_bench_with_defaults_runs_flash_attention_and_writes_0_1(cli, demo_model: Path, monkeypatch) -> None:
    monkeypatch.delenv("LLMCTL_HW_PROFILE")  # this machine, as a user runs it
    r = cli("bench", demo_model, "-p", "16", "-n", "4", "-r", "2", "-t", "1", "--no-extras", "-o", "csv")
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["test"] for x in rows] == ["pp16", "tg4"] and all(x["status"] == "ok" and float(x["avg_ts"]) > 0 for x in rows)
    assert {x["flash_attn"] for x in rows} == {"1"} and {x["noisy"] for x in rows} <= {"0", "1"}
    assert (rows[0]["n_batch"], rows[0]["n_ubatch"], rows[0]["type_k"]) == ("2048", "512", "f16")


@pytest.mark.slow
def test_real_bench_of_a_good_and_an_unloadable_model_exits_1_and_keeps_the_good_one(cli, demo_model: Path, make_gguf, isolated: Path) -> None:
    unloadable = make_gguf("unloadable.Q8_0.gguf")  # a valid header llama.cpp cannot load (no tokenizer merges)
    r = cli("bench", demo_model, unloadable, "-p", "8", "-n", "2", "-r", "1", "-t", "1", "--no-extras", "-o", "jsonl")
    assert r.exit_code == 1, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["model"] == str(demo_model), x["status"] == "ok") for x in rows] == [(True, True)] * 2 + [(False, False)] * 2
    (error,) = _errors(r.stderr)
    assert "1 of 2 models failed" in error and "unloadable.Q8_0.gguf" in error and "Traceback" not in r.stderr
    (saved,) = benchrun.list_runs(isolated)
    assert saved.failed_models[0]["model"] == str(unloadable)
