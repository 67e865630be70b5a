"""Real ggml-rpc-servers on loopback for the tests of the commands that take --rpc."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmctl.bench.serving import free_port
from llmctl.engine.rpc_worker import RpcWorker, WorkerSpec, start_worker


@contextmanager
def running_workers(binary: Path, count: int = 2) -> Iterator[list[RpcWorker]]:
    """``count`` ggml-rpc-servers, one thread each, on free loopback ports; stopped after."""
    workers: list[RpcWorker] = []
    try:
        for _ in range(count):
            workers.append(start_worker(WorkerSpec(port=free_port(), threads=1), binary=binary))
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def endpoints_of(workers: list[RpcWorker]) -> str:
    """The workers as --rpc takes them."""
    return ",".join(str(w.endpoint) for w in workers)
