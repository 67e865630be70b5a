"""What this machine can hold and run: the live probe, and hardware profiles.

The live probe uses psutil (memory, cores), /proc/cpuinfo or sysctl (CPU brand
and ISA flags; py-cpuinfo only as a fallback, since it takes ~1.4 s), pynvml
(NVIDIA GPUs) and llama-cpp-python (what the installed llama.cpp can do). The
parts that do not change between runs (CPU, llama.cpp build, measured memory
bandwidth) are cached in ``$LLMCTL_HOME/cache/hardware.json`` keyed to the
machine and the installed build.

A hardware profile (``--hw-profile FILE`` or ``LLMCTL_HW_PROFILE``) replaces the
probe with a described machine, so users can ask what would fit elsewhere and
tests can cover every GPU decision without a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmctl.config import Settings
from llmctl.errors import UsageError

ENV_PROFILE = "LLMCTL_HW_PROFILE"
GIB = 1024**3

# ISA features llama.cpp's CPU backend uses, as /proc/cpuinfo and py-cpuinfo name them.
CPU_FEATURES = (
    "sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw",
    "avx512vl", "avx512dq", "avx512cd", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "amx_tile",
    "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "sve", "sve2", "i8mm", "dotprod", "fp16",
)  # fmt: skip
_FLAG_ALIASES = {"pni": "sse3", "avx512vbmi": "avx512_vbmi", "avx512_vbmi1": "avx512_vbmi"}


@dataclass
class CPUInfo:
    brand: str
    arch: str
    physical_cores: int
    logical_cores: int
    features: list[str]
    bandwidth_gbs: float | None = None  # measured (or described) memory read bandwidth


@dataclass
class GPUInfo:
    index: int
    name: str
    vendor: str  # nvidia | apple
    memory_total: int
    memory_free: int
    memory_used: int = 0
    bandwidth_gbs: float | None = None
    driver: str | None = None
    cuda_version: str | None = None
    compute_capability: str | None = None
    unified: bool = False  # Apple Silicon: GPU memory is system RAM


@dataclass
class BuildInfo:
    """The installed llama.cpp, as llama-cpp-python reports it."""

    installed: bool
    version: str | None = None
    system_info: str | None = None
    gpu_offload: bool = False
    backend: str = "cpu"  # cpu | cuda | metal | vulkan | rocm | sycl
    error: str | None = None


@dataclass
class HardwareInfo:
    source: str  # "live" or "profile: NAME"
    os: str
    cpu: CPUInfo
    ram_total: int
    ram_available: int
    swap_total: int
    swap_free: int
    disk_free: int | None
    disk_path: str | None
    gpus: list[GPUInfo]
    gpu_note: str | None  # why there is no GPU, or what is wrong with it
    build: BuildInfo

    @property
    def usable_gpus(self) -> list[GPUInfo]:
        """GPUs the installed llama.cpp can offload to."""
        if not self.build.gpu_offload:
            return []
        wanted = "apple" if self.build.backend == "metal" else "nvidia"
        return [g for g in self.gpus if g.vendor == wanted or self.build.backend in ("vulkan",)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- live probe -----------------------------------------------------------------


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set[str]] | None:
    """The first CPU's brand and raw flags from a cpuinfo file (Linux); None without one."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    brand, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not brand:
            brand = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return brand, flags


def _proc_cpuinfo() -> tuple[str, list[str]] | None:
    info = _read_cpuinfo()
    if info is None or not info[1]:
        return None
    brand, raw = info
    flags = {_FLAG_ALIASES.get(f, f) for f in raw}
    return brand or platform.processor() or "unknown", sorted(f for f in CPU_FEATURES if f in flags)


