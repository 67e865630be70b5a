"""A bounded, header-only GGUF reader.

Reads the metadata and tensor infos of a GGUF file without touching tensor
data and without materialising large arrays (the vocabulary is skipped, only
its length is kept). Every count, length, offset and size is checked against
the file's real size and fixed limits before it is used, so a crafted file
gives :class:`~llmctl.errors.InvalidModelError` in bounded time and memory,
never a crash or a hang. Works on any :class:`ByteSource`: a local file here,
HTTP range reads for remote files.

Format: little-endian; magic ``GGUF``, u32 version (2 or 3), u64 tensor_count,
u64 kv_count; kv entries (string key, u32 type, value); tensor infos (name,
u32 n_dims, u64 dims, u32 ggml type, u64 offset relative to the aligned data
section).
"""

from __future__ import annotations

import os
import re
import stat
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmctl.errors import InvalidModelError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Limits. Real files stay far below every one of them (the largest real figures
# are in the comments; docs/architecture.md explains them); crafted files hit
# them quickly. Together they bound what reading a model's header(s) can cost,
# whatever the files hold: a second or two of work, under 100 MB of memory, and
# nothing read past MAX_HEADER_BYTES of a file (for a remote one, at most ~130
# range requests of READ_CHUNK; a value straddling two chunks is read twice).
MAX_KEY_BYTES = 65_536
MAX_STRING_BYTES = 16 * 1024 * 1024  # one materialised string value (a chat template: real ones are tens of KB)
MAX_TENSOR_NAME_BYTES = 1024  # llama.cpp itself refuses names of 64 bytes or more
# Everything a header keeps (metadata keys and values, tensor infos) is charged
# at its estimated size as Python objects, not only its string bytes: 65,536
# tensor infos alone take ~34 MB.
MAX_MATERIALISED_BYTES = 48 * 1024 * 1024
# Metadata and tensor infos end within this many bytes from the start of the
# file. Real headers are 1-20 MB: the vocabulary and merges of 256k-token
# models (Gemma 3: 262,144 tokens) are the bulk of them.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_METADATA_KEYS = 65_536  # real files have 20-100 keys, a few hundred at most
MAX_TENSORS = 65_536  # per file; the largest real models have 1,000-2,000 (DeepSeek-V3: 1,025; ~45k unmerged)
MAX_ARRAY_LENGTH = 1 << 22  # 4,194,304 entries: 16x the largest vocabulary (Gemma 3: 262,144), 14x Llama 3's merges
# Strings the reader walks one by one without keeping them (those of arrays
# longer than MAX_ARRAY_MATERIALISE: vocabulary and merges), over the whole
# header. Real files: under 1 M (~0.2 s); the limit bounds the walk to ~1 s.
MAX_SKIPPED_STRINGS = 1 << 22
# Values inside arrays of arrays (each inner array and each of its entries).
# llama.cpp refuses arrays of arrays, so no loadable model has any.
MAX_NESTED_VALUES = 65_536
MAX_ARRAY_MATERIALISE = 4096  # longer arrays are summarised as ArraySummary
MAX_NESTING = 8
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 20
MAX_ELEMENTS = 1 << 62
MAX_BLOCKS = 100_000
READ_CHUNK = 1 << 20
# Estimated bytes of the Python objects behind each kept value (measured with
# tracemalloc on CPython 3.11; strings are charged at their real size).
_LIST_BYTES = 56  # an empty list; each entry adds a pointer (8)
_NUMBER_BYTES = 32  # an int or float object (not for u8 and bool: see _SMALL_NUMBERS)
_KEY_BYTES = 128  # a slot in each of two dicts (metadata, value types)
_TENSOR_BYTES = 448  # TensorInfo, its shape tuple and ints, a list slot, the duplicate-name set entry
# Bump when ModelInfo gains or changes fields, so cached summaries are re-read.
SUMMARY_VERSION = 2

# GGUF metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 8, 9, 10, 11, 12

_SCALARS: dict[int, struct.Struct] = {
    T_UINT8: struct.Struct("<B"),
    T_INT8: struct.Struct("<b"),
    T_UINT16: struct.Struct("<H"),
    T_INT16: struct.Struct("<h"),
    T_UINT32: struct.Struct("<I"),
    T_INT32: struct.Struct("<i"),
    T_FLOAT32: struct.Struct("<f"),
    T_BOOL: struct.Struct("<B"),
    T_UINT64: struct.Struct("<Q"),
    T_INT64: struct.Struct("<q"),
    T_FLOAT64: struct.Struct("<d"),
}
VALUE_TYPE_NAMES = {
    T_UINT8: "u8", T_INT8: "i8", T_UINT16: "u16", T_INT16: "i16", T_UINT32: "u32",
    T_INT32: "i32", T_FLOAT32: "f32", T_BOOL: "bool", T_STRING: "string",
    T_ARRAY: "array", T_UINT64: "u64", T_INT64: "i64", T_FLOAT64: "f64",
}  # fmt: skip
_SMALL_NUMBERS = {T_UINT8, T_BOOL}  # values Python keeps as shared, cached objects: no memory per value
_INTEGER_TYPES = {T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_UINT64, T_INT64}

_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_TENSOR_TAILS = {n: struct.Struct(f"<{n}QIQ") for n in range(1, MAX_DIMS + 1)}

# ggml tensor types: id -> (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip

# llama_ftype (general.file_type) -> the quantisation name users know.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}  # fmt: skip


class ByteSource(Protocol):
    """Anything that can hand out bytes by offset: a local file, HTTP ranges."""

    name: str
    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A local file as a :class:`ByteSource`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = str(path)
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer for ever.
            self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            from llmctl.errors import NotFoundError

            raise NotFoundError(f"{self.name}: no such file", hint="check the path") from None
        except IsADirectoryError:
            raise InvalidModelError(self.name, "is a directory") from None
        except OSError as exc:
            raise InvalidModelError(self.name, exc.strerror or str(exc)) from None
        info = os.fstat(self._fd)
        if not stat.S_ISREG(info.st_mode):  # checked on the open file: no swap between check and read
            os.close(self._fd)
            raise InvalidModelError(self.name, "is not a regular file (a pipe, socket, device or folder)")
        self.size = info.st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fd, length, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
        return os.read(self._fd, length)  # pragma: no cover

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ArraySummary:
    """A metadata array too long to keep (the vocabulary, merges, scores…)."""

    item_type: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "array", "item_type": self.item_type, "count": self.count}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # relative to the data section
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]


