"""``llmctl engine install`` / ``llmctl engine status``: llama.cpp's own tools, built once per machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llmctl import output
from llmctl.options import JsonOpt

if TYPE_CHECKING:
    from llmctl.engine.native import NativeTools

engine_app = typer.Typer(
    name="engine",
    help="llama.cpp's own tools (llama-server, ggml-rpc-server, llama-bench, llama-fit-params): build and check them.",
    no_args_is_help=True,
)


@engine_app.command("install")
def install(
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Parallel compile jobs (default: one per CPU).")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Build llama.cpp's tools from the llama.cpp llama-cpp-python vendors (once per machine and CMAKE_ARGS)."""
    from llmctl.engine import native

    tools = native.locate()
    if tools is None:
        with output.status("Building llama.cpp's tools…"):
            tools = native.install(on_step=output.info, jobs=jobs)
    elif tools.source == native.ENV_BIN:
        output.info(f"using your own build in {tools.bin_dir} ({native.ENV_BIN}); nothing to install")
    if json_output:
        output.emit_json(tools.to_dict())
        return
    output.emit_fields(_fields(tools))


@engine_app.command("status")
def status(json_output: JsonOpt = False) -> None:
    """Show which llama.cpp tools llmctl uses, their version and backends."""
    from llmctl.engine import native

    tools = native.locate()
    if json_output:
        output.emit_json({"installed": tools is not None, **(tools.to_dict() if tools else {})})
        return
    if tools is None:
        output.info("llama.cpp's tools are not installed: run `llmctl engine install` (about 10-20 minutes on 2 cores, once)")
        return
    output.emit_fields(_fields(tools))


def _fields(tools: NativeTools) -> list[tuple[str, object]]:
    return [
        ("llama.cpp", tools.llama_cpp_version),
        ("built from", f"llama-cpp-python {tools.llama_cpp_python}" if tools.llama_cpp_python else "your own build (LLMCTL_LLAMA_BIN)"),
        ("backends", ", ".join(tools.backends) or "-"),
        ("cmake args", tools.cmake_args or "-"),
        ("folder", str(tools.bin_dir)),
        ("built", tools.built or "-"),
    ]