def _sysctl(name: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_brand_and_features() -> tuple[str, list[str]]:
    found = _proc_cpuinfo()
    if found:
        return found
    if sys.platform == "darwin":
        brand = _sysctl("machdep.cpu.brand_string") or "Apple"
        if platform.machine() == "arm64":
            features = ["neon", "fp16", "dotprod"] + (["i8mm"] if _sysctl("hw.optional.arm.FEAT_I8MM") == "1" else [])
            return brand, features
        raw = (_sysctl("machdep.cpu.features") or "") + " " + (_sysctl("machdep.cpu.leaf7_features") or "")
        flags = {_FLAG_ALIASES.get(f.lower().replace(".", "_"), f.lower().replace(".", "_")) for f in raw.split()}
        return brand, sorted(f for f in CPU_FEATURES if f in flags)
    import cpuinfo  # slow (~1.4 s): only where nothing faster exists, and the result is cached

    data = cpuinfo.get_cpu_info()
    flags = {_FLAG_ALIASES.get(f, f) for f in data.get("flags", [])}
    return data.get("brand_raw") or "unknown", sorted(f for f in CPU_FEATURES if f in flags)


def _machine_key() -> str:
    machine_id = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            machine_id = Path(path).read_text().strip()
            break
        except OSError:
            continue
    return f"{platform.node()}|{platform.machine()}|{machine_id}|{os.cpu_count()}"


def _build_key() -> str:
    """Identifies the installed llama-cpp-python without importing it."""
    from importlib.util import find_spec

    try:
        spec = find_spec("llama_cpp")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return "none"
    folder = Path(spec.origin).parent
    stamps = [str(p.stat().st_mtime_ns) for p in sorted(folder.glob("lib/*")) if p.is_file()]
    return f"{spec.origin}|{Path(spec.origin).stat().st_mtime_ns}|{'|'.join(stamps)}"


def probe_build() -> BuildInfo:
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        return BuildInfo(installed=False, error=f"{type(exc).__name__}: {exc}")
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    backend = "cpu"
    upper = system_info.upper()
    for name, marker in (("cuda", "CUDA"), ("metal", "METAL"), ("rocm", "HIP"), ("vulkan", "VULKAN"), ("sycl", "SYCL")):
        if marker in upper:
            backend = name
            break
    return BuildInfo(
        installed=True,
        version=getattr(llama_cpp, "__version__", None),
        system_info=system_info,
        gpu_offload=offload,
        backend=backend if offload else "cpu",
    )


def _nvml_gpus() -> tuple[list[GPUInfo], str | None]:
    try:
        import pynvml
    except ImportError:
        return [], "no NVIDIA GPU detected: the nvidia-ml-py package is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, …
        return [], f"no NVIDIA GPU detected: {_nvml_reason(exc)}"
    gpus: list[GPUInfo] = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = None
        try:
            raw = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda = f"{raw // 1000}.{(raw % 1000) // 10}"
        except Exception:  # noqa: BLE001
            pass
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            capability = None
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability = f"{major}.{minor}"
            except Exception:  # noqa: BLE001
                pass
            bandwidth = None
            try:
                clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
                bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
                bandwidth = clock_mhz * 1e6 * 2 * bus_bits / 8 / 1e9
            except Exception:  # noqa: BLE001
                pass
            gpus.append(
                GPUInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    vendor="nvidia",
                    memory_total=int(memory.total),
                    memory_free=int(memory.free),
                    memory_used=int(memory.used),
                    bandwidth_gbs=bandwidth,
                    driver=driver,
                    cuda_version=cuda,
                    compute_capability=capability,
                )
            )
    except Exception as exc:  # noqa: BLE001
        return gpus, f"NVML error: {_nvml_reason(exc)}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    if not gpus:
        return [], "no NVIDIA GPU detected: NVML reports no devices"
    return gpus, None


def _nvml_reason(exc: Exception) -> str:
    name = type(exc).__name__.replace("NVMLError_", "")
    text = str(exc)
    if "LibraryNotFound" in name or "NVML Shared Library Not Found" in text:
        return "the NVIDIA driver library (libnvidia-ml) is not installed"
    if "DriverNotLoaded" in name:
        return "the NVIDIA driver is not loaded"
    return text or name


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _apple_gpu(ram_total: int, brand: str) -> list[GPUInfo]:
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return []
    # Metal lets a process keep about three quarters of unified memory resident on the GPU.
    budget = int(ram_total * 0.75)
    return [GPUInfo(0, f"{brand} GPU", "apple", memory_total=budget, memory_free=budget, unified=True)]


