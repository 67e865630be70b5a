"""Benchmark results as text: llama-bench's markdown, CSV, JSON, JSONL; bar charts (terminal and SVG).

Field names and types follow llama-bench's JSON/CSV output where they exist,
so tools that read llama-bench's files read these (``flash_attn`` is a
number, 0 or 1, as there; CSV writes every boolean as 0 or 1, as llama-bench
does); llmctl's own fields are added after them (docs/json.md lists both).
A serving benchmark's levels (``bench --serve``) have their own records, tables and comparisons.

Text cells come from model files (``general.*`` metadata, file names) and are
untrusted. JSON and JSONL escape every non-ASCII character and so stay exact.
Markdown is read on terminals and in documents: control and bidi characters
are shown escaped and ``|`` cannot split a cell. CSV is data but is often
opened in a terminal or a spreadsheet: control and bidi characters are shown
escaped, and a text cell that a spreadsheet would run as a formula (one that
starts with ``=``, ``+``, ``-``, ``@``) gets a leading ``'``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from html import escape
from typing import Any, Callable

from llmctl.bench.run import BenchRun, Row, ServingRow
from llmctl.output import safe

LLAMA_BENCH_FIELDS = [
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
    "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers",
    "flash_attn", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
]  # fmt: skip
LLMCTL_FIELDS = ["test", "noisy", "bytes_per_token", "bandwidth_gbs", "roofline_pct", "status", "model", "run_id", "llmctl_version"]


def record(run: BenchRun, row: Row) -> dict[str, Any]:
    """One result as a flat record: llama-bench's fields, then llmctl's, then the samples."""
    data = asdict(row)
    fp = run.fingerprint
    out: dict[str, Any] = {}
    for name in LLAMA_BENCH_FIELDS:
        out[name] = fp.get(name) if name in ("build_commit", "build_number", "cpu_info", "gpu_info", "backends") else data.get(name)
    if row.devices:  # bench --rpc: the devices and backends llama-bench reported for this row, not this machine's
        out["gpu_info"], out["backends"] = row.devices, row.backend
    out["flash_attn"] = int(row.flash_attn)  # llama-bench's is a number: 0, 1 (or -1, auto, which llmctl resolves)
    for name in LLMCTL_FIELDS:
        out[name] = run.run_id if name == "run_id" else fp.get(name) if name == "llmctl_version" else data.get(name)
    out["samples_ns"] = data["samples_ns"]
    out["samples_ts"] = data["samples_ts"]
    return out


SERVING_FIELDS = [
    "kind", "model", "server", "fresh", "server_build", "server_slots", "endpoint", "test", "concurrency", "n_prompt", "n_gen",
    "repetitions", "ignore_eos", "test_time", "requests", "failed", "prompt_tokens", "completion_tokens", "avg_ts", "stddev_ts",
    "noisy", "request_ts", "ttft_p50_s", "ttft_p95_s", "status", "errors", "cpu_info", "run_id", "llmctl_version",
    "samples_ts", "samples_request_ts", "samples_ttft_s",
]  # fmt: skip


def serving_record(run: BenchRun, row: ServingRow) -> dict[str, Any]:
    """One level of a serving benchmark as a flat record (docs/json.md)."""
    data = asdict(row)
    data["kind"] = "serving"
    data["cpu_info"] = run.fingerprint.get("cpu_info")
    data["run_id"] = run.run_id
    data["llmctl_version"] = run.fingerprint.get("llmctl_version")
    return {name: data.get(name) for name in SERVING_FIELDS}


def to_json(run: BenchRun) -> str:
    doc = {
        "run_id": run.run_id,
        "created": run.created,
        "interrupted": run.interrupted,
        "fingerprint": run.fingerprint,
        "results": [record(run, r) for r in run.rows],
        "extras": [asdict(e) for e in run.extras],
        "failed_models": run.failed_models,
        "serving": [serving_record(run, s) for s in run.serving],
    }
    return json.dumps(doc, indent=2)


def to_jsonl(run: BenchRun) -> str:
    records = [record(run, r) for r in run.rows] + [serving_record(run, s) for s in run.serving]
    return "".join(json.dumps(r) + "\n" for r in records)


def to_csv(run: BenchRun) -> str:
    if run.serving and not run.rows:
        return serving_csv(run)
    fields = LLAMA_BENCH_FIELDS + LLMCTL_FIELDS + ["samples_ns", "samples_ts"]
    return _records_csv(fields, [_joined(record(run, row), ("samples_ns", "samples_ts")) for row in run.rows])


def serving_csv(run: BenchRun) -> str:
    lists = ("errors", "samples_ts", "samples_request_ts", "samples_ttft_s")
    return _records_csv(SERVING_FIELDS, [_joined(serving_record(run, row), lists) for row in run.serving])


def _joined(rec: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``rec`` with its list fields ``names`` as ``;``-joined text (a CSV cell each)."""
    return {**rec, **{name: ";".join(str(v) for v in rec[name]) for name in names}}


