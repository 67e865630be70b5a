"""The GPU check: what `serve` and `fit` do with an NVIDIA GPU, measured on one (run by hand where one is lent).

    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" \
    python3 benchmarks/gpu_check.py --tokenizer TOKENIZER.gguf --sdist SDIST.tar.gz --out DIR [--budget SECONDS]

1. `llmctl engine install` builds llama.cpp's tools with CUDA (timed).
2. Models with random weights are built from the demo model's tokenizer (tools/tokenizer_gguf.py writes
   it; tests/support/loadable_models.py builds the shapes, byte-identical to the ones built on the CPU
   machine) and imported.
3. For each case (a model, fully or partly offloaded): the plan `serve` makes (`plan_server`), the
   child started with exactly its flags, a 512-token prompt and 16 generated tokens, then the child's
   GPU memory as NVML reports it for that process, its RSS, the buffer sizes llama-server logs, and
   llama-fit-params's projection for the same flags. `fit --serve --json` for the same case.
4. `llmctl serve` ÷ the same llama-server started by hand at 1, 4 and 8 streaming clients, all layers on
   the GPU (benchmarks/bench_serve.py's method), and llama-bench's pp512/tg128 for reference.

Everything goes to DIR/summary.json as it is measured (a run cut short keeps what it had), with the
logs beside it. Steps are skipped, not half-run, when the budget is nearly spent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

EXTRA_SPECS = {
    # ~1.0B parameters, 2 GiB in F16: large enough that the weights dominate a GPU's memory figures
    "gpu-1b-f16": ("llama", 2048, 32, 8, 16, 5632, "F16", False),
}
# (label, model, GPU layers or None for the plan's, per-slot context or None, slots or None)
CASES = [
    ("1b full", "gpu-1b-f16", None, 8192, None),
    ("1b partial 8/17", "gpu-1b-f16", 8, 8192, 1),
    ("gqa-f16 full", "llama-gqa-f16", None, 4096, 1),
    ("qwen2-mha-q8 full", "qwen2-mha-q8", None, 4096, 2),
    ("qwen2-mha-q8 partial 4/9", "qwen2-mha-q8", 4, 4096, 1),
]
START = time.monotonic()
SUMMARY: dict[str, Any] = {}


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def save(out: Path, key: str, value: Any) -> None:
    SUMMARY[key] = value
    (out / "summary.json").write_text(json.dumps(SUMMARY, indent=1, default=str))
    print(f"[{time.monotonic() - START:6.1f}s] {key}: {json.dumps(value, default=str)[:600]}", flush=True)


def sh(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=max(timeout, 1), env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 127, "", f"{type(exc).__name__}: {exc}")


def llmctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return sh([sys.executable, "-m", "llmctl", *args], timeout)


def nvml_process_memory(pid: int) -> dict[str, Any]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"error": str(exc)}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        used = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"process_bytes": used.get(pid), "all_processes": used, "device_used_bytes": info.used, "device_total_bytes": info.total}
    finally:
        pynvml.nvmlShutdown()


BUFFER_LINE = re.compile(r"(\S+) (model buffer|KV buffer|compute buffer|RS buffer|output buffer|buffer) size\s*=\s*([\d.]+) MiB")


def buffers(log: str) -> list[tuple[str, str, float]]:
    return [(m.group(1), m.group(2), float(m.group(3))) for m in BUFFER_LINE.finditer(log)]


def fit_params_args(server_argv: list[str]) -> list[str]:
    """The flags of llama-server's command line that llama-fit-params shares (model, sizes, offload, KV)."""
    keep_value = {"-m", "-c", "-np", "-ngl", "-b", "-ub", "-ctk", "-ctv", "-fa", "-ts", "-t", "-tb"}
    keep_flag = {"--swa-full", "--kv-unified"}  # it takes no --no-kv-unified (split per slot is its default)
    out, i = [], 0
    while i < len(server_argv):
        arg = server_argv[i]
        if arg in keep_value and i + 1 < len(server_argv):
            out += [arg, server_argv[i + 1]]
            i += 2
            continue
        if arg in keep_flag:
            out.append(arg)
        i += 1
    return out


def generate(url: str, n_prompt: int, n_gen: int) -> dict[str, Any]:
    body = {"prompt": " hello" * n_prompt, "n_predict": n_gen, "ignore_eos": True, "temperature": 0, "cache_prompt": False}
    request = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read()).get("timings", {})


