"""``llmctl fit``: how a model would be loaded on this machine, and the memory it needs."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl import fit, gguf, output
from llmctl.commands import open_store
from llmctl.config import get_settings
from llmctl.errors import UsageError
from llmctl.hardware import get_hardware
from llmctl.options import CacheTypeKOpt, CacheTypeVOpt, CtxOpt, GpuLayersOpt, HwProfileOpt, JsonOpt, ModelArg, ThreadsOpt


def fit_command(
    model: ModelArg,
    ctx: CtxOpt = None,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
    flash_attn: Annotated[bool, typer.Option("--flash-attn", help="Plan with flash attention (smaller compute buffers).")] = False,
    hw_profile: HwProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Plan how to load a model here (or on a --hw-profile machine): GPU layers, context, memory per device."""
    overrides = fit.Overrides(
        n_ctx=ctx,
        n_gpu_layers=gpu_layers,
        threads=threads,
        type_k=_cache_type(cache_type_k, "--cache-type-k"),
        type_v=_cache_type(cache_type_v, "--cache-type-v"),
        flash_attn=flash_attn or None,
    )
    resolved = open_store().resolve(model)
    _, info = gguf.read_model(resolved.paths)
    hw = get_hardware(get_settings(), hw_profile, with_bandwidth=True)
    size = sum(p.stat().st_size for p in resolved.paths)
    candidate = fit.Candidate(resolved.name, info, size, str(resolved.paths[0]))
    plan = fit.make_plan([candidate], hw, overrides, force=True)
    if json_output:
        output.emit_json(plan.to_dict())
        return
    render_plan(plan)


def _cache_type(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    if value.lower() not in fit.KV_TYPES:
        raise UsageError(f"{flag} {value!r} is not a KV cache type", hint="use one of " + ", ".join(fit.KV_TYPES))
    return value.lower()


def render_plan(plan: fit.Plan) -> None:
    chosen = plan.chosen
    cfg = chosen.config
    speed = f"≤ {chosen.tokens_per_second:.0f} tokens/s (memory-bandwidth bound)" if chosen.tokens_per_second else "unknown (bandwidth not measured)"
    output.emit_fields(
        [
            ("model", chosen.candidate.label),
            ("machine", plan.hardware),
            ("fit", chosen.fit),
            ("gpu layers", f"{cfg.n_gpu_layers} of {(chosen.candidate.info.layer_count or 0) + 1}"),
            ("context", cfg.n_ctx),
            ("threads", plan.threads),
            ("kv cache", f"{cfg.type_k} / {cfg.type_v}"),
            ("generation", speed),
            ("why", "; ".join(plan.reasons)),
        ]
    )
    rows = []
    for dev in chosen.estimate.devices:
        if not dev.total:
            continue
        rows.append(
            [
                dev.device,
                output.human_bytes(dev.weights),
                output.human_bytes(dev.kv_cache),
                output.human_bytes(dev.compute),
                output.human_bytes(dev.overhead),
                output.human_bytes(dev.total),
                output.human_bytes(dev.available) if dev.available is not None else "-",
                "yes" if dev.fits else "NO",
            ]
        )
    output.emit_table(
        ["DEVICE", "WEIGHTS", "KV CACHE", "COMPUTE", "OVERHEAD", "TOTAL", "AVAILABLE", "FITS"],
        rows,
        right_align=("WEIGHTS", "KV CACHE", "COMPUTE", "OVERHEAD", "TOTAL", "AVAILABLE"),
    )
    for warning in plan.warnings:
        output.warn(warning)
