"""Shared helpers for the benchmark scripts: timing and the results table."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support and tools


@dataclass
class Row:
    name: str
    value: float  # what llmctl measured
    unit: str
    reference: float | None  # the number it is compared with
    reference_name: str
    target: str  # the acceptance target, in words
    ok: bool | None  # None: informational
    paired_ratio: float | None = None  # a ratio measured pairwise (median of per-round ratios), shown instead of value ÷ reference

    @property
    def ratio(self) -> str:
        if self.paired_ratio is not None:
            return f"{self.paired_ratio:.3f}"
        if not self.reference:
            return "-"
        return f"{self.value / self.reference:.3f}"


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def wall_of_command(argv: list[str], env: dict[str, str], repeat: int = 10, warmup: int = 1) -> float:
    def once() -> None:
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return median_seconds(once, repeat, warmup)


def print_table(rows: list[Row]) -> None:
    header = ["benchmark", "llmctl", "reference", "ratio", "target", "result"]
    lines = [header]
    for r in rows:
        ref = "-" if r.reference is None else f"{r.reference:.4g} {r.unit} ({r.reference_name})"
        verdict = "info" if r.ok is None else ("PASS" if r.ok else "FAIL")
        lines.append([r.name, f"{r.value:.4g} {r.unit}", ref, r.ratio, r.target, verdict])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(out))
