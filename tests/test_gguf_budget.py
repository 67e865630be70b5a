"""Valid but huge GGUF headers: the reader's counts, bytes, memory and time are bounded.

The files here break no rule of the format, only every plausible size (10 M
nested arrays, 4 M metadata keys, 3 M tensor infos, millions of tiny strings,
thousands of kept arrays, strings of a megabyte each). They are generated on
the fly (tests/gguf_factory.py, ``write_huge``) and each must end in the usual
one-line ``InvalidModelError`` naming the limit, within bounded time and
memory, in every command that reads a header, and over HTTP range reads too.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from llmctl import gguf
from llmctl.errors import InvalidModelError
from tests.support.gguf_factory import (
    T_STRING,
    T_UINT8,
    T_UINT32,
    RawGGUF,
    many_arrays,
    many_keys,
    nested_arrays,
    string_array,
    write_huge,
)
from tests.support.measure_rss import Run, run_llmctl

# Generous for a loaded 2-core machine: the reader itself takes well under a
# second; before these limits the same files took 14-60 s and 0.5-1 GB.
SECONDS_BOUND = 10.0
RSS_BOUND_MB = 300
BASE_KEYS, BASE_TENSORS = 6, 3  # what write_huge's base model (RawGGUF.minimal) has


def refusal(path: Path) -> str:
    """The problem InvalidModelError reports for ``path`` (fails if the file is accepted)."""
    with pytest.raises(InvalidModelError) as caught:
        gguf.read_model([path])
    assert str(path) in caught.value.message
    return caught.value.problem


# --- each limit, named in the error ---------------------------------------------


# name -> (write_huge arguments, a fragment of the error), each just past one limit.
LIMIT_CASES: dict[str, tuple[Any, str]] = {
    "metadata keys": (
        lambda: {"kvs": many_keys(gguf.MAX_METADATA_KEYS - BASE_KEYS + 1)},
        f"metadata keys (limit {gguf.MAX_METADATA_KEYS})",
    ),
    "tensors": (lambda: {"tensors": gguf.MAX_TENSORS - BASE_TENSORS + 1}, f"tensors (limit {gguf.MAX_TENSORS})"),
    "array length": (
        lambda: {"kvs": string_array(gguf.MAX_ARRAY_LENGTH + 1)},
        f"entries (limit {gguf.MAX_ARRAY_LENGTH})",
    ),
    "nested values": (
        lambda: {"kvs": nested_arrays(16, 4096)},
        f"more than {gguf.MAX_NESTED_VALUES} values inside arrays of arrays",
    ),
    "kept numbers": (lambda: {"kvs": many_arrays(400, 4096, T_UINT32)}, "bytes of memory (the limit)"),
    "kept strings": (lambda: {"kvs": many_arrays(300, 4096, T_STRING)}, "bytes of memory (the limit)"),
    "header bytes": (lambda: {"kvs": string_array(5000, 1 << 20)}, f"run past {gguf.MAX_HEADER_BYTES} bytes"),
}


@pytest.mark.parametrize("case", sorted(LIMIT_CASES))
def test_each_limit_is_refused_and_named(tmp_path: Path, case: str) -> None:
    make, fragment = LIMIT_CASES[case]
    assert fragment in refusal(write_huge(tmp_path / "huge.gguf", **make()))


def test_skipped_strings_are_counted_over_the_whole_header(tmp_path: Path, monkeypatch) -> None:
    # Two vocabulary-sized arrays, each within the per-array limit, too many together.
    monkeypatch.setattr(gguf, "MAX_SKIPPED_STRINGS", 10_000)
    a, b = string_array(6000, 3, key="x.a"), string_array(6000, 3, key="x.b")
    path = write_huge(tmp_path / "two.gguf", kvs=(2, [*a[1], *b[1]]))
    assert "more than 10000 strings in long arrays" in refusal(path)
    path = write_huge(tmp_path / "one.gguf", kvs=string_array(6000, 3, key="x.a"))
    assert gguf.read_model([path])[0][0].metadata["x.a"] == gguf.ArraySummary("string", 6000)


def test_headers_at_the_limits_are_read(tmp_path: Path) -> None:
    """Right at each count limit a file is still a model: the limits refuse only what is beyond them."""
    path = write_huge(tmp_path / "keys.gguf", kvs=many_keys(gguf.MAX_METADATA_KEYS - BASE_KEYS))
    assert len(gguf.read_model([path])[0][0].metadata) == gguf.MAX_METADATA_KEYS
    path = write_huge(tmp_path / "tensors.gguf", tensors=gguf.MAX_TENSORS - BASE_TENSORS)
    assert gguf.read_model([path])[1].tensor_count == gguf.MAX_TENSORS
    # 16 arrays of 4095 numbers: 16 + 16 * 4095 = 65,536 values inside arrays of arrays
    path = write_huge(tmp_path / "nested.gguf", kvs=nested_arrays(16, 4095))
    nested = gguf.read_model([path])[0][0].metadata["x.nested"]
    assert len(nested) == 16 and all(len(inner) == 4095 for inner in nested)


def test_long_arrays_of_arrays_are_summarised_not_kept(tmp_path: Path) -> None:
    path = write_huge(tmp_path / "nested.gguf", kvs=nested_arrays(5000))
    assert gguf.read_model([path])[0][0].metadata["x.nested"] == gguf.ArraySummary("array", 5000)


def test_the_parts_of_a_split_model_share_one_budget(make_gguf, monkeypatch) -> None:
    parts = gguf.split_parts(make_gguf("split.gguf", split_max_tensors=7))
    costs = []
    for part in parts:
        budget = gguf.HeaderBudget()
        with gguf.FileSource(part) as source:
            gguf.read_header(source, budget)
        costs.append(gguf.MAX_MATERIALISED_BYTES - budget.memory)
    assert len(parts) == 3 and max(costs) < sum(costs) - 1
    monkeypatch.setattr(gguf, "MAX_MATERIALISED_BYTES", sum(costs) - 1)  # each part alone fits
    for part in parts:
        with gguf.FileSource(part) as source:
            gguf.read_header(source)
    with pytest.raises(InvalidModelError, match="bytes of memory"):
        gguf.read_model(parts)


# --- memory: what is charged covers what is kept -------------------------------------

MEMORY_SHAPES: dict[str, Any] = {
    "many keys": lambda: {"kvs": many_keys(5000)},
    "many tensors": lambda: {"tensors": 5000},
    "kept number arrays": lambda: {"kvs": many_arrays(10, 4096, T_UINT32)},
    "kept byte arrays": lambda: {"kvs": many_arrays(10, 4096, T_UINT8)},
    "kept string arrays": lambda: {"kvs": many_arrays(10, 4096, T_STRING)},
    "nested arrays": lambda: {"kvs": nested_arrays(1000, 15)},
}


@pytest.mark.parametrize("shape", sorted(MEMORY_SHAPES))
def test_the_memory_budget_covers_what_a_header_really_keeps(tmp_path: Path, monkeypatch, shape: str) -> None:
    """Measured with tracemalloc: a budget a little under the real size refuses the file,
    and the charges are not wildly pessimistic either (3x the real size reads it)."""
    path = write_huge(tmp_path / "kept.gguf", **MEMORY_SHAPES[shape]())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with gguf.FileSource(path) as source:
            header = gguf.read_header(source)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert header.metadata  # kept alive until measured
    monkeypatch.setattr(gguf, "MAX_MATERIALISED_BYTES", int(kept * 0.95))
    with pytest.raises(InvalidModelError, match="bytes of memory"), gguf.FileSource(path) as source:
        gguf.read_header(source)
    monkeypatch.setattr(gguf, "MAX_MATERIALISED_BYTES", kept * 3)
    with gguf.FileSource(path) as source:
        gguf.read_header(source)


def test_a_string_that_would_widen_in_memory_is_charged_before_decoding(tmp_path: Path, monkeypatch) -> None:
    # 2 MiB of ASCII and one emoji: Python stores it at 4 bytes per character (8 MiB).
    text = "a" * (2 << 20) + "\N{GRINNING FACE}"
    kvs = (1, [gguf_kv_string("x.wide", text)])
    path = write_huge(tmp_path / "wide.gguf", kvs=kvs)
    monkeypatch.setattr(gguf, "MAX_MATERIALISED_BYTES", 6 << 20)
    assert "bytes of memory" in refusal(path)
    monkeypatch.setattr(gguf, "MAX_MATERIALISED_BYTES", 12 << 20)
    assert gguf.read_model([path])[0][0].metadata["x.wide"] == text


def gguf_kv_string(key: str, text: str) -> bytes:
    from tests.support.gguf_factory import _kv_head, gstr

    return _kv_head(key, T_STRING) + gstr(text)


# --- bytes read: bounded for any source, local or remote -------------------------


class CountingFile:
    """A local file as a ByteSource that records every read (what an HTTP source would request)."""

    def __init__(self, path: Path, claimed_size: int | None = None) -> None:
        self._file = gguf.FileSource(path)
        self.name = str(path)
        self.size = claimed_size or self._file.size
        self.reads: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        data = self._file.read_at(offset, length)
        return data + b"\0" * (min(length, self.size - offset) - len(data))  # zeros past the real end


def test_a_huge_header_costs_a_bounded_number_of_reads(tmp_path: Path) -> None:
    """5,000 vocabulary strings of 1 MiB each (5 GiB, sparse): every string would cost a 1 MiB read."""
    path = write_huge(tmp_path / "long.gguf", kvs=string_array(5000, 1 << 20))
    source = CountingFile(path)
    with pytest.raises(InvalidModelError, match=f"run past {gguf.MAX_HEADER_BYTES} bytes"):
        gguf.read_header(source)
    assert len(source.reads) <= gguf.MAX_HEADER_BYTES // gguf.READ_CHUNK + 2
    assert sum(length for _, length in source.reads) <= gguf.MAX_HEADER_BYTES
    assert max(offset + length for offset, length in source.reads) <= gguf.MAX_HEADER_BYTES


def test_a_source_claiming_an_absurd_size_is_read_no_further_than_the_header_limit(tmp_path: Path) -> None:
    # A remote listing may claim any size (1 PiB here) and the header any count: 100,000
    # strings of 1 MiB would be 100 GiB. The file holds the first 80 of them.
    path = write_huge(tmp_path / "lying.gguf", kvs=string_array(80, 1 << 20, declared=100_000))
    source = CountingFile(path, claimed_size=1 << 50)
    with pytest.raises(InvalidModelError, match=f"run past {gguf.MAX_HEADER_BYTES} bytes"):
        gguf.read_header(source)
    assert len(source.reads) <= gguf.MAX_HEADER_BYTES // gguf.READ_CHUNK + 2
    assert max(offset + length for offset, length in source.reads) <= gguf.MAX_HEADER_BYTES


def test_a_remote_huge_header_fails_fast_over_http(cli, hub, tmp_path: Path) -> None:
    """Through the local Hub and real range requests: `pull --dry-run` reads headers remotely."""
    crafted = {
        "Keys-Q8_0.gguf": write_huge(tmp_path / "keys.gguf", kvs=many_keys(gguf.MAX_METADATA_KEYS)),
        "Long-Q8_0.gguf": write_huge(tmp_path / "long.gguf", kvs=string_array(5000, 16 << 10)),
    }
    for filename, path in crafted.items():
        hub.add_repo("evil/Huge-GGUF", {filename: path})
        hub.log.clear()
        try:
            r = cli("pull", "evil/Huge-GGUF", "--dry-run")
        finally:
            hub.repos.pop("evil/huge-gguf")
        assert r.exit_code == 1, r.stderr
        first = r.stderr.splitlines()[0]
        assert first.startswith("error: ") and "not a valid GGUF model" in first and "limit" in first, r.stderr
        ranges = [rng for rng in hub.bytes_served() if rng is not None]
        assert None not in hub.bytes_served()  # nothing but range reads
        assert len(ranges) <= gguf.MAX_HEADER_BYTES // gguf.READ_CHUNK + 2, (filename, len(ranges))


# --- the commands, in their own process: exit code, one line, time, peak memory ---------


# name -> (write_huge arguments, the limit the error names). ~100 MB each, sparse where long.
CRAFTED: dict[str, tuple[Any, str]] = {
    "10M empty nested arrays": (lambda: {"kvs": nested_arrays(10_000_000)}, "(limit 4194304)"),
    "4M metadata keys": (lambda: {"kvs": many_keys(4_000_000)}, "(limit 65536)"),
    "3M tensor infos": (lambda: {"tensors": 3_000_000}, "(limit 65536)"),
    "10M tiny strings in a vocabulary": (lambda: {"kvs": string_array(10_000_000)}, "(limit 4194304)"),
    "4096 kept arrays of 4096 numbers": (lambda: {"kvs": many_arrays(4096)}, "memory (the limit)"),
    "4096 kept arrays of 4096 strings": (lambda: {"kvs": many_arrays(4096, kind=T_STRING)}, "memory (the limit)"),
    "5000 vocabulary strings of 1 MiB": (lambda: {"kvs": string_array(5000, 1 << 20)}, "(the limit for a header)"),
}


@pytest.fixture(scope="module")
def crafted_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("huge")
    return {name: write_huge(folder / f"{i}.gguf", **make()) for i, (name, (make, _)) in enumerate(CRAFTED.items())}


def assert_bounded(run: Run, *needles: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.exit_code == 1, (run.exit_code, run.stderr)
    assert lines and lines[0].startswith("error: ") and "not a valid GGUF model" in lines[0], run.stderr
    assert len(lines) <= 2 and "Traceback" not in run.stderr, run.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert run.seconds < SECONDS_BOUND, run
    assert run.peak_rss_mb < RSS_BOUND_MB, run


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CRAFTED))
def test_show_refuses_a_huge_header_in_bounded_time_and_memory(crafted_files, name: str) -> None:
    assert_bounded(run_llmctl("show", str(crafted_files[name])), CRAFTED[name][1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["10M empty nested arrays", "4M metadata keys", "3M tensor infos"])
def test_list_fit_and_import_are_bounded_the_same_way(crafted_files, tmp_path: Path, name: str) -> None:
    path = str(crafted_files[name])
    limit = CRAFTED[name][1]
    # A cold hardware probe measures memory bandwidth over a large array (~0.5 GB,
    # cached afterwards): warm it on a small valid model, so that what is measured
    # below is the header.
    assert run_llmctl("fit", str(RawGGUF.minimal().write(tmp_path / "small.gguf"))).exit_code == 0
    assert_bounded(run_llmctl("fit", path), limit)
    assert_bounded(run_llmctl("import", path, "--name", "huge"), limit)
    assert_bounded(run_llmctl("show", path, "--json"), limit)
    # In the Hugging Face cache: listed with its problem; the listing itself succeeds.
    snapshot = tmp_path / "hf" / "hub" / "models--evil--Huge-GGUF" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "huge-Q8_0.gguf").symlink_to(path)
    run = run_llmctl("list", "--json")
    assert run.exit_code == 0, run.stderr
    (model,) = json.loads(run.stdout)["models"]
    assert model["status"].startswith("invalid") and limit in model["status"]
    assert run.seconds < SECONDS_BOUND and run.peak_rss_mb < RSS_BOUND_MB, run


@pytest.mark.slow
def test_the_worst_header_within_every_limit_is_read_in_bounded_time_and_memory(tmp_path: Path) -> None:
    """Every count at its limit in one file (65,535 keys, 4 Mi vocabulary strings, 65,536 tensors)."""
    import itertools

    keys, walked = many_keys(gguf.MAX_METADATA_KEYS - BASE_KEYS - 1), string_array(gguf.MAX_SKIPPED_STRINGS)
    path = write_huge(
        tmp_path / "worst.gguf",
        kvs=(keys[0] + walked[0], itertools.chain(keys[1], walked[1])),
        tensors=gguf.MAX_TENSORS - BASE_TENSORS,
    )
    run = run_llmctl("show", str(path))
    assert run.exit_code == 0, run.stderr  # the limits agree with each other: together they still admit it
    assert run.seconds < SECONDS_BOUND and run.peak_rss_mb < RSS_BOUND_MB, run
