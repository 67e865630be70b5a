"""Parallel slots for serving: the KV cache llama.cpp allocates for n sequences, and how many slots
the planner gives llama-server on each hardware profile."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llmctl.errors import DoesNotFitError
from llmctl.plan import fit, hardware
from tests.plan import test_fit
from tests.plan.test_fit import PROFILES, candidates, info_of
from tests.support.gguf_factory import Q4_K, SHAPES

MIB = 1024**2
shapes = test_fit.shapes  # the fixture: headers of real model shapes at four quantisations


# --- the estimate -------------------------------------------------------------------------------


def test_kv_cache_holds_a_stream_per_slot(make_gguf) -> None:
    info = info_of(make_gguf(n_layers=3, n_embd=64, n_head=4, n_head_kv=2))  # 128 bytes per cell per layer
    one = fit.kv_cache_bytes_per_layer(info, fit.LoadConfig(n_ctx=1000))  # padded to 1024 cells
    for slots in (2, 3, 4):
        config = fit.LoadConfig(n_ctx=1000, n_seq=slots)
        # llama_context: n_ctx_seq = pad(pad(n_ctx × slots) / slots) = 1024 cells, a stream each
        assert fit.kv_streams(config) == (1024, slots)
        assert fit.kv_cache_bytes_per_layer(info, config) == [slots * b for b in one] == [slots * 1024 * 128] * 3
        assert config.total_ctx == 1000 * slots
        # unified: one stream of all the slots' cells, padded once
        unified = replace(config, kv_unified=True)
        assert fit.kv_streams(unified) == (fit.padded_cells(1000 * slots), 1)
        assert fit.kv_cache_bytes_per_layer(info, unified) == [fit.padded_cells(1000 * slots) * 128] * 3


def test_sliding_window_layers_keep_a_window_per_slot(make_gguf) -> None:
    info = info_of(make_gguf(arch="gemma2", n_layers=2, n_head=[4, 4], n_head_kv=[2, 2], sliding_window=128))
    per_cell = 2 * 32 * 2  # 2 KV heads × (16 + 16) dims × f16
    split = fit.kv_cache_bytes_per_layer(info, fit.LoadConfig(n_ctx=4096, n_seq=3, swa_full=False))
    # llama_kv_cache_iswa: each stream holds pad(window + ubatch) = 768 cells on windowed layers
    assert split == [3 * 768 * per_cell, 3 * 4096 * per_cell]
    unified = fit.kv_cache_bytes_per_layer(info, fit.LoadConfig(n_ctx=4096, n_seq=3, swa_full=False, kv_unified=True))
    # unified: one stream with a window for every sequence, pad(3 × 128 + 512) = 1024 cells
    assert unified == [1024 * per_cell, 3 * 4096 * per_cell]


def test_compute_buffer_attends_one_stream(make_gguf) -> None:
    info = info_of(make_gguf(n_layers=2, n_embd=64, n_head=4, n_head_kv=2, n_ctx=65536))
    single = {n: fit.estimate_memory(info, fit.LoadConfig(n_ctx=n)).devices[0] for n in (2048, 8192)}
    split = fit.estimate_memory(info, fit.LoadConfig(n_ctx=2048, n_seq=4)).devices[0]
    unified = fit.estimate_memory(info, fit.LoadConfig(n_ctx=2048, n_seq=4, kv_unified=True)).devices[0]
    assert split.compute == single[2048].compute  # each slot's scores cover its own 2048 cells
    assert unified.compute == single[8192].compute  # a unified pool is attended as a whole
    assert split.kv_cache == unified.kv_cache == single[8192].kv_cache
    # the speed quoted is one request's: its own KV cache at the same depth as with one slot
    assert split.bytes_per_token == single[2048].bytes_per_token


def test_one_slot_estimates_are_the_in_process_ones(shapes) -> None:
    info = shapes[("7b", Q4_K)]
    hw = hardware.load_profile("rtx4060-16gb")
    for config in (fit.LoadConfig(n_ctx=4096, n_gpu_layers=20), fit.LoadConfig(n_ctx=1000, flash_attn=True, n_gpu_layers=33)):
        plain = fit.estimate_memory(info, config, hw)
        for same in (replace(config, n_seq=1), replace(config, n_seq=1, kv_unified=True)):
            assert fit.estimate_memory(info, same, hw).devices == plain.devices


def test_demo_model_slots_match_llama_server_logs(demo_model: Path) -> None:
    """Anchors: the buffers llama-server (the llama.cpp of llama-cpp-python 0.3.36, CPU, with serve's
    flags: -fa off -b 512 -ub 512 --embeddings) logs for the demo model at -np 4 -c 8192, split (four
    2048-cell streams) and --kv-unified (one 8192-cell stream): ``llama_kv_cache: size = 180.00 MiB``
    both; ``CPU compute buffer size`` 103.02 and 166.38 MiB."""
    info = info_of(demo_model)
    split = fit.estimate_memory(info, fit.LoadConfig(n_ctx=2048, n_seq=4)).devices[0]
    unified = fit.estimate_memory(info, fit.LoadConfig(n_ctx=2048, n_seq=4, kv_unified=True)).devices[0]
    assert split.kv_cache / MIB == unified.kv_cache / MIB == pytest.approx(180.00, abs=0.01)
    assert split.compute / MIB == pytest.approx(103.02, rel=0.06)
    assert unified.compute / MIB == pytest.approx(166.38, rel=0.06)


# --- the planner --------------------------------------------------------------------------------

SERVING = fit.Overrides(serving=True)


def serving_plan(shapes, shape: str, profile: str, overrides: fit.Overrides = SERVING) -> fit.Plan:
    return fit.make_plan(candidates(shapes, shape), hardware.load_profile(profile), overrides)


def test_slots_follow_memory(shapes) -> None:
    # Llama-2-7B at 4096 tokens: 2 GiB of KV cache a slot
    assert serving_plan(shapes, "7b", "laptop-8gb").parallel == 1  # 8 GB of RAM holds one context (of 2048)
    assert serving_plan(shapes, "7b", "rtx4060-16gb").parallel == 1  # Q4_K_M on the GPU, 2 GiB to spare
    assert serving_plan(shapes, "7b", "rtx4090-32gb").parallel == 4
    assert serving_plan(shapes, "13b", "rtx4090-32gb").parallel == 2  # Q8_0 leaves room for two 3.1 GiB contexts
    assert serving_plan(shapes, "1b", "laptop-8gb").parallel == 4  # 256 MiB a slot at 8192 tokens
    plan = serving_plan(shapes, "13b", "rtx4090-32gb")
    assert (plan.config.n_ctx, plan.total_ctx, plan.config.n_seq) == (4096, 8192, 2)
    assert any(r.startswith("2 parallel slots of 4096 tokens") and "3 do not fit" in r for r in plan.reasons)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_slots_fit_beside_the_weights_of_one(shapes, profile: str, shape: str) -> None:
    hw = hardware.load_profile(profile)
    cands = candidates(shapes, shape)
    try:
        plan = fit.make_plan(cands, hw, SERVING)
    except DoesNotFitError:
        with pytest.raises(DoesNotFitError):
            fit.make_plan(cands, hw, fit.Overrides(serving=True, parallel=1))
        return
    chosen = plan.chosen
    one = fit.plan_candidate(chosen.candidate, hw, fit.Overrides(parallel=1))
    assert plan.serving and 1 <= plan.parallel <= 4 and chosen.estimate.fits
    # the slots took no layer off the GPU and no token off the context of one slot
    assert (chosen.config.n_gpu_layers, chosen.config.n_ctx, chosen.fit) == (one.config.n_gpu_layers, one.config.n_ctx, one.fit)
    if plan.parallel < 4:  # one more slot would not have fitted
        assert not fit.estimate_memory(chosen.candidate.info, replace(chosen.config, n_seq=plan.parallel + 1), hw).fits
    if plan.parallel > 1:
        assert chosen.config.n_ctx >= fit.default_context(chosen.candidate.info)
    # llama-server keeps only the window of sliding-window layers unless told --swa-full
    assert chosen.config.swa_full is False


def test_shortened_context_gets_one_slot(shapes) -> None:
    plan = serving_plan(shapes, "7b", "laptop-8gb")
    assert (plan.parallel, plan.config.n_ctx) == (1, 2048)  # 4096 does not fit even once
    assert any("shortened" in r for r in plan.reasons)


def test_parallel_override_is_exact_and_may_cost_gpu_layers(shapes) -> None:
    auto = serving_plan(shapes, "13b", "rtx4060-16gb")
    assert (auto.chosen.candidate.label, auto.parallel) == ("Q6_K", 1)
    two = serving_plan(shapes, "13b", "rtx4060-16gb", fit.Overrides(parallel=2))
    assert two.parallel == 2 and two.serving and two.total_ctx == 2 * two.config.n_ctx
    # asked for, a second slot's KV cache takes the place of some layers on the GPU
    assert two.chosen.fit == fit.PARTIAL and two.config.n_gpu_layers < auto.config.n_gpu_layers
    assert any(r.endswith("--parallel") for r in two.reasons)
    eight = serving_plan(shapes, "1b", "rtx4090-32gb", fit.Overrides(parallel=8))
    assert eight.parallel == 8 and eight.chosen.fit == fit.FULL_GPU  # more than the ladder, when asked


def test_parallel_that_does_not_fit_is_refused_with_a_count_that_does(shapes) -> None:
    hw = hardware.load_profile("laptop-8gb")
    cands = [candidates(shapes, "7b")[0]]  # Q4_K_M: one context of 2048 tokens fits in RAM
    with pytest.raises(DoesNotFitError) as caught:
        fit.make_plan(cands, hw, fit.Overrides(parallel=6, n_ctx=1024))
    assert "6 slots of 1024 tokens" in caught.value.message
    fewer = int(re.search(r"--parallel (\d+)", caught.value.hint or "").group(1))  # type: ignore[union-attr]
    assert 1 < fewer < 6
    assert fit.make_plan(cands, hw, fit.Overrides(parallel=fewer, n_ctx=1024)).parallel == fewer
    with pytest.raises(DoesNotFitError):
        fit.make_plan(cands, hw, fit.Overrides(parallel=fewer + 1, n_ctx=1024))
    with pytest.raises(DoesNotFitError) as none:
        fit.make_plan(cands, hw, fit.Overrides(parallel=2, n_ctx=8192))
    assert "not even one slot fits" in (none.value.hint or "")


def test_in_process_plans_have_one_slot_and_no_serving_fields(shapes) -> None:
    plan = fit.make_plan(candidates(shapes, "7b"), hardware.load_profile("rtx4090-32gb"))
    assert (plan.serving, plan.parallel, plan.total_ctx) == (False, 1, plan.config.n_ctx)
    assert plan.config.swa_full is False  # run: one prompt, nothing to roll back, so the window is enough
    chat = fit.make_plan(candidates(shapes, "7b"), hardware.load_profile("rtx4090-32gb"), fit.Overrides(multi_turn=True))
    assert chat.config.swa_full is True  # chat reuses its cache turn after turn
    doc = plan.to_dict()
    assert "serving" not in doc and "parallel" not in doc["chosen"] and not any("slot" in r for r in plan.reasons)


def test_serving_plan_json(shapes) -> None:
    plan = serving_plan(shapes, "13b", "rtx4090-32gb")
    doc = json.loads(json.dumps(plan.to_dict()))
    chosen = doc["chosen"]
    assert doc["serving"] is True
    assert (chosen["parallel"], chosen["ctx_per_slot"], chosen["total_ctx"], chosen["kv_unified"]) == (2, 4096, 8192, False)
    assert chosen["kv_cache_bytes"] == sum(d["kv_cache"] for d in chosen["memory"]) == 2 * 40 * 4096 * 5120 * 2 * 2
    assert all("parallel" in c for c in doc["candidates"])


# --- the command --------------------------------------------------------------------------------


def test_fit_serve_shows_slots(cli, demo_model: Path) -> None:
    plain = cli("fit", demo_model, "--hw-profile", "laptop-8gb")
    assert plain.exit_code == 0 and "slots" not in plain.stdout and "per slot" not in plain.stdout
    r = cli("fit", demo_model, "--hw-profile", "laptop-8gb", "--serve")
    assert r.exit_code == 0, r.stderr
    assert "8192 per slot" in r.stdout
    assert "4 × 8192 tokens, 720.0 MiB of KV cache (llama-server -np 4 -c 32768)" in r.stdout
    doc = json.loads(cli("fit", demo_model, "--hw-profile", "laptop-8gb", "--parallel", "3", "--ctx", "4096", "--json").stdout)
    assert (doc["chosen"]["parallel"], doc["chosen"]["total_ctx"], doc["chosen"]["kv_cache_bytes"]) == (3, 12288, 3 * 90 * MIB)
    assert cli("fit", demo_model, "--parallel", "0").exit_code == 2


# --- against llama-server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_buffers(server: Path, model: Path, *args: str) -> tuple[float, float]:
    """The KV cache and CPU compute buffer (MiB) llama-server logs while loading ``model`` with the
    flags ``serve`` starts it with that bear on memory (engine/server_process.py)."""
    command = [str(server), "-m", str(model), "--port", str(_free_port()), "-t", "1", "-lv", "4",
               "-fa", "off", "--fit", "off", "-b", "512", "-ub", "512", "--cache-ram", "0", "--embeddings", "--pooling", "mean", *args]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kv = compute = None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while (kv is None or compute is None) and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if found := re.search(r"llama_kv_cache: size = +([\d.]+) MiB", line):
                kv = float(found.group(1))
            if found := re.search(r"CPU compute buffer size = +([\d.]+) MiB", line):
                compute = float(found.group(1))
    finally:
        process.kill()
        process.wait(timeout=30)
    assert kv is not None and compute is not None, "".join(lines[-30:])
    return kv, compute


@pytest.mark.slow
def test_kv_cache_and_compute_match_a_real_llama_server(native_tools, demo_model: Path) -> None:
    info = info_of(demo_model)
    server = native_tools.path("llama-server")
    for args, config in (
        (["-np", "4", "-c", "8192", "--no-kv-unified"], fit.LoadConfig(n_ctx=2048, n_seq=4)),
        (["-np", "2", "-c", "6000", "--no-kv-unified"], fit.LoadConfig(n_ctx=3000, n_seq=2)),  # 3072 cells a slot
        (["-np", "4", "-c", "8192", "--kv-unified"], fit.LoadConfig(n_ctx=2048, n_seq=4, kv_unified=True)),
    ):
        kv, compute = _server_buffers(server, demo_model, *args)
        cpu = fit.estimate_memory(info, config).devices[0]
        assert cpu.kv_cache / MIB == pytest.approx(kv, abs=0.01), args
        # measured: 103.02, 105.01, 166.38 MiB against 97.1, 97.1, 173.5 (docs/fit.md)
        assert cpu.compute / MIB == pytest.approx(compute, rel=0.08), args
