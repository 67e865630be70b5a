"""`make bench`: run every benchmark and print one table with ratios against its reference."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fit  # noqa: E402
import bench_foundation  # noqa: E402
import bench_generation  # noqa: E402
import bench_hub  # noqa: E402
import bench_llama_bench  # noqa: E402
import bench_rpc  # noqa: E402
import bench_serve  # noqa: E402
from common import print_table  # noqa: E402


def _precompile() -> None:
    """Measure llmctl as installed: a wheel install ships compiled bytecode.

    An editable install compiles on first import and caches the result, unless
    PYTHONDONTWRITEBYTECODE is set, when every start recompiles every module
    (about 0.13 s more per command on the 2-core machine). compileall writes
    the cache either way.
    """
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "llmctl"), quiet=1)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    _precompile()
    if "--compare-only" in sys.argv:
        rows = bench_llama_bench.run()
        print_table(rows)
        return 1 if any(r.ok is False for r in rows) else 0
    import os

    print(f"# llmctl benchmarks on {platform.node()}: {_cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    rows = bench_foundation.run() + bench_fit.run() + bench_hub.run() + bench_generation.run() + bench_serve.run() + bench_llama_bench.run() + bench_rpc.run()
    print_table(rows)
    failed = [r.name for r in rows if r.ok is False]
    if failed:
        print(f"\nmissed target: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
