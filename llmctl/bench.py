"""llama-bench's measurements, through llama-cpp-python's low-level API.

The method of llama.cpp's tools/llama-bench: random token ids (the first a BOS
when the vocabulary adds one); prompt processing decodes ``n_prompt`` tokens
in chunks of ``n_batch`` with one synchronise at the end; text generation
decodes one token at a time, synchronising after each. One warm-up run
precedes the timed repetitions, and every repetition starts from an empty KV
cache. Results are tokens per second per repetition; the report is their mean
and sample standard deviation. Tokenisation and sampling are not timed.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measurement:
    test: str  # "pp512", "tg128", "pp512+tg128"
    samples_ts: list[float] = field(default_factory=list)

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0

    @property
    def noisy(self) -> bool:
        """Coefficient of variation above 10%: the figure should not be trusted as is."""
        return self.avg_ts > 0 and self.stddev_ts / self.avg_ts > 0.10


class LowLevel:
    """Decoding straight through llama.cpp, bypassing sampling and detokenisation."""

    def __init__(self, llm: Any, seed: int = 42) -> None:
        import llama_cpp

        self.api = llama_cpp
        self.ctx = llm._ctx.ctx
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = llama_cpp.llama_vocab_bos(vocab)
        self.n_batch = llm.n_batch
        self.rng = random.Random(seed)

    def clear(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), False)

    def _decode(self, tokens: list[int]) -> None:
        array = (self.api.llama_token * len(tokens))(*tokens)
        if self.api.llama_decode(self.ctx, self.api.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")

    def prompt(self, n_prompt: int) -> None:
        tokens = [self.rng.randrange(self.n_vocab) for _ in range(n_prompt)]
        if self.add_bos and tokens:
            tokens[0] = self.bos
        for start in range(0, n_prompt, self.n_batch):
            self._decode(tokens[start : start + self.n_batch])
        self.api.llama_synchronize(self.ctx)

    def generate(self, n_gen: int) -> None:
        token = self.bos if self.add_bos else self.rng.randrange(self.n_vocab)
        for _ in range(n_gen):
            self._decode([token])
            self.api.llama_synchronize(self.ctx)
            token = self.rng.randrange(self.n_vocab)


def measure(llm: Any, *, n_prompt: int = 0, n_gen: int = 0, repetitions: int = 5) -> Measurement:
    """One llama-bench test: ppN (n_gen 0), tgN (n_prompt 0) or ppN+tgM."""
    runner = LowLevel(llm)
    name = "+".join(part for part in (f"pp{n_prompt}" if n_prompt else "", f"tg{n_gen}" if n_gen else "") if part)
    # warm-up: a prompt run and a one-token generation, as llama-bench does
    runner.clear()
    if n_prompt:
        runner.prompt(n_prompt)
    runner.generate(1)
    result = Measurement(name)
    for _ in range(repetitions):
        runner.clear()
        start = time.perf_counter_ns()
        if n_prompt:
            runner.prompt(n_prompt)
        if n_gen:
            runner.generate(n_gen)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        result.samples_ts.append((n_prompt + n_gen) / elapsed)
    return result
