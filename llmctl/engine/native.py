"""llama.cpp's own tools: ``llama-server``, ``ggml-rpc-server``, ``llama-bench``, ``llama-fit-params``.

llmctl builds them from the very llama.cpp that the installed llama-cpp-python
vendors (its source distribution's ``vendor/llama.cpp``), with the same
``CMAKE_ARGS`` as the wheel (so CUDA or Metal builds match), the RPC backend
on, and, on x86-64, without the AMX kernels (they raise SIGILL on AMX Xeons
under some hypervisors; see tools/llama_wheel.py). A build is cached per
machine key (the version, the CMake arguments, the CPU's features and the
compilers), like the wheel, under ``LLMCTL_ENGINE_DIR`` (default: llmctl's
cache folder). ``LLMCTL_LLAMA_BIN`` names a folder with one's own build instead,
used after a version check.

Nothing here prints: ``install`` reports its steps through a callback.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llmctl.errors import LlmctlError
from llmctl.fileio import atomic_write_text, exclusive_lock, now_iso

if TYPE_CHECKING:
    from llmctl.plan.hardware import HardwareInfo

TOOLS = ("llama-server", "ggml-rpc-server", "llama-bench", "llama-fit-params")
ENV_DIR = "LLMCTL_ENGINE_DIR"
ENV_BIN = "LLMCTL_LLAMA_BIN"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# llama.cpp's release line vendored by the pinned llama-cpp-python (0.3.36: llama.cpp 0.5.x):
# the server flags and routes llmctl drives are those of this line.
SUPPORTED_LLAMA_CPP = (0, 5)
MANIFEST = "manifest.json"
GPU_BACKENDS = {"CUDA": "cuda", "Metal": "metal", "Vulkan": "vulkan", "ROCm": "rocm", "SYCL": "sycl"}  # as _backends names them
_VERSION_LINE = re.compile(r"version: (\d+)\.(\d+)\.(\d+)\S* \(build (\d+), commit ([^)]*)\)")


class NativeEngineError(LlmctlError):
    """llama.cpp's tools are missing, unusable, or could not be built."""


@dataclass
class NativeTools:
    """An installed set of llama.cpp's tools."""

    bin_dir: Path
    llama_cpp_version: str  # as the tools print it, e.g. 0.5.0
    source: str  # "llmctl" (built here) or ENV_BIN (one's own build)
    llama_cpp_python: str | None = None  # the llama-cpp-python whose vendored llama.cpp was built
    cmake_args: str = ""
    backends: list[str] = field(default_factory=list)
    built: str | None = None

    def path(self, tool: str) -> Path:
        return self.bin_dir / _exe(tool)

    def missing(self) -> list[str]:
        return [tool for tool in TOOLS if not os.access(self.path(tool), os.X_OK)]

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["bin_dir"] = str(self.bin_dir)
        data["tools"] = {tool: str(self.path(tool)) for tool in TOOLS if tool not in self.missing()}
        return data


def _exe(tool: str) -> str:
    return tool + (".exe" if sys.platform == "win32" else "")


# --- where builds live, and their key -----------------------------------------------------------


def engine_dir() -> Path:
    configured = os.environ.get(ENV_DIR)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("llmctl")) / "engine"


def llama_cpp_python_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError as exc:
        raise NativeEngineError("llama-cpp-python is not installed", hint="reinstall llmctl") from exc


def cmake_args(user: str | None = None, *, rpc: bool = True) -> str:
    """``CMAKE_ARGS`` (the wheel's), plus the RPC backend (unless ``rpc`` is False: the wheel, whose
    bindings cannot use it) and, on x86-64, the no-AMX flags for each language whose flags the user
    leaves alone. tools/llama_wheel.py builds the wheel with the same function."""
    user = (os.environ.get("CMAKE_ARGS", "") if user is None else user).strip()
    args = user
    if platform.machine().lower() in ("x86_64", "amd64"):
        for lang in ("C", "CXX"):
            if not re.search(rf"-DCMAKE_{lang}_FLAGS(:[A-Z]+)?=", user):
                args = f'{args} "-DCMAKE_{lang}_FLAGS={NO_AMX}"'
    if rpc and "-DGGML_RPC=" not in user:
        args = f"{args} -DGGML_RPC=ON"
    return args.strip()


