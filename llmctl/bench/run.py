"""A benchmark run: sweep configurations over models, measure, explain, store.

For each model and each combination of the swept parameters the planner is
asked first (a configuration that will not fit is skipped with the reason);
then the model is loaded with that configuration and llama-bench's tests run
(``llmctl.bench.measure``). Beyond llama-bench, each model also gets its cold and
warm load time, time to first token and end-to-end generation rate through
the same path as ``run``, and peak memory; each generation result is set
against the memory-bandwidth bound (a roofline percentage). Runs are stored
as JSON under ``$LLMCTL_HOME/bench`` for ``--history`` and ``--compare``.
A run of ``bench --serve`` holds ``ServingRow``s instead (measured by
``llmctl.bench.serving``): one per concurrency level, in the same history.

Contexts are made as llama-bench makes them, so that ``llmctl bench M`` and
``llama-bench -m M`` measure the same configuration: its defaults (the
command's), flash attention ``auto`` (``bench.resolve_flash_attn``), the KV
cache of sliding-window layers sized to the window (``swa_full`` off). One
difference: llama-bench makes a context per test, sized for it; llmctl one
per configuration, sized for the largest test (attention reads only the
cells in use, so the speed is the same).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from llmctl import __version__, gguf
from llmctl.bench.measure import Measurement, measure, resolve_flash_attn, test_name
from llmctl.engine.base import Result
from llmctl.errors import EXIT_INTERRUPTED, LlmctlError, NotFoundError, UsageError
from llmctl.fileio import now_iso
from llmctl.plan import fit
from llmctl.plan.hardware import HardwareInfo

RUN_FORMAT = 1


@dataclass
class Sweep:
    threads: list[int]
    gpu_layers: list[int | None]  # None: the plan's choice
    batch: list[int]
    ubatch: list[int]
    flash_attn: list[bool | None]  # None: auto
    type_k: list[str]
    type_v: list[str]
    n_prompt: list[int]
    n_gen: list[int]
    depth: list[int]
    prompt_gen: list[tuple[int, int]] = field(default_factory=list)
    repetitions: int = 5

    def load_configs(self) -> list[dict[str, Any]]:
        keys = ("threads", "gpu_layers", "batch", "ubatch", "flash_attn", "type_k", "type_v")
        return [dict(zip(keys, combo)) for combo in itertools.product(*(getattr(self, k) for k in keys))]

    def tests(self) -> list[tuple[int, int, int]]:
        """(n_prompt, n_gen, depth) of every test, in llama-bench's order."""
        out = []
        for depth in self.depth:
            out += [(p, 0, depth) for p in self.n_prompt if p > 0]
            out += [(0, g, depth) for g in self.n_gen if g > 0]
            out += [(p, g, depth) for p, g in self.prompt_gen]
        return out


@dataclass
class Row:
    """One test of one configuration: llama-bench's fields, and llmctl's."""

    model: str
    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    backend: str
    n_threads: int
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    type_k: str
    type_v: str
    n_prompt: int
    n_gen: int
    n_depth: int
    test: str
    test_time: str
    samples_ts: list[float] = field(default_factory=list)
    avg_ts: float | None = None
    stddev_ts: float | None = None
    avg_ns: int | None = None
    stddev_ns: int | None = None
    samples_ns: list[int] = field(default_factory=list)
    noisy: bool = False
    bandwidth_gbs: float | None = None
    bytes_per_token: int | None = None
    roofline_pct: float | None = None
    status: str = "ok"  # ok | skipped: … | failed: … | interrupted
    devices: str | None = None  # bench --rpc: the devices llama-bench used (its gpu_info: RPC workers' HOST:PORT)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class ModelExtras:
    """What llama-bench cannot tell: load times and the real generation path."""

    model: str
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    ttft_s: float | None = None
    e2e_tokens_per_second: float | None = None
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    status: str = "ok"


