"""``bench --tune``: the fastest threads, batch and GPU layers for one model on this machine.

A short sweep (tg32 and pp256, 2 repetitions each) within the plan's memory
budget: threads for generation first, then batch sizes for prompt processing
at the best thread count, then, with a GPU, a few GPU-layer counts up to the
plan's. The winner is saved per machine and model; ``run`` and ``chat`` use it
unless told otherwise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from llmctl.bench.measure import measure
from llmctl.bench.run import BenchModel
from llmctl.fileio import now_iso
from llmctl.plan import fit
from llmctl.plan.hardware import HardwareInfo

TG, PP, REPS = 32, 256, 2


def _load(model: BenchModel, config: fit.LoadConfig, threads: int, n_batch: int, n_ubatch: int, ngl: int) -> Any:
    """The model as the plan loads it (KV cache types, flash attention), with the knobs being tuned set."""
    from llmctl.engine.llama import load_llama

    return load_llama(model.paths[0], replace(config, n_batch=n_batch, n_ubatch=n_ubatch, n_gpu_layers=ngl), threads=threads)


def thread_candidates(hw: HardwareInfo) -> list[int]:
    physical, logical = hw.cpu.physical_cores, hw.cpu.logical_cores
    return sorted({1, max(physical // 2, 1), physical, logical})


def tune(model: BenchModel, hw: HardwareInfo, on_step: Callable[[str], None] = lambda _t: None) -> dict[str, Any]:
    size = sum(p.stat().st_size for p in model.paths)
    plan = fit.plan_candidate(fit.Candidate(model.label, model.info, size), hw, fit.Overrides(n_ctx=1024))
    ngl = plan.config.n_gpu_layers
    best_threads, best_tg = 1, 0.0
    for threads in thread_candidates(hw):
        rate = measure(_load(model, plan.config, threads, 512, 512, ngl), n_gen=TG, repetitions=REPS).avg_ts
        on_step(f"threads {threads}: tg{TG} {rate:.1f} t/s")
        if rate > best_tg:
            best_threads, best_tg = threads, rate
    best_batch, best_pp = (512, 512), 0.0
    for n_batch in (256, 512, 1024, 2048):
        n_ubatch = min(n_batch, 512)
        rate = measure(_load(model, plan.config, best_threads, n_batch, n_ubatch, ngl), n_prompt=PP, repetitions=REPS).avg_ts
        on_step(f"batch {n_batch}/{n_ubatch}: pp{PP} {rate:.1f} t/s")
        if rate > best_pp:
            best_batch, best_pp = (n_batch, n_ubatch), rate
    best_ngl = ngl
    if ngl:
        for candidate in sorted({ngl, max(ngl - 2, 0), max(ngl // 2, 0)}, reverse=True)[1:]:
            rate = measure(_load(model, plan.config, best_threads, *best_batch, candidate), n_gen=TG, repetitions=REPS).avg_ts
            on_step(f"gpu layers {candidate}: tg{TG} {rate:.1f} t/s")
            if rate > best_tg * 1.02:
                best_ngl, best_tg = candidate, rate
    return {
        "threads": best_threads,
        "n_batch": best_batch[0],
        "n_ubatch": best_batch[1],
        "n_gpu_layers": best_ngl,
        "tg_ts": round(best_tg, 2),
        "pp_ts": round(best_pp, 2),
        "created": now_iso(),
    }
