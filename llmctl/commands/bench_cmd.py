"""``llmctl bench``: llama-bench's numbers, plus load, first-token and roofline figures; history and tuning;
with ``--serve``, a serving benchmark (concurrent streaming clients against a server)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable

import typer

from llmctl import output
from llmctl.bench.choices import Endpoint, ReportFormat
from llmctl.commands import open_store
from llmctl.config import get_settings
from llmctl.errors import LlmctlError, UsageError
from llmctl.models.locate import locate
from llmctl.options import ModelsArg, RpcOpt
from llmctl.plan.hardware import _machine_key, get_hardware

if TYPE_CHECKING:
    from llmctl.bench import run as benchrun


def bench(
    models: ModelsArg = None,
    n_prompt: Annotated[
        str | None, typer.Option("--n-prompt", "-p", help="Prompt lengths to process (pp tests), e.g. 512 or 128,512 (default 512; 128 with --serve).")
    ] = None,
    n_gen: Annotated[str | None, typer.Option("--n-gen", "-n", help="Tokens to generate (tg tests), e.g. 128 (default 128; 64 with --serve).")] = None,
    prompt_gen: Annotated[str | None, typer.Option("--prompt-gen", "-pg", help="Combined tests PROMPT,GEN (e.g. 512,128); ';' separates several.")] = None,
    depth: Annotated[str, typer.Option("--depth", "-d", help="Tokens already in the context before each test.")] = "0",
    repetitions: Annotated[
        int | None, typer.Option("--repetitions", "-r", min=1, max=1000, help="Timed repetitions after the warm-up (default 5; 3 with --serve).")
    ] = None,
    threads: Annotated[str | None, typer.Option("--threads", "-t", help="Thread counts, e.g. 1,2,4 or 1-8 (default: physical cores, as llama-bench).")] = None,
    gpu_layers: Annotated[str | None, typer.Option("--gpu-layers", "-ngl", help="GPU layer counts (default: the plan's, all that fit).")] = None,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Logical batch sizes.")] = "2048",
    ubatch_size: Annotated[str, typer.Option("--ubatch-size", "-ub", help="Physical batch sizes.")] = "512",
    flash_attn: Annotated[
        str, typer.Option("--flash-attn", "-fa", help="Flash attention: auto (on wherever llama.cpp has it), on/1, off/0; 0,1 compares.")
    ] = "auto",
    cache_type_k: Annotated[str, typer.Option("--cache-type-k", "-ctk", help="KV cache types for keys.")] = "f16",
    cache_type_v: Annotated[str, typer.Option("--cache-type-v", "-ctv", help="KV cache types for values.")] = "f16",
    output_format: Annotated[
        ReportFormat, typer.Option("--output", "-o", help="Format of the results (also for --history and --compare).")
    ] = ReportFormat.table,
    no_extras: Annotated[bool, typer.Option("--no-extras", help="Skip load times, TTFT and the run-path rate.")] = False,
    chart: Annotated[bool, typer.Option("--chart", help="Draw a bar chart of the results on stderr.")] = False,
    chart_file: Annotated[Path | None, typer.Option("--chart-file", help="Also write the chart as an SVG image.")] = None,
    history: Annotated[bool, typer.Option("--history", help="List past benchmark runs.")] = False,
    compare: Annotated[tuple[str, str] | None, typer.Option("--compare", help="Compare two past runs: RUN_A RUN_B (or 'last').")] = None,
    tune: Annotated[bool, typer.Option("--tune", help="Find the fastest threads / batch / GPU layers for MODEL and save them for run and chat.")] = False,
    serve: Annotated[
        bool, typer.Option("--serve", help="Benchmark serving: concurrent streaming clients against a fresh `llmctl serve` (or --server URL).")
    ] = False,
    server: Annotated[
        str | None, typer.Option("--server", help="Benchmark the running OpenAI-compatible server at URL (llmctl serve, llama-server); implies --serve.")
    ] = None,
    concurrency: Annotated[str | None, typer.Option("--concurrency", "-c", help="With --serve: concurrent clients, e.g. 1,4,8 (the default).")] = None,
    endpoint: Annotated[Endpoint, typer.Option("--endpoint", help="With --serve: the API the clients call.")] = Endpoint.completions,
    serve_args: Annotated[
        str | None, typer.Option("--serve-args", help="With --serve: options for the fresh `llmctl serve`, e.g. --serve-args='--parallel 8'.")
    ] = None,
    rpc: RpcOpt = None,
) -> None:
    """Benchmark models like llama-bench (pp/tg tokens per second, its defaults), with roofline, load and first-token figures; or a server under concurrent clients (--serve)."""
    from llmctl.bench import report as benchreport
    from llmctl.bench import run as benchrun

    home = get_settings().home
    if history:
        _history(home, output_format)
        return
    if compare:
        _compare(home, compare, output_format)
        return
    in_process_only = {"--prompt-gen": prompt_gen, "--depth": depth if depth != "0" else None, "--threads": threads, "--gpu-layers": gpu_layers,
                       "--batch-size": batch_size if batch_size != "2048" else None, "--ubatch-size": ubatch_size if ubatch_size != "512" else None,
                       "--flash-attn": flash_attn if flash_attn != "auto" else None, "--cache-type-k": cache_type_k if cache_type_k != "f16" else None,
                       "--cache-type-v": cache_type_v if cache_type_v != "f16" else None, "--no-extras": no_extras or None, "--tune": tune or None}  # fmt: skip
    endpoints = _rpc_endpoints(rpc, serve or server is not None, tune)
    if serve or server is not None:
        if given := [flag for flag, value in in_process_only.items() if value is not None]:
            raise UsageError(f"{given[0]} sets up llama.cpp in this process; with --serve the server's own settings apply",
                             hint="pass the server's options with --serve-args, or start it with them and use --server URL")  # fmt: skip
        if server is not None and serve_args:
            raise UsageError("--serve-args starts a fresh `llmctl serve`; --server benchmarks one already running", hint="use one of them")
        plan = _serving_plan(concurrency, n_prompt, n_gen, repetitions, endpoint)
        _bench_serving(home, models or [], plan, server, shlex.split(serve_args or ""), output_format, chart, chart_file)
        return
    for flag, value in (
        ("--concurrency", concurrency),
        ("--serve-args", serve_args),
        ("--endpoint", endpoint if endpoint is not Endpoint.completions else None),
    ):
        if value is not None:
            raise UsageError(f"{flag} is for serving benchmarks", hint="add --serve (a fresh llmctl serve) or --server URL")
    n_prompt, n_gen, repetitions = n_prompt or "512", n_gen or "128", repetitions or 5
    if not models:
        raise UsageError("name at least one model to benchmark", hint="e.g. llmctl bench smollm2")
    hw = get_hardware(get_settings(), with_bandwidth=True)
    if tune:
        _tune(home, models[0], hw)
        return
    sweep = _sweep(
        {
            "threads": threads,
            "gpu_layers": gpu_layers,
            "batch_size": batch_size,
            "ubatch_size": ubatch_size,
            "flash_attn": flash_attn,
            "cache_type_k": cache_type_k,
            "cache_type_v": cache_type_v,
            "n_prompt": n_prompt,
            "n_gen": n_gen,
            "depth": depth,
            "prompt_gen": prompt_gen,
            "repetitions": repetitions,
        },  # fmt: skip
        hw,
    )
    run = benchrun.new_run(hw)
    bench_models = _models(models, run)
    if endpoints:
        _preflight(run, endpoints)
        no_extras = True  # load times and the run path are in-process figures
    try:
        with _Progress(len(bench_models) * len(sweep.load_configs()) * len(sweep.tests()), run) as progress:
            for model in bench_models:
                if endpoints:
                    _run_rpc(run, model, sweep, endpoints, progress.row)
                else:
                    benchrun.run_model(run, model, sweep, hw, extras=not no_extras, on_row=progress.row)
    except KeyboardInterrupt:
        run.interrupted = True  # reported once, after the results (BenchInterrupted below)
    if not run.interrupted:
        run.note_failed_models()
    failed = [r for r in run.rows if r.status.startswith("failed")]
    all_failed = bool(failed) and not any(r.ok for r in run.rows)
    if run.rows and not all_failed:  # a run that measured nothing would only clutter --history and --compare
        saved = benchrun.save_run(home, run)
        output.info(f"saved as run {run.run_id} ({saved})")
    _render(run, output_format, extras=not no_extras)
    if all_failed and not run.interrupted:
        raise LlmctlError(  # exit 1
            f"every test failed, nothing was measured or saved (first failure: {failed[0].status.removeprefix('failed: ')})",
            hint=LOAD_HINT,
        )
    if chart or chart_file:
        pairs = benchreport.chart_pairs(run)
        if chart:
            output.info(benchreport.bar_chart(pairs), multiline=True)
        if chart_file:
            chart_file.write_text(benchreport.svg_chart(pairs, f"llmctl bench {run.run_id}"), encoding="utf-8")
    if run.interrupted:
        raise benchrun.BenchInterrupted("interrupted", hint="the results above are those measured before Ctrl-C" if run.rows else None)
    if run.failed_models:
        _some_models_failed(run, len(models))


LOAD_HINT = "check that llama.cpp can load the model: `llmctl run MODEL hello`; LLMCTL_DEBUG=1 shows its log"


def _rpc_endpoints(flag: str | None, serving: bool, tune: bool) -> list:
    """--rpc's workers (else LLMCTL_RPC's): for the in-process tests only."""
    from llmctl.engine.rpc import endpoints_from

    if flag is not None and serving:
        raise UsageError("--rpc benchmarks llama-bench across the workers; a served model gets its workers from serve",
                         hint="give them to the server: --serve-args='--rpc HOST:PORT,…'")  # fmt: skip
    if flag is not None and tune:
        raise UsageError("--tune tunes this machine's in-process settings; it cannot tune across RPC workers", hint="leave out --rpc")
    return [] if serving or tune else endpoints_from(flag)


def _preflight(run: benchrun.BenchRun, endpoints: list) -> None:
    """Check every worker before llama-bench (which aborts on a bad one); note them in the run's fingerprint."""
    from llmctl.engine.rpc import preflight

    workers = preflight(endpoints)
    run.fingerprint["rpc"] = [w.to_dict() for w in workers]


