"""``bench --rpc``: the same tests through native ``llama-bench --rpc``, as rows of llmctl's run.

llama-cpp-python cannot use llama.cpp's RPC backend, so a benchmark across workers is llama-bench's
own: llmctl hands it the sweep it would measure in-process (``-p/-n/-pg/-d/-r``, threads, batch
sizes, KV cache types, flash attention, GPU layers: every layer and the output layer on the
workers unless ``--gpu-layers`` says), reads its JSON lines as each test finishes, and keeps them as
``Row``s, so the table, ``--output`` formats, ``--history`` and ``--compare`` are ``bench``'s.
llama-bench names the devices it used in ``gpu_info`` (for RPC devices, their ``HOST:PORT``) and
its backends in ``backends`` (``RPC``, ``CPU,RPC`` …); they go into ``Row.devices`` and ``Row.backend``.

No roofline for these rows: the bandwidth that bounds them is the workers' and the network's.
Nothing here prints.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable

from llmctl.bench.measure import test_name
from llmctl.bench.run import BenchModel, BenchRun, Row, Sweep, _emit
from llmctl.engine.rpc import Endpoint, format_endpoints
from llmctl.engine.server_process import _die_with_parent

ERROR_TAIL = 20  # lines of llama-bench's stderr kept to say why it failed


def all_layers(model: BenchModel) -> int:
    """Every block and the output layer: what ``run --rpc`` puts on the workers by default."""
    return (model.info.layer_count or 0) + 1


def _csv(values: list[Any]) -> str:
    return ",".join(str(v) for v in values)


def _fa(value: bool | None) -> str:
    """``auto`` resolved as in-process `bench` resolves it (on), so the rows of both compare."""
    from llmctl.bench.measure import resolve_flash_attn

    return "on" if resolve_flash_attn(value) else "off"


def llama_bench_args(model: BenchModel, sweep: Sweep, endpoints: list[Endpoint]) -> list[str]:
    """llama-bench's arguments for ``sweep`` on ``model`` with its layers on ``endpoints``."""
    layers = [all_layers(model) if n is None else n for n in sweep.gpu_layers]
    args = ["-m", str(model.paths[0]), "--rpc", format_endpoints(endpoints), "-o", "jsonl"]
    args += ["-p", _csv(sweep.n_prompt), "-n", _csv(sweep.n_gen), "-d", _csv(sweep.depth), "-r", str(sweep.repetitions)]
    for p, g in sweep.prompt_gen:
        args += ["-pg", f"{p},{g}"]
    args += ["-t", _csv(sweep.threads), "-ngl", _csv(layers), "-b", _csv(sweep.batch), "-ub", _csv(sweep.ubatch)]
    args += ["-fa", _csv([_fa(v) for v in sweep.flash_attn]), "-ctk", _csv(sweep.type_k), "-ctv", _csv(sweep.type_v)]
    return args


def expected_tests(sweep: Sweep) -> int:
    """How many rows llama-bench writes for ``sweep`` (its tests × its parameter combinations)."""
    return len(sweep.tests()) * len(sweep.load_configs())


def row_from_record(model: BenchModel, record: dict[str, Any]) -> Row:
    """One of llama-bench's JSON records as a ``Row`` (its field names are llmctl's)."""
    p, g, d = int(record.get("n_prompt", 0)), int(record.get("n_gen", 0)), int(record.get("n_depth", 0))
    fa = record.get("flash_attn")
    samples_ts = [round(float(s), 3) for s in record.get("samples_ts", [])]
    return Row(
        model=model.label,
        model_filename=str(record.get("model_filename") or model.paths[0]),
        model_type=str(record.get("model_type", "")),
        model_size=int(record.get("model_size", 0)),
        model_n_params=int(record.get("model_n_params", 0)),
        backend=str(record.get("backends") or "RPC"),
        n_threads=int(record.get("n_threads", 0)),
        n_gpu_layers=int(record.get("n_gpu_layers", 0)),
        n_batch=int(record.get("n_batch", 0)),
        n_ubatch=int(record.get("n_ubatch", 0)),
        flash_attn=bool(fa) and fa != -1,  # -1: auto, which llama-bench does not resolve in its record
        type_k=str(record.get("type_k", "f16")),
        type_v=str(record.get("type_v", "f16")),
        n_prompt=p,
        n_gen=g,
        n_depth=d,
        test=test_name(p, g, d),
        test_time=str(record.get("test_time", "")),
        samples_ts=samples_ts,
        avg_ts=round(float(record["avg_ts"]), 3) if record.get("avg_ts") is not None else None,
        stddev_ts=round(float(record["stddev_ts"]), 3) if record.get("stddev_ts") is not None else None,
        avg_ns=int(record["avg_ns"]) if record.get("avg_ns") is not None else None,
        stddev_ns=int(record["stddev_ns"]) if record.get("stddev_ns") is not None else None,
        samples_ns=[int(s) for s in record.get("samples_ns", [])],
        devices=str(record.get("gpu_info") or "") or None,
    )