def measure_bandwidth_gbs(size_mib: int = 512, repeats: int = 5) -> float | None:
    """Memory read bandwidth of one core: the best of a few passes over an array larger than any cache.

    Generation reads every weight once per token, so read bandwidth is what
    bounds it. A max-reduction is read-only and vectorised, so memory, not
    arithmetic, limits it.
    """
    try:
        import time

        import numpy as np
    except ImportError:
        return None
    data = np.ones(size_mib * 1024 * 1024 // 8, dtype=np.uint64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.max()
        best = min(best, time.perf_counter() - start)
    return round(data.nbytes / best / 1e9, 1)


class HardwareCache:
    """The slow, stable parts of the probe, on disk."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.home / "cache" / "hardware.json"

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save(self, data: dict[str, Any]) -> None:
        from llmctl.fileio import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps(data, indent=1))
        except OSError:
            pass  # a read-only home only makes the next probe slower


def probe(settings: Settings, *, with_bandwidth: bool = False, refresh: bool = False) -> HardwareInfo:
    """The live machine. Cheap when warm: CPU, build and bandwidth come from the cache."""
    import psutil

    cache = HardwareCache(settings)
    data = {} if refresh else cache.load()
    changed = False
    machine = _machine_key()
    if data.get("machine") != machine:
        data = {"machine": machine}
    if "cpu" not in data:
        brand, features = _cpu_brand_and_features()
        data["cpu"] = {"brand": brand, "features": features}
        changed = True
    build_key = _build_key()
    if data.get("build_key") != build_key or "build" not in data:
        data["build"] = asdict(probe_build())
        data["build_key"] = build_key
        changed = True
    if with_bandwidth and not data.get("bandwidth_gbs"):
        data["bandwidth_gbs"] = measure_bandwidth_gbs()
        changed = True
    if changed:
        cache.save(data)

    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    cpu = CPUInfo(
        brand=data["cpu"]["brand"],
        arch=platform.machine(),
        physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        features=data["cpu"]["features"],
        bandwidth_gbs=data.get("bandwidth_gbs"),
    )
    gpus, note = _nvml_gpus()
    if not gpus:
        apple = _apple_gpu(memory.total, cpu.brand)
        if apple:
            gpus, note = apple, None
    disk_path = _existing_parent(settings.hf_hub_cache)
    disk_free = shutil.disk_usage(disk_path).free if disk_path else None
    build = BuildInfo(**data["build"])
    return HardwareInfo(
        source="live",
        os=f"{platform.system()} {platform.release()} ({platform.machine()})",
        cpu=cpu,
        ram_total=memory.total,
        ram_available=memory.available,
        swap_total=swap.total,
        swap_free=swap.free,
        disk_free=disk_free,
        disk_path=str(disk_path) if disk_path else None,
        gpus=gpus,
        gpu_note=note,
        build=build,
    )


def _existing_parent(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def reinstall_hint(hw: HardwareInfo) -> str | None:
    """When a GPU is present but llama.cpp cannot use it: the command that fixes it."""
    if hw.build.gpu_offload or not hw.gpus:
        return None
    gpu = hw.gpus[0]
    if gpu.vendor == "apple":
        args = "-DGGML_METAL=on"
    else:
        arch = (gpu.compute_capability or "").replace(".", "")
        args = "-DGGML_CUDA=on" + (f" -DCMAKE_CUDA_ARCHITECTURES={arch}" if arch else "")
    return (
        f'CMAKE_ARGS="{args}" {Path(sys.executable).parent / "pip"} install --force-reinstall --no-cache-dir llama-cpp-python=={hw.build.version or "0.3.36"}'
    )


def build_warnings(hw: HardwareInfo) -> list[str]:
    """Known ways the installed llama.cpp build can fail on this machine."""
    warnings = []
    if hw.source == "live" and "AMX_INT8 = 1" in (hw.build.system_info or "") and _in_virtual_machine():
        warnings.append(
            "this llama.cpp build has AMX kernels and this is a virtual machine, where they can die with "
            "'Illegal instruction'; if generation crashes, rebuild llama-cpp-python without AMX (see docs/gpu.md)"
        )
    return warnings


def _in_virtual_machine(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """The CPU's 'hypervisor' flag (Linux); elsewhere we cannot tell cheaply, so no."""
    info = _read_cpuinfo(cpuinfo)
    return info is not None and "hypervisor" in info[1]


# --- profiles -------------------------------------------------------------------


class ProfileError(UsageError):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(
            f"hardware profile {path}: {problem}",
            hint="see docs/hardware-profiles.md for the format, or the examples in profiles/",
        )


def load_profile(path: str | os.PathLike[str]) -> HardwareInfo:
    """A described machine, checked whole by the profile schema (llmctl/plan/profile.py); errors name the bad field."""
    from llmctl.plan import profile as schema  # pydantic: only when a profile is used

    name = str(path)
    resolved = _resolve_profile_path(name)
    try:
        data = json.loads(resolved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        from llmctl.errors import NotFoundError

        shipped = ", ".join(sorted(p.stem for p in shipped_profiles_dir().glob("*.json")))
        raise NotFoundError(f"hardware profile {name} not found", hint=f"shipped profiles: {shipped}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(name, f"cannot be read: {exc}") from None
    except ValueError as exc:
        raise ProfileError(name, f"is not valid JSON: {exc}") from None
    try:
        described = schema.check(data)
    except ValueError as exc:
        raise ProfileError(name, str(exc)) from None
    cpu, ram = described.cpu, described.ram
    total = described.ram_total
    gpus = []
    for index, gpu in enumerate(described.gpus):
        memory_total = described.gpu_memory_total(gpu)
        memory_free = gpu.size_bytes("memory_free") or memory_total
        vendor = described.vendor(gpu)
        gpus.append(
            GPUInfo(
                index=index,
                name=gpu.name,
                vendor=vendor,
                memory_total=memory_total,
                memory_free=memory_free,
                memory_used=memory_total - memory_free,
                bandwidth_gbs=gpu.bandwidth_gbs,
                compute_capability=gpu.compute_capability,
                unified=vendor == "apple",
            )
        )
    return HardwareInfo(
        source=f"profile: {described.name or resolved.stem}",
        os=described.os or "described",
        cpu=CPUInfo(
            brand=cpu.brand or "described CPU",
            arch=cpu.arch or "x86_64",
            physical_cores=cpu.physical_cores,
            logical_cores=cpu.logical_cores or cpu.physical_cores,
            features=[f.lower() for f in cpu.features],
            bandwidth_gbs=cpu.bandwidth_gbs,
        ),
        ram_total=total,
        ram_available=ram.size_bytes("available") or int(total * schema.RAM_AVAILABLE_SHARE),
        swap_total=0,
        swap_free=0,
        disk_free=described.size_bytes("disk_free"),
        disk_path=None,
        gpus=gpus,
        gpu_note=None if gpus else "no GPU in this profile",
        build=BuildInfo(installed=True, version="profile", gpu_offload=described.backend != "cpu", backend=described.backend),
    )


def shipped_profiles_dir() -> Path:
    return Path(__file__).parent / "profiles"


def _resolve_profile_path(name: str) -> Path:
    """A path, or the name of a shipped profile (``rtx4090-32gb``)."""
    path = Path(name).expanduser()
    if path.exists() or os.sep in name or name.endswith(".json"):
        return path
    return shipped_profiles_dir() / f"{name}.json"


def get_hardware(settings: Settings, profile: str | None = None, *, with_bandwidth: bool = False) -> HardwareInfo:
    """The profile if one is given (flag, then LLMCTL_HW_PROFILE), else the live probe."""
    chosen = profile or os.environ.get(ENV_PROFILE)
    if chosen:
        return load_profile(chosen)
    return probe(settings, with_bandwidth=with_bandwidth)