def _run_rpc(run: benchrun.BenchRun, model: benchrun.BenchModel, sweep: benchrun.Sweep, endpoints: list, on_row) -> None:
    from llmctl.bench import rpc_bench
    from llmctl.engine import native

    logs = get_settings().home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"bench-rpc-{run.run_id}.log"  # llama-bench's stderr, for when it fails
    rpc_bench.run_model(run, model, sweep, endpoints, binary=native.require("llama-bench"), log_path=log, on_row=on_row)


def _serving_plan(concurrency: str | None, n_prompt: str | None, n_gen: str | None, repetitions: int | None, endpoint: Endpoint):
    from llmctl.bench.measure import parse_sweep
    from llmctl.bench.serving import ServingPlan

    return ServingPlan(
        concurrency=parse_sweep(concurrency or "1,4,8", "--concurrency", minimum=1),
        n_prompt=parse_sweep(n_prompt or "128", "--n-prompt", minimum=1),
        n_gen=parse_sweep(n_gen or "64", "--n-gen", minimum=1),
        repetitions=repetitions or 3,
        endpoint=endpoint,
    )


def _bench_serving(home: Path, names: list[str], plan, url: str | None, serve_args: list[str], fmt: str, chart: bool, chart_file: Path | None) -> None:
    """bench --serve: measure, save, render; then the failures, if any, as the exit status."""
    from llmctl.bench import report as benchreport
    from llmctl.bench import run as benchrun
    from llmctl.bench import serving

    run = benchrun.new_run(get_hardware(get_settings()))
    if url is None:  # a fresh server resolves names from this store: unknown ones fail now, before it starts
        names = [m.label for m in _models(names, run)] if names else []
    failure: LlmctlError | None = None
    with _ServingProgress() as progress:
        try:
            serving.bench_serving(run, names, plan, url=url, serve_args=serve_args, on_row=progress.row, on_step=progress.step)
        except KeyboardInterrupt:
            run.interrupted = True
        except LlmctlError as exc:
            failure = exc  # raised after the levels measured before it are shown and saved
    if any(s.avg_ts for s in run.serving):
        output.info(f"saved as run {run.run_id} ({benchrun.save_run(home, run)})")
    if run.serving:
        _render(run, fmt)
        if chart:
            output.info(benchreport.bar_chart(benchreport.chart_pairs(run)), multiline=True)
        if chart_file:
            chart_file.write_text(benchreport.svg_chart(benchreport.chart_pairs(run), f"llmctl bench --serve {run.run_id}"), encoding="utf-8")
    if failure is not None:
        raise failure
    if run.interrupted:
        raise benchrun.BenchInterrupted("interrupted", hint="the results above are those measured before Ctrl-C" if run.serving else None)
    failed = [s for s in run.serving if not s.ok]
    if failed:
        lost = sum(s.failed for s in run.serving)
        raise LlmctlError(
            f"{lost} of {sum(s.requests for s in run.serving)} requests failed, in {len(failed)} of {len(run.serving)} levels "
            f"(first: {failed[0].test} × {failed[0].concurrency}: {failed[0].errors[0]})",
            hint="the figures leave the failed requests out; the server's log says why they failed",
        )
    if run.failed_models:
        _some_models_failed(run, len(names))


