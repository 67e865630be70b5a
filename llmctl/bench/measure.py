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
        # One preallocated single-token batch, refilled each step: the loop's Python
        # cost stays far below a decode, so the figure is llama.cpp's.
        api, ctx = self.api, self.ctx
        one = (api.llama_token * 1)(self.bos if self.add_bos else self.rng.randrange(self.n_vocab))
        batch = api.llama_batch_get_one(one, 1)
        decode, synchronize, draw, n_vocab = api.llama_decode, api.llama_synchronize, self.rng.randrange, self.n_vocab
        for _ in range(n_gen):
            if decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            synchronize(ctx)
            one[0] = draw(n_vocab)


def measure(llm: Any, *, n_prompt: int = 0, n_gen: int = 0, n_depth: int = 0, repetitions: int = 5) -> Measurement:
    """One llama-bench test: ppN (n_gen 0), tgN (n_prompt 0) or ppN+tgM, optionally at a depth."""
    if repetitions < 1:
        raise ValueError("repetitions must be at least 1")
    runner = LowLevel(llm)
    name = test_name(n_prompt, n_gen, n_depth)
    # warm-up, as llama-bench does: a prompt run, and a one-token generation for tg tests
    runner.clear()
    if n_prompt:
        runner.prompt(n_prompt)
    if n_gen:
        runner.generate(1)
    result = Measurement(name)
    for _ in range(repetitions):
        runner.clear()
        if n_depth:
            runner.prompt(n_depth)  # the context already there: prefilled, not timed
        start = time.perf_counter_ns()
        if n_prompt:
            runner.prompt(n_prompt)
        if n_gen:
            runner.generate(n_gen)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        result.samples_ts.append((n_prompt + n_gen) / elapsed)
    return result


# --- sweeps ------------------------------------------------------------------------------

from llmctl.errors import UsageError  # noqa: E402


def test_name(n_prompt: int, n_gen: int, depth: int = 0) -> str:
    """llama-bench's name for a test: pp512, tg128, pp512+tg128, with " @ dN" at a depth."""
    name = "+".join(p for p in (f"pp{n_prompt}" if n_prompt else "", f"tg{n_gen}" if n_gen else "") if p)
    return f"{name} @ d{depth}" if depth else name


def parse_sweep(text: str, flag: str, *, minimum: int = 0) -> list[int]:
    """llama-bench's list syntax: ``1,2,4``, ranges ``1-8``, ``1-8+2`` (step), ``1-64*2`` (multiply)."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"{flag} {text!r}: empty value", hint="use a comma list like 1,2,4 or a range like 1-8")
        if "-" in part[1:]:
            values.extend(_range(part, flag))
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise UsageError(f"{flag} {text!r}: {part!r} is not a valid value", hint="use a comma list like 1,2,4") from None
    for value in values:
        if value < minimum:
            raise UsageError(f"{flag} {text!r}: {value} is below {minimum}")
    return list(dict.fromkeys(values))


def _range(part: str, flag: str) -> list[int]:
    import re

    match = re.fullmatch(r"(\d+)-(\d+)(?:([+*])(\d+))?", part)
    if not match:
        raise UsageError(f"{flag}: {part!r} is not a range", hint="ranges look like 1-8, 1-8+2 or 1-64*2")
    first, last = int(match.group(1)), int(match.group(2))
    op, step = match.group(3) or "+", int(match.group(4) or 1)
    if last < first or step < 1 or (op == "*" and step < 2) or (op == "*" and first < 1):
        raise UsageError(f"{flag}: {part!r} is an empty or endless range")
    out: list[int] = []
    value = first
    while value <= last and len(out) < 1000:
        out.append(value)
        value = value + step if op == "+" else value * step
    return out


AUTO = None  # flash attention "auto": llama.cpp decides when the context is made


def parse_flash_attn(text: str, flag: str = "--flash-attn") -> list[bool | None]:
    """llama-bench's ``-fa`` values: on/1, off/0, auto/-1 (``None``); a comma list sweeps them."""
    mapping: dict[str, bool | None] = {"1": True, "on": True, "true": True, "enabled": True,
                                       "0": False, "off": False, "false": False, "disabled": False,
                                       "-1": AUTO, "auto": AUTO}  # fmt: skip
    out: list[bool | None] = []
    for part in text.split(","):
        key = part.strip().lower()
        if key not in mapping:
            raise UsageError(f"{flag} {text!r}: {part.strip()!r} is not on, off or auto", hint="e.g. --flash-attn auto, or 0,1 to compare")
        out.append(mapping[key])
    return list(dict.fromkeys(out))


def resolve_flash_attn(requested: bool | None) -> bool:
    """What llama.cpp makes of a flash-attention setting, ``auto`` included.

    llama.cpp resolves ``auto`` when it creates the context: on, unless some
    layer's attention would run on a device other than its KV cache because
    that device has no flash-attention kernel for the model's head size. The
    CPU backend has one for every model, so on the CPU ``auto`` is always on;
    the GPU backends have them for the head sizes models use. llama-cpp-python
    takes only on or off and does not report llama.cpp's choice, so ``auto`` is
    resolved here as on: llama.cpp's choice on the CPU always, and on a GPU
    unless its backend lacks the kernel for the model's head size (there
    ``-fa 0`` measures what llama-bench would).
    """
    return True if requested is AUTO else bool(requested)


def parse_pairs(text: str, flag: str) -> list[tuple[int, int]]:
    """``--prompt-gen 512,128`` (one pair) or ``512,128;1024,256``."""
    pairs = []
    for chunk in text.split(";"):
        values = [parse_sweep(part, flag, minimum=1)[0] if part.strip() else -1 for part in chunk.split(",")]
        if len(values) != 2 or min(values) < 1:
            raise UsageError(f"{flag} {text!r}: needs PROMPT,GEN pairs", hint="e.g. --prompt-gen 512,128")
        pairs.append((values[0], values[1]))
    return pairs
