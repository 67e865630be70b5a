"""``llmctl fit``: how a model would be loaded on this machine, and the memory it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl import output
from llmctl.commands import open_store
from llmctl.config import get_settings
from llmctl.errors import DoesNotFitError, UsageError
from llmctl.models import locate
from llmctl.options import CacheTypeKOpt, CacheTypeVOpt, CtxOpt, GpuLayersOpt, HwProfileOpt, JsonOpt, ModelArg, ThreadsOpt
from llmctl.plan import fit
from llmctl.plan.hardware import get_hardware
from llmctl.plan.tuned import TunedProfile, describe_tuned, merge_tuned, tuned_here


def fit_command(
    model: ModelArg,
    ctx: CtxOpt = None,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    cache_type_k: CacheTypeKOpt = None,
    cache_type_v: CacheTypeVOpt = None,
    flash_attn: Annotated[
        bool | None, typer.Option("--flash-attn/--no-flash-attn", help="Plan with or without flash attention (default: on, as llama.cpp's auto).")
    ] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Plan for `llmctl serve`: parallel slots, each with its own context.")] = False,
    parallel: Annotated[int | None, typer.Option("--parallel", min=1, help="Slots to plan for (implies --serve; default: as many as fit, up to 4).")] = None,
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
        flash_attn=flash_attn,
        parallel=parallel,
        serving=serve,
    )
    hw = get_hardware(get_settings(), hw_profile, with_bandwidth=True)
    if overrides.for_server:  # planned for llama-server: its GPU backends count, not the wheel's
        from llmctl.engine.native import serving_hardware

        hw = serving_hardware(hw)
    candidates = locate.candidates(open_store(), model, status=output.status)
    tuned = _tuned_for(candidates) if hw_profile is None else None
    if tuned:
        overrides = merge_tuned(overrides, tuned)
    try:
        plan = fit.make_plan(candidates, hw, overrides)
    except DoesNotFitError as refused:
        if refused.full_plan is None:
            raise
        show(refused.full_plan, json_output, tuned)  # the plan that does not fit, then exit 4
        raise refused.for_planning_only() from None
    show(plan, json_output, tuned)


def show(plan: fit.Plan, json_output: bool, tuned: TunedProfile | None = None) -> None:
    """The plan on stdout: the JSON document, or (several candidates: their table and) the chosen one."""
    if tuned:
        plan.reasons.append(f"tuned on this machine by `bench --tune`: {describe_tuned(tuned)}")
    if json_output:
        output.emit_json(plan.to_dict())
        return
    if len(plan.candidates) > 1:
        render_candidates(plan)
    render_plan(plan)


def _tuned_for(candidates: list[fit.Candidate]) -> TunedProfile | None:
    """This machine's tuned settings for a local model (none for a repo's quants on the Hub)."""
    if len(candidates) != 1 or not candidates[0].location or not Path(candidates[0].location).exists():
        return None
    return tuned_here([Path(candidates[0].location)])


def render_candidates(plan: fit.Plan, stderr: bool = False) -> None:
    """One row per quant: its size, fit label, GPU layers and expected speed."""
    rows = [
        [
            ("→ " if c is plan.chosen else "  ") + c.candidate.label,
            output.human_bytes(c.candidate.size),
            f"{c.candidate.bits_per_weight:.1f}",
            c.fit,
            f"{c.config.n_gpu_layers}/{(c.candidate.info.layer_count or 0) + 1}",
            c.config.n_ctx,
            f"{c.tokens_per_second:.0f}" if c.tokens_per_second else "-",
            *([c.config.n_seq] if plan.serving else []),
        ]
        for c in sorted(plan.candidates, key=lambda c: c.candidate.size)
    ]
    columns = ["QUANT", "SIZE", "BITS/W", "FIT", "GPU LAYERS", "CONTEXT", "≤ TOKENS/S", *(["SLOTS"] if plan.serving else [])]
    output.emit_table(columns, rows, right_align=("SIZE", "BITS/W", "CONTEXT", "≤ TOKENS/S", "SLOTS"), stderr=stderr)


def _serving_fields(plan: fit.Plan) -> list[tuple[str, object]]:
    """A serving plan's slots and the KV cache they take together (nothing for a plain plan)."""
    if not plan.serving:
        return []
    kv = sum(d.kv_cache for d in plan.chosen.estimate.devices)
    slots = f"{plan.parallel} × {plan.config.n_ctx} tokens, {output.human_bytes(kv)} of KV cache"
    return [("slots", f"{slots} (llama-server -np {plan.parallel} -c {plan.total_ctx})")]


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
            ("context", cfg.n_ctx if not plan.serving else f"{cfg.n_ctx} per slot"),
            *_serving_fields(plan),
            ("threads", plan.threads),
            ("kv cache", f"{cfg.type_k} / {cfg.type_v}"),
            ("generation", speed),
            *[("why" if i == 0 else "", reason) for i, reason in enumerate(plan.reasons)],
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
                output.human_bytes(dev.resident),
                output.human_bytes(dev.available) if dev.available is not None else "-",
                "yes" if dev.fits else "NO",
            ]
        )
    output.emit_table(
        ["DEVICE", "WEIGHTS", "KV CACHE", "COMPUTE", "OVERHEAD", "ALLOCATED", "IN USE", "AVAILABLE", "FITS"],
        rows,
        right_align=("WEIGHTS", "KV CACHE", "COMPUTE", "OVERHEAD", "ALLOCATED", "IN USE", "AVAILABLE"),
    )
    for warning in plan.warnings:
        output.warn(warning)
