"""``llmctl fit``'s own behaviour: a plan that does not fit exits 4 after showing itself, several pulled
quants of a repo are compared like ``pull --dry-run`` compares the Hub's, and ``--gpu-layers`` on a build
without a GPU backend says why nothing is offloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.errors import EXIT_DOES_NOT_FIT, EXIT_USAGE

TINY_MACHINE = Path(__file__).parents[1] / "data" / "tiny-machine.json"


def test_nothing_fits_exits_4_after_the_plan(cli, demo_model: Path) -> None:
    r = cli("fit", demo_model, "--hw-profile", TINY_MACHINE)
    assert r.exit_code == EXIT_DOES_NOT_FIT, r.stderr
    assert "too large" in r.stdout and "NO" in r.stdout  # the plan, with the device that does not fit
    assert "does not fit on this machine" in r.stderr
    assert "--force" not in r.stderr and "loading anyway" not in r.stderr  # fit loads nothing
    r = cli("fit", demo_model, "--hw-profile", TINY_MACHINE, "--json")
    assert r.exit_code == EXIT_DOES_NOT_FIT
    doc = json.loads(r.stdout)  # the document comes first, whole
    assert doc["chosen"]["fit"] == "too large" and doc["chosen"]["memory"][0]["fits"] is False
    assert not any("--force" in w for w in doc["warnings"])
    assert r.stderr.startswith("error: ") and "--force" not in r.stderr


def test_a_plan_that_fits_exits_0(cli, demo_model: Path) -> None:
    r = cli("fit", demo_model, "--hw-profile", "laptop-8gb", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["chosen"]["fit"] == "CPU only"


def test_gpu_layers_without_a_gpu_backend_say_why(cli, demo_model: Path) -> None:
    r = cli("fit", demo_model, "--hw-profile", "laptop-8gb", "--gpu-layers", "10")
    assert r.exit_code == 0, r.stderr
    assert "gpu layers   0 of 31" in r.stdout
    assert "this llama.cpp build has no GPU backend: --gpu-layers 10 cannot offload anything" in r.stdout
    assert "docs/gpu.md" in r.stdout
    doc = json.loads(cli("fit", demo_model, "--hw-profile", "laptop-8gb", "--gpu-layers", "10", "--json").stdout)
    assert doc["chosen"]["n_gpu_layers"] == 0
    assert sum("no GPU backend" in reason for reason in doc["reasons"]) == 1
    # with a GPU build the layers go where asked, and nothing is said
    doc = json.loads(cli("fit", demo_model, "--hw-profile", "rtx4060-16gb", "--gpu-layers", "10", "--json").stdout)
    assert doc["chosen"]["n_gpu_layers"] == 10 and not any("GPU backend" in reason for reason in doc["reasons"])


def test_gpu_layers_on_this_machines_cpu_build(cli, demo_model: Path) -> None:
    from llmctl.plan.hardware import probe_build

    if probe_build().gpu_offload:
        pytest.skip("this llama.cpp build has a GPU backend")
    doc = json.loads(cli("fit", demo_model, "--gpu-layers", "5", "--ctx", "2048", "--json").stdout)
    assert doc["chosen"]["n_gpu_layers"] == 0
    assert any(reason.startswith("this llama.cpp build has no GPU backend") for reason in doc["reasons"])


def test_fit_of_a_repo_compares_its_pulled_quants_as_pull_does(cli, hub, monkeypatch: pytest.MonkeyPatch) -> None:
    dry = cli("pull", "test/Tiny-GGUF", "--dry-run", "--hw-profile", "laptop-8gb", "--json")
    assert dry.exit_code == 0, dry.stderr
    on_hub = json.loads(dry.stdout)["plan"]
    for quant in ("Q8_0", "F16"):
        assert cli("pull", f"test/Tiny-GGUF:{quant}").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the pulled files, not the Hub's
    r = cli("fit", "test/Tiny-GGUF", "--hw-profile", "laptop-8gb", "--json")
    assert r.exit_code == 0, r.stderr
    local = json.loads(r.stdout)
    names = {"Q8_0": "tiny:q8_0", "F16": "tiny:f16"}
    assert {c["label"] for c in local["candidates"]} == set(names.values())
    assert local["chosen"]["label"] == names[on_hub["chosen"]["label"]] == "tiny:q8_0"
    renamed = []
    for reason in on_hub["reasons"]:
        for quant, name in names.items():
            reason = reason.replace(f"{quant}:", f"{name}:").replace(f"{quant} not chosen", f"{name} not chosen")
        renamed.append(reason)
    assert local["reasons"] == renamed
    table = cli("fit", "test/Tiny-GGUF", "--hw-profile", "laptop-8gb")
    assert table.exit_code == 0
    assert "→ tiny:q8_0" in table.stdout and "tiny:f16" in table.stdout and "BITS/W" in table.stdout
    # one quant named is one model, as before
    one = json.loads(cli("fit", "test/Tiny-GGUF:F16", "--hw-profile", "laptop-8gb", "--json").stdout)
    assert [c["label"] for c in one["candidates"]] == ["tiny:f16"]


def test_a_prefix_that_matches_several_models_is_still_ambiguous(cli, hub) -> None:
    for quant in ("Q8_0", "F16"):
        assert cli("pull", f"test/Tiny-GGUF:{quant}").exit_code == 0
    r = cli("fit", "tiny:")
    assert r.exit_code == EXIT_USAGE and "matches 2 models" in r.stderr
