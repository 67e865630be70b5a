"""The memory estimate against hand-computed values, and the planner's decisions on every profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl import gguf
from llmctl.errors import DoesNotFitError
from llmctl.plan import fit, hardware
from tests.support.gguf_factory import F16, Q4_K, Q6_K, Q8_0, SHAPES, write_shape_model

MIB = 1024**2
GIB = 1024**3
PROFILES = sorted(p.stem for p in hardware.shipped_profiles_dir().glob("*.json"))


def info_of(path: Path) -> gguf.ModelInfo:
    return gguf.read_model(gguf.split_parts(path))[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[tuple[str, int], gguf.ModelInfo]:
    folder = tmp_path_factory.mktemp("shapes")
    out = {}
    for shape in SHAPES:
        for qtype in (Q4_K, Q6_K, Q8_0, F16):
            out[(shape, qtype)] = info_of(write_shape_model(folder / f"{shape}-{qtype}.gguf", shape, qtype))
    return out


def candidates(shapes, shape: str) -> list[fit.Candidate]:
    names = {Q4_K: "Q4_K_M", Q6_K: "Q6_K", Q8_0: "Q8_0", F16: "F16"}
    return [fit.Candidate(names[q], shapes[(shape, q)], shapes[(shape, q)].file_size) for q in names]


# --- the estimate -------------------------------------------------------------------


def test_kv_cache_matches_hand_computation(make_gguf) -> None:
    info = info_of(make_gguf(n_layers=3, n_embd=64, n_head=4, n_head_kv=2))
    # 64/4 = 16 dims per head; per cell per layer 2 heads × (16 + 16) × 2 bytes = 128 bytes
    config = fit.LoadConfig(n_ctx=1000)  # padded to 1024 cells
    assert fit.kv_cache_bytes_per_layer(info, config) == [1024 * 128] * 3
    q8 = fit.LoadConfig(n_ctx=1024, type_k="q8_0", type_v="q4_0")
    assert fit.kv_cache_bytes_per_layer(info, q8) == [int(1024 * 2 * (16 * 34 / 32 + 16 * 18 / 32))] * 3


def test_kv_cache_per_layer_heads_and_sliding_window(make_gguf) -> None:
    info = info_of(make_gguf(arch="gemma2", n_layers=4, n_head=[4, 4, 4, 4], n_head_kv=[2, 1, 2, 0], sliding_window=128))
    full = fit.kv_cache_bytes_per_layer(info, fit.LoadConfig(n_ctx=4096))
    assert full == [4096 * h * 32 * 2 for h in (2, 1, 2, 0)]  # llama.cpp's default: swa_full
    assert fit.swa_layers(info) == [True, False, True, False]  # gemma2: every other layer
    small = fit.kv_cache_bytes_per_layer(info, fit.LoadConfig(n_ctx=4096, swa_full=False))
    window_cells = 768  # 128 + 512 (ubatch), padded to 256
    assert small == [window_cells * 2 * 64, 4096 * 1 * 64, window_cells * 2 * 64, 0]


def test_demo_model_kv_and_compute_match_llama_cpp(demo_model: Path) -> None:
    """Anchors: the buffer sizes llama.cpp 0.3.36 logs when loading the demo model on the CPU."""
    info = info_of(demo_model)
    logged = {2048: (45.00, 99.38), 8192: (180.00, 166.38), 32768: (720.00, 646.38)}
    for n_ctx, (kv_mib, compute_mib) in logged.items():
        est = fit.estimate_memory(info, fit.LoadConfig(n_ctx=n_ctx))
        cpu = est.devices[0]
        assert cpu.kv_cache / MIB == pytest.approx(kv_mib, abs=0.01)
        assert cpu.compute / MIB == pytest.approx(compute_mib, rel=0.06)
        assert cpu.weights == info.total_tensor_bytes  # 92.10 MiB "CPU_Mapped model buffer"


def test_weights_follow_llama_cpp_placement(shapes) -> None:
    info = shapes[("7b", Q4_K)]
    hw = hardware.load_profile("rtx4090-32gb")
    layer = info.layer_bytes[0]
    by_ngl = {n: fit.estimate_memory(info, fit.LoadConfig(n_ctx=4096, n_gpu_layers=n), hw) for n in (0, 1, 2, 33)}
    cpu0, gpu0 = by_ngl[0].devices
    assert gpu0.weights == 0 and cpu0.weights == info.total_tensor_bytes
    cpu1, gpu1 = by_ngl[1].devices
    assert gpu1.weights == info.output_bytes  # the output layer goes first
    cpu2, gpu2 = by_ngl[2].devices
    assert gpu2.weights == info.output_bytes + layer  # then the last block
    assert gpu2.kv_cache == fit.kv_cache_bytes_per_layer(info, fit.LoadConfig(n_ctx=4096))[-1]
    cpu33, gpu33 = by_ngl[33].devices
    assert cpu33.weights == info.embedding_bytes  # token embeddings never leave the CPU
    assert gpu33.weights == info.total_tensor_bytes - info.embedding_bytes
    assert gpu33.overhead == fit.GPU_BACKEND_BYTES["nvidia"]


def test_two_gpus_split_layers_by_free_memory(shapes) -> None:
    info = shapes[("70b", Q4_K)]
    hw = hardware.load_profile("dual-rtx3090-64gb")
    est = fit.estimate_memory(info, fit.LoadConfig(n_ctx=4096, n_gpu_layers=81), hw)
    _, gpu0, gpu1 = est.devices
    assert gpu0.layers == 40 and gpu1.layers == 40
    assert gpu1.weights - gpu0.weights == info.output_bytes


def test_moe_reads_only_routed_experts(make_gguf) -> None:
    import numpy as np

    path = make_gguf(n_layers=2, extra={"llama.expert_count": 8, "llama.expert_used_count": 2})
    info = info_of(path)
    # a MoE model whose expert tensors make up most of each layer
    moe = gguf.ModelInfo.from_dict({**info.to_dict(), "expert_count": 8, "expert_used_count": 2,
                                    "expert_bytes": 2 * 800_000, "layer_bytes": [1_000_000, 1_000_000]})  # fmt: skip
    dense = gguf.ModelInfo.from_dict({**moe.to_dict(), "expert_count": None, "expert_bytes": 0})
    cfg = fit.LoadConfig(n_ctx=256)
    moe_cpu = fit.estimate_memory(moe, cfg).devices[0]
    dense_cpu = fit.estimate_memory(dense, cfg).devices[0]
    assert moe_cpu.weights == dense_cpu.weights  # every expert is loaded
    assert dense_cpu.bytes_per_token - moe_cpu.bytes_per_token == 2 * int(800_000 * 6 / 8)
    assert np.isfinite(moe_cpu.bytes_per_token)


def test_generated_moe_header_counts_expert_tensors(tmp_path: Path) -> None:
    from tests.support.gguf_factory import T_STRING, T_UINT32, RawGGUF, RawTensor

    raw = RawGGUF.minimal()
    raw.kvs += [("llama.expert_count", T_UINT32, 4), ("llama.expert_used_count", T_UINT32, 2)]
    raw.tensors.append(RawTensor("blk.0.ffn_up_exps.weight", [32, 16, 4]))
    info = info_of(raw.write(tmp_path / "moe.gguf"))
    assert info.expert_count == 4 and info.expert_bytes == 32 * 16 * 4 * 4
    assert T_STRING  # the factory's constants are shared


def test_bandwidth_bound(shapes) -> None:
    info = shapes[("7b", Q4_K)]
    hw = hardware.load_profile("laptop-8gb")
    est = fit.estimate_memory(info, fit.LoadConfig(n_ctx=4096), hw)
    tps = fit.expected_tokens_per_second(est)
    per_token = est.devices[0].bytes_per_token
    assert per_token > info.total_tensor_bytes - info.embedding_bytes  # weights + the KV cache
    assert tps == pytest.approx(35e9 / per_token)


# --- the planner --------------------------------------------------------------------

EXPECTED = {
    # profile: {shape: (chosen quant, fit class)}
    "laptop-8gb": {"1b": ("Q8_0", fit.CPU_ONLY), "7b": ("Q4_K_M", fit.CPU_ONLY), "13b": (None, fit.TOO_LARGE), "70b": (None, fit.TOO_LARGE)},
    "rtx4060-16gb": {"1b": ("Q8_0", fit.FULL_GPU), "7b": ("Q4_K_M", fit.FULL_GPU), "13b": ("Q6_K", fit.PARTIAL), "70b": (None, fit.TOO_LARGE)},
    "rtx4090-32gb": {"1b": ("Q8_0", fit.FULL_GPU), "7b": ("Q8_0", fit.FULL_GPU), "13b": ("Q8_0", fit.FULL_GPU), "70b": ("Q4_K_M", fit.PARTIAL)},
    "dual-rtx3090-64gb": {"1b": ("Q8_0", fit.FULL_GPU), "7b": ("Q8_0", fit.FULL_GPU), "13b": ("Q8_0", fit.FULL_GPU), "70b": ("Q4_K_M", fit.FULL_GPU)},
    "m2-16gb": {"1b": ("Q8_0", fit.FULL_GPU), "7b": ("Q8_0", fit.FULL_GPU), "13b": ("Q4_K_M", fit.PARTIAL), "70b": (None, fit.TOO_LARGE)},
}  # fmt: skip


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_planner_decisions(shapes, profile: str, shape: str) -> None:
    hw = hardware.load_profile(profile)
    quant, fit_class = EXPECTED[profile][shape]
    if quant is None:
        with pytest.raises(DoesNotFitError) as caught:
            fit.make_plan(candidates(shapes, shape), hw)
        assert "does not fit" in caught.value.message
        return
    plan = fit.make_plan(candidates(shapes, shape), hw)
    assert (plan.chosen.candidate.label, plan.chosen.fit) == (quant, fit_class), plan.reasons
    assert plan.chosen.estimate.fits
    # every device of the chosen plan within its budget, margins included
    for dev in plan.chosen.estimate.devices:
        assert dev.available is None or dev.needed <= dev.available
    # a better-quality candidate that was passed over was either a worse fit class or too slow
    for other in plan.candidates:
        if other.candidate.bits_per_weight > plan.chosen.candidate.bits_per_weight and not other.candidate.unquantised:
            assert (
                (not other.fits)
                or fit._CLASS_RANK[other.fit] > fit._CLASS_RANK[plan.chosen.fit]
                or ((other.tokens_per_second or 0) < max(p.tokens_per_second or 0 for p in plan.candidates if p.fit == plan.chosen.fit) / 2)
            )


def test_context_shrinks_before_giving_up_and_is_capped(shapes) -> None:
    hw = hardware.load_profile("laptop-8gb")
    one_b = fit.make_plan([candidates(shapes, "1b")[0]], hw)
    assert one_b.config.n_ctx == fit.DEFAULT_CTX  # trained on 131072, capped by default
    assert any("default cap" in r for r in one_b.reasons)
    f16_7b = fit.Candidate("F16", shapes[("7b", F16)], shapes[("7b", F16)].file_size)
    with pytest.raises(DoesNotFitError):
        fit.make_plan([f16_7b], hw)
    forced = fit.make_plan([f16_7b], hw, force=True)
    assert forced.chosen.fit == fit.TOO_LARGE and forced.warnings


def test_user_overrides_win(shapes) -> None:
    hw = hardware.load_profile("rtx4090-32gb")
    plan = fit.make_plan([candidates(shapes, "7b")[0]], hw, fit.Overrides(n_ctx=2048, n_gpu_layers=10, threads=3, type_k="q8_0"))
    assert (plan.config.n_ctx, plan.config.n_gpu_layers, plan.threads, plan.config.type_k) == (2048, 10, 3, "q8_0")
    assert plan.chosen.fit == fit.PARTIAL


def test_cpu_only_build_on_a_gpu_machine_plans_for_the_cpu(shapes) -> None:
    hw = hardware.load_profile("rtx4090-32gb")
    hw.build = hardware.BuildInfo(installed=True, version="0.3.36", gpu_offload=False, backend="cpu")
    plan = fit.make_plan([candidates(shapes, "7b")[0]], hw)
    assert plan.chosen.fit == fit.CPU_ONLY
    assert "cannot use the GPU" in plan.chosen.reason
    assert any("cannot use it" in w for w in plan.warnings)


def test_plan_json_is_serialisable(shapes) -> None:
    plan = fit.make_plan(candidates(shapes, "13b"), hardware.load_profile("rtx4060-16gb"))
    doc = json.loads(json.dumps(plan.to_dict()))
    assert doc["chosen"]["fit"] == fit.PARTIAL
    assert {c["label"] for c in doc["candidates"]} == {"Q4_K_M", "Q6_K", "Q8_0", "F16"}
    assert doc["chosen"]["memory"][0]["device"] == "CPU"


# --- the estimate against the real engine -------------------------------------------------


@pytest.mark.slow
def test_estimate_tracks_measured_rss_of_the_demo_model(demo_model: Path) -> None:
    info = info_of(demo_model)
    for n_ctx in (2048, 8192):
        script = Path(__file__).parents[1] / "support" / "measure_rss.py"
        out = subprocess.run([sys.executable, str(script), str(demo_model), str(n_ctx)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        measured = json.loads(out.stdout.strip().splitlines()[-1])["rss_growth"]
        estimate = fit.estimate_memory(info, fit.LoadConfig(n_ctx=n_ctx), depth=512, n_outputs=1).total
        assert estimate == pytest.approx(measured, rel=0.25), (n_ctx, estimate / MIB, measured / MIB)