class _ServingProgress:
    """bench --serve's progress on stderr: a spinner naming the level on a terminal, and a line per level."""

    def __init__(self) -> None:
        self.spinner: Any = None

    def __enter__(self) -> _ServingProgress:
        if output.interactive_stderr():
            self.spinner = output._make_console(stderr=True).status("starting")
            self.spinner.__enter__()
        return self

    def step(self, text: str) -> None:
        if self.spinner is not None:
            self.spinner.update(text)

    def row(self, row) -> None:
        from llmctl.bench.report import _ms

        rate = f"{row.avg_ts:.2f} t/s total" if row.avg_ts is not None else "no tokens"
        line = f"{row.model} {row.test} × {row.concurrency}: {rate}, TTFT p50 {_ms(row.ttft_p50_s)}"
        line = line if row.ok else f"{line}; {row.status}"
        if self.spinner is not None:  # through the spinner's console, so the line lands above it
            from rich.text import Text

            self.spinner.console.print(Text(output.safe(line)))
        else:
            output.info(line)

    def __exit__(self, *exc: object) -> None:
        if self.spinner is not None:
            self.spinner.__exit__(*exc)


def _some_models_failed(run: benchrun.BenchRun, asked: int) -> None:
    """Exit 1 naming the models that measured nothing; the others' results are already out and saved."""
    failed = run.failed_models
    raise LlmctlError(
        f"{len(failed)} of {asked} models failed: {_reasons(failed)}; the others' results are shown and saved as run {run.run_id}",
        hint=failed[0].get("hint") or LOAD_HINT,
    )