@dataclass
class GGUFHeader:
    source: str
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    value_types: dict[str, int]
    tensors: list[TensorInfo]


class _Problem(Exception):
    """Raised inside the reader; converted to InvalidModelError with the file name."""


class HeaderBudget:
    """What reading headers may still cost: memory kept, strings walked, values in nested arrays.

    One budget is shared by all parts of a split model (see :func:`read_model`),
    so a model of many parts costs no more than one file at the limits.
    """

    def __init__(self) -> None:
        self.memory = MAX_MATERIALISED_BYTES
        self.skipped_strings = MAX_SKIPPED_STRINGS
        self.nested_values = MAX_NESTED_VALUES


class _Cursor:
    """Sequential reads over a ByteSource through a chunked buffer, with the header's budgets."""

    def __init__(self, source: ByteSource, budget: HeaderBudget) -> None:
        self.source = source
        self.size = source.size
        self.pos = 0
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.left = budget

    def _need(self, n: int) -> int:
        """Make [pos, pos+n) available; return its index in buf."""
        if self.pos + n > self.size:
            raise _Problem(f"truncated: needs {n} bytes at offset {self.pos}, file has {self.size}")
        rel = self.pos - self.base
        if rel >= 0 and rel + n <= len(self.buf):
            return rel
        if self.pos + n > MAX_HEADER_BYTES:
            raise _header_too_large()
        length = min(max(n, READ_CHUNK), self.size - self.pos, MAX_HEADER_BYTES - self.pos)
        data = self.source.read_at(self.pos, length)
        if len(data) < n:
            raise _Problem(f"truncated: short read at offset {self.pos}")
        self.buf, self.base = data, self.pos
        return 0

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS[kind]
        rel = self._need(fmt.size)
        (value,) = fmt.unpack_from(self.buf, rel)
        self.pos += fmt.size
        if kind == T_BOOL:
            if value > 1:
                raise _Problem(f"bool value {value} at offset {self.pos - 1}")
            return bool(value)
        return value

    def u32(self) -> int:
        rel = self._need(4)
        self.pos += 4
        return _U32(self.buf, rel)[0]

    def u64(self) -> int:
        rel = self._need(8)
        self.pos += 8
        return _U64(self.buf, rel)[0]

    def remaining(self) -> int:
        return self.size - self.pos

    def string(self, limit: int, what: str) -> str:
        """Read one string and charge what it costs in memory."""
        start = self.pos
        length = self.u64()
        if length > limit:
            raise _Problem(f"{what} at offset {start} is {length} bytes long (limit {limit})")
        if length > self.remaining():
            raise _Problem(f"truncated: {what} at offset {start} runs past the end of the file")
        self._check_room(length)  # before reading it
        rel = self._need(length)
        raw = self.buf[rel : rel + length]  # the whole buffer, not a copy, when it was read for this string
        if length > READ_CHUNK and not raw.isascii():
            # Python may store a decoded string at up to 4 bytes per character:
            # make sure that fits before decoding it.
            self._check_room(4 * length)
        self.pos += length
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Problem(f"{what} at offset {start} is not valid UTF-8") from None
        self.charge(sys.getsizeof(text))
        return text

    def strings(self, count: int, limit: int, what: str) -> list[str]:
        """Read and keep ``count`` strings (a short array), charging each like :meth:`string`."""
        out: list[str] = []
        unpack, sizeof = _U64, sys.getsizeof
        fast_max = min(limit, READ_CHUNK)  # longer ones take the careful path
        while len(out) < count:
            # Fast path: the strings that lie whole in the buffer, with no call per string.
            buf, rel, cost = self.buf, self.pos - self.base, 0
            end = len(buf)
            for _ in range(count - len(out)):
                if rel < 0 or rel + 8 > end:
                    break
                length = unpack(buf, rel)[0]
                stop = rel + 8 + length
                if stop > end or length > fast_max:
                    break
                try:
                    text = buf[rel + 8 : stop].decode("utf-8")
                except UnicodeDecodeError:
                    raise _Problem(f"{what} at offset {self.base + rel} is not valid UTF-8") from None
                cost += sizeof(text)
                if cost > self.left.memory:
                    raise _too_much_memory()
                out.append(text)
                rel = stop
            self.pos = self.base + rel
            self.charge(cost)
            if len(out) < count:  # the next string is not in the buffer: the careful path reads it
                out.append(self.string(limit, what))
        return out

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` strings, reading only their lengths (the vocabulary path)."""
        self.left.skipped_strings -= count
        if self.left.skipped_strings < 0:
            raise _Problem(f"more than {MAX_SKIPPED_STRINGS} strings in long arrays (the limit)")
        unpack = _U64
        done = 0
        while done < count:
            rel = self._need(8)
            buf = self.buf
            # Walk as many strings as the buffer holds. This loop is the reader's
            # hot path (a vocabulary is 30k-260k strings): no bounds check per
            # string; unpack_from raises when the next length is not in the buffer.
            todo, walked = count - done, 0
            try:
                for walked in range(todo):  # noqa: B007 - read after the loop
                    rel += 8 + unpack(buf, rel)[0]
                walked = todo
            except struct.error:
                pass  # string number `walked` starts past the buffer, or its length does
            done += walked
            self.pos = self.base + rel
            if self.pos > self.size:
                raise _Problem("truncated: string array runs past the end of the file")
            if self.pos > MAX_HEADER_BYTES:
                raise _header_too_large()

    def skip(self, n: int) -> None:
        if n > self.remaining():
            raise _Problem(f"truncated: needs {n} bytes at offset {self.pos}")
        self.pos += n
        if self.pos > MAX_HEADER_BYTES:
            raise _header_too_large()

    def charge(self, n: int) -> None:
        """Charge ``n`` bytes of kept Python objects to the header's memory budget."""
        self.left.memory -= n
        if self.left.memory < 0:
            raise _too_much_memory()

    def _check_room(self, n: int) -> None:
        if n > self.left.memory:
            raise _too_much_memory()

    def nested(self, n: int) -> None:
        self.left.nested_values -= n
        if self.left.nested_values < 0:
            raise _Problem(f"more than {MAX_NESTED_VALUES} values inside arrays of arrays (the limit)")


def _header_too_large() -> _Problem:
    return _Problem(f"metadata and tensor infos run past {MAX_HEADER_BYTES} bytes (the limit for a header)")


def _too_much_memory() -> _Problem:
    return _Problem(f"metadata and tensor infos need more than {MAX_MATERIALISED_BYTES} bytes of memory (the limit)")


def _read_value(cur: _Cursor, kind: int, depth: int) -> Any:
    if kind in _SCALARS:
        cur.charge(_NUMBER_BYTES if kind not in _SMALL_NUMBERS else 0)
        return cur.scalar(kind)
    if kind == T_STRING:
        return cur.string(MAX_STRING_BYTES, "string value")
    if kind == T_ARRAY:
        return _read_array(cur, depth + 1, keep=True)
    raise _Problem(f"unknown value type {kind} at offset {cur.pos - 4}")


def _read_array(cur: _Cursor, depth: int, keep: bool) -> Any:
    """One array; kept as a list when short and ``keep``, otherwise skipped and summarised."""
    if depth > MAX_NESTING:
        raise _Problem(f"arrays nested deeper than {MAX_NESTING}")
    start = cur.pos
    item = cur.u32()
    count = cur.u64()
    # The smallest an entry can be: its bytes must fit in what is left of the file.
    width = _SCALARS[item].size if item in _SCALARS else 8 if item == T_STRING else 12 if item == T_ARRAY else 0
    if not width:
        raise _Problem(f"array at offset {start} has unknown element type {item}")
    if count * width > cur.remaining():
        what = "strings" if item == T_STRING else "arrays" if item == T_ARRAY else "elements"
        raise _Problem(f"array at offset {start}: {count} {what} run past the end of the file")
    if count > MAX_ARRAY_LENGTH:
        raise _Problem(f"array at offset {start} has {count} entries (limit {MAX_ARRAY_LENGTH})")
    if depth > 1 or item == T_ARRAY:
        cur.nested(count)
    wanted, keep = keep, keep and count <= MAX_ARRAY_MATERIALISE
    cur.charge(_LIST_BYTES + 8 * count if keep else _LIST_BYTES if wanted else 0)  # the list, or the summary
    if item in _SCALARS:
        if not keep:
            cur.skip(count * width)
            return ArraySummary(VALUE_TYPE_NAMES[item], count)
        cur.charge(count * _NUMBER_BYTES if item not in _SMALL_NUMBERS else 0)
        rel = cur._need(count * width)
        values = struct.unpack_from(f"<{count}{_SCALARS[item].format[-1]}", cur.buf, rel)
        cur.pos += count * width
        if item == T_BOOL:
            if any(v > 1 for v in values):
                raise _Problem(f"array at offset {start}: bool value out of range")
            return [bool(v) for v in values]
        return list(values)
    if item == T_STRING:
        if not keep:
            cur.skip_strings(count)
            return ArraySummary("string", count)
        return cur.strings(count, MAX_STRING_BYTES, "string in array")
    if not keep:
        for _ in range(count):
            _read_array(cur, depth + 1, keep=False)
        return ArraySummary("array", count)
    return [_read_array(cur, depth + 1, keep=True) for _ in range(count)]


def read_header(source: ByteSource, budget: HeaderBudget | None = None) -> GGUFHeader:
    """Read and validate one GGUF file's header. Raises InvalidModelError.

    Pass one ``budget`` to every part of a split model: the parts share it.
    """
    try:
        return _read_header(source, budget or HeaderBudget())
    except _Problem as problem:
        raise InvalidModelError(source.name, str(problem)) from None
    except OSError as exc:
        raise InvalidModelError(source.name, f"read failed: {exc.strerror or exc}") from None


def _read_header(source: ByteSource, budget: HeaderBudget) -> GGUFHeader:
    cur = _Cursor(source, budget)
    if source.size < 4:
        raise _Problem("file is too small to be GGUF")
    rel = cur._need(4)
    magic = cur.buf[rel : rel + 4]
    if magic != MAGIC:
        raise _Problem(f"bad magic {magic!r} (expected b'GGUF')")
    cur.pos = 4
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        raise _Problem(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = cur.u64()
    kv_count = cur.u64()
    # Each kv entry needs at least 8 (key length) + 1 (key) + 4 (type) + 1 bytes;
    # each tensor info at least 8 + 1 + 4 + 8 + 4 + 8.
    if kv_count * 14 > cur.remaining():
        raise _Problem(f"truncated or corrupt: {kv_count} metadata entries cannot fit in {source.size} bytes")
    if tensor_count * 33 > cur.remaining():
        raise _Problem(f"truncated or corrupt: {tensor_count} tensors cannot fit in {source.size} bytes")
    # The limits on counts come after the size checks: those name the likelier problem.
    if kv_count > MAX_METADATA_KEYS:
        raise _Problem(f"{kv_count} metadata keys (limit {MAX_METADATA_KEYS})")
    if tensor_count > MAX_TENSORS:
        raise _Problem(f"{tensor_count} tensors (limit {MAX_TENSORS})")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for _ in range(kv_count):
        key = cur.string(MAX_KEY_BYTES, "metadata key")
        cur.charge(_KEY_BYTES)
        if key in metadata:
            raise _Problem(f"duplicate metadata key '{key}'")
        kind = cur.u32()
        metadata[key] = _read_value(cur, kind, 0)
        value_types[key] = kind

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] != T_UINT32:
            raise _Problem("general.alignment must be a u32")
        if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise _Problem(f"general.alignment {alignment} is not a power of two up to {MAX_ALIGNMENT}")

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for _ in range(tensor_count):
        tensors.append(_read_tensor_info(cur, alignment, names))

    data_offset = -(-cur.pos // alignment) * alignment
    data_size = source.size - data_offset
    if tensors and data_size < 0:
        raise _Problem("truncated: file ends before its data section")
    end = 0
    for tensor in sorted(tensors, key=lambda t: t.offset):
        if tensor.offset < end:
            raise _Problem(f"tensor '{tensor.name}' overlaps the tensor before it")
        end = tensor.offset + tensor.n_bytes
        if end > data_size:
            raise _Problem(f"truncated: tensor '{tensor.name}' data runs past the end of the file")
    return GGUFHeader(
        source=source.name,
        version=version,
        file_size=source.size,
        alignment=alignment,
        data_offset=data_offset,
        metadata=metadata,
        value_types=value_types,
        tensors=tensors,
    )


def _read_tensor_info(cur: _Cursor, alignment: int, names: set[str]) -> TensorInfo:
    name = cur.string(MAX_TENSOR_NAME_BYTES, "tensor name")
    cur.charge(_TENSOR_BYTES)
    if name in names:
        raise _Problem(f"duplicate tensor name '{name}'")
    names.add(name)
    n_dims = cur.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Problem(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    tail = _TENSOR_TAILS[n_dims]  # the dims, the ggml type and the offset in one read
    rel = cur._need(tail.size)
    *dims, type_id, offset = tail.unpack_from(cur.buf, rel)
    cur.pos += tail.size
    shape = tuple(dims)
    n_elements = 1
    for dim in shape:
        n_elements *= dim
        if dim >= MAX_ELEMENTS or n_elements >= MAX_ELEMENTS:
            raise _Problem(f"tensor '{name}' shape {list(shape)} overflows")
    if type_id not in GGML_TYPES:
        raise _Problem(f"tensor '{name}' has unknown ggml type {type_id}")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    if shape[0] % block:
        raise _Problem(f"tensor '{name}' row of {shape[0]} is not a multiple of the {type_name} block ({block})")
    if offset % alignment:
        raise _Problem(f"tensor '{name}' data offset {offset} is not aligned to {alignment}")
    n_bytes = n_elements // block * block_bytes
    return TensorInfo(name, shape, type_id, offset, n_elements, n_bytes)


# --- split files -------------------------------------------------------------

SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def split_parts(path: Path) -> list[Path]:
    """All parts of a split model given any part; ``[path]`` for a single file."""
    match = SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    if count < 1:
        raise InvalidModelError(str(path), "split count is 0")
    prefix = match["prefix"]
    return [path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


# --- model summary -----------------------------------------------------------


@dataclass
class ModelInfo:
    """What llmctl needs to know about a model, from its header(s) alone."""

    architecture: str
    name: str | None
    quant: str
    parameter_count: int
    layer_count: int | None
    context_length: int | None
    embedding_length: int | None
    head_count: int | list[int] | None
    head_count_kv: int | list[int] | None
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    expert_count: int | None
    expert_used_count: int | None
    vocab_size: int | None
    chat_template: str | None
    size_label: str | None
    license: str | None
    gguf_version: int
    file_type: int | None
    split_count: int
    tensor_count: int
    layer_bytes: list[int]
    embedding_bytes: int
    output_bytes: int
    other_bytes: int
    total_tensor_bytes: int
    file_size: int
    tensor_types: dict[str, dict[str, int]] = field(default_factory=dict)
    # Added after the first index format: defaults keep older cached summaries loadable.
    feed_forward_length: int | list[int] | None = None
    merges_count: int | None = None
    sliding_window_pattern: int | list[bool] | None = None
    tied_embeddings: bool = False
    expert_bytes: int = 0

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def max_head_count(self) -> int | None:
        return _max(self.head_count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _typed(header: GGUFHeader, key: str, kinds: set[int], what: str) -> Any:
    """A metadata value, or None; raises when a known key has the wrong type."""
    if key not in header.metadata:
        return None
    kind = header.value_types[key]
    value = header.metadata[key]
    if kind in kinds:
        return value
    if kind == T_ARRAY and "array" in what and isinstance(value, list):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
    raise _Problem(f"metadata '{key}' has type {VALUE_TYPE_NAMES.get(kind, kind)}, expected {what}")


def _int(header: GGUFHeader, key: str) -> int | None:
    return _typed(header, key, _INTEGER_TYPES, "an integer")


def _int_or_array(header: GGUFHeader, key: str) -> int | list[int] | None:
    value = _typed(header, key, _INTEGER_TYPES, "an integer or an integer array")
    if isinstance(value, list) and value and len(set(value)) == 1:
        return value[0]
    return value


def _str(header: GGUFHeader, key: str) -> str | None:
    return _typed(header, key, {T_STRING}, "a string")


def _max(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return max(value) if value else None
    return value


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def summarize(headers: list[GGUFHeader]) -> ModelInfo:
    """Turn one header (or all parts of a split model, in order) into a ModelInfo."""
    first = headers[0]
    try:
        return _summarize(headers)
    except _Problem as problem:
        raise InvalidModelError(first.source, str(problem)) from None


def _summarize(headers: list[GGUFHeader]) -> ModelInfo:
    first = headers[0]
    arch = _str(first, "general.architecture")
    if not arch:
        raise _Problem("missing general.architecture")
    _check_split(headers)

    tensors = [t for h in headers for t in h.tensors]
    block_count = _int(first, f"{arch}.block_count")
    if block_count is not None and not 0 <= block_count <= MAX_BLOCKS:
        raise _Problem(f"{arch}.block_count {block_count} is out of range (0 to {MAX_BLOCKS})")
    layer_bytes = [0] * (block_count or 0)
    embedding = output = other = experts = 0
    histogram: dict[str, dict[str, int]] = {}
    for tensor in tensors:
        slot = histogram.setdefault(tensor.type_name, {"count": 0, "bytes": 0})
        slot["count"] += 1
        slot["bytes"] += tensor.n_bytes
        if "_exps." in tensor.name:
            experts += tensor.n_bytes
        match = _BLOCK_RE.match(tensor.name)
        if match:
            index = int(match.group(1))
            if index >= len(layer_bytes):
                if block_count is not None or index > MAX_BLOCKS:
                    raise _Problem(f"tensor '{tensor.name}' is outside the {block_count} blocks")
                layer_bytes.extend([0] * (index + 1 - len(layer_bytes)))
            layer_bytes[index] += tensor.n_bytes
        elif tensor.name.startswith("token_embd"):
            embedding += tensor.n_bytes
        elif tensor.name.startswith(("output.", "output_norm.")):
            output += tensor.n_bytes
        else:
            other += tensor.n_bytes

    file_type = _int(first, "general.file_type")
    if file_type is not None and file_type in FILE_TYPES:
        quant = FILE_TYPES[file_type]
    elif histogram:
        quant = max(histogram.items(), key=lambda item: item[1]["bytes"])[0]
    else:
        quant = "unknown"

    embedding_length = _int(first, f"{arch}.embedding_length")
    head_count = _int_or_array(first, f"{arch}.attention.head_count")
    head_count_kv = _int_or_array(first, f"{arch}.attention.head_count_kv")
    if head_count_kv is None:
        head_count_kv = head_count
    key_length = _int(first, f"{arch}.attention.key_length")
    value_length = _int(first, f"{arch}.attention.value_length")
    max_heads = _max(head_count)
    if key_length is None and embedding_length and max_heads:
        key_length = embedding_length // max_heads
    if value_length is None and embedding_length and max_heads:
        value_length = embedding_length // max_heads

    vocab_size = _int(first, f"{arch}.vocab_size")
    tokens = first.metadata.get("tokenizer.ggml.tokens")
    if vocab_size is None and tokens is not None:
        if first.value_types["tokenizer.ggml.tokens"] != T_ARRAY:
            raise _Problem("metadata 'tokenizer.ggml.tokens' is not an array")
        vocab_size = tokens.count if isinstance(tokens, ArraySummary) else len(tokens)

    merges = first.metadata.get("tokenizer.ggml.merges")
    merges_count = merges.count if isinstance(merges, ArraySummary) else len(merges) if isinstance(merges, list) else None
    pattern = first.metadata.get(f"{arch}.attention.sliding_window_pattern")
    if pattern is not None and not (
        (isinstance(pattern, int) and not isinstance(pattern, bool)) or (isinstance(pattern, list) and all(isinstance(v, bool) for v in pattern))
    ):
        raise _Problem(f"metadata '{arch}.attention.sliding_window_pattern' must be an integer or a bool array")

    return ModelInfo(
        architecture=arch,
        name=_str(first, "general.name"),
        quant=quant,
        parameter_count=sum(t.n_elements for t in tensors),
        layer_count=block_count,
        context_length=_int(first, f"{arch}.context_length"),
        embedding_length=embedding_length,
        head_count=head_count,
        head_count_kv=head_count_kv,
        key_length=key_length,
        value_length=value_length,
        sliding_window=_int(first, f"{arch}.attention.sliding_window"),
        expert_count=_int(first, f"{arch}.expert_count"),
        expert_used_count=_int(first, f"{arch}.expert_used_count"),
        vocab_size=vocab_size,
        chat_template=_str(first, "tokenizer.chat_template"),
        size_label=_str(first, "general.size_label"),
        license=_str(first, "general.license"),
        gguf_version=first.version,
        file_type=file_type,
        split_count=len(headers),
        tensor_count=len(tensors),
        layer_bytes=layer_bytes,
        embedding_bytes=embedding,
        output_bytes=output,
        other_bytes=other,
        total_tensor_bytes=sum(t.n_bytes for t in tensors),
        file_size=sum(h.file_size for h in headers),
        tensor_types=dict(sorted(histogram.items(), key=lambda item: -item[1]["bytes"])),
        feed_forward_length=_int_or_array(first, f"{arch}.feed_forward_length"),
        merges_count=merges_count,
        sliding_window_pattern=pattern,
        tied_embeddings=not any(t.name == "output.weight" for t in tensors),
        expert_bytes=experts,
    )


def _check_split(headers: list[GGUFHeader]) -> None:
    count = len(headers)
    for index, header in enumerate(headers):
        split_count = _int(header, "split.count")
        split_no = _int(header, "split.no")
        if count == 1 and split_count in (None, 1):
            continue
        if split_count != count:
            raise _Problem(f"{header.source} says it is one of {split_count} parts, found {count}")
        if split_no != index:
            raise _Problem(f"{header.source} says it is part {split_no}, expected {index}")


def read_model(paths: list[Path]) -> tuple[list[GGUFHeader], ModelInfo]:
    """Read every part of a model from disk and summarise it."""
    headers, budget = [], HeaderBudget()
    for path in paths:
        with FileSource(path) as source:
            headers.append(read_header(source, budget))
    return headers, summarize(headers)


def metadata_for_json(header: GGUFHeader) -> dict[str, Any]:
    """Metadata ready for strict JSON: long arrays (at any depth) as summaries, NaN and infinities as null."""
    import math

    def clean(value: Any) -> Any:
        if isinstance(value, ArraySummary):
            return value.to_json()
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return {key: clean(value) for key, value in header.metadata.items()}
