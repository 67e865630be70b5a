"""``llmctl show``: everything useful from a model's header."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmctl import gguf, output
from llmctl.commands import open_store
from llmctl.commands.list_cmd import mmproj_json
from llmctl.errors import LlmctlError
from llmctl.models.locate import locate
from llmctl.models.store import ResolvedModel
from llmctl.options import JsonOpt, ModelArg


def show(
    model: ModelArg,
    json_output: JsonOpt = False,
    template: Annotated[bool, typer.Option("--template", help="Print only the chat template.")] = False,
) -> None:
    """Show a model's details: architecture, size, quantisation, layers, heads, context, template."""
    located = locate(open_store(), model)
    resolved, info = located.model, located.info
    if template:
        if not info.chat_template:
            raise LlmctlError(
                f"model '{resolved.name}' has no chat template",
                hint="use `llmctl run --raw` for plain completion",
            )
        if json_output:
            output.emit_json({"name": resolved.name, "chat_template": info.chat_template})
        else:
            output.emit_text(output.safe(info.chat_template, keep_layout=True))
        return
    if json_output:
        output.emit_json(show_json(resolved, located.headers, info))
        return
    output.emit_fields(_fields(resolved, info))
    total = info.total_tensor_bytes or 1
    output.emit_table(
        ["TENSOR TYPE", "TENSORS", "BYTES", "SHARE"],
        [[name, slot["count"], output.human_bytes(slot["bytes"]), f"{100 * slot['bytes'] / total:.1f}%"] for name, slot in info.tensor_types.items()],
        right_align=("TENSORS", "BYTES", "SHARE"),
    )


def _per_layer(value: int | list[int] | None) -> str:
    if isinstance(value, list):
        return f"per layer {min(value)}–{max(value)}" if value else "-"
    return "-" if value is None else str(value)


def _fields(resolved: ResolvedModel, info: gguf.ModelInfo) -> list[tuple[str, Any]]:
    entry = resolved.entry
    sha = ", ".join(h or "-" for h in entry.sha256) if entry else "- (not registered)"
    template = f"present ({len(info.chat_template)} chars; `--template` prints it)" if info.chat_template else "none"
    experts = f"{info.expert_count} ({info.expert_used_count} used)" if info.expert_count else "-"
    return [
        ("name", resolved.name),
        ("model", info.name or "-"),
        ("architecture", info.architecture),
        ("parameters", f"{output.human_count(info.parameter_count)} ({info.parameter_count:,})"),
        ("quantisation", info.quant + (f" (file type {info.file_type})" if info.file_type is not None else "")),
        ("size", f"{output.human_bytes(info.file_size)} ({info.file_size:,} bytes)"),
        ("layers", info.layer_count if info.layer_count is not None else "-"),
        ("context", info.context_length or "-"),
        ("embedding", info.embedding_length or "-"),
        ("heads", _per_layer(info.head_count)),
        ("kv heads", _per_layer(info.head_count_kv)),
        ("key/value length", f"{info.key_length or '-'} / {info.value_length or '-'}"),
        ("sliding window", info.sliding_window or "-"),
        ("experts", experts),
        ("vocabulary", info.vocab_size or "-"),
        ("chat template", template),
        ("license", info.license or "-"),
        ("gguf", f"v{info.gguf_version}, {info.tensor_count} tensors, {info.split_count} file(s)"),
        ("source", entry.source_label if entry else resolved.kind),
        ("path", "\n".join(str(p) for p in resolved.paths)),
        ("projector", _projector(resolved)),
        ("sha256", sha),
        ("tuned here", _tuned(resolved)),
    ]


def _projector(resolved: ResolvedModel) -> str:
    projector = mmproj_json(resolved.entry, resolved.kind, resolved.paths)
    if projector is None:
        return "none"
    if projector["size_bytes"] is None:
        return f"{projector['path']} (missing)"
    return f"{projector['path']} ({output.human_bytes(projector['size_bytes'])})"


def _tuned(resolved: ResolvedModel) -> str:
    from llmctl.plan.tuned import describe_tuned, tuned_here

    tuned = tuned_here(resolved.paths)
    if not tuned:
        return "- (`llmctl bench --tune` finds the fastest settings for this machine)"
    return describe_tuned(tuned)


def show_json(resolved: ResolvedModel, headers: list[gguf.GGUFHeader], info: gguf.ModelInfo) -> dict[str, Any]:
    entry = resolved.entry
    return {
        "name": resolved.name,
        "kind": resolved.kind,
        "files": [str(p) for p in resolved.paths],
        "source": entry.source if entry else None,
        "sha256": entry.sha256 if entry else None,
        "mmproj": mmproj_json(entry, resolved.kind, resolved.paths),
        "info": info.to_dict(),
        "metadata": gguf.metadata_for_json(headers[0]),
    }