def _cpu_identity() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(version: str, args: str) -> str:
    compilers = [f"{name}={os.environ.get(name, '')}" for name in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CUDACXX")]
    parts = [version, args, platform.machine(), platform.system(), _cpu_identity(), *compilers]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_folder(version: str, args: str) -> Path:
    return engine_dir() / f"llama.cpp-{version}-{build_key(version, args)}"


# --- finding the tools ------------------------------------------------------------------------


def tool_version(binary: Path) -> tuple[str, tuple[int, int]]:
    """``X.Y.Z`` and (major, minor) as ``binary --version`` prints them."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeEngineError(f"{binary} does not run: {exc}", hint=f"check the build in {binary.parent}") from exc
    match = _VERSION_LINE.search(done.stdout + done.stderr)
    if match is None:
        raise NativeEngineError(f"{binary} --version said nothing llmctl recognises", hint="use a build of llama.cpp's own tools")
    major, minor, patch = (int(match.group(i)) for i in (1, 2, 3))
    return f"{major}.{minor}.{patch}", (major, minor)


def locate() -> NativeTools | None:
    """The tools to use: one's own build when ``LLMCTL_LLAMA_BIN`` is set, else llmctl's build for the
    installed llama-cpp-python and ``CMAKE_ARGS``; None when neither is there."""
    own = os.environ.get(ENV_BIN)
    if own:
        return _own_build(Path(own).expanduser())
    folder = build_folder(llama_cpp_python_version(), cmake_args())
    return read_manifest(folder)


def read_manifest(folder: Path) -> NativeTools | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        tools = NativeTools(
            bin_dir=folder / "bin",
            llama_cpp_version=str(data["llama_cpp_version"]),
            source="llmctl",
            llama_cpp_python=data.get("llama_cpp_python"),
            cmake_args=str(data.get("cmake_args", "")),
            backends=[str(b) for b in data.get("backends", [])],
            built=data.get("built"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if tools.missing() else tools


def _own_build(bin_dir: Path) -> NativeTools:
    server = bin_dir / _exe("llama-server")
    if not os.access(server, os.X_OK):
        raise NativeEngineError(f"{ENV_BIN}={bin_dir} has no llama-server", hint=f"point {ENV_BIN} at the bin/ folder of a llama.cpp build")
    text, line = tool_version(server)
    if line != SUPPORTED_LLAMA_CPP:
        wanted = ".".join(map(str, SUPPORTED_LLAMA_CPP))
        raise NativeEngineError(
            f"the llama.cpp in {bin_dir} is version {text}; llmctl drives llama.cpp {wanted}.x",
            hint=f"unset {ENV_BIN} to use llmctl's own build (`llmctl engine install`)",
        )
    return NativeTools(bin_dir=bin_dir, llama_cpp_version=text, source=ENV_BIN, backends=_backends(server))


def require(tool: str) -> Path:
    """The path of ``tool``, or an error saying how to get it."""
    tools = locate()
    if tools is None:
        raise NativeEngineError(f"llama.cpp's {tool} is not installed", hint="run `llmctl engine install` (builds it once, ~10-20 min on 2 cores)")
    if tool in tools.missing():
        raise NativeEngineError(f"{tools.bin_dir} has no {tool}", hint="run `llmctl engine install` again, or point LLMCTL_LLAMA_BIN at a full build")
    return tools.path(tool)


def _backends(server: Path) -> list[str]:
    """The backends a build has: CPU always; GPUs as ``--list-devices`` names them (CUDA0, Metal…);
    RPC when the server takes ``--rpc``."""
    found = ["CPU"]
    for args in (["--list-devices"], ["--help"]):
        try:
            done = subprocess.run([str(server), *args], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = done.stdout + done.stderr
        names = ("CUDA", "Metal", "Vulkan", "ROCm", "SYCL") if args == ["--list-devices"] else ()
        found += [name for name in names if re.search(rf"\b{name}\d*\b", text) and name not in found]
        if args == ["--help"] and "--rpc" in text:
            found.append("RPC")
    return found


def serving_hardware(hw: HardwareInfo) -> HardwareInfo:
    """``hw`` as llama-server sees it: the GPU backends of the native tools, not of the in-process
    llama-cpp-python (the two are built apart and may differ: a CPU wheel beside a CUDA server, or
    no wheel at all). A hardware profile describes its own build and is returned as it is, and so is
    ``hw`` when the tools are not installed (the serve that follows says so)."""
    from dataclasses import replace

    from llmctl.plan.hardware import BuildInfo

    if hw.source != "live":
        return hw
    try:
        tools = locate()
    except NativeEngineError:
        tools = None
    if tools is None:
        return hw
    gpu = next((b for b in tools.backends if b in GPU_BACKENDS), None)
    build = BuildInfo(
        installed=True,
        version=f"llama.cpp {tools.llama_cpp_version}",
        system_info=f"llama-server backends: {', '.join(tools.backends)}",
        gpu_offload=gpu is not None,
        backend=GPU_BACKENDS[gpu] if gpu else "cpu",
    )
    return replace(hw, build=build)


# --- building -----------------------------------------------------------------------------------


def missing_build_tools() -> list[str]:
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    compiler = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        missing.append("a C++ compiler")
    return missing


def install(*, on_step: Callable[[str], None] = lambda _s: None, jobs: int | None = None, sdist: Path | None = None) -> NativeTools:
    """Build the tools for this machine (once: a finished build is reused) and return them."""
    version = llama_cpp_python_version()
    args = cmake_args()
    folder = build_folder(version, args)
    done = read_manifest(folder)
    if done is not None:
        return done
    missing = missing_build_tools()
    if missing:
        raise NativeEngineError(
            f"building llama.cpp's tools needs {' and '.join(missing)}",
            hint="install them (Debian/Ubuntu: apt install cmake build-essential), or set LLMCTL_LLAMA_BIN to your own build",
        )
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.with_name(folder.name + ".lock"), on_wait=lambda: on_step("another llmctl is building the same tools; waiting")):
        done = read_manifest(folder)  # built by the one we waited for
        if done is not None:
            return done
        source = _vendored_source(folder, version, sdist, on_step)
        build = folder / "build"
        on_step(f"configuring llama.cpp (CMAKE_ARGS: {args})")
        _run(["cmake", "-S", str(source), "-B", str(build), *_configure_flags(args)], folder / "configure.log")
        on_step(f"compiling {', '.join(TOOLS)} (about 10-20 minutes on 2 cores; log: {folder / 'build.log'})")
        jobs = jobs or os.cpu_count() or 2
        _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS], folder / "build.log")
        bin_dir = folder / "bin"
        bin_dir.mkdir(exist_ok=True)
        for tool in TOOLS:
            built = next((p for p in (build / "bin" / _exe(tool), build / "bin" / "Release" / _exe(tool)) if p.exists()), None)
            if built is None:
                raise NativeEngineError(f"the build made no {tool}", hint=f"see {folder / 'build.log'}")
            shutil.copy2(built, bin_dir / _exe(tool))
        server = bin_dir / _exe("llama-server")
        text, _line = tool_version(server)
        manifest = {
            "llama_cpp_version": text,
            "llama_cpp_python": version,
            "cmake_args": args,
            "backends": _backends(server),
            "built": now_iso(),
        }
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: a manifest means a whole build
        shutil.rmtree(source.parent, ignore_errors=True)
    tools = read_manifest(folder)
    if tools is None:  # pragma: no cover - the manifest was just written
        raise NativeEngineError(f"the build in {folder} is incomplete", hint="run `llmctl engine install` again")
    return tools


def _configure_flags(args: str) -> list[str]:
    import shlex

    fixed = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",  # the tools stand alone: no libllama.so to find at run time
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download during the build; the server's web page is not llmctl's
        "-DLLAMA_OPENSSL=OFF",  # the server listens on loopback behind llmctl; no HTTPS client needed
    ]
    return fixed + shlex.split(args)


def _vendored_source(folder: Path, version: str, sdist: Path | None, on_step: Callable[[str], None]) -> Path:
    """llama.cpp's tree from llama-cpp-python's source distribution (downloaded once from PyPI)."""
    archive = sdist or engine_dir() / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        on_step(f"downloading the llama-cpp-python {version} source distribution")
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=archive.parent) as tmp:
            _run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                 "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp],
                folder / "download.log",
            )  # fmt: skip
            got = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"), None)
            if got is None:
                raise NativeEngineError("pip downloaded no llama-cpp-python source distribution", hint=f"see {folder / 'download.log'}")
            os.replace(got, archive)
    target = folder / "src" / "llama.cpp"
    if (target / "CMakeLists.txt").exists():
        return target
    on_step("unpacking llama.cpp from it")
    staging = folder / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _unpack_vendored(archive, staging)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise NativeEngineError(f"{archive} cannot be unpacked safely: {exc}", hint="delete it and run `llmctl engine install` again") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _unpack_vendored(archive: Path, staging: Path) -> None:
    """Only the members under ``*/vendor/llama.cpp/``, each checked by tarfile's data filter."""
    prefix = None
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) > 3 and parts[1:3] == ["vendor", "llama.cpp"]:
                prefix = parts[0] + "/vendor/llama.cpp/"
                break
        if prefix is None:
            raise tarfile.TarError("it holds no vendor/llama.cpp")
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for member in members:
            member.name = member.name[len(prefix) :]
            if member.name.startswith("/") or ".." in member.name.split("/"):
                raise tarfile.TarError(f"{member.name!r} points out of the folder")
        if hasattr(tarfile, "data_filter"):  # also refuses links out of the folder and special files
            tar.extractall(staging, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters: plain files and folders only
            tar.extractall(staging, members=[m for m in members if m.isfile() or m.isdir()])


def _run(command: list[str], log: Path) -> None:
    with open(log, "w", encoding="utf-8") as out:
        try:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        except OSError as exc:
            raise NativeEngineError(f"{command[0]} did not start: {exc}", hint="check that it is installed") from exc
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise NativeEngineError(f"{Path(command[0]).name} failed (exit {done.returncode}): {tail[0][:300]}", hint=f"the whole log is {log}")
