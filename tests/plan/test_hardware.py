"""hwinfo and hardware profiles: the live probe on this machine, profiles, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl import config
from llmctl.errors import EXIT_USAGE
from llmctl.plan import hardware

PROFILES = sorted(p.stem for p in hardware.shipped_profiles_dir().glob("*.json"))


def test_live_probe_reports_this_machine(cli) -> None:
    import os

    import psutil

    r = cli("hwinfo", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "live"
    assert doc["cpu"]["logical_cores"] == os.cpu_count()
    assert doc["ram_total"] == psutil.virtual_memory().total
    assert doc["build"]["installed"] is True and doc["build"]["version"] == "0.3.36"
    assert "CPU" in doc["build"]["system_info"]
    # this machine has no NVIDIA GPU: reported with its reason, never a crash
    assert doc["gpus"] == [] and doc["gpu_note"].startswith("no NVIDIA GPU detected")


def test_probe_caches_the_slow_parts(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config.load_settings()
    first = hardware.probe(settings)
    calls = []
    monkeypatch.setattr(hardware, "probe_build", lambda: calls.append(1) or first.build)
    monkeypatch.setattr(hardware, "_cpu_brand_and_features", lambda: calls.append(2) or ("x", []))
    second = hardware.probe(settings)
    assert calls == [] and second.cpu == first.cpu and second.build == first.build
    hardware.probe(settings, refresh=True)
    assert sorted(calls) == [1, 2]


def test_cpu_features_from_proc_cpuinfo() -> None:
    found = hardware._proc_cpuinfo()
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo on this platform")
    brand, features = found
    flags = Path("/proc/cpuinfo").read_text()
    assert brand
    assert ("avx2" in features) == (" avx2" in flags)
    assert set(features) <= set(hardware.CPU_FEATURES)


def test_nvml_missing_library_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    gpus, note = hardware._nvml_gpus()
    assert gpus == [] and note.startswith("no NVIDIA GPU detected")


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_load(cli, name: str) -> None:
    r = cli("hwinfo", "--hw-profile", name, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"].startswith("profile: ")
    assert doc["ram_total"] > 0
    hw = hardware.load_profile(name)
    assert (hw.build.backend == "cpu") == (not hw.usable_gpus)


def test_profile_from_env_and_path(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "box.json"
    path.write_text(json.dumps({"name": "my box", "cpu": {"physical_cores": 2}, "ram": {"total_gib": 4}}))
    monkeypatch.setenv("LLMCTL_HW_PROFILE", str(path))
    doc = json.loads(cli("hwinfo", "--json").stdout)
    assert doc["source"] == "profile: my box" and doc["ram_total"] == 4 * 1024**3


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"ram": {"total_gb": 8}}, "missing field 'cpu'"),
        ({"cpu": {"physical_cores": "four"}, "ram": {"total_gb": 8}}, "field 'cpu.physical_cores' must be an integer, got 'four'"),
        ({"cpu": {"physical_cores": 4.0}, "ram": {"total_gb": 8}}, "field 'cpu.physical_cores' must be an integer, got 4.0"),
        ({"cpu": {"physical_cores": 4, "features": ["avx", 2]}, "ram": {"total_gb": 8}}, "field 'cpu.features[1]' must be a string, got 2"),
        ({"cpu": 4, "ram": {"total_gb": 8}}, "field 'cpu' must be an object, got 4"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": "8"}}, "field 'ram.total_gb' must be a number, got '8'"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": -1}}, "'ram.total_gb' must be positive"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8, "available_gb": 9}}, "'ram.available_gb' is larger"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "backend": "tpu"}, "'backend' must be one of"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "backend": "cuda"}, "needs at least one entry in 'gpus'"),
        (
            {"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "backend": "cuda", "gpus": [{"name": "x"}]},
            "missing field 'gpus[0].memory_total_gib' (or 'gpus[0].memory_total_gb')",
        ),
        (
            {"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "gpus": [{"name": "x", "memory_total_gb": True}]},
            "field 'gpus[0].memory_total_gb' must be a number, got True",
        ),
        (
            {"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "gpus": [{"name": "x", "memory_total_gb": 8, "memory_free_gb": 9}]},
            "field 'gpus[0].memory_free_gb' is larger than 'gpus[0].memory_total_gb'",
        ),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "gpus": ["x"]}, "field 'gpus[0]' must be an object, got 'x'"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "gpus": [{"memory_total_gb": 8}]}, "missing field 'gpus[0].name'"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gb": 8}, "disk_free_gb": 0}, "field 'disk_free_gb' must be positive, got 0"),
        ({"cpu": {"physical_cores": 4}, "ram": {}}, "missing field 'ram.total_gib' (or 'ram.total_gb')"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gib": 8, "total_gb": 8}}, "fields 'ram.total_gib' and 'ram.total_gb' are both given: use one"),
        ({"cpu": {"physical_cores": 4}, "ram": {"total_gib": 8, "available_gb": 9}}, "field 'ram.available_gb' is larger than 'ram.total_gib'"),
        (
            {"cpu": {"physical_cores": 4}, "ram": {"total_gib": 8}, "gpus": [{"name": "x", "memory_total_gib": 8, "memory_free_gib": 8, "memory_free_gb": 8}]},
            "fields 'gpus[0].memory_free_gib' and 'gpus[0].memory_free_gb' are both given",
        ),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_malformed_profiles_name_the_bad_field(cli, tmp_path: Path, profile, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(profile))
    r = cli("hwinfo", "--hw-profile", path)
    assert r.exit_code == EXIT_USAGE
    assert f"error: hardware profile {path}: " in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_profile_reads_as_before(tmp_path: Path) -> None:
    """Defaults and conversions of a described machine (GiB to bytes, shares of RAM, the vendor from the backend);
    fields the schema does not know are ignored, and null counts as not given."""
    path = tmp_path / "mac.json"
    path.write_text(json.dumps({
        "backend": "metal", "comment": "ignored", "os": None,
        "cpu": {"physical_cores": 8, "features": ["NEON"], "bandwidth_gbs": 100},
        "ram": {"total_gib": 16},
        "gpus": [{"name": "M2", "memory_free_gib": 10}],
    }))  # fmt: skip
    hw = hardware.load_profile(path)
    gib = 1024**3
    assert hw.source == "profile: mac" and hw.os == "described" and hw.build.backend == "metal" and hw.build.gpu_offload
    assert (hw.cpu.physical_cores, hw.cpu.logical_cores, hw.cpu.features, hw.cpu.arch) == (8, 8, ["neon"], "x86_64")
    assert hw.ram_total == 16 * gib and hw.ram_available == int(16 * gib * 0.85)
    (gpu,) = hw.gpus
    assert gpu.vendor == "apple" and gpu.unified and gpu.memory_total == int(16 * gib * 0.75)
    assert gpu.memory_free == 10 * gib and gpu.memory_used == gpu.memory_total - gpu.memory_free
    assert hw.usable_gpus == [gpu] and hw.disk_free is None


def test_profile_sizes_are_read_in_the_unit_their_field_names(tmp_path: Path) -> None:
    """``_gb`` is 10^9 bytes, ``_gib`` 2^30: 0.8 GB is 800,000,000 bytes, not 0.8 GiB. Fields may mix units."""
    path = tmp_path / "box.json"
    path.write_text(json.dumps({
        "backend": "cuda", "cpu": {"physical_cores": 4},
        "ram": {"total_gib": 16, "available_gb": 17},  # 17 GB is 15.8 GiB: within 16 GiB
        "gpus": [{"name": "g", "memory_total_gb": 8, "memory_free_gb": 0.8}, {"name": "h", "memory_total_gib": 8}],
        "disk_free_gb": 500,
    }))  # fmt: skip
    hw = hardware.load_profile(path)
    assert hw.ram_total == 16 * 1024**3 and hw.ram_available == 17 * 10**9
    assert (hw.gpus[0].memory_total, hw.gpus[0].memory_free) == (8 * 10**9, 800_000_000)
    assert hw.gpus[1].memory_total == hw.gpus[1].memory_free == 8 * 1024**3
    assert hw.disk_free == 500 * 10**9


def test_shipped_profiles_describe_the_machines_they_name() -> None:
    """In GiB, as RAM and GPU makers count: an 8 GB RTX 4060 has 8 GiB."""
    gib = 1024**3
    rtx4060 = hardware.load_profile("rtx4060-16gb")
    assert rtx4060.ram_total == 16 * gib and rtx4060.gpus[0].memory_total == 8 * gib
    assert int(rtx4060.gpus[0].memory_free) == int(7.6 * gib)
    assert hardware.load_profile("laptop-8gb").ram_total == 8 * gib
    for name in PROFILES:
        text = (hardware.shipped_profiles_dir() / f"{name}.json").read_text()
        assert '_gb"' not in text, name  # every size in GiB


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_profile_number_must_be_finite(tmp_path: Path, value: float) -> None:
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"cpu": {"physical_cores": 4}, "ram": {"total_gb": value}}))
    with pytest.raises(hardware.ProfileError, match=r"field 'ram.total_gb' must be a finite number, got (nan|inf)$"):
        hardware.load_profile(path)


def test_profile_not_json_or_missing(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    r = cli("hwinfo", "--hw-profile", path)
    assert r.exit_code == EXIT_USAGE and "not valid JSON" in r.stderr
    r = cli("hwinfo", "--hw-profile", "no-such-profile")
    assert r.exit_code == 3 and "shipped profiles: " in r.stderr


def test_gpu_without_gpu_build_prints_reinstall_command(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.commands import hwinfo as hwinfo_cmd

    hw = hardware.load_profile("rtx4090-32gb")
    hw.build = hardware.BuildInfo(installed=True, version="0.3.36", gpu_offload=False, backend="cpu")
    monkeypatch.setattr(hwinfo_cmd, "get_hardware", lambda *a, **k: hw)
    r = cli("hwinfo")
    assert r.exit_code == 0
    assert "cannot use it" in r.stderr
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89"' in r.stderr
    assert "llama-cpp-python==0.3.36" in r.stderr
    hw.gpus[0].vendor = "apple"
    assert "-DGGML_METAL=on" in hardware.reinstall_hint(hw)


def test_amx_build_in_a_virtual_machine_is_warned_about(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.commands import hwinfo as hwinfo_cmd

    hw = hardware.load_profile("laptop-8gb")
    hw.build = hardware.BuildInfo(installed=True, version="0.3.36", gpu_offload=False, backend="cpu",
                                  system_info="CPU : AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |")  # fmt: skip
    monkeypatch.setattr(hwinfo_cmd, "get_hardware", lambda *a, **k: hw)
    monkeypatch.setattr(hardware, "_in_virtual_machine", lambda: True)
    assert cli("hwinfo", "--json").stdout.count('"warnings": []') == 1  # a described machine: not this build
    hw.source = "live"
    r = cli("hwinfo")
    assert r.exit_code == 0 and "AMX kernels" in r.stderr and "docs/gpu.md" in r.stderr
    (warning,) = json.loads(cli("hwinfo", "--json").stdout)["warnings"]
    assert "Illegal instruction" in warning
    monkeypatch.setattr(hardware, "_in_virtual_machine", lambda: False)  # bare metal: AMX is fine
    assert json.loads(cli("hwinfo", "--json").stdout)["warnings"] == []
    hw.build.system_info = "CPU : AVX512 = 1 | REPACK = 1 |"  # a build without AMX, as make setup makes
    monkeypatch.setattr(hardware, "_in_virtual_machine", lambda: True)
    assert json.loads(cli("hwinfo", "--json").stdout)["warnings"] == []


def test_in_virtual_machine_reads_the_hypervisor_flag(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu vme avx2 hypervisor amx_tile\n\nprocessor\t: 1\n")
    assert hardware._in_virtual_machine(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu vme avx2 amx_tile\nbugs\t\t: hypervisor_like\n")
    assert not hardware._in_virtual_machine(str(info))
    assert not hardware._in_virtual_machine(str(tmp_path / "missing"))  # macOS, Windows


def test_fit_command_on_the_demo_model(cli, demo_model: Path) -> None:
    r = cli("fit", demo_model, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    chosen = doc["chosen"]
    assert chosen["fit"] == "CPU only" and chosen["n_gpu_layers"] == 0
    assert chosen["n_ctx"] == 8192
    assert chosen["expected_tokens_per_second"] > 0  # bandwidth measured and cached
    r = cli("fit", demo_model, "--hw-profile", "rtx4060-16gb", "--ctx", "4096")
    assert r.exit_code == 0
    assert "full GPU offload" in r.stdout and "GPU 0: NVIDIA GeForce RTX 4060" in r.stdout
    r = cli("fit", demo_model, "--cache-type-k", "q9_9")
    assert r.exit_code == EXIT_USAGE and "not a KV cache type" in r.stderr
