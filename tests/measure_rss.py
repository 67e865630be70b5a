"""Measure what loading a model costs the process, the way llmctl's estimate defines it.

``python measure_rss.py MODEL N_CTX`` prints JSON: the resident-memory growth
from before the load to after a 512-token prompt batch and 4 generated tokens,
with llama-cpp-python's defaults otherwise (mmap, f16 KV cache, no flash
attention, n_batch = n_ubatch = 512). Run in its own process so nothing else
shares the measurement.
"""

from __future__ import annotations

import json
import random
import sys

import psutil


def main() -> None:
    import llama_cpp

    path, n_ctx = sys.argv[1], int(sys.argv[2])
    process = psutil.Process()
    before = process.memory_info().rss
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=2, verbose=False)
    after_load = process.memory_info().rss
    rng = random.Random(0)
    llm.eval([rng.randrange(100, llm.n_vocab()) for _ in range(512)])
    for _ in range(4):
        llm.eval([llm.sample(temp=0.0)])
    after = process.memory_info().rss
    print(json.dumps({"n_ctx": n_ctx, "load_growth": after_load - before, "rss_growth": after - before}))


if __name__ == "__main__":
    main()