def _records_csv(fields: list[str], records: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({key: csv_cell(value) for key, value in rec.items()})
    return buffer.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@")


def csv_cell(value: Any) -> Any:
    """A text cell made harmless for terminals and spreadsheets; booleans as 0 and 1, as llama-bench writes
    them; numbers and other values pass as they are."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, str):
        return value
    text = safe(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def md_cell(text: str) -> str:
    """A Markdown table cell: control and bidi characters escaped, ``|`` unable to end the cell."""
    return safe(text).replace("|", "\\|")


def human_size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.2f} MiB"


def human_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def ts_cell(row: Row) -> str:
    if not row.ok:
        return row.status
    cell = f"{row.avg_ts:.2f} ± {row.stddev_ts:.2f}"
    return cell + " (noisy)" if row.noisy else cell


def varying(rows: list[Row]) -> list[str]:
    """Parameters that differ between rows: shown as columns, as llama-bench does for swept ones."""
    names = ["n_gpu_layers", "n_batch", "n_ubatch", "flash_attn", "type_k", "type_v"]
    return [n for n in names if len({getattr(r, n) for r in rows}) > 1]


def param_cell(value: Any) -> str:
    """A swept parameter in a table: flash attention as llama-bench shows it, 0 or 1."""
    return str(int(value)) if isinstance(value, bool) else str(value)


def table_rows(run: BenchRun) -> tuple[list[str], list[list[str]]]:
    extra_cols = varying(run.rows)
    with_devices = any(r.devices for r in run.rows)
    columns = ["model", "size", "params", "backend", *(["devices"] if with_devices else []), "threads", *extra_cols, "test", "t/s", "% of bw bound"]
    rows = []
    for r in run.rows:
        rows.append(
            [
                r.model_type,
                human_size(r.model_size),
                human_params(r.model_n_params),
                r.backend,
                *([r.devices or "-"] if with_devices else []),
                str(r.n_threads),
                *[param_cell(getattr(r, c)) for c in extra_cols],
                r.test,
                ts_cell(r),
                f"{r.roofline_pct:.0f}%" if r.roofline_pct is not None else "",
            ]
        )
    return columns, rows


SERVING_RIGHT = ("clients", "prompt", "generated", "t/s total", "t/s per client", "TTFT p50", "TTFT p95", "failed")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _tokens(mean: float | None) -> str:
    return "-" if mean is None else f"{mean:g}"


def serving_table_rows(run: BenchRun) -> tuple[list[str], list[list[str]]]:
    """The serving levels as a table: the load, the aggregate and per-client rates, TTFT, failures."""
    multi_server = len({s.server for s in run.serving}) > 1
    columns = ["model", *(["server"] if multi_server else []), "test", "clients", "prompt", "generated", *SERVING_RIGHT[3:]]
    rows = []
    for s in run.serving:
        total = "-" if s.avg_ts is None else f"{s.avg_ts:.2f} ± {s.stddev_ts or 0:.2f}" + (" (noisy)" if s.noisy else "")
        rows.append(
            [
                s.model,
                *([s.server] if multi_server else []),
                s.test,
                str(s.concurrency),
                _tokens(s.prompt_tokens),
                _tokens(s.completion_tokens),
                total,
                "-" if s.request_ts is None else f"{s.request_ts:.2f}",
                _ms(s.ttft_p50_s),
                _ms(s.ttft_p95_s),
                f"{s.failed}/{s.requests}",
            ]
        )
    return columns, rows


def serving_summary(run: BenchRun) -> list[str]:
    """A line per server: where, which API, what it said of itself."""
    lines = []
    for server in dict.fromkeys(s.server for s in run.serving):
        first = next(s for s in run.serving if s.server == server)
        about = [f"/v1/{'chat/' if first.endpoint == 'chat' else ''}completions", f"{first.repetitions} repetitions per level"]
        if first.fresh:
            about.insert(0, "a fresh llmctl serve")
        if first.server_build:
            about.append(f"build {first.server_build}")
        if first.server_slots:
            about.append(f"{first.server_slots} slots")
        if not first.ignore_eos:
            about.append("ignore_eos refused: replies may end early")
        lines.append(f"{server}: " + ", ".join(about))
    return lines


def markdown_table(columns: list[str], rows: list[list[str]], right: Callable[[str], bool]) -> str:
    """A markdown table, its cells escaped; ``right(column)`` says which columns align right."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---:" if right(c) else "---" for c in columns) + " |"]
    lines += ["| " + " | ".join(md_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def serving_markdown(run: BenchRun) -> str:
    columns, rows = serving_table_rows(run)
    text = markdown_table(columns, rows, lambda c: c in SERVING_RIGHT) + "\n" + "".join(f"{md_cell(line)}\n" for line in serving_summary(run))
    for s in run.serving:
        if not s.ok:
            text += f"\n{md_cell(s.model)} {md_cell(s.test)} × {s.concurrency}: {md_cell(s.status)}"
    return text if text.endswith("\n") else text + "\n"


def to_markdown(run: BenchRun) -> str:
    if run.serving and not run.rows:
        return serving_markdown(run)
    columns, rows = table_rows(run)
    right = {"size", "params", "threads", "t/s", "% of bw bound"}
    text = markdown_table(columns, rows, lambda c: c in right)
    extras = [e for e in run.extras if e.status == "ok"]
    if extras:
        text += "\n| model | load cold | load warm | TTFT (run path) | generation (run path) | peak RSS |\n|---|---:|---:|---:|---:|---:|\n"
        for e in extras:
            text += (
                f"| {md_cell(e.model)} | {_s(e.load_cold_s)} | {_s(e.load_warm_s)} | {_s(e.ttft_s)} | "
                f"{e.e2e_tokens_per_second or '-'} t/s | {human_size(e.peak_rss_bytes) if e.peak_rss_bytes else '-'} |\n"
            )
    bw = run.fingerprint.get("bandwidth_gbs")
    if bw:
        text += f"\nMemory bandwidth (measured, one core reading): {bw} GB/s. build: {md_cell(str(run.fingerprint.get('build_commit')))}\n"
    return text


# --- comparing two runs -------------------------------------------------------------------

COMPARE_FIELDS = ["model", "model_type", "test", "n_threads", "n_gpu_layers", "n_batch", "n_ubatch", "flash_attn", "type_k",
                  "type_v", "avg_ts_a", "stddev_ts_a", "avg_ts_b", "stddev_ts_b", "ratio", "run_a", "run_b"]  # fmt: skip


def _rates(x: Row | ServingRow, y: Row | ServingRow, ratio: float) -> dict[str, Any]:
    """Both runs' speeds and B's ÷ A's, as every comparison record has them."""
    return {"avg_ts_a": x.avg_ts, "stddev_ts_a": x.stddev_ts, "avg_ts_b": y.avg_ts, "stddev_ts_b": y.stddev_ts, "ratio": round(ratio, 4)}


def _compare_document(a: BenchRun, b: BenchRun, results: list[dict[str, Any]], serving: list[dict[str, Any]] | None = None) -> str:
    doc: dict[str, Any] = {
        "run_a": {"run_id": a.run_id, "created": a.created, "cpu_info": a.fingerprint.get("cpu_info")},
        "run_b": {"run_id": b.run_id, "created": b.created, "cpu_info": b.fingerprint.get("cpu_info")},
        "results": results,
    }
    if serving is not None:
        doc["serving"] = serving
    return json.dumps(doc, indent=2)


def _model_name(a: Row, b: Row) -> str:
    """The model's name as the runs knew it (what was typed, or the store's name)."""
    return a.model if a.model == b.model else f"{a.model} → {b.model}"


def compare_records(a: BenchRun, b: BenchRun, pairs: list[tuple[Row, Row, float]]) -> list[dict[str, Any]]:
    """One record per test measured in both runs: the configuration, both speeds, B's ÷ A's."""
    return [
        {
            "model": _model_name(x, y),
            "model_type": x.model_type,
            "test": x.test,
            "n_threads": x.n_threads,
            "n_gpu_layers": x.n_gpu_layers,
            "n_batch": x.n_batch,
            "n_ubatch": x.n_ubatch,
            "flash_attn": int(x.flash_attn),
            "type_k": x.type_k,
            "type_v": x.type_v,
            **_rates(x, y, ratio),
            "run_a": a.run_id,
            "run_b": b.run_id,
        }
        for x, y, ratio in pairs
    ]


def compare_json(a: BenchRun, b: BenchRun, pairs: list[tuple[Row, Row, float]]) -> str:
    return _compare_document(a, b, compare_records(a, b, pairs))


def compare_jsonl(a: BenchRun, b: BenchRun, pairs: list[tuple[Row, Row, float]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in compare_records(a, b, pairs))


def compare_csv(a: BenchRun, b: BenchRun, pairs: list[tuple[Row, Row, float]]) -> str:
    return _records_csv(COMPARE_FIELDS, compare_records(a, b, pairs))


def compare_table(a: BenchRun, b: BenchRun, pairs: list[tuple[Row, Row, float]]) -> tuple[list[str], list[list[str]]]:
    """The terminal's and markdown's table: model names, the swept parameters, both speeds, the ratio."""
    extra_cols = varying([x for x, _, _ in pairs])
    columns = ["model", "test", "threads", *extra_cols, f"{a.run_id} t/s", f"{b.run_id} t/s", "ratio"]
    rows = [
        [
            _model_name(x, y),
            x.test,
            str(x.n_threads),
            *[param_cell(getattr(x, c)) for c in extra_cols],
            f"{x.avg_ts:.2f}",
            f"{y.avg_ts:.2f}",
            f"{ratio:.3f}",
        ]  # fmt: skip
        for x, y, ratio in pairs
    ]
    return columns, rows


def compare_chart_pairs(a: BenchRun, b: BenchRun, pairs: list[tuple[Row, Row, float]]) -> list[tuple[str, float]]:
    """B's speed as a percentage of A's, per test (and model, when the runs hold several)."""
    multi = len({x.model for x, _, _ in pairs}) > 1
    arrow = f"({a.run_id[-4:]}→{b.run_id[-4:]})"
    return [(" ".join([*([_model_name(x, y)] if multi else []), x.test, arrow]), ratio * 100) for x, y, ratio in pairs]


def compare_markdown(a: BenchRun, b: BenchRun, pairs: list[tuple[Row, Row, float]]) -> str:
    columns, rows = compare_table(a, b, pairs)
    return markdown_table(columns, rows, lambda c: c not in {"model", "test", "type_k", "type_v"})


SERVING_COMPARE_FIELDS = ["kind", "model", "endpoint", "test", "concurrency", "n_prompt", "n_gen", "avg_ts_a", "stddev_ts_a", "avg_ts_b",
                          "stddev_ts_b", "ratio", "ttft_p50_s_a", "ttft_p50_s_b", "request_ts_a", "request_ts_b", "server_a", "server_b",
                          "run_a", "run_b"]  # fmt: skip


def serving_compare_records(a: BenchRun, b: BenchRun, pairs: list[tuple[ServingRow, ServingRow, float]]) -> list[dict[str, Any]]:
    """One record per serving level measured in both runs: both aggregate rates, B's ÷ A's, both TTFT p50s."""
    return [
        {
            "kind": "serving",
            "model": x.model,
            "endpoint": x.endpoint,
            "test": x.test,
            "concurrency": x.concurrency,
            "n_prompt": x.n_prompt,
            "n_gen": x.n_gen,
            **_rates(x, y, ratio),
            "ttft_p50_s_a": x.ttft_p50_s,
            "ttft_p50_s_b": y.ttft_p50_s,
            "request_ts_a": x.request_ts,
            "request_ts_b": y.request_ts,
            "server_a": x.server,
            "server_b": y.server,
            "run_a": a.run_id,
            "run_b": b.run_id,
        }
        for x, y, ratio in pairs
    ]


def serving_compare_json(a: BenchRun, b: BenchRun, pairs: list[tuple[ServingRow, ServingRow, float]]) -> str:
    return _compare_document(a, b, [], serving_compare_records(a, b, pairs))


def serving_compare_table(a: BenchRun, b: BenchRun, pairs: list[tuple[ServingRow, ServingRow, float]]) -> tuple[list[str], list[list[str]]]:
    columns = ["model", "test", "clients", f"{a.run_id} t/s", f"{b.run_id} t/s", "ratio", "TTFT p50 A", "TTFT p50 B"]
    rows = [
        [x.model, x.test, str(x.concurrency), f"{x.avg_ts:.2f}", f"{y.avg_ts:.2f}", f"{ratio:.3f}", _ms(x.ttft_p50_s), _ms(y.ttft_p50_s)]
        for x, y, ratio in pairs
    ]
    return columns, rows


def serving_compare_markdown(a: BenchRun, b: BenchRun, pairs: list[tuple[ServingRow, ServingRow, float]]) -> str:
    columns, rows = serving_compare_table(a, b, pairs)
    return markdown_table(columns, rows, lambda c: c not in ("model", "test"))


def serving_compare_csv(a: BenchRun, b: BenchRun, pairs: list[tuple[ServingRow, ServingRow, float]]) -> str:
    return _records_csv(SERVING_COMPARE_FIELDS, serving_compare_records(a, b, pairs))


def serving_compare_chart_pairs(pairs: list[tuple[ServingRow, ServingRow, float]]) -> list[tuple[str, float]]:
    """B's aggregate rate as a percentage of A's, per level."""
    multi = len({x.model for x, _, _ in pairs}) > 1
    return [(" ".join([*([x.model] if multi else []), x.test, f"c{x.concurrency}"]), ratio * 100) for x, _, ratio in pairs]


def serving_chart_pairs(run: BenchRun) -> list[tuple[str, float]]:
    multi = len({s.model for s in run.serving}) > 1
    return [(" ".join([*([s.model] if multi else []), s.test, f"c{s.concurrency}"]), s.avg_ts) for s in run.serving if s.avg_ts]


def _s(value: float | None) -> str:
    return f"{value:.3f} s" if value is not None else "-"


def bar_chart(pairs: list[tuple[str, float]], width: int = 40) -> str:
    """Horizontal bars for the terminal: label, bar, value."""
    if not pairs:
        return ""
    top = max(v for _, v in pairs) or 1
    label_width = max(len(label) for label, _ in pairs)
    lines = []
    for label, value in pairs:
        filled = value / top * width
        bar = "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")
        lines.append(f"{label.ljust(label_width)}  {bar.ljust(width)}  {value:.1f}")
    return "\n".join(lines)


def chart_pairs(run: BenchRun) -> list[tuple[str, float]]:
    multi = len({r.model for r in run.rows}) > 1
    extra_cols = varying(run.rows)
    pairs = []
    for r in run.rows:
        if not (r.ok and r.avg_ts):
            continue
        label = " ".join([*([r.model] if multi else []), r.test, f"t{r.n_threads}", *[f"{c}={param_cell(getattr(r, c))}" for c in extra_cols]])
        pairs.append((label, r.avg_ts))
    return pairs + serving_chart_pairs(run)


def svg_chart(pairs: list[tuple[str, float]], title: str) -> str:
    """The same bars as an SVG image, for sharing."""
    bar_h, gap, left, width = 22, 8, 260, 420
    height = 40 + len(pairs) * (bar_h + gap)
    top = max((v for _, v in pairs), default=1) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(safe(title))}</text>',
    ]
    for i, (label, value) in enumerate(pairs):
        y = 34 + i * (bar_h + gap)
        w = max(int(value / top * width), 1)
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{escape(safe(label))}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w}" height="{bar_h}" fill="#4a7bd0"/>')
        parts.append(f'<text x="{left + w + 6}" y="{y + 15}">{value:.1f} t/s</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