@dataclass
class ServingRow:
    """One level of a serving benchmark (``bench --serve``): ``concurrency`` streaming clients, each
    sending a prompt of about ``n_prompt`` tokens and asking for ``n_gen``, ``repetitions`` times.

    ``samples_ts`` holds each repetition's aggregate rate (every completion token of the round ÷
    the round's wall time); ``request_ts`` is the mean of each request's own generation rate
    (tokens after the first ÷ first to last token); TTFTs run from sending a request to its first
    content token. ``prompt_tokens`` and ``completion_tokens`` are the means the server reported.
    Failed requests are counted in ``failed`` (``errors`` says why) and left out of every figure.
    """

    model: str
    server: str  # the URL benchmarked
    endpoint: str  # completions | chat
    concurrency: int
    n_prompt: int
    n_gen: int
    test: str  # pp128+tg64
    test_time: str
    repetitions: int
    fresh: bool = False  # a `llmctl serve` started for this run
    server_build: str | None = None
    server_slots: int | None = None
    ignore_eos: bool = True
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # "3 × HTTP 503: …"
    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    samples_ts: list[float] = field(default_factory=list)
    avg_ts: float | None = None
    stddev_ts: float | None = None
    request_ts: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    samples_request_ts: list[float] = field(default_factory=list)
    samples_ttft_s: list[float] = field(default_factory=list)
    noisy: bool = False
    status: str = "ok"  # ok | failed: N of M requests … | interrupted

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class BenchRun:
    run_id: str
    created: str
    fingerprint: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    extras: list[ModelExtras] = field(default_factory=list)
    interrupted: bool = False
    failed_models: list[dict[str, str | None]] = field(default_factory=list)  # {"model", "reason", "hint"}: nothing measured
    serving: list[ServingRow] = field(default_factory=list)  # bench --serve

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "run_id": self.run_id,
            "created": self.created,
            "fingerprint": self.fingerprint,
            "interrupted": self.interrupted,
            "results": [asdict(r) for r in self.rows],
            "extras": [asdict(e) for e in self.extras],
            "failed_models": self.failed_models,
            **({"serving": [asdict(s) for s in self.serving]} if self.serving else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRun:
        return cls(
            run_id=data["run_id"],
            created=data["created"],
            fingerprint=data.get("fingerprint", {}),
            rows=[Row(**r) for r in data.get("results", [])],
            extras=[ModelExtras(**e) for e in data.get("extras", [])],
            interrupted=bool(data.get("interrupted")),
            failed_models=list(data.get("failed_models", [])),
            serving=[ServingRow(**s) for s in data.get("serving", [])],
        )

    @property
    def models(self) -> list[str]:
        """The models benchmarked, in order, in-process and served."""
        return list(dict.fromkeys([*(r.model for r in self.rows), *(s.model for s in self.serving)]))

    def fail_model(self, model: str, reason: str, hint: str | None = None) -> None:
        self.failed_models.append({"model": model, "reason": reason, "hint": hint})

    def note_failed_models(self) -> None:
        """Record every benchmarked model none of whose tests ran (skipped ones are not failures)."""
        known = {f["model"] for f in self.failed_models}
        for model in dict.fromkeys(r.model for r in self.rows):
            rows = [r for r in self.rows if r.model == model]
            failed = [r for r in rows if r.status.startswith("failed")]
            if failed and not any(r.ok for r in rows) and model not in known:
                self.fail_model(model, failed[0].status.removeprefix("failed: "))


class BenchInterrupted(LlmctlError):
    """Ctrl-C during a benchmark: the results measured so far are shown and saved, then the run stops."""

    exit_code = EXIT_INTERRUPTED


def fingerprint(hw: HardwareInfo) -> dict[str, Any]:
    return {
        "cpu_info": hw.cpu.brand,
        "cpu_features": hw.cpu.features,
        "physical_cores": hw.cpu.physical_cores,
        "gpu_info": ", ".join(g.name for g in hw.gpus) or None,
        "ram_total": hw.ram_total,
        "backends": hw.build.backend.upper() if hw.build.backend != "cpu" else "CPU",
        "build_commit": f"llama-cpp-python-{hw.build.version}",
        "build_number": hw.build.version,
        "system_info": hw.build.system_info,
        "bandwidth_gbs": hw.cpu.bandwidth_gbs,
        "llmctl_version": __version__,
        "os": hw.os,
        "host": platform.node(),
    }


def new_run(hw: HardwareInfo) -> BenchRun:
    now = datetime.now(timezone.utc)
    run_id = now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    return BenchRun(run_id, now.replace(microsecond=0).isoformat(), fingerprint(hw))


@dataclass
class BenchModel:
    label: str
    paths: list[Path]
    info: gguf.ModelInfo


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def run_model(
    run: BenchRun,
    model: BenchModel,
    sweep: Sweep,
    hw: HardwareInfo,
    *,
    extras: bool = True,
    on_row: Callable[[Row], None] | None = None,
) -> None:
    """Every configuration × test of one model, appended to ``run`` as they finish."""
    from llmctl.engine.llama import load_llama

    info = model.info
    size = sum(p.stat().st_size for p in model.paths)
    tests = sweep.tests()
    n_ctx = max((p + g + d for p, g, d in tests), default=512)
    peak = _rss()
    peak_vram: int | None = None  # read while a model is loaded: after `del llm` it is gone
    first_load = True
    for config in sweep.load_configs():
        overrides = fit.Overrides(
            n_ctx=max(n_ctx, 256),
            n_gpu_layers=config["gpu_layers"],
            threads=config["threads"],
            type_k=config["type_k"],
            type_v=config["type_v"],
            flash_attn=resolve_flash_attn(config["flash_attn"]),
            n_batch=config["batch"],
            n_ubatch=config["ubatch"],
        )
        candidate = fit.Candidate(model.label, info, size)
        planned = fit.plan_candidate(candidate, hw, overrides)
        # llama-bench's contexts keep only the window on sliding-window layers; the plan,
        # made for a full-size cache, is on the safe side of that.
        load = replace(planned.config, swa_full=False)
        rows = [_row(model, info, size, hw, config, load, p, g, d) for p, g, d in tests]
        if not planned.fits:
            for row in rows:
                row.status = f"skipped: does not fit ({planned.reason})"
                _emit(run, row, on_row)
            continue
        try:
            start = time.perf_counter()
            llm = load_llama(model.paths[0], load, threads=config["threads"])
            load_s = time.perf_counter() - start
        except (ValueError, RuntimeError, OSError) as exc:
            for row in rows:
                row.status = f"failed: {exc}"
                _emit(run, row, on_row)
            continue
        if extras and first_load:
            run.extras.append(_extras(model, load_s, config["threads"], planned.config))
        first_load = False
        for row, (p, g, d) in zip(rows, tests):
            try:
                result = measure(llm, n_prompt=p, n_gen=g, n_depth=d, repetitions=sweep.repetitions)
            except RuntimeError as exc:
                row.status = f"failed: {exc}"
                _emit(run, row, on_row)
                continue
            _fill(row, result, info, load, hw)
            peak = max(peak, _rss())
            vram = _vram_used(hw)
            if vram is not None:
                peak_vram = max(peak_vram or 0, vram)
            _emit(run, row, on_row)
        del llm
    for extra in run.extras:
        if extra.model == model.label:
            extra.peak_rss_bytes = peak
            extra.peak_vram_bytes = peak_vram


def _emit(run: BenchRun, row: Row, on_row: Callable[[Row], None] | None) -> None:
    run.rows.append(row)
    if on_row:
        on_row(row)


def _row(model: BenchModel, info: gguf.ModelInfo, size: int, hw: HardwareInfo, config: dict[str, Any], load: fit.LoadConfig, p: int, g: int, d: int) -> Row:
    return Row(
        model=model.label,
        model_filename=str(model.paths[0]),
        model_type=f"{info.architecture} {info.size_label or ''} {info.quant}".replace("  ", " ").strip(),
        model_size=size,
        model_n_params=info.parameter_count,
        backend=hw.build.backend.upper() if load.n_gpu_layers else "CPU",
        n_threads=config["threads"],
        n_gpu_layers=load.n_gpu_layers,
        n_batch=load.n_batch,
        n_ubatch=load.n_ubatch,
        flash_attn=load.flash_attn,
        type_k=load.type_k,
        type_v=load.type_v,
        n_prompt=p,
        n_gen=g,
        n_depth=d,
        test=test_name(p, g, d),
        test_time=now_iso(),
    )


def _fill(row: Row, result: Measurement, info: gguf.ModelInfo, load: fit.LoadConfig, hw: HardwareInfo) -> None:
    row.samples_ts = [round(s, 3) for s in result.samples_ts]
    row.avg_ts = round(result.avg_ts, 3)
    row.stddev_ts = round(result.stddev_ts, 3)
    tokens = row.n_prompt + row.n_gen
    row.samples_ns = [int(tokens / s * 1e9) for s in result.samples_ts]
    row.avg_ns = int(sum(row.samples_ns) / len(row.samples_ns))
    row.stddev_ns = int(_stdev(row.samples_ns))
    row.noisy = result.noisy
    if row.n_gen and not row.n_prompt:
        # Generation reads the weights and the KV cache in use for every token: the roofline.
        depth = row.n_depth + row.n_gen // 2
        estimate = fit.estimate_memory(info, load, hw, depth=max(depth, 1), n_outputs=1)
        bound = fit.expected_tokens_per_second(estimate)
        row.bytes_per_token = sum(d.bytes_per_token for d in estimate.devices)
        row.bandwidth_gbs = hw.cpu.bandwidth_gbs if not load.n_gpu_layers else None
        if bound:
            row.roofline_pct = round(100 * result.avg_ts / bound, 1)


def _stdev(values: list[int]) -> float:
    import statistics

    return statistics.stdev(values) if len(values) > 1 else 0.0


def _extras(model: BenchModel, cold_s: float, threads: int, load: fit.LoadConfig) -> ModelExtras:
    """Cold/warm load, and TTFT and generation rate through the run path (``load`` is the plan's, as run loads it)."""
    from llmctl.engine.llama import Engine, load_llama
    from llmctl.engine.sampling import SamplingSettings

    extra = ModelExtras(model.label, load_cold_s=round(cold_s, 4))
    start = time.perf_counter()
    warm = load_llama(model.paths[0], load, threads=threads)
    extra.load_warm_s = round(time.perf_counter() - start, 4)
    engine = Engine(warm, model.label, load, extra.load_warm_s, [], threads=threads)
    try:
        final = None
        messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
        for piece in engine.chat(messages, SamplingSettings(temperature=0, max_tokens=64, seed=1)):
            final = piece
        if isinstance(final, Result):
            extra.ttft_s = round(final.timings.ttft_s, 4)
            rate = final.timings.generation_tokens_per_second
            extra.e2e_tokens_per_second = round(rate, 2) if rate else None
    except LlmctlError as exc:
        extra.status = f"failed: {exc.message}"
    finally:
        engine.close()
    return extra


def _vram_used(hw: HardwareInfo) -> int | None:
    if not any(g.vendor == "nvidia" for g in hw.gpus):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            used = 0
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == os.getpid():
                    used += int(process.usedGpuMemory or 0)
            return used or None
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - VRAM is a bonus figure
        return None


# --- history --------------------------------------------------------------------------


def history_dir(home: Path) -> Path:
    return home / "bench"


def save_run(home: Path, run: BenchRun) -> Path:
    from llmctl.fileio import atomic_write_text

    path = history_dir(home) / f"{run.run_id}.json"
    atomic_write_text(path, json.dumps(run.to_dict(), indent=1) + "\n")
    return path


def list_runs(home: Path) -> list[BenchRun]:
    runs = []
    for path in sorted(history_dir(home).glob("*.json")):
        try:
            runs.append(BenchRun.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged history file does not hide the others
    return runs


def load_run(home: Path, run_id: str) -> BenchRun:
    runs = list_runs(home)
    if run_id == "last" and runs:
        return runs[-1]
    matches = [r for r in runs if r.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFoundError(f"no benchmark run '{run_id}'", hint="list them with `llmctl bench --history`")
    raise UsageError(f"'{run_id}' matches {len(matches)} runs", hint="give more of the run id")


def row_key(row: Row) -> tuple[Any, ...]:
    return (Path(row.model_filename).name, row.test, row.n_threads, row.n_gpu_layers, row.n_batch, row.n_ubatch,
            row.flash_attn, row.type_k, row.type_v)  # fmt: skip


def compare(a: BenchRun, b: BenchRun) -> list[tuple[Row, Row, float]]:
    """Rows present and measured in both runs, with B's speed ÷ A's."""
    index = {row_key(r): r for r in a.rows if r.ok and r.avg_ts}
    out = []
    for row in b.rows:
        base = index.get(row_key(row))
        if base is not None and base.avg_ts and row.ok and row.avg_ts:  # index holds measured rows only
            out.append((base, row, row.avg_ts / base.avg_ts))
    return out


def serving_key(row: ServingRow) -> tuple[Any, ...]:
    """What makes two serving levels comparable: the model's name, the API and the load. The server
    is left out, so that two servers of one model compare (``llmctl serve`` against ``llama-server``)."""
    return (row.model, row.endpoint, row.concurrency, row.n_prompt, row.n_gen)


def compare_serving(a: BenchRun, b: BenchRun) -> list[tuple[ServingRow, ServingRow, float]]:
    """Serving levels measured in both runs without a failed request, with B's aggregate rate ÷ A's."""
    index = {serving_key(s): s for s in a.serving if s.ok and s.avg_ts}
    out = []
    for row in b.serving:
        base = index.get(serving_key(row))
        if base is not None and base.avg_ts and row.ok and row.avg_ts:
            out.append((base, row, row.avg_ts / base.avg_ts))
    return out