def _reasons(failed: list[dict]) -> str:
    return "; ".join(f"{f['model']} ({f['reason']})" for f in failed)


def _sweep(args: dict, hw) -> benchrun.Sweep:
    from llmctl.bench import run as benchrun
    from llmctl.bench.measure import parse_flash_attn, parse_pairs, parse_sweep
    from llmctl.commands.fit_cmd import _cache_type

    for name, flag in (("cache_type_k", "--cache-type-k"), ("cache_type_v", "--cache-type-v")):
        for value in args[name].split(","):
            _cache_type(value.strip(), flag)
    gpu_layers: list[int | None] = [None]  # None: the plan's choice
    if args["gpu_layers"]:
        gpu_layers = [*parse_sweep(args["gpu_layers"], "--gpu-layers")]
    return benchrun.Sweep(
        threads=parse_sweep(args["threads"], "--threads", minimum=1) if args["threads"] else [hw.cpu.physical_cores],
        gpu_layers=gpu_layers,
        batch=parse_sweep(args["batch_size"], "--batch-size", minimum=1),
        ubatch=parse_sweep(args["ubatch_size"], "--ubatch-size", minimum=1),
        flash_attn=parse_flash_attn(args["flash_attn"], "--flash-attn"),
        type_k=[v.strip().lower() for v in args["cache_type_k"].split(",")],
        type_v=[v.strip().lower() for v in args["cache_type_v"].split(",")],
        n_prompt=parse_sweep(args["n_prompt"], "--n-prompt"),
        n_gen=parse_sweep(args["n_gen"], "--n-gen"),
        depth=parse_sweep(args["depth"], "--depth"),
        prompt_gen=parse_pairs(args["prompt_gen"], "--prompt-gen") if args["prompt_gen"] else [],
        repetitions=args["repetitions"],
    )


