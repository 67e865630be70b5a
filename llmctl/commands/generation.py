"""What run and chat share: turning flags into sampling settings and a plan override, telling a load, the timing summary, ending a stopped reply's line."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from llmctl import output
from llmctl.engine.base import Timings
from llmctl.engine.runner import LoadFeedback
from llmctl.plan.fit import Overrides

if TYPE_CHECKING:
    from llmctl.engine.sampling import SamplingSettings


def sampling_from_flags(
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repeat_penalty: float | None,
    seed: int | None,
    max_tokens: int | None,
    stop: list[str] | None,
) -> SamplingSettings:
    from llmctl.engine.sampling import from_flags  # pydantic: only when a command samples

    return from_flags(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        seed=seed,
        max_tokens=max_tokens,
        stop=list(stop or []),
    )


def rpc_from_flag(value: str | None) -> list[str] | None:
    """``--rpc``'s workers, else ``LLMCTL_RPC``'s (None: generate in this process)."""
    from llmctl.engine.rpc import endpoints_from

    endpoints = endpoints_from(value)
    return [str(e) for e in endpoints] or None


def overrides_from_flags(ctx: int | None, gpu_layers: int | None, threads: int | None) -> Overrides:
    return Overrides(n_ctx=ctx, n_gpu_layers=gpu_layers, threads=threads)


def load_feedback() -> LoadFeedback:
    """A load told as run and chat tell it: each warning on stderr as it arises, a spinner while loading (on a terminal)."""
    return LoadFeedback(note=output.warn, progress=output.status)


def timing_summary(t: Timings) -> list[str]:
    """The lines `--verbose` prints, named as `ollama run --verbose` names them, plus TTFT."""

    def rate(value: float | None) -> str:
        return f"{value:.2f} tokens/s" if value else "-"

    return [
        f"total duration:       {t.total_s + t.load_s:.3f}s",
        f"load duration:        {t.load_s:.3f}s",
        f"prompt eval count:    {t.prompt_eval_tokens} token(s) of {t.prompt_tokens}",
        f"prompt eval duration: {t.prompt_eval_s:.3f}s",
        f"prompt eval rate:     {rate(t.prompt_tokens_per_second)}",
        f"eval count:           {t.generated_tokens} token(s)",
        f"eval duration:        {t.generation_s:.3f}s",
        f"eval rate:            {rate(t.generation_tokens_per_second)}",
        f"time to first token:  {t.ttft_s:.3f}s",
    ]


def print_summary(t: Timings) -> None:
    for line in timing_summary(t):
        output.info(line)


def end_partial_line(at_line_start: bool) -> None:
    """After a reply stopped mid-line (Ctrl-C), start a new line where the reader sees the reply.

    stdout on a terminal gets the newline; on a pipe or a file it keeps the model's
    exact text, so the newline goes to stderr only when both are the same file
    (``2>&1``), where the error message would otherwise join the text.
    """
    if at_line_start:
        return
    if output._is_tty(sys.stdout):
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif _same_file(sys.stdout, sys.stderr):
        sys.stderr.write("\n")
        sys.stderr.flush()


def _same_file(a: object, b: object) -> bool:
    try:
        first, second = os.fstat(a.fileno()), os.fstat(b.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
