"""Options shared by several commands, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.commands.completion import complete_model_names

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
        autocompletion=complete_model_names,
    ),
]
ModelsArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="One or more model names from `llmctl list`.",
        show_default=False,
        metavar="MODEL...",
        autocompletion=complete_model_names,
    ),
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
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", min=1, help="CPU threads (default: physical cores).")]
CacheTypeKOpt = Annotated[str | None, typer.Option("--cache-type-k", help="KV cache type for keys: f16, q8_0, q4_0, … (default f16).")]
CacheTypeVOpt = Annotated[str | None, typer.Option("--cache-type-v", help="KV cache type for values: f16, q8_0, q4_0, … (default f16).")]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", "--temp", help="Sampling temperature; 0 picks the likeliest token (default 0.8).")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling: keep tokens up to this cumulative probability (default 0.95).")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Keep only the K likeliest tokens (default 40).")]
MinPOpt = Annotated[float | None, typer.Option("--min-p", help="Drop tokens less likely than this fraction of the likeliest (default 0.05).")]
RepeatPenaltyOpt = Annotated[float | None, typer.Option("--repeat-penalty", help="Penalty for repeated tokens (default 1.0: off, as in llama.cpp).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed; with --temperature 0 output is reproducible.")]
MaxTokensOpt = Annotated[
    int | None, typer.Option("--max-tokens", "-n", help="Stop after this many tokens (default: when the model stops or the context is full).")
]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop when this text appears (repeatable).")]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Timing summary on stderr (load, prompt, generation, time to first token). LLMCTL_DEBUG=1 adds llama.cpp's own log."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Load even if the planner says it does not fit.")]
ChatFormatOpt = Annotated[
    str | None, typer.Option("--chat-format", help="llama-cpp-python chat format to use instead of the model's template (e.g. chatml, llama-2).")
]
ThinkOpt = Annotated[
    str | None,
    typer.Option(
        "--think",
        help="Reasoning models: 'on' or 'off' where the chat template has a switch (Qwen3 and others); "
        "'low', 'medium' or 'high' for gpt-oss (default: the template's own).",
        metavar="MODE",
        show_default=False,
    ),
]
HideThinkingOpt = Annotated[
    bool,
    typer.Option("--hide-thinking", help="Do not show a reasoning model's thinking on the terminal (stdout never has it)."),
]
RpcOpt = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        help="Split the model across llama.cpp RPC workers (each running `llmctl rpc-server`) at these addresses; it then "
        "runs in a llama-server child, its layers on the workers (all of them unless --gpu-layers says). Also LLMCTL_RPC.",
        metavar="HOST:PORT,...",
        show_default=False,
    ),
]