def _models(names: list[str], run: benchrun.BenchRun) -> list[benchrun.BenchModel]:
    """Resolve every model; with several, one that fails is reported and the others still run
    (the command then exits 1, naming it)."""
    from llmctl.bench import run as benchrun

    store = open_store()
    found = []
    for name in names:
        try:
            located = locate(store, name)
            found.append(benchrun.BenchModel(located.name, located.paths, located.info))
        except LlmctlError as exc:
            if len(names) == 1:
                raise
            output.warn(f"{name}: {exc.message}; benchmarking the others")
            run.fail_model(name, exc.message, exc.hint)
    if not found:
        raise UsageError(f"none of the models could be benchmarked: {_reasons(run.failed_models)}", hint=run.failed_models[0]["hint"])
    return found


class _Progress:
    """Progress on stderr: on a terminal, the results table filling in live above a progress bar;
    otherwise one plain line per result."""

    def __init__(self, total: int, run: benchrun.BenchRun) -> None:
        self.total = total
        self.run = run
        self.live: Any = None  # rich.live.Live on a terminal

    def __enter__(self) -> _Progress:
        if output.interactive_stderr():
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
            self.task = self.bar.add_task("benchmarking", total=self.total)
            self.live = Live(self._view(), console=output._make_console(stderr=True), transient=True, refresh_per_second=4)
            self.live.__enter__()
        return self

    def _view(self):
        from rich import box
        from rich.console import Group
        from rich.table import Table

        from llmctl.bench import report as benchreport

        columns, rows = benchreport.table_rows(self.run)
        table = Table(box=box.SIMPLE_HEAD)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(output.safe(cell) for cell in row))
        return Group(table, self.bar)

    def row(self, row: benchrun.Row) -> None:
        from llmctl.bench import report as benchreport

        if self.live is not None:
            self.bar.update(self.task, advance=1, description=row.test)
            self.live.update(self._view())
            return
        line = f"{row.model} t{row.n_threads} ngl{row.n_gpu_layers} fa{int(row.flash_attn)} {row.test}: {benchreport.ts_cell(row)}" + (
            f" t/s, {row.roofline_pct:.0f}% of the bandwidth bound" if row.roofline_pct is not None else (" t/s" if row.ok else "")
        )
        output.info(line)

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)


def _render(run: benchrun.BenchRun, fmt: str, *, extras: bool = True) -> None:
    from llmctl.bench import report as benchreport

    if fmt == "table" and run.serving and not run.rows:
        columns, cells = benchreport.serving_table_rows(run)
        output.emit_table(columns, cells, right_align=benchreport.SERVING_RIGHT)
        for line in benchreport.serving_summary(run):
            output.info(line)
        for level in run.serving:
            if not level.ok:
                output.warn(f"{level.model} {level.test} × {level.concurrency}: {'; '.join(level.errors)}")
    elif fmt == "md":
        output.emit_text(benchreport.to_markdown(run))
    elif fmt == "csv":
        sys.stdout.write(benchreport.to_csv(run))
    elif fmt == "json":
        output.emit_text(benchreport.to_json(run))
    elif fmt == "jsonl":
        sys.stdout.write(benchreport.to_jsonl(run))
    else:
        columns, rows = benchreport.table_rows(run)
        output.emit_table(columns, rows, right_align=("size", "params", "threads", "t/s", "% of bw bound"))
        if extras and run.extras:
            output.emit_table(
                ["model", "load cold", "load warm", "TTFT (run path)", "t/s (run path)", "peak RSS", "status"],
                [
                    [
                        e.model,
                        benchreport._s(e.load_cold_s),
                        benchreport._s(e.load_warm_s),
                        benchreport._s(e.ttft_s),
                        e.e2e_tokens_per_second or "-",
                        output.human_bytes(e.peak_rss_bytes) if e.peak_rss_bytes else "-",
                        e.status,
                    ]
                    for e in run.extras
                ],
            )


