"""Options shared by several commands, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print JSON on stdout instead of a table (schema: docs/json.md)."),
]
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: a name from `llmctl list` (or a unique prefix), owner/repo[:QUANT], or a path to a .gguf file.",
        show_default=False,
        metavar="MODEL",
    ),
]
ModelsArg = Annotated[
    list[str] | None,
    typer.Argument(help="One or more model names from `llmctl list`.", show_default=False, metavar="MODEL..."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
HwProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--hw-profile",
        help="Plan for a described machine instead of this one: a JSON file or a shipped profile name "
        "(laptop-8gb, rtx4060-16gb, rtx4090-32gb, dual-rtx3090-64gb, m2-16gb). Also LLMCTL_HW_PROFILE.",
        metavar="FILE",
    ),
]
CtxOpt = Annotated[
    int | None,
    typer.Option("--ctx", "-c", min=256, help="Context size in tokens (default: the model's, capped at 8192 and by memory)."),
]
GpuLayersOpt = Annotated[
    int | None,
    typer.Option("--gpu-layers", "-ngl", min=0, help="Layers to offload to the GPU (default: as many as fit; the output layer counts as one)."),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", "-t", min=1, help="CPU threads (default: physical cores).")
]
CacheTypeKOpt = Annotated[
    str | None, typer.Option("--cache-type-k", help="KV cache type for keys: f16, q8_0, q4_0, … (default f16).")
]
CacheTypeVOpt = Annotated[
    str | None, typer.Option("--cache-type-v", help="KV cache type for values: f16, q8_0, q4_0, … (default f16).")
]
