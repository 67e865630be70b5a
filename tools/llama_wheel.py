"""Build (once) and install the pinned llama-cpp-python for this machine.

pip's own wheel cache keys a source build by name and version only: a wheel
compiled with ``-march=native`` on one CPU, or with other ``CMAKE_ARGS``, is
reused as-is on the next machine that shares the cache. So the Makefile builds
the wheel itself, into ``$DEMO_DIR/wheels/<key>/``, where the key covers the
version, the CMake arguments, the Python and the CPU's feature flags.

x86-64 builds leave out llama.cpp's AMX kernels (``-mno-amx-*``): on Xeons
with AMX running under some hypervisors the AMX tile instructions raise
SIGILL in ``ggml_backend_amx_mul_mat`` although the CPU and the kernel report
AMX as usable, and Ollama leaves AMX out of its builds for speed reasons too.
Set ``CMAKE_ARGS`` (e.g. ``-DGGML_CUDA=on``) to add your own options; they
are remembered in the venv until ``CMAKE_ARGS`` is set again (``CMAKE_ARGS=``
for the plain CPU build). Where they set ``CMAKE_C_FLAGS`` or
``CMAKE_CXX_FLAGS`` themselves, the AMX flags are not added to that one.

Usage: python tools/llama_wheel.py --cache DIR --venv-python .venv/bin/python
Prints the installed wheel's path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _pinned_version() -> str:
    """The llama-cpp-python version pyproject.toml pins (one place to change it)."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    match = re.search(r"llama-cpp-python==([0-9][0-9A-Za-z.]*)", text)
    if match is None:
        raise SystemExit("pyproject.toml does not pin llama-cpp-python==X.Y.Z")
    return match.group(1)


VERSION = _pinned_version()
REMEMBERED = ".llama-cmake-args"  # in the venv: the CMAKE_ARGS of its last build


def user_cmake_args(venv: Path) -> str:
    """CMAKE_ARGS from the environment when set (even empty), else the venv's last ones.

    So `CMAKE_ARGS=-DGGML_CUDA=on make setup` sticks: a later plain `make test`
    or `make bench` keeps the CUDA build, and `CMAKE_ARGS= make setup` goes
    back to the CPU build.
    """
    if "CMAKE_ARGS" in os.environ:
        return os.environ["CMAKE_ARGS"].strip()
    remembered = venv / REMEMBERED
    return remembered.read_text().strip() if remembered.exists() else ""


def cmake_args(user: str) -> str:
    """The user's arguments, plus the no-AMX flags for each language they leave alone: the rule
    llmctl's own build of llama.cpp's tools follows (llmctl/engine/native.py), without RPC."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # llmctl is installed after the wheel
    from llmctl.engine.native import cmake_args as native_cmake_args

    return native_cmake_args(user, rpc=False)


def cpu_identity() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    try:
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        brand = ""
    return brand or platform.processor() or platform.machine()


def key(args: str) -> str:
    env = [f"{name}={os.environ.get(name, '')}" for name in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CUDACXX")]
    parts = [VERSION, args, platform.machine(), platform.system(), f"py{sys.version_info[:2]}", cpu_identity(), *env]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(folder: Path, args: str, python: str) -> Path:
    """The wheel in ``folder``, built first if needed; one build at a time per folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # a second clone sharing the cache waits, then reuses
        except ImportError:  # no fcntl (Windows): builds are not serialised
            pass
        wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
        if wheels:
            return wheels[-1]
        print(f"building llama-cpp-python {VERSION} (CMAKE_ARGS={args!r}); this takes a few minutes once", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            subprocess.run(
                [python, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                 "--no-cache-dir", "--no-binary", "llama-cpp-python", f"llama-cpp-python=={VERSION}", "-w", str(tmp)],
                check=True,
                env=dict(os.environ, CMAKE_ARGS=args),
            )  # fmt: skip
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)  # appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return sorted(folder.glob("llama_cpp_python-*.whl"))[-1]


def installed_from(python: str) -> str | None:
    """The file:// URL pip recorded for the installed llama-cpp-python, if any."""
    code = (
        "import importlib.metadata as m, json\n"
        "try:\n d = m.distribution('llama_cpp_python').read_text('direct_url.json')\n"
        " print(json.loads(d)['url'] if d else '')\n"
        "except Exception:\n print('')"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False).stdout.strip()
    return out or None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--venv-python", required=True, help="the venv's python, e.g. .venv/bin/python")
    opts = ap.parse_args()
    venv = Path(opts.venv_python).parent.parent  # .venv/bin/python -> .venv

    user = user_cmake_args(venv)
    args = cmake_args(user)
    wheel = build(opts.cache / "wheels" / f"llama_cpp_python-{VERSION}-{key(args)}", args, opts.venv_python)
    if installed_from(opts.venv_python) != wheel.resolve().as_uri():
        subprocess.run(
            [opts.venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--force-reinstall", str(wheel)],
            check=True,
        )  # fmt: skip
    (venv / REMEMBERED).write_text(user)
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
