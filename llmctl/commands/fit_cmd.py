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
from llmctl.options import CacheTypeKOpt, CacheTypeVOpt, CtxOpt, GpuLayersOpt, HwProfileOpt, JsonOpt, ModelArg, RpcOpt, ThreadsOpt
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
    rpc: RpcOpt = None,
) -> None:
    """Plan how to load a model here (or on a --hw-profile machine, or across --rpc workers): GPU layers, context, memory per device."""
    from llmctl.engine.rpc import endpoints_from

    endpoints = endpoints_from(rpc)
    if endpoints:
        if serve or parallel or hw_profile:
            raise UsageError(
                "--rpc plans one context across the workers with llama.cpp's own projection", hint="leave out --serve, --parallel and --hw-profile"
            )
        _fit_rpc(model, endpoints, ctx, gpu_layers, _cache_type(cache_type_k, "--cache-type-k"), _cache_type(cache_type_v, "--cache-type-v"),
                 flash_attn, json_output)  # fmt: skip
        return
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
    """One row per quant: its size, fit label, GPU layers, memory (allocated, in use) and expected speed."""
    rows = [
        [
            ("→ " if c is plan.chosen else "  ") + c.candidate.label,
            output.human_bytes(c.candidate.size),
            f"{c.candidate.bits_per_weight:.1f}",
            c.fit,
            f"{c.config.n_gpu_layers}/{(c.candidate.info.layer_count or 0) + 1}",
            c.config.n_ctx,
            output.human_bytes(c.estimate.total),
            output.human_bytes(c.estimate.resident),
            f"{c.tokens_per_second:.0f}" if c.tokens_per_second else "-",
            *([c.config.n_seq] if plan.serving else []),
        ]
        for c in sorted(plan.candidates, key=lambda c: c.candidate.size)
    ]
    columns = ["QUANT", "SIZE", "BITS/W", "FIT", "GPU LAYERS", "CONTEXT", "ALLOCATED", "IN USE", "≤ TOKENS/S", *(["SLOTS"] if plan.serving else [])]
    output.emit_table(columns, rows, right_align=("SIZE", "BITS/W", "CONTEXT", "ALLOCATED", "IN USE", "≤ TOKENS/S", "SLOTS"), stderr=stderr)


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


def _fit_rpc(name: str, endpoints: list, ctx: int | None, gpu_layers: int | None, type_k: str | None, type_v: str | None,
             flash_attn: bool | None, json_output: bool) -> None:  # fmt: skip
    """fit --rpc: the workers checked, then llama-fit-params' layout shown; exit 4 when it does not fit."""
    from llmctl.plan import rpc_fit

    located = locate.locate(open_store(), name)
    layer_count = (located.info.layer_count or 0) + 1
    n_ctx = ctx or min(located.info.context_length or fit.DEFAULT_CTX, fit.DEFAULT_CTX)
    with output.status(f"Asking llama-fit-params to lay out {located.name} on {len(endpoints)} worker(s)…"):
        workers, projection = rpc_fit.check_workers(located.name, located.paths[0], endpoints, layer_count=layer_count, n_ctx=n_ctx,
                                                    n_gpu_layers=gpu_layers, type_k=type_k, type_v=type_v, flash_attn=flash_attn)  # fmt: skip
    if json_output:
        output.emit_json({**projection.to_dict(), "workers": [w.to_dict() for w in workers]})
    else:
        _render_rpc(projection)
    if not projection.fits:
        raise rpc_fit.refusal(projection)


def _render_rpc(projection) -> None:
    from llmctl.plan.rpc_fit import FIT_TARGET_MIB

    on_workers = sum(len(d.layers) for d in projection.devices if d.endpoint)
    output.emit_fields(
        [
            ("model", projection.model),
            ("workers", ", ".join(projection.endpoints)),
            ("fit", "fits" if projection.fits else "does not fit"),
            ("gpu layers", f"{projection.n_gpu_layers} of {projection.layer_count} ({on_workers} on the workers)"),
            ("context", projection.n_ctx),
            ("projection", "llama.cpp's own (llama-fit-params)"),
            *([("llama.cpp's fit", projection.fitted_args)] if projection.fitted_args else []),
            *([("why", "; ".join(projection.reasons()))] if projection.reasons() else []),
        ]
    )

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value} MiB"

    rows = [
        [
            d.name,
            d.endpoint or "this machine",
            _layer_span(d.layers),
            mib(d.model_mib),
            mib(d.context_mib),
            mib(d.compute_mib),
            mib(d.used_mib),
            mib(d.free_mib),
            "yes" if d.fits and d.within_margin else "tight" if d.fits else "NO",
        ]  # fmt: skip
        for d in projection.devices
    ]
    output.emit_table(
        ["DEVICE", "WHERE", "LAYERS", "WEIGHTS", "KV CACHE", "COMPUTE", "TOTAL", "FREE", "FITS"],
        rows,
        right_align=("WEIGHTS", "KV CACHE", "COMPUTE", "TOTAL", "FREE"),
    )
    if any(not d.within_margin for d in projection.devices if d.fits):
        output.warn(f"'tight': within the device's memory but under the {FIT_TARGET_MIB} MiB llama.cpp keeps free")


def _layer_span(layers: list[int]) -> str:
    """Layers as ranges: 0-15, or 16-29,30."""
    if not layers:
        return "-"
    spans: list[str] = []
    start = prev = layers[0]
    for index in [*layers[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        spans.append(f"{start}-{prev}" if prev != start else str(start))
        if index is not None:
            start = prev = index
    return f"{','.join(spans)} ({len(layers)})"
