"""Which quant the planner takes from a repo: real-shaped quant sets (tests/plan/hub_quants.py) on the shipped
hardware profiles and a few described machines. Q8_0 is a quant like the others; unquantised files
(F16/BF16/F32) are taken only when no quantised file fits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llmctl.errors import DoesNotFitError
from llmctl.plan import fit, hardware
from llmctl.plan.hardware import HardwareInfo
from tests.plan.hub_quants import HUB_FILES, hub_candidates, info_for

GIB = 1024**3
PROFILES = sorted(p.stem for p in hardware.shipped_profiles_dir().glob("*.json"))
SMALL = ["SmolLM2-135M-Instruct", "SmolLM2-360M-Instruct"]


def laptop(ram_gib: int, available_gib: float) -> HardwareInfo:
    """A CPU-only laptop (the shipped 8 GB one's CPU) with this much memory."""
    return replace(hardware.load_profile("laptop-8gb"), ram_total=ram_gib * GIB, ram_available=int(available_gib * GIB))


def mac(ram_gib: int) -> HardwareInfo:
    """An Apple Silicon machine with this much unified memory (Metal's budget: 75% of it)."""
    m2 = hardware.load_profile("m2-16gb")
    gpu = replace(m2.gpus[0], memory_total=ram_gib * 3 * GIB // 4, memory_free=ram_gib * 3 * GIB // 4)
    return replace(m2, ram_total=ram_gib * GIB, ram_available=int(ram_gib * 0.875 * GIB), gpus=[gpu])


def machines() -> dict[str, HardwareInfo]:
    return {**{name: hardware.load_profile(name) for name in PROFILES}, "laptop-16gb": laptop(16, 11)}


def test_a_small_models_q8_0_above_8_6_bits_per_weight_is_chosen_on_a_16gb_laptop() -> None:
    candidates = hub_candidates("SmolLM2-135M-Instruct")
    q8 = next(c for c in candidates if c.label == "Q8_0")
    assert q8.bits_per_weight > 8.6  # the tokenizer and norms weigh more in a small model
    plan = fit.make_plan(candidates, laptop(16, 11))
    assert (plan.chosen.candidate.label, plan.chosen.fit) == ("Q8_0", fit.CPU_ONLY), plan.reasons
    f16 = next(p for p in plan.candidates if p.candidate.label == "F16")
    assert f16.fits  # it fits too, and is passed over, saying why
    assert any(r.startswith("F16 not chosen: unquantised") for r in plan.reasons), plan.reasons


@pytest.mark.parametrize("model", SMALL)
@pytest.mark.parametrize("machine", [*PROFILES, "laptop-16gb"])
def test_small_models_get_q8_0_on_every_machine(model: str, machine: str) -> None:
    plan = fit.make_plan(hub_candidates(model), machines()[machine])
    assert plan.chosen.candidate.label == "Q8_0", plan.reasons


# docs/fit.md's table: repo × machine → chosen quant (None: too large).
TABLE = {
    "SmolLM2-1.7B-Instruct": ["Q6_K", "Q6_K", "Q8_0", "Q8_0", "Q8_0"],
    "Llama-2-7b-chat": ["Q4_K_M", "Q6_K", "Q4_K_M", "Q8_0", "Q8_0"],
    "Meta-Llama-3.1-70B-Instruct": [None, None, None, None, "Q4_K_M"],
}
COLUMNS = ["laptop-8gb", "laptop-16gb", "rtx4060-16gb", "m2-16gb", "dual-rtx3090-64gb"]


@pytest.mark.parametrize("model", list(TABLE))
def test_larger_models_as_docs_fit_md_says(model: str) -> None:
    for machine, want in zip(COLUMNS, TABLE[model]):
        try:
            chosen = fit.make_plan(hub_candidates(model), machines()[machine]).chosen.candidate.label
        except DoesNotFitError:
            chosen = None
        assert chosen == want, (model, machine)


def test_a_70b_model_on_64gb_machines_gets_a_4_or_5_bit_quant() -> None:
    candidates = hub_candidates("Meta-Llama-3.1-70B-Instruct")
    on_mac = fit.make_plan(candidates, mac(64))
    assert (on_mac.chosen.candidate.label, on_mac.chosen.fit) == ("Q4_K_M", fit.FULL_GPU), on_mac.reasons
    on_cpu = fit.make_plan(candidates, laptop(64, 58))
    assert (on_cpu.chosen.candidate.label, on_cpu.chosen.fit) == ("Q5_K_M", fit.CPU_ONLY), on_cpu.reasons
    on_two_gpus = fit.make_plan(candidates, hardware.load_profile("dual-rtx3090-64gb"))
    assert on_two_gpus.chosen.candidate.label in {"Q4_K_M", "Q4_K_S", "Q5_K_S", "Q5_K_M"}, on_two_gpus.reasons
    assert on_two_gpus.chosen.fit == fit.FULL_GPU


@pytest.mark.parametrize("model", list(HUB_FILES))
def test_unquantised_files_are_never_chosen_while_a_quant_fits(model: str) -> None:
    for name, hw in {**machines(), "mac-192gb": mac(192), "server-512gb": laptop(512, 480)}.items():
        try:
            plan = fit.make_plan(hub_candidates(model), hw)
        except DoesNotFitError:
            continue
        quant_fits = any(p.fits and not p.candidate.unquantised for p in plan.candidates)
        assert not (quant_fits and plan.chosen.candidate.unquantised), (model, name, plan.reasons)


def test_f16_is_chosen_when_it_is_the_only_file() -> None:
    only = hub_candidates("SmolLM2-135M-Instruct", only=["f16"])
    plan = fit.make_plan(only, laptop(16, 11))
    assert plan.chosen.candidate.label == "F16" and plan.chosen.fits
    assert not any("not chosen" in r for r in plan.reasons)


def test_unquantised_is_the_files_type_not_its_bits_per_weight() -> None:
    heavy_q8 = fit.Candidate("Q8_0", info_for("SmolLM2-135M-Instruct", "Q8_0", 160_000_000), 160_000_000)
    light_f16 = fit.Candidate("custom", info_for("SmolLM2-135M-Instruct", "F16", 200_000_000), 200_000_000)
    assert heavy_q8.bits_per_weight > 9 and not heavy_q8.unquantised
    assert light_f16.bits_per_weight < 12 and light_f16.unquantised  # labelled by name, typed by the header
