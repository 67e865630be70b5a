"""What run and chat share: turning flags into sampling settings and a plan override, and the timing summary."""

from __future__ import annotations

from llmctl import output
from llmctl.engine import SamplingSettings, Timings
from llmctl.fit import Overrides


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
    settings = SamplingSettings()
    given = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "repeat_penalty": repeat_penalty,
        "seed": seed,
        "max_tokens": max_tokens,
    }
    for key, value in given.items():
        if value is not None:
            setattr(settings, key, value)
    settings.stop = list(stop or [])
    return settings.validate()


def overrides_from_flags(ctx: int | None, gpu_layers: int | None, threads: int | None) -> Overrides:
    return Overrides(n_ctx=ctx, n_gpu_layers=gpu_layers, threads=threads)


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
