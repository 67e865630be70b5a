"""llama.cpp's own tools: where llmctl builds them, how it keys a build, and one's own build checked."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from llmctl.engine import native


def _script(path: Path, text: str) -> Path:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_build_key_follows_cmake_args_and_the_rpc_backend_is_always_on(monkeypatch) -> None:
    monkeypatch.setenv("CMAKE_ARGS", "")
    cpu = native.cmake_args()
    assert "-DGGML_RPC=ON" in cpu
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_CUDA=on")
    cuda = native.cmake_args()
    assert "-DGGML_CUDA=on" in cuda and "-DGGML_RPC=ON" in cuda
    assert native.build_key("0.3.36", cpu) != native.build_key("0.3.36", cuda)
    assert native.build_key("0.3.36", cpu) != native.build_key("0.3.37", cpu)
    assert native.build_key("0.3.36", cpu) == native.build_key("0.3.36", cpu)


def test_no_amx_flags_on_x86_unless_the_user_sets_that_language(monkeypatch) -> None:
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    args = native.cmake_args("")
    assert args.count("-mno-amx-tile") == 2
    args = native.cmake_args("-DCMAKE_C_FLAGS=-O2")
    assert args.count("-mno-amx-tile") == 1 and "-DCMAKE_CXX_FLAGS=" in args
    monkeypatch.setattr(native.platform, "machine", lambda: "arm64")
    assert "amx" not in native.cmake_args("")


def test_nothing_installed_is_one_error_with_the_command_to_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(native.ENV_BIN, raising=False)
    assert native.locate() is None
    with pytest.raises(native.NativeEngineError) as info:
        native.require("llama-server")
    assert "llmctl engine install" in (info.value.hint or "")


def test_a_half_written_build_is_not_used(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(native.ENV_BIN, raising=False)
    folder = native.build_folder(native.llama_cpp_python_version(), native.cmake_args())
    (folder / "bin").mkdir(parents=True)
    for tool in native.TOOLS[:2]:  # the build stopped half-way: no manifest, two tools
        _script(folder / "bin" / tool, "exit 0\n")
    assert native.locate() is None
    (folder / native.MANIFEST).write_text(json.dumps({"llama_cpp_version": "0.5.0"}))
    assert native.locate() is None  # a manifest over missing tools is no build either
    for tool in native.TOOLS[2:]:
        _script(folder / "bin" / tool, "exit 0\n")
    found = native.locate()
    assert found is not None and found.source == "llmctl" and found.missing() == []


def test_ones_own_build_is_used_after_a_version_check(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(native.ENV_BIN, str(tmp_path))
    with pytest.raises(native.NativeEngineError, match="has no llama-server"):
        native.locate()
    _script(tmp_path / "llama-server", 'echo "version: 0.4.2 (build 1, commit abc)" >&2\n')
    with pytest.raises(native.NativeEngineError, match="version 0.4.2"):
        native.locate()
    _script(tmp_path / "llama-server", 'echo "version: 0.5.1-dev (build 0, commit unknown)" >&2\necho "Available devices:"\n')
    found = native.locate()
    assert found is not None and found.source == native.ENV_BIN and found.llama_cpp_version == "0.5.1"
    assert found.backends == ["CPU"]
    _script(tmp_path / "llama-server", "echo nonsense\n")
    with pytest.raises(native.NativeEngineError, match="recognises"):
        native.locate()


def test_missing_cmake_or_compiler_is_named_before_anything_is_downloaded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(native.NativeEngineError) as info:
        native.install()
    assert "cmake" in info.value.message and "C++ compiler" in info.value.message
    assert "apt install cmake build-essential" in (info.value.hint or "")
    assert not (tmp_path / "sdist").exists()


def test_the_source_archive_is_unpacked_inside_its_folder_only(tmp_path: Path, monkeypatch) -> None:
    """A hostile archive (a member escaping with ../, a link out) cannot write outside the build folder."""
    import io
    import tarfile

    monkeypatch.setenv(native.ENV_DIR, str(tmp_path / "engine"))
    archive = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:

        def add(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data) if kind == tarfile.REGTYPE else 0, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("llama_cpp_python-9.9.9/vendor/llama.cpp/CMakeLists.txt", b"project(x)")
        add("llama_cpp_python-9.9.9/vendor/llama.cpp/../../../../escaped.txt")
        add("llama_cpp_python-9.9.9/vendor/llama.cpp/link", kind=tarfile.SYMTYPE, link="/etc/passwd")
    folder = tmp_path / "engine" / "build"
    folder.mkdir(parents=True)
    with pytest.raises(native.NativeEngineError, match="cannot be unpacked safely"):
        native._vendored_source(folder, "9.9.9", archive, lambda _s: None)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "engine" / "escaped.txt").exists()
    assert not any(p.is_symlink() for p in folder.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "llama_cpp_python-9.9.9.tar.gz"]


def test_serving_plans_see_the_servers_gpu_backends_not_the_wheels(tmp_path: Path, monkeypatch) -> None:
    """A CPU-only llama-cpp-python beside a CUDA llama-server (or none at all) must not plan 0 GPU layers for serve."""
    from dataclasses import replace

    from llmctl.plan.hardware import BuildInfo, load_profile

    described = load_profile("rtx4090-32gb")
    live = replace(described, source="live", build=BuildInfo(installed=False, error="no wheel"))
    assert live.usable_gpus == []
    monkeypatch.setenv(native.ENV_BIN, str(tmp_path))
    _script(
        tmp_path / "llama-server",
        'echo "version: 0.5.0 (build 1, commit abc)" >&2\necho "Available devices:"\necho "  CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23000 MiB free)"\n',
    )
    served = native.serving_hardware(live)
    assert served.build.backend == "cuda" and [g.name for g in served.usable_gpus] == [g.name for g in described.gpus]
    _script(tmp_path / "llama-server", 'echo "version: 0.5.0 (build 1, commit abc)" >&2\necho "Available devices:"\n')
    assert native.serving_hardware(live).usable_gpus == []  # a CPU-only server: no GPU layers, whatever the wheel says
    assert native.serving_hardware(described) is described  # a profile describes its own build
    monkeypatch.setenv(native.ENV_BIN, str(tmp_path / "nowhere"))
    assert native.serving_hardware(live) is live  # no tools: serve itself reports that