def case(out: Path, label: str, model: str, ngl: int | None, ctx: int | None, slots: int | None) -> dict[str, Any]:
    from bench_serve import _rss

    from llmctl.bench.serving import free_port
    from llmctl.commands import open_store
    from llmctl.engine import native
    from llmctl.engine.server_process import plan_server, server_args
    from llmctl.plan.fit import Overrides

    result: dict[str, Any] = {"model": model}
    fit_args = ["fit", model, "--serve", "--json", *(["--gpu-layers", str(ngl)] if ngl is not None else [])]
    fit_args += [*(["--ctx", str(ctx)] if ctx else []), *(["--parallel", str(slots)] if slots else [])]
    done = llmctl(*fit_args)
    result["fit_json"] = json.loads(done.stdout) if done.returncode == 0 else {"exit": done.returncode, "stderr": done.stderr[-800:]}
    planned = plan_server(open_store(), model, Overrides(n_ctx=ctx, n_gpu_layers=ngl, parallel=slots, serving=True))
    argv = server_args(planned.spec)
    result["plan_total_bytes"] = planned.memory
    result["server_args"] = argv
    fp = sh([str(native.require("llama-fit-params")), *fit_params_args(argv), "-lv", "4"], 120)
    result["fit_params_output"] = [
        line for line in (fp.stdout + fp.stderr).splitlines() if "memory_breakdown" in line or "projected" in line or "error" in line
    ]
    port = free_port()
    log_path = out / f"server-{re.sub(r'[^A-Za-z0-9]+', '-', label)}.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [str(native.require("llama-server")), *argv, "-lv", "4", "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        from bench_serve import _wait_healthy

        _wait_healthy(url, child)
        result["after_load"] = {"nvml": nvml_process_memory(child.pid), "rss": _rss(child.pid)}
        result["timings"] = generate(url, 512, 16)
        result["after_generation"] = {"nvml": nvml_process_memory(child.pid), "rss": _rss(child.pid)}
    finally:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
    text = log_path.read_text(errors="replace")
    result["buffers_mib"] = buffers(text)
    result["memory_breakdown"] = [line for line in text.splitlines() if "memory_breakdown" in line]
    lines = text.splitlines()
    log_path.write_text("\n".join(line for line in lines if "slot" not in line or "MiB" in line)[-400_000:])  # the load, not every token
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--sdist", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=560.0, help="seconds for the whole check")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmctl-gpu-check"))
    parser.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    parser.add_argument("--serve-model", default="gpu-1b-f16", help="the model of the serve ÷ llama-server rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", type=Path, help="LLMCTL_ENGINE_DIR (default: a fresh folder under --work)")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work
    home, engine = work / "home", a.engine or work / "engine"
    (engine / "sdist").mkdir(parents=True, exist_ok=True)
    if not (engine / "sdist" / a.sdist.name).exists():
        shutil.copy(a.sdist, engine / "sdist" / a.sdist.name)
    site = work / "site"
    if importlib.util.find_spec("llama_cpp") is None:
        # llama-cpp-python itself is not needed here (serve and fit drive the native tools), only the
        # version whose vendored llama.cpp the tools are built from: a dist-info naming it stands in.
        version = a.sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
        meta = site / f"llama_cpp_python-{version}.dist-info"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n")
        sys.path.append(str(site))
    os.environ.update(
        {
            "LLMCTL_HOME": str(home),
            "HF_HUB_CACHE": str(work / "hub"),
            "LLMCTL_ENGINE_DIR": str(engine),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", ""), str(site)]),
        }
    )
    save(a.out, "cmake_args", os.environ.get("CMAKE_ARGS", ""))
    smi = sh(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version", "--format=csv"], 30)
    save(a.out, "nvidia_smi", smi.stdout.strip())

    # 1. the tools, with CUDA
    started = time.monotonic()
    done = sh([sys.executable, "-m", "llmctl", "engine", "install"], min(left(a.budget) - 130, 480))
    save(a.out, "engine_install", {"exit": done.returncode, "seconds": round(time.monotonic() - started, 1), "stderr": done.stderr[-1500:]})
    for log in engine.glob("*/build.log"):
        (a.out / "build.log").write_text(log.read_text(errors="replace")[-200_000:])
    status = llmctl("engine", "status", "--json")
    save(a.out, "engine_status", status.stdout.strip() or status.stderr.strip())
    if status.returncode != 0:
        return 1
    hw = llmctl("hwinfo", "--json")
    save(a.out, "hwinfo", json.loads(hw.stdout) if hw.returncode == 0 else hw.stderr[-800:])

    # 2. models
    from tests.support import loadable_models

    loadable_models.SPECS.update(EXTRA_SPECS)
    models = work / "models"
    models.mkdir(exist_ok=True)
    for name in sorted({c[1] for c in CASES[: a.cases]} | {a.serve_model}):
        path = loadable_models.build(a.tokenizer, models, name, chat_template=loadable_models_template(a.tokenizer))
        imported = llmctl("import", str(path), "--name", name)
        save(a.out, f"model {name}", {"bytes": path.stat().st_size, "import_exit": imported.returncode, "stderr": imported.stderr[-300:]})

    # 3. plans against memory
    for label, model, ngl, ctx, slots in CASES[: a.cases]:
        if left(a.budget) < 60:
            save(a.out, f"case {label}", "skipped: budget")
            continue
        try:
            save(a.out, f"case {label}", case(a.out, label, model, ngl, ctx, slots))
        except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others
            save(a.out, f"case {label}", {"error": f"{type(exc).__name__}: {exc}"})

    # 4. serve ÷ llama-server by hand, all layers on the GPU; llama-bench for reference
    if left(a.budget) > 120:
        import bench_serve

        try:
            rows = bench_serve.serve_vs_hand(a.serve_model, dict(os.environ), rounds=a.rounds)
            save(a.out, "serve_vs_hand", [row.__dict__ for row in rows])
        except Exception as exc:  # noqa: BLE001
            save(a.out, "serve_vs_hand", {"error": f"{type(exc).__name__}: {exc}"})
    if left(a.budget) > 40:
        from llmctl.engine import native

        path = models / f"{a.serve_model}.gguf"
        done = sh([str(native.require("llama-bench")), "-m", str(path), "-ngl", "99", "-p", "512", "-n", "128", "-r", "3", "-o", "json"], left(a.budget) - 10)
        save(a.out, "llama_bench", json.loads(done.stdout) if done.returncode == 0 else done.stderr[-800:])
    save(a.out, "seconds", round(time.monotonic() - START, 1))
    return 0


def loadable_models_template(tokenizer: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(tokenizer).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None


if __name__ == "__main__":
    sys.exit(main())
