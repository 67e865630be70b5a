"""The header reader against llama.cpp's own ``gguf`` package, and against broken files."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl import gguf
from llmctl.errors import InvalidModelError
from tests.support.examples import examples
from tests.support.gguf_factory import T_ARRAY, T_STRING, T_UINT8, T_UINT32, T_UINT64, RawGGUF, RawTensor, gstr


def _reference_scalars(reader) -> dict:
    """Metadata values as the gguf package decodes them (short arrays as lists)."""
    import gguf as ggufpkg

    values = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        kind = fld.types[0]
        if kind == ggufpkg.GGUFValueType.ARRAY:
            if len(fld.data) > gguf.MAX_ARRAY_MATERIALISE:
                values[name] = ("array", len(fld.data))
                continue
        values[name] = fld.contents()
    return values


def _ours(header: gguf.GGUFHeader) -> dict:
    return {k: ("array", v.count) if isinstance(v, gguf.ArraySummary) else v for k, v in header.metadata.items()}


def _assert_matches_reference(path: Path) -> gguf.GGUFHeader:
    import gguf as ggufpkg

    reader = ggufpkg.GGUFReader(path)
    with gguf.FileSource(path) as src:
        header = gguf.read_header(src)
    ours = _ours(header)
    ref = _reference_scalars(reader)
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value), key
        else:
            assert ours[key] == value, key
    assert len(header.tensors) == len(reader.tensors)
    for mine, theirs in zip(header.tensors, reader.tensors):
        assert mine.name == theirs.name
        assert list(mine.shape) == [int(d) for d in theirs.shape]
        assert mine.type_id == int(theirs.tensor_type)
        assert header.data_offset + mine.offset == int(theirs.data_offset)
        assert mine.n_elements == int(theirs.n_elements)
        assert mine.n_bytes == int(theirs.n_bytes)
    return header


@pytest.mark.slow  # the gguf package reads the 49,152-token vocabulary item by item: seconds
def test_demo_model_matches_gguf_package(demo_model: Path) -> None:
    header = _assert_matches_reference(demo_model)
    info = gguf.summarize([header])
    assert info.architecture == "llama"
    assert info.quant == "Q4_1"
    assert info.layer_count == 30
    assert info.context_length == 8192
    assert info.embedding_length == 576
    assert (info.head_count, info.head_count_kv) == (9, 3)
    assert (info.key_length, info.value_length) == (64, 64)
    assert info.vocab_size == 49152
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.parameter_count == sum(t.n_elements for t in header.tensors)
    assert sum(info.layer_bytes) + info.embedding_bytes + info.output_bytes + info.other_bytes == info.total_tensor_bytes
    assert len(info.layer_bytes) == 30 and len(set(info.layer_bytes)) == 1
    # The data section ends exactly at the end of the file for this model.
    assert header.data_offset + info.total_tensor_bytes == demo_model.stat().st_size


def test_demo_vocab_is_summarised_not_materialised(demo_model: Path) -> None:
    with gguf.FileSource(demo_model) as src:
        header = gguf.read_header(src)
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, gguf.ArraySummary) and tokens.count == 49152
    assert isinstance(header.metadata["tokenizer.ggml.merges"], gguf.ArraySummary)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"n_layers": 3, "n_head": [4, 4, 2], "n_head_kv": [2, 1, 1], "sliding_window": 64},
        {"f16": True, "file_type": 1, "chat_template": None},
        {"file_type": None, "arch": "qwen2", "extra": {"general.license": "mit"}},
    ],
)
def test_generated_files_match_gguf_package(make_gguf, kwargs) -> None:
    path = make_gguf(**kwargs)
    header = _assert_matches_reference(path)
    info = gguf.summarize([header])
    assert info.architecture == kwargs.get("arch", "llama")
    assert info.layer_count == kwargs.get("n_layers", 2)
    assert info.head_count == kwargs.get("n_head", 4)
    assert info.head_count_kv == kwargs.get("n_head_kv", 2)
    assert info.sliding_window == kwargs.get("sliding_window")
    assert info.has_chat_template == (kwargs.get("chat_template", "x") is not None)
    assert info.vocab_size == 32


def test_quant_falls_back_to_dominant_tensor_type(make_gguf) -> None:
    info = gguf.read_model([make_gguf(file_type=None, f16=True)])[1]
    assert info.file_type is None
    assert info.quant == "F16"


def test_split_model_is_read_as_one(make_gguf, tmp_path: Path) -> None:
    single = make_gguf("whole.gguf")
    first = make_gguf("split.gguf", split_max_tensors=7)
    parts = gguf.split_parts(first)
    assert len(parts) == 3 and all(p.exists() for p in parts)
    assert gguf.split_parts(parts[1]) == parts
    _, info = gguf.read_model(parts)
    _, whole = gguf.read_model([single])
    assert info.split_count == 3
    assert info.tensor_count == whole.tensor_count
    assert info.parameter_count == whole.parameter_count
    assert info.layer_bytes == whole.layer_bytes


def test_split_parts_out_of_order_are_rejected(make_gguf) -> None:
    parts = gguf.split_parts(make_gguf("split.gguf", split_max_tensors=7))
    with pytest.raises(InvalidModelError, match="part"):
        gguf.read_model([parts[1], parts[0], parts[2]])


def test_type_table_matches_gguf_package() -> None:
    import gguf as ggufpkg

    for qtype, (block, size) in ggufpkg.GGML_QUANT_SIZES.items():
        assert gguf.GGML_TYPES[int(qtype)] == (qtype.name, block, size)
    for ftype in ggufpkg.LlamaFileType:
        if ftype.value in gguf.FILE_TYPES:
            assert ftype.name.removeprefix("MOSTLY_").replace("ALL_", "") == gguf.FILE_TYPES[ftype.value]


# --- broken and hostile files ---------------------------------------------------


def _kv_replace(raw: RawGGUF, key: str, kind: int, value) -> RawGGUF:
    raw.kvs = [(k, kind, value) if k == key else (k, t, v) for k, t, v in raw.kvs]
    return raw


def _variants() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a fragment the error must contain)."""
    good = RawGGUF.minimal().build()
    header_end = len(RawGGUF(kvs=RawGGUF.minimal().kvs, tensors=[]).build())
    v: dict[str, tuple[bytes, str]] = {
        "empty": (b"", "too small"),
        "bad magic": (b"GGML" + good[4:], "bad magic"),
        "text file": (b"hello world, not a model\n", "bad magic"),
        "version 1": (good[:4] + struct.pack("<I", 1) + good[8:], "version 1"),
        "version 99": (good[:4] + struct.pack("<I", 99) + good[8:], "version 99"),
        "cut in counts": (good[:12], "truncated"),
        "cut in first key": (good[:30], "truncated"),
        "cut in kv section": (good[: header_end // 2], "truncated"),
        "cut in tensor infos": (good[: header_end + 20], "truncated"),
        "cut in data": (good[:-64], "truncated"),
        "huge kv count": (good[:16] + struct.pack("<Q", 2**62) + good[24:], "cannot fit"),
        "huge tensor count": (good[:8] + struct.pack("<Q", 2**60) + good[16:], "cannot fit"),
    }
    raw = RawGGUF.minimal()
    raw.kvs = []
    raw.kv_count = 1
    raw.raw_kv_tail = gstr("general.architecture", length=2**40)
    v["huge key length"] = (raw.build(), "limit")
    raw = RawGGUF.minimal()
    raw.kvs = raw.kvs + [("x.big", T_ARRAY, (T_UINT32, []))]
    raw.kv_count = len(raw.kvs)
    data = raw.build()
    # patch the empty array's count to something enormous
    pos = data.index(b"x.big") + len("x.big") + 4 + 4
    v["huge array count"] = (data[:pos] + struct.pack("<Q", 2**58) + data[pos + 8 :], "past the end")
    nested: tuple = (T_UINT8, [1])
    for _ in range(12):
        nested = (T_ARRAY, [nested])
    raw = RawGGUF.minimal()
    raw.kvs.append(("x.nested", T_ARRAY, nested))
    v["deep nesting"] = (raw.build(), "nested deeper")
    raw = RawGGUF.minimal()
    raw.tensors[1].dims = [32, 1, 1, 1, 1]
    v["five dims"] = (raw.build(), "dimensions")
    raw = RawGGUF.minimal()
    raw.tensors[1].dims = [2**32, 2**32]
    v["element overflow"] = (raw.build(), "overflows")
    raw = RawGGUF.minimal()
    raw.tensors[1].type_id = 77
    v["unknown tensor type"] = (raw.build(), "unknown ggml type")
    raw = RawGGUF.minimal()
    raw.tensors[2].offset = 1 << 30
    v["offset past end"] = (raw.build(), "past the end")
    raw = RawGGUF.minimal()
    raw.tensors[1].offset = 0
    v["overlapping tensors"] = (raw.build(), "overlaps")
    raw = RawGGUF.minimal()
    raw.tensors[1].offset = 1028
    v["misaligned offset"] = (raw.build(), "not aligned")
    for bad in (0, 48):
        raw = RawGGUF.minimal()
        raw.alignment = bad
        raw.kvs.append(("general.alignment", T_UINT32, bad))
        v[f"alignment {bad}"] = (raw.build(), "power of two")
    raw = RawGGUF.minimal()
    raw.kvs.append(("general.name", T_STRING, "again"))
    v["duplicate key"] = (raw.build(), "duplicate metadata key")
    raw = RawGGUF.minimal()
    raw.tensors.append(RawTensor("output.weight", [32]))
    v["duplicate tensor"] = (raw.build(), "duplicate tensor")
    raw = RawGGUF.minimal()
    raw.kvs.append((b"bad\xff\xfekey", T_UINT8, 1))
    v["invalid utf-8 key"] = (raw.build(), "UTF-8")
    raw = RawGGUF.minimal()
    raw.kvs.append(("x.flag", 7, 5))
    v["bool out of range"] = (raw.build(), "bool")
    raw = RawGGUF.minimal()
    raw.kvs.append(("x.weird", 13, 0))
    v["unknown value type"] = (raw.build(), "unknown value type")
    v["block count as string"] = (
        _kv_replace(RawGGUF.minimal(), "llama.block_count", T_STRING, "thirty").build(),
        "expected an integer",
    )
    v["architecture as number"] = (
        _kv_replace(RawGGUF.minimal(), "general.architecture", T_UINT32, 7).build(),
        "expected a string",
    )
    raw = RawGGUF.minimal()
    raw.kvs = [kv for kv in raw.kvs if kv[0] != "general.architecture"]
    v["no architecture"] = (raw.build(), "missing general.architecture")
    raw = RawGGUF.minimal()
    raw.tensors.append(RawTensor("blk.5.attn_q.weight", [32]))
    v["block outside block_count"] = (raw.build(), "outside")
    v["huge block count"] = (_kv_replace(RawGGUF.minimal(), "llama.block_count", T_UINT64, 2**63).build(), "out of range")
    return v


VARIANTS = _variants()


def test_minimal_raw_file_is_valid(tmp_path: Path) -> None:
    path = RawGGUF.minimal().write(tmp_path / "ok.gguf")
    _, info = gguf.read_model([path])
    assert info.layer_count == 1 and info.tensor_count == 3


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_broken_file_is_rejected_with_reason(tmp_path: Path, name: str) -> None:
    data, fragment = VARIANTS[name]
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    with pytest.raises(InvalidModelError) as caught:
        gguf.read_model([path])
    assert fragment in caught.value.problem
    assert str(path) in caught.value.message


def test_every_truncation_of_a_valid_file_is_rejected(tmp_path: Path) -> None:
    data = RawGGUF.minimal().build()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    # Shortened in place, longest cut first: rewriting the file for every cut costs a disk flush each on ext4.
    for cut in reversed(range(0, len(data) - 1, 7)):
        os.truncate(path, cut)
        with pytest.raises(InvalidModelError):
            gguf.read_model([path])


def test_directory_and_missing_file(tmp_path: Path) -> None:
    from llmctl.errors import NotFoundError

    with pytest.raises(InvalidModelError, match="directory"):
        gguf.read_model([tmp_path])
    with pytest.raises(NotFoundError):
        gguf.read_model([tmp_path / "nope.gguf"])


class _CountingSource:
    """A byte source that records what was read: the reader must not touch tensor data."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self._data = path.read_bytes()
        self.size = len(self._data)
        self.reads: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self._data[offset : offset + length]


def test_reader_works_on_any_byte_source_and_skips_tensor_data(demo_model: Path) -> None:
    source = _CountingSource(demo_model)
    header = gguf.read_header(source)
    assert header.data_offset < 2_000_000
    assert sum(length for _, length in source.reads) < 4 * gguf.READ_CHUNK
    assert all(offset < header.data_offset for offset, _ in source.reads)


def test_metadata_for_json_is_serialisable(demo_model: Path) -> None:
    import json

    headers, _ = gguf.read_model([demo_model])
    doc = json.loads(json.dumps(gguf.metadata_for_json(headers[0])))
    assert doc["tokenizer.ggml.tokens"] == {"type": "array", "item_type": "string", "count": 49152}
    assert doc["general.architecture"] == "llama"


# --- huge headers, scaled down: every limit, property-tested --------------------------

# The reader's limits shrunk ~1000x, drawn per example so that small generated files
# cross each of them in turn, and a 64-byte read chunk, so that strings straddle chunk
# boundaries everywhere.
_SMALL_RANGES = {
    "MAX_METADATA_KEYS": (36, 90),
    "MAX_TENSORS": (20, 40),
    "MAX_ARRAY_LENGTH": (100, 300),
    "MAX_SKIPPED_STRINGS": (100, 800),
    "MAX_NESTED_VALUES": (50, 800),
    "MAX_HEADER_BYTES": (2_000, 40_000),
    "MAX_MATERIALISED_BYTES": (5_000, 60_000),
}
_SMALL_READS = {"MAX_ARRAY_MATERIALISE": 16, "READ_CHUNK": 64}
SMALL_LIMITS = st.fixed_dictionaries({name: st.integers(*bounds) for name, bounds in _SMALL_RANGES.items()}).map(lambda limits: limits | _SMALL_READS)
# Half the examples read under the real limits: then only the exact read-back is tested.
LIMITS = st.one_of(SMALL_LIMITS, st.just(_SMALL_READS))
_NUMBER_KINDS = [T_UINT8, T_UINT32, T_UINT64, 5, 7]  # u8, u32, u64, i32, bool


@st.composite
def _huge_shapes(draw) -> tuple[list, int]:
    """Extra metadata entries (key, kind, value) and a number of extra tensors."""
    kvs = []
    sizes = st.one_of(st.integers(0, 20), st.integers(0, 260))  # short (kept) and long (summarised) arrays
    for i in range(draw(st.integers(0, 40))):
        shape = draw(st.sampled_from(["number", "string", "numbers", "strings", "nested"]))
        if shape == "number":
            kvs.append((f"x.{i}", T_UINT32, draw(st.integers(0, 2**32 - 1))))
        elif shape == "string":
            kvs.append((f"x.{i}", T_STRING, draw(st.text(max_size=300))))
        elif shape == "numbers":
            kind = draw(st.sampled_from(_NUMBER_KINDS))
            top = 1 if kind == 7 else 255 if kind == T_UINT8 else 2**31 - 1
            n = draw(sizes)
            kvs.append((f"x.{i}", T_ARRAY, (kind, draw(st.lists(st.integers(0, top), min_size=n, max_size=n)))))
        elif shape == "strings":
            n = draw(sizes)
            kvs.append((f"x.{i}", T_ARRAY, (T_STRING, draw(st.lists(st.text(max_size=90), min_size=n, max_size=n)))))
        else:
            inner = st.lists(st.integers(0, 2**31 - 1), max_size=30).map(lambda v: (T_UINT32, v))
            kvs.append((f"x.{i}", T_ARRAY, (T_ARRAY, draw(st.lists(inner, max_size=40)))))
    return kvs, draw(st.integers(0, 24))


def _expected(kind: int, value, materialise: int):
    """What the reader keeps for a generated value: short arrays as lists, long ones summarised."""
    if kind != T_ARRAY:
        return value
    item, items = value
    if len(items) > materialise:
        return gguf.ArraySummary(gguf.VALUE_TYPE_NAMES[item], len(items))
    if item == 7:
        return [bool(v) for v in items]
    return [_expected(item, v, materialise) for v in items] if item == T_ARRAY else list(items)


class _RecordingSource:
    def __init__(self, data: bytes) -> None:
        self.name, self.size, self._data = "generated.gguf", len(data), data
        self.reads: list[tuple[int, int]] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self._data[offset : offset + length]

    def assert_bounded(self, limits: dict[str, int]) -> None:
        """Nothing past the header limit is read, and little twice: a value that straddles the end of
        the buffer is read again from its start, so reads and bytes are at most twice the header."""
        cap, chunk = limits["MAX_HEADER_BYTES"], limits["READ_CHUNK"]
        assert max(offset + length for offset, length in self.reads) <= cap
        assert sum(length for _, length in self.reads) <= 2 * cap + chunk
        assert len(self.reads) <= 2 * cap // chunk + 2


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shape=_huge_shapes(), patched=LIMITS)
def test_huge_header_shapes_are_read_exactly_or_refused_by_a_limit(shape, patched: dict[str, int]) -> None:
    """Within every limit a header reads back exactly (fast paths included); past a count limit it is
    refused, naming that limit; either way nothing past the header limit is read."""
    limits = {name: getattr(gguf, name) for name in _SMALL_RANGES} | patched
    extra, n_tensors = shape
    raw = RawGGUF.minimal()
    raw.kvs += extra
    raw.tensors += [RawTensor(f"x.{i}", [32]) for i in range(n_tensors)]
    data = raw.build()
    long_arrays = [v[1] for _, k, v in extra if k == T_ARRAY and len(v[1]) > limits["MAX_ARRAY_MATERIALISE"]]
    counts = {
        "metadata keys (limit": len(raw.kvs) > limits["MAX_METADATA_KEYS"],
        "tensors (limit": len(raw.tensors) > limits["MAX_TENSORS"],
        "entries (limit": any(len(v[1]) > limits["MAX_ARRAY_LENGTH"] for _, k, v in extra if k == T_ARRAY),
        "values inside arrays of arrays": sum(len(v[1]) + sum(len(inner[1]) for inner in v[1]) for _, k, v in extra if k == T_ARRAY and v[0] == T_ARRAY)
        > limits["MAX_NESTED_VALUES"],
        "strings in long arrays": sum(len(items) for items in long_arrays if items and isinstance(items[0], str)) > limits["MAX_SKIPPED_STRINGS"],
    }
    source = _RecordingSource(data)
    with mock.patch.multiple(gguf, **patched):
        try:
            header = gguf.read_header(source)
        except InvalidModelError as exc:
            assert "limit" in exc.problem, exc.problem
            named = [fragment for fragment in counts if fragment in exc.problem]
            assert all(counts[fragment] for fragment in named), (exc.problem, counts)
            if not named:  # the two budgets without a simple count: bytes of header, bytes of memory
                assert "run past" in exc.problem or "bytes of memory" in exc.problem, exc.problem
            source.assert_bounded(limits)
            return
    assert not any(counts.values()), counts
    source.assert_bounded(limits)
    for key, kind, value in extra:
        assert header.metadata[key] == _expected(kind, value, limits["MAX_ARRAY_MATERIALISE"]), key
    assert len(header.tensors) == len(raw.tensors)
