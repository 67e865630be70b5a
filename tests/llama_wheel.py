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
Set ``CMAKE_ARGS`` (e.g. ``-DGGML_CUDA=on``) to add your own options; when
they set ``CMAKE_C_FLAGS`` themselves, the AMX flags are not added.

Usage: python tests/llama_wheel.py --cache DIR [--venv-python PY]
Prints the installed wheel's path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

def _pinned_version() -> str:
    """The llama-cpp-python version pyproject.toml pins (one place to change it)."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    match = re.search(r"llama-cpp-python==([0-9][0-9A-Za-z.]*)", text)
    if match is None:
        raise SystemExit("pyproject.toml does not pin llama-cpp-python==X.Y.Z")
    return match.group(1)


VERSION = _pinned_version()
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_args() -> str:
    args = os.environ.get("CMAKE_ARGS", "").strip()
    if platform.machine().lower() in ("x86_64", "amd64") and "CMAKE_C_FLAGS" not in args:
        args = f'{args} "-DCMAKE_C_FLAGS={NO_AMX}" "-DCMAKE_CXX_FLAGS={NO_AMX}"'.strip()
    return args


def cpu_identity() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    try:
        return subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return platform.processor()


def key(args: str) -> str:
    parts = [VERSION, args, platform.machine(), platform.system(), f"py{sys.version_info[:2]}", cpu_identity()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--venv-python", default=sys.executable)
    opts = ap.parse_args()

    args = cmake_args()
    k = key(args)
    folder = opts.cache / "wheels" / f"llama_cpp_python-{VERSION}-{k}"
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if not wheels:
        print(f"building llama-cpp-python {VERSION} (CMAKE_ARGS={args!r}); this takes a few minutes once", file=sys.stderr)
        tmp = folder.with_name(folder.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        env = dict(os.environ, CMAKE_ARGS=args)
        subprocess.run(
            [opts.venv_python, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-cache-dir", "--no-binary", "llama-cpp-python", f"llama-cpp-python=={VERSION}", "-w", str(tmp)],
            check=True,
            env=env,
        )
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        tmp.rename(folder)  # appears whole or not at all
        wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    wheel = wheels[-1]

    venv_marker = Path(opts.venv_python).parent.parent / ".llama-wheel"  # .venv/bin/python -> .venv
    if not (venv_marker.exists() and venv_marker.read_text() == str(wheel)):
        subprocess.run(
            [opts.venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--force-reinstall", str(wheel)],
            check=True,
        )
        venv_marker.write_text(str(wheel))
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