def run_model(
    run: BenchRun,
    model: BenchModel,
    sweep: Sweep,
    endpoints: list[Endpoint],
    *,
    binary: Path,
    log_path: Path | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> None:
    """Run llama-bench for one model and append its rows to ``run`` as each test finishes.

    A llama-bench that fails (a worker lost, a model it cannot load) leaves one failed row per test
    it did not finish, with the last thing it said."""
    command = [str(binary), *llama_bench_args(model, sweep, endpoints)]
    tail: deque[str] = deque(maxlen=ERROR_TAIL)
    log = log_path.open("w", encoding="utf-8", errors="replace") if log_path is not None else None
    done = 0
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            # Killed with llmctl (a SIGTERM or SIGKILL runs no cleanup here): a llama-bench left
            # running would hold every worker, since each serves one client at a time.
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only a prctl call, resolved in the parent
        )
        reader = threading.Thread(target=_drain, args=(process.stderr, tail, log), daemon=True)
        reader.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                _emit(run, row_from_record(model, record), on_row)
                done += 1
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        reader.join(timeout=5)
    finally:
        if log is not None:
            log.close()
    if code != 0 or done < expected_tests(sweep):
        why = _last_error(list(tail)) or (f"llama-bench exited with status {code}" if code else "llama-bench stopped early")
        _fail_rest(run, model, sweep, endpoints, done, why, on_row)


def _drain(stream: Any, tail: deque[str], log: Any) -> None:
    for line in stream:
        tail.append(line.rstrip())
        if log is not None:
            log.write(line)


def _last_error(lines: list[str]) -> str | None:
    """The line that says why: llama.cpp's error or abort line, else the last one."""
    for line in reversed(lines):
        lowered = line.lower()
        if "error" in lowered or "failed" in lowered or "abort" in lowered or "crashed" in lowered:
            return line.strip()
    return lines[-1].strip() if lines else None


def _fail_rest(run: BenchRun, model: BenchModel, sweep: Sweep, endpoints: list[Endpoint], done: int, why: str, on_row: Callable[[Row], None] | None) -> None:
    """A failed row for each test llama-bench did not report, in its order (configurations, then tests)."""
    combos = [(config, test) for config in sweep.load_configs() for test in sweep.tests()]
    for config, (p, g, d) in combos[done:]:
        row = Row(
            model=model.label,
            model_filename=str(model.paths[0]),
            model_type=f"{model.info.architecture} {model.info.size_label or ''} {model.info.quant}".replace("  ", " ").strip(),
            model_size=sum(path.stat().st_size for path in model.paths),
            model_n_params=model.info.parameter_count,
            backend="RPC",
            n_threads=config["threads"],
            n_gpu_layers=all_layers(model) if config["gpu_layers"] is None else config["gpu_layers"],
            n_batch=config["batch"],
            n_ubatch=config["ubatch"],
            flash_attn=bool(config["flash_attn"]),
            type_k=config["type_k"],
            type_v=config["type_v"],
            n_prompt=p,
            n_gen=g,
            n_depth=d,
            test=test_name(p, g, d),
            test_time="",
            status=f"failed: {why}",
            devices=format_endpoints(endpoints),
        )
        _emit(run, row, on_row)
