"""bench: statistics, sweep parsing, output formats, a real short run, history, compare, tuning."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from llmctl.bench import report as benchreport
from llmctl.bench import run as benchrun
from llmctl.bench.measure import Measurement, parse_flash_attn, parse_pairs, parse_sweep
from llmctl.errors import EXIT_USAGE, UsageError


def test_statistics_by_hand() -> None:
    m = Measurement("tg128", [100.0, 110.0, 90.0, 105.0, 95.0])
    assert m.avg_ts == 100.0
    # sample standard deviation: sqrt(sum((x - 100)^2) / (n - 1)) = sqrt(250 / 4)
    assert m.stddev_ts == pytest.approx((250 / 4) ** 0.5)
    assert not m.noisy  # CV 7.9%
    noisy = Measurement("tg128", [100.0, 140.0, 60.0])
    assert noisy.stddev_ts == pytest.approx(40.0) and noisy.noisy  # CV 40%
    assert Measurement("pp512", [300.0]).stddev_ts == 0.0


def test_sweep_syntax() -> None:
    assert parse_sweep("1,2,4", "--threads") == [1, 2, 4]
    assert parse_sweep("1-4", "--threads") == [1, 2, 3, 4]
    assert parse_sweep("0-32+8", "--gpu-layers") == [0, 8, 16, 24, 32]
    assert parse_sweep("1-64*2", "--batch-size") == [1, 2, 4, 8, 16, 32, 64]
    assert parse_sweep("2,1-3", "--threads") == [2, 1, 3]  # order kept, duplicates dropped
    assert parse_flash_attn("0,1", "--flash-attn") == [False, True]
    assert parse_pairs("512,128;64,16", "--prompt-gen") == [(512, 128), (64, 16)]
    assert parse_pairs("128,128", "--prompt-gen") == [(128, 128)]
    for bad in ("", "a", "4-1", "1-8*1", "1,,2", "3-x"):
        with pytest.raises(UsageError):
            parse_sweep(bad, "--threads", minimum=1)
    with pytest.raises(UsageError):
        parse_sweep("0", "--threads", minimum=1)
    with pytest.raises(UsageError):
        parse_flash_attn("maybe", "--flash-attn")


def test_sweep_tests_follow_llama_bench_order() -> None:
    sweep = benchrun.Sweep([2], [None], [2048], [512], [False], ["f16"], ["f16"], [512], [128], [0, 1024], [(64, 16)])
    assert [benchrun.test_name(*t) for t in sweep.tests()] == [
        "pp512", "tg128", "pp64+tg16", "pp512 @ d1024", "tg128 @ d1024", "pp64+tg16 @ d1024",
    ]  # fmt: skip
    assert len(sweep.load_configs()) == 1


def _fake_run() -> benchrun.BenchRun:
    run = benchrun.BenchRun("20260101-000000-abcd", "2026-01-01T00:00:00+00:00", {"cpu_info": "Test CPU", "build_commit": "x", "llmctl_version": "0.1.0"})
    for test, n_prompt, n_gen, samples in (("pp512", 512, 0, [300.0, 310.0]), ("tg128", 0, 128, [150.0, 152.0])):
        row = benchrun.Row("demo", "/m/demo.gguf", "llama 135M Q4_1", 98362432, 134515008, "CPU", 2, 0, 2048, 512,
                           False, "f16", "f16", n_prompt, n_gen, 0, test, "2026-01-01T00:00:00+00:00")  # fmt: skip
        m = Measurement(test, samples)
        row.samples_ts, row.avg_ts, row.stddev_ts = samples, m.avg_ts, m.stddev_ts
        row.samples_ns = [int((n_prompt + n_gen) / s * 1e9) for s in samples]
        row.avg_ns = int(statistics.fmean(row.samples_ns))
        run.rows.append(row)
    return run


def test_output_formats_parse_back_with_llama_bench_fields() -> None:
    run = _fake_run()
    doc = json.loads(benchreport.to_json(run))
    first = doc["results"][0]
    for field in benchreport.LLAMA_BENCH_FIELDS + ["samples_ts", "samples_ns", "roofline_pct", "noisy"]:
        assert field in first
    assert first["avg_ts"] == 305.0 and first["n_prompt"] == 512 and first["cpu_info"] == "Test CPU"
    lines = [json.loads(line) for line in benchreport.to_jsonl(run).splitlines()]
    assert [r["test"] for r in lines] == ["pp512", "tg128"]
    rows = list(csv.DictReader(io.StringIO(benchreport.to_csv(run))))
    assert rows[1]["avg_ts"] == "151.0" and rows[1]["n_gen"] == "128" and rows[1]["samples_ts"] == "150.0;152.0"
    md = benchreport.to_markdown(run)
    assert md.splitlines()[0].startswith("| model | size | params | backend | threads | test | t/s")
    assert "| llama 135M Q4_1 | 93.81 MiB | 134.52 M | CPU | 2 | pp512 | 305.00 ± 7.07 |" in md


def test_bar_chart_and_svg() -> None:
    pairs = [("pp512", 300.0), ("tg128", 150.0)]
    chart = benchreport.bar_chart(pairs, width=20).splitlines()
    assert chart[0].count("█") == 20 and chart[1].count("█") == 10
    svg = benchreport.svg_chart(pairs, "t <&> title")
    assert svg.startswith("<svg") and "t &lt;&amp;&gt; title" in svg and svg.count("<rect") == 2


def test_history_and_compare(cli, isolated: Path) -> None:
    a = _fake_run()
    b = _fake_run()
    b.run_id = "20260102-000000-beef"
    for row in b.rows:
        row.avg_ts = row.avg_ts * 1.1
    benchrun.save_run(isolated, a)
    benchrun.save_run(isolated, b)
    r = cli("bench", "--history")
    assert r.exit_code == 0 and a.run_id in r.stdout and b.run_id in r.stdout
    r = cli("bench", "--compare", a.run_id, "last")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("1.100") == 2
    r = cli("bench", "--compare", "nope", "last")
    assert r.exit_code == 3


def test_bad_bench_input(cli, demo_model: Path, tmp_path: Path) -> None:
    r = cli("bench", demo_model, "--threads", "0")
    assert r.exit_code == EXIT_USAGE and "--threads" in r.stderr
    r = cli("bench", demo_model, "--cache-type-k", "q9")
    assert r.exit_code == EXIT_USAGE
    r = cli("bench", demo_model, "-o", "xml")
    assert r.exit_code == EXIT_USAGE
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    r = cli("bench", bad)
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_short_real_bench_with_a_missing_model(cli, demo_model: Path, isolated: Path) -> None:
    r = cli("bench", demo_model, "no-such-model", "-p", "32", "-n", "8", "-r", "2", "-t", "1,2", "-o", "json")
    assert r.exit_code == 1, r.stderr  # a model failed; the other's results are still printed and saved
    doc = json.loads(r.stdout)
    results = doc["results"]
    assert [(x["n_threads"], x["test"]) for x in results] == [(1, "pp32"), (1, "tg8"), (2, "pp32"), (2, "tg8")]
    for x in results:
        assert x["status"] == "ok" and x["avg_ts"] > 0 and len(x["samples_ts"]) == 2
        assert x["avg_ns"] > 0 and x["model_n_params"] == 134515008
    tg = [x for x in results if x["n_gen"]]
    assert all(0 < x["roofline_pct"] < 150 and x["bytes_per_token"] > 90_000_000 for x in tg)
    assert [f["model"] for f in doc["failed_models"]] == ["no-such-model"]
    extras = {e["model"]: e for e in doc["extras"]}
    demo = extras[str(demo_model)]
    assert demo["load_cold_s"] > 0 and demo["ttft_s"] > 0 and demo["e2e_tokens_per_second"] > 0 and demo["peak_rss_bytes"] > 90_000_000
    assert "no model named 'no-such-model'" in r.stderr
    assert len(benchrun.list_runs(isolated)) == 1


@pytest.mark.slow
def test_configuration_that_does_not_fit_is_skipped(cli, demo_model: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_HW_PROFILE", str(Path(__file__).parents[1] / "data" / "tiny-machine.json"))
    r = cli("bench", demo_model, "-p", "16", "-n", "4", "-r", "1", "--no-extras", "-o", "jsonl")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows and all(row["status"].startswith("skipped: does not fit") for row in rows)


@pytest.mark.slow
def test_tune_saves_a_profile_that_run_uses(cli, demo_model: Path, isolated: Path, monkeypatch) -> None:
    from llmctl.bench import tune

    monkeypatch.setattr(tune, "TG", 4)
    monkeypatch.setattr(tune, "PP", 32)
    monkeypatch.setattr(tune, "REPS", 1)
    r = cli("bench", demo_model, "--tune")
    assert r.exit_code == 0, r.stderr
    assert "Saved for this machine" in r.stderr
    saved = json.loads((isolated / "tuned.json").read_text())
    (profile,) = next(iter(saved.values())).values()
    assert profile["threads"] >= 1 and profile["tg_ts"] > 0
    r = cli("run", demo_model, "Hi", "--max-tokens", "2", "--json")
    assert json.loads(r.stdout)["load"]["threads"] == profile["threads"]
    assert "tuned on this machine" in cli("fit", demo_model).stdout
    assert f"{profile['threads']} thread{'' if profile['threads'] == 1 else 's'}, batch" in cli("show", demo_model).stdout


@pytest.mark.slow
def test_ctrl_c_prints_the_results_so_far(demo_model: Path, isolated: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    exe = str(Path(sys.executable).with_name("llmctl"))
    proc = subprocess.Popen([exe, "bench", str(demo_model), "-p", "64", "-n", "16", "-r", "2", "-t", "1,2", "--no-extras", "-o", "json"],
                            env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first finished result
    assert "pp64" in first
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["interrupted"] and 1 <= len(doc["results"]) < 4
    assert [line for line in err.splitlines() if "interrupted" in line] == ["error: interrupted"] and "Traceback" not in err
    (saved,) = benchrun.list_runs(isolated)
    assert saved.interrupted


def test_ctrl_c_is_reported_once_after_the_results(cli, demo_model: Path, isolated: Path, monkeypatch) -> None:
    """One "interrupted" line (not bench's and the CLI's both); what was measured is still shown and saved."""
    monkeypatch.setenv("LLMCTL_HW_PROFILE", "laptop-8gb")

    def one_row_then_ctrl_c(run, model, sweep, hw, **_) -> None:
        run.rows.append(benchrun.Row(**_ROW))
        raise KeyboardInterrupt

    monkeypatch.setattr(benchrun, "run_model", one_row_then_ctrl_c)
    r = cli("bench", demo_model, "-o", "json")
    assert r.exit_code == 130
    assert [line for line in r.stderr.splitlines() if "interrupted" in line] == ["error: interrupted"]
    assert "hint: the results above are those measured before Ctrl-C" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["interrupted"] and [row["test"] for row in doc["results"]] == ["tg128"]
    (saved,) = benchrun.list_runs(isolated)
    assert saved.interrupted


_ROW = dict(
    model="demo", model_filename="demo.gguf", model_type="llama 135M Q4_1", model_size=1, model_n_params=1, backend="CPU",
    n_threads=1, n_gpu_layers=0, n_batch=2048, n_ubatch=512, flash_attn=False, type_k="f16", type_v="f16",
    n_prompt=0, n_gen=128, n_depth=0, test="tg128", test_time="2025-01-01T00:00:00Z", samples_ts=[10.0], avg_ts=10.0,
)  # fmt: skip


def test_tuned_profile_reads_the_same_in_bench_fit_and_show(cli, demo_model: Path, isolated: Path, monkeypatch) -> None:
    """bench --tune, fit and show describe a tuned profile with one phrase."""
    from llmctl.bench import tune
    from llmctl.plan.tuned import describe_tuned

    profile = {"threads": 1, "n_batch": 512, "n_ubatch": 256, "n_gpu_layers": 3, "tg_ts": 41.27, "pp_ts": 812.5}
    monkeypatch.setattr(tune, "tune", lambda model, hw, on_step: dict(profile))
    phrase = "1 thread, batch 512/256, 3 GPU layers (tg 41.3 t/s, pp 812.5 t/s)"
    assert describe_tuned(profile) == phrase
    r = cli("bench", demo_model, "--tune")
    assert r.exit_code == 0, r.stderr
    assert f"Saved for this machine: {phrase}. run and chat use it." in r.stderr
    fit_out, show_out = cli("fit", demo_model).stdout, cli("show", demo_model).stdout
    assert f"tuned on this machine by `bench --tune`: {phrase}" in fit_out
    assert phrase in show_out