def _history(home: Path, fmt: str = "table") -> None:
    from llmctl.bench import run as benchrun

    runs = benchrun.list_runs(home)
    if fmt in ("json", "jsonl"):
        docs = [{"run_id": r.run_id, "created": r.created, "models": sorted(r.models), "tests": len(r.rows), "serving": len(r.serving),
                 "interrupted": r.interrupted, "cpu_info": r.fingerprint.get("cpu_info")} for r in runs]  # fmt: skip
        output.emit_json({"runs": docs}) if fmt == "json" else output.emit_text("".join(json.dumps(d) + "\n" for d in docs) or "\n")
        return
    if not runs:
        output.info("No benchmark runs yet.")
        return
    output.emit_table(
        ["RUN", "DATE", "MODELS", "TESTS", "CPU"],
        [[r.run_id, r.created, ", ".join(sorted(r.models)), _tests_cell(r), r.fingerprint.get("cpu_info", "-")] for r in runs],
    )


def _tests_cell(run: benchrun.BenchRun) -> str:
    """How many tests a run holds: in-process ones, or a serving benchmark's levels."""
    return str(len(run.rows)) if run.rows or not run.serving else f"{len(run.serving)} serving"


def _compare(home: Path, ids: tuple[str, str], fmt: str = "table") -> None:
    from llmctl.bench import report as benchreport
    from llmctl.bench import run as benchrun

    a, b = (benchrun.load_run(home, run_id) for run_id in ids)
    pairs = benchrun.compare(a, b)
    if not pairs and (serving_pairs := benchrun.compare_serving(a, b)):
        _compare_serving(a, b, serving_pairs, fmt)
        return
    if not pairs:
        raise UsageError(f"runs {a.run_id} and {b.run_id} have no test in common", hint="compare runs of the same model and settings")
    _emit_comparison(
        fmt,
        {
            "json": lambda: benchreport.compare_json(a, b, pairs),
            "jsonl": lambda: benchreport.compare_jsonl(a, b, pairs),
            "csv": lambda: benchreport.compare_csv(a, b, pairs),
            "md": lambda: benchreport.compare_markdown(a, b, pairs),
        },
        lambda: benchreport.compare_table(a, b, pairs),
        lambda columns: ("threads", columns[-3], columns[-2], "ratio"),
        lambda: benchreport.compare_chart_pairs(a, b, pairs),
    )


def _compare_serving(a: benchrun.BenchRun, b: benchrun.BenchRun, pairs: list, fmt: str) -> None:
    """Two serving benchmarks, level by level (same model name, API, load): B's aggregate rate ÷ A's."""
    from llmctl.bench import report as benchreport

    _emit_comparison(
        fmt,
        {
            "json": lambda: benchreport.serving_compare_json(a, b, pairs),
            "jsonl": lambda: "".join(json.dumps(r) + "\n" for r in benchreport.serving_compare_records(a, b, pairs)),
            "csv": lambda: benchreport.serving_compare_csv(a, b, pairs),
            "md": lambda: benchreport.serving_compare_markdown(a, b, pairs),
        },
        lambda: benchreport.serving_compare_table(a, b, pairs),
        lambda columns: tuple(columns[2:]),
        lambda: benchreport.serving_compare_chart_pairs(pairs),
    )


def _emit_comparison(fmt: str, texts: dict[str, Callable[[], str]], table: Callable[[], tuple[list[str], list[list[str]]]],
                     right_align: Callable[[list[str]], tuple[str, ...]], chart: Callable[[], list[tuple[str, float]]]) -> None:  # fmt: skip
    """A comparison in ``fmt``: a document (json, md) or lines (jsonl, csv) on stdout, else the table and its chart."""
    from llmctl.bench import report as benchreport

    if fmt in ("json", "md"):
        output.emit_text(texts[fmt]())
    elif fmt in ("jsonl", "csv"):
        sys.stdout.write(texts[fmt]())
    else:
        columns, rows = table()
        output.emit_table(columns, rows, right_align=right_align(columns))
        output.info(benchreport.bar_chart(chart()), multiline=True)


def _tune(home: Path, name: str, hw) -> None:
    from llmctl.bench import run as benchrun
    from llmctl.bench import tune
    from llmctl.plan.tuned import describe_tuned, save_tuned

    located = locate(open_store(), name)
    model = benchrun.BenchModel(located.name, located.paths, located.info)
    with output.status(f"Tuning {located.name}…"):
        profile = tune.tune(model, hw, on_step=lambda text: output.info(text))
    save_tuned(home, _machine_key(), located.paths, profile)
    output.info(f"Saved for this machine: {describe_tuned(profile)}. run and chat use it.")
