"""``llmctl hwinfo``: what this machine (or a described one) has, and what llama.cpp can use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llmctl import output
from llmctl.config import get_settings
from llmctl.options import HwProfileOpt, JsonOpt
from llmctl.plan.hardware import HardwareInfo, build_warnings, get_hardware, probe, reinstall_hint

if TYPE_CHECKING:
    from llmctl.engine.native import NativeTools


def hwinfo(
    json_output: JsonOpt = False,
    hw_profile: HwProfileOpt = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Re-probe the cached parts (CPU, llama.cpp build, bandwidth).")] = False,
    bandwidth: Annotated[bool, typer.Option("--bandwidth", help="Also measure memory bandwidth (once; cached).")] = False,
) -> None:
    """Show CPU, memory, disk, GPUs and the installed llama.cpp build."""
    settings = get_settings()
    if refresh and not hw_profile:
        hw = probe(settings, with_bandwidth=bandwidth, refresh=True)
    else:
        hw = get_hardware(settings, hw_profile, with_bandwidth=bandwidth)
    hint = reinstall_hint(hw)
    warnings = build_warnings(hw)
    tools, tools_problem = _native_tools() if hw.source == "live" else (None, None)
    if json_output:
        native = tools.to_dict() if tools else None
        output.emit_json({**hw.to_dict(), "native_tools": native, "reinstall_command": hint, "warnings": warnings})
        return
    fields = _fields(hw)
    if hw.source == "live":
        fields.append(("llama.cpp tools", _describe_tools(tools, tools_problem)))
    output.emit_fields(fields)
    if hw.gpus:
        output.emit_table(
            ["GPU", "NAME", "MEMORY", "FREE", "BANDWIDTH", "DRIVER / CUDA", "COMPUTE"],
            [
                [
                    g.index,
                    g.name + (" (unified memory)" if g.unified else ""),
                    output.human_bytes(g.memory_total),
                    output.human_bytes(g.memory_free),
                    f"{g.bandwidth_gbs:.0f} GB/s" if g.bandwidth_gbs else "-",
                    f"{g.driver or '-'} / {g.cuda_version or '-'}",
                    g.compute_capability or "-",
                ]
                for g in hw.gpus
            ],
            right_align=("MEMORY", "FREE", "BANDWIDTH"),
        )
    if hint:
        output.warn("a GPU is present but the installed llama.cpp cannot use it; reinstall it with:")
        output.info(hint)
    for warning in warnings:
        output.warn(warning)


def _native_tools() -> tuple[NativeTools | None, str | None]:
    from llmctl.engine import native

    try:
        return native.locate(), None
    except native.NativeEngineError as exc:
        return None, exc.message


def _describe_tools(tools: NativeTools | None, problem: str | None) -> str:
    if problem:
        return f"not usable: {problem}"
    if tools is None:
        return "not installed (`llmctl engine install`)"
    return f"llama.cpp {tools.llama_cpp_version}, backends {', '.join(tools.backends)}, in {tools.bin_dir}"


def _fields(hw: HardwareInfo) -> list[tuple[str, object]]:
    cpu, build = hw.cpu, hw.build
    offload = f"backend {build.backend}, GPU offload {'yes' if build.gpu_offload else 'no'}"
    if not build.installed:
        llama = f"not usable: {build.error}"
    elif hw.source == "live":
        llama = f"llama-cpp-python {build.version}, {offload}"
    else:
        llama = f"as described: {offload}"
    disk = "-"
    if hw.disk_free is not None:
        disk = output.human_bytes(hw.disk_free) + " free" + (f" in {hw.disk_path}" if hw.disk_path else "")
    return [
        ("source", hw.source),
        ("os", hw.os),
        ("cpu", f"{cpu.brand} ({cpu.arch}), {cpu.physical_cores} cores / {cpu.logical_cores} threads"),
        ("cpu features", " ".join(cpu.features) or "-"),
        ("memory bandwidth", f"{cpu.bandwidth_gbs:.1f} GB/s" if cpu.bandwidth_gbs else "not measured (`--bandwidth`)"),
        ("ram", f"{output.human_bytes(hw.ram_total)} total, {output.human_bytes(hw.ram_available)} available"),
        ("swap", f"{output.human_bytes(hw.swap_total)} total, {output.human_bytes(hw.swap_free)} free"),
        ("disk", disk),
        ("gpus", f"{len(hw.gpus)}" if hw.gpus else (hw.gpu_note or "none")),
        ("llama.cpp", llama),
        ("llama.cpp flags", build.system_info or "-"),
    ]
