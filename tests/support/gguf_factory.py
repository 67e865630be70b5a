"""Builders for test GGUF files.

``write_model`` uses the ``gguf`` package (llama.cpp's own writer) for valid
files; ``RawGGUF`` writes bytes field by field so tests can craft every kind
of broken or hostile file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def write_model(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int | list[int] = 4,
    n_head_kv: int | list[int] = 2,
    n_vocab: int = 32,
    n_ctx: int = 256,
    n_ff: int = 128,
    file_type: int | None = 7,
    model_name: str = "Tiny Test Model",
    chat_template: str | None = "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    sliding_window: int | None = None,
    extra: dict[str, Any] | None = None,
    split_max_tensors: int = 0,
    f16: bool = False,
) -> Path:
    """A tiny model with real tensor shapes; returns the (first) file's path."""
    import gguf

    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_name(model_name)
    writer.add_block_count(n_layers)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    if file_type is not None:
        writer.add_file_type(file_type)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(n_vocab)])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    dtype = np.float16 if f16 else np.float32
    max_heads = max(n_head) if isinstance(n_head, list) else n_head
    head_dim = n_embd // max_heads
    kv_heads = max(n_head_kv) if isinstance(n_head_kv, list) else n_head_kv

    def tensor(tname: str, *shape: int) -> None:
        # numpy shape is reversed relative to ggml's ne[]
        writer.add_tensor(tname, np.ones(tuple(reversed(shape)), dtype=dtype))

    tensor("token_embd.weight", n_embd, n_vocab)
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", n_embd)
        tensor(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        tensor(f"blk.{i}.attn_k.weight", n_embd, head_dim * kv_heads)
        tensor(f"blk.{i}.attn_v.weight", n_embd, head_dim * kv_heads)
        tensor(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        tensor(f"blk.{i}.ffn_norm.weight", n_embd)
        tensor(f"blk.{i}.ffn_up.weight", n_embd, n_ff)
        tensor(f"blk.{i}.ffn_down.weight", n_ff, n_embd)
    tensor("output_norm.weight", n_embd)
    tensor("output.weight", n_embd, n_vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return next(iter(sorted(path.parent.glob(path.stem + "-00001-of-*.gguf"))))
    return path


def write_projector(path: Path, *, f16: bool = True, n_embd: int = 64, n_layers: int = 2, image_size: int = 32, patch_size: int = 8) -> Path:
    """A tiny multimodal projector as llama.cpp's converter writes one (``general.architecture`` "clip",
    a ViT of ``v.*`` tensors and an ``mm.*`` MLP): what a repo's ``mmproj-*.gguf`` holds."""
    import gguf

    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name("Tiny Test Projector")
    writer.add_type("mmproj")
    writer.add_file_type(1 if f16 else 0)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch_size)
    writer.add_uint32("clip.vision.embedding_length", n_embd)
    writer.add_uint32("clip.vision.feed_forward_length", 2 * n_embd)
    writer.add_uint32("clip.vision.projection_dim", n_embd)
    writer.add_uint32("clip.vision.block_count", n_layers)
    writer.add_uint32("clip.vision.attention.head_count", 4)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    dtype = np.float16 if f16 else np.float32
    n_patches = (image_size // patch_size) ** 2

    def tensor(tname: str, *shape: int) -> None:
        writer.add_tensor(tname, np.ones(tuple(reversed(shape)), dtype=dtype))

    tensor("v.patch_embd.weight", patch_size, patch_size, 3, n_embd)
    tensor("v.position_embd.weight", n_embd, n_patches)
    for i in range(n_layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensor(f"v.blk.{i}.{part}.weight", n_embd, n_embd)
        tensor(f"v.blk.{i}.ffn_up.weight", n_embd, 2 * n_embd)
        tensor(f"v.blk.{i}.ffn_down.weight", 2 * n_embd, n_embd)
    tensor("mm.0.weight", n_embd, n_embd)
    tensor("mm.2.weight", n_embd, n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- raw, field-by-field writer ---------------------------------------------------

T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 8, 9, 10, 11, 12
_FMT = {T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
        T_FLOAT32: "<f", T_BOOL: "<B", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d"}  # fmt: skip


def gstr(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def value_bytes(kind: int, value: Any) -> bytes:
    if kind == T_STRING:
        return gstr(value)
    if kind == T_ARRAY:
        item, items = value
        return struct.pack("<IQ", item, len(items)) + b"".join(value_bytes(item, v) for v in items)
    return struct.pack(_FMT.get(kind, "<I"), value)  # unknown kinds: 4 raw bytes


@dataclass
class RawTensor:
    name: str
    dims: list[int]
    type_id: int = 0  # F32
    offset: int | None = None  # None: packed one after another, aligned

    def nbytes(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        # Absurd shapes (overflow tests) get a token amount of data.
        return min(n * 4 if self.type_id == 0 else n * 2, 1 << 16)


@dataclass
class RawGGUF:
    """A GGUF assembled from parts; every field can be overridden to break it."""

    kvs: list[tuple[str | bytes, int, Any]] = field(default_factory=list)
    tensors: list[RawTensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    alignment: int = 32
    kv_count: int | None = None
    tensor_count: int | None = None
    raw_kv_tail: bytes = b""  # appended after the kv entries (hand-made entries)

    @classmethod
    def minimal(cls) -> RawGGUF:
        return cls(
            kvs=[
                ("general.architecture", T_STRING, "llama"),
                ("general.name", T_STRING, "raw"),
                ("llama.block_count", T_UINT32, 1),
                ("llama.context_length", T_UINT32, 128),
                ("llama.embedding_length", T_UINT32, 32),
                ("llama.attention.head_count", T_UINT32, 4),
            ],
            tensors=[
                RawTensor("token_embd.weight", [32, 8]),
                RawTensor("blk.0.attn_q.weight", [32, 32]),
                RawTensor("output.weight", [32, 8]),
            ],
        )

    def build(self) -> bytes:
        out = bytearray(self.magic)
        out += struct.pack("<I", self.version)
        out += struct.pack("<Q", len(self.tensors) if self.tensor_count is None else self.tensor_count)
        kv_count = len(self.kvs) if self.kv_count is None else self.kv_count
        out += struct.pack("<Q", kv_count)
        for key, kind, value in self.kvs:
            out += gstr(key) + struct.pack("<I", kind) + value_bytes(kind, value)
        out += self.raw_kv_tail
        align = self.alignment if self.alignment > 0 else 32
        offset = 0
        for tensor in self.tensors:
            own = offset if tensor.offset is None else tensor.offset
            out += gstr(tensor.name) + struct.pack("<I", len(tensor.dims))
            out += b"".join(struct.pack("<Q", d) for d in tensor.dims)
            out += struct.pack("<IQ", tensor.type_id, own)
            offset = -(-(own + tensor.nbytes()) // align) * align
        out += b"\0" * ((-len(out)) % align)
        # The data section holds the tensors packed naturally; an explicit offset
        # beyond that points past the end of the file.
        out += b"\0" * sum(-(-t.nbytes() // align) * align for t in self.tensors)
        return bytes(out)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.build())
        return path


# --- big shapes without weights ----------------------------------------------------

# (n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, context) of well-known model shapes.
SHAPES = {
    "1b": (16, 2048, 32, 8, 8192, 128256, 131072),  # Llama-3.2-1B
    "7b": (32, 4096, 32, 32, 11008, 32000, 4096),  # Llama-2-7B
    "13b": (40, 5120, 40, 40, 13824, 32000, 4096),  # Llama-2-13B
    "70b": (80, 8192, 64, 8, 28672, 32000, 4096),  # Llama-2-70B
}
Q4_K, Q6_K, Q8_0, F16 = 12, 14, 8, 1
FTYPE_OF = {Q4_K: 15, Q6_K: 18, Q8_0: 7, F16: 1}  # as llama.cpp labels the whole file


def write_shape_model(path: Path, shape: str, type_id: int = Q4_K) -> Path:
    """A valid GGUF header for a real model shape; the data section is a sparse hole.

    The file is as large as the real model (so sizes and offsets are checked
    for real) but takes no disk space.
    """
    from llmctl.gguf import GGML_TYPES

    n_layer, n_embd, n_head, n_kv, n_ff, n_vocab, ctx = SHAPES[shape]
    head_dim = n_embd // n_head
    tensors: list[tuple[str, list[int], int]] = [("token_embd.weight", [n_embd, n_vocab], Q6_K if type_id != F16 else F16)]
    for i in range(n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", [n_embd], 0),
            (f"blk.{i}.attn_q.weight", [n_embd, n_embd], type_id),
            (f"blk.{i}.attn_k.weight", [n_embd, head_dim * n_kv], type_id),
            (f"blk.{i}.attn_v.weight", [n_embd, head_dim * n_kv], type_id),
            (f"blk.{i}.attn_output.weight", [n_embd, n_embd], type_id),
            (f"blk.{i}.ffn_norm.weight", [n_embd], 0),
            (f"blk.{i}.ffn_gate.weight", [n_embd, n_ff], type_id),
            (f"blk.{i}.ffn_up.weight", [n_embd, n_ff], type_id),
            (f"blk.{i}.ffn_down.weight", [n_ff, n_embd], type_id),
        ]
    tensors += [("output_norm.weight", [n_embd], 0), ("output.weight", [n_embd, n_vocab], Q6_K if type_id != F16 else F16)]
    kvs = [
        ("general.architecture", T_STRING, "llama"),
        ("general.name", T_STRING, f"shape-{shape}"),
        ("general.file_type", T_UINT32, FTYPE_OF[type_id]),
        ("llama.block_count", T_UINT32, n_layer),
        ("llama.context_length", T_UINT32, ctx),
        ("llama.embedding_length", T_UINT32, n_embd),
        ("llama.feed_forward_length", T_UINT32, n_ff),
        ("llama.attention.head_count", T_UINT32, n_head),
        ("llama.attention.head_count_kv", T_UINT32, n_kv),
        ("llama.vocab_size", T_UINT32, n_vocab),
    ]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, kind, value in kvs:
        out += gstr(key) + struct.pack("<I", kind) + value_bytes(kind, value)
    offset = 0
    for name, dims, tid in tensors:
        _, block, block_bytes = GGML_TYPES[tid]
        n = 1
        for d in dims:
            n *= d
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", tid, offset)
        offset += -(-(n // block * block_bytes) // 32) * 32
    out += b"\0" * ((-len(out)) % 32)
    with open(path, "wb") as fh:
        fh.write(out)
        fh.truncate(len(out) + offset)
    return path


# --- huge but well-formed headers ---------------------------------------------------
#
# Files of ~100 MB that break no rule of the format, only every plausible size:
# written in chunks (never held in memory whole), with holes for long runs of
# zeros, so tests can generate them on the fly in tmp_path.

_BATCH = 1 << 16


def _kv_head(key: str, kind: int) -> bytes:
    return gstr(key) + struct.pack("<I", kind)


def write_huge(path: Path, *, kvs: tuple[int, Any] = (0, ()), tensors: int = 0) -> Path:
    """``RawGGUF.minimal()`` plus ``kvs = (count, chunks)`` extra encoded kv entries
    and ``tensors`` extra small F32 tensors.

    ``chunks`` yields bytes, or an int: a hole of that many zero bytes (sparse on
    disk). The result is a valid model: the header is merely huge.
    """
    base = RawGGUF.minimal()
    n_kvs, chunks = kvs
    # The three base tensors are 1 KiB, 4 KiB and 1 KiB of F32 data, packed in order.
    base_tensors = [(t.name, t.dims, t.nbytes()) for t in base.tensors]
    with open(path, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, len(base_tensors) + tensors, len(base.kvs) + n_kvs))
        for key, kind, value in base.kvs:
            fh.write(gstr(key) + struct.pack("<I", kind) + value_bytes(kind, value))
        for chunk in chunks:
            if isinstance(chunk, int):
                fh.seek(chunk, 1)
            else:
                fh.write(chunk)
        offset = 0
        for name, dims, nbytes in base_tensors:
            fh.write(gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims))
            fh.write(struct.pack("<IQ", 0, offset))
            offset += nbytes
        # Named x.00000000, x.00000001, ...: 1-D F32 tensors of 32 elements, 128 bytes each.
        info = struct.Struct("<Q10sIQIQ")
        for start in range(0, tensors, _BATCH):
            fh.write(b"".join(info.pack(10, b"x.%08d" % i, 1, 32, 0, offset + 128 * i) for i in range(start, min(start + _BATCH, tensors))))
        offset += 128 * tensors
        pos = fh.seek(0, 1)
        fh.seek(-pos % 32, 1)
        fh.truncate(fh.tell() + offset)
    return path


def nested_arrays(count: int, inner: int = 0) -> tuple[int, Any]:
    """One key holding an array of ``count`` arrays of ``inner`` u32 each."""
    element = struct.pack("<IQ", T_UINT32, inner) + struct.pack("<I", 300) * inner

    def chunks():
        yield _kv_head("x.nested", T_ARRAY) + struct.pack("<IQ", T_ARRAY, count)
        for start in range(0, count, _BATCH):
            yield element * min(_BATCH, count - start)

    return 1, chunks()


def many_keys(count: int) -> tuple[int, Any]:
    """``count`` extra u8 keys."""

    entry = struct.Struct("<Q10sIB")  # key x.00000000, x.00000001, ...; type u8; value 1

    def chunks():
        for start in range(0, count, _BATCH):
            yield b"".join(entry.pack(10, b"x.%08d" % i, T_UINT8, 1) for i in range(start, min(start + _BATCH, count)))

    return count, chunks()


def string_array(count: int, length: int = 0, key: str = "tokenizer.ggml.tokens", declared: int | None = None) -> tuple[int, Any]:
    """One key holding ``count`` strings of ``length`` bytes (zeros: holes when long).

    ``declared``: the count the array's header claims, if not ``count`` (a lie
    that only a source claiming a larger size than the file's can keep up).
    """

    def chunks():
        yield _kv_head(key, T_ARRAY) + struct.pack("<IQ", T_STRING, count if declared is None else declared)
        if length >= 4096:
            prefix = struct.pack("<Q", length)
            for _ in range(count):
                yield prefix
                yield length
            return
        item = struct.pack("<Q", length) + b"a" * length
        for start in range(0, count, _BATCH):
            yield item * min(_BATCH, count - start)

    return 1, chunks()


def many_arrays(keys: int, count: int = 4096, kind: int = T_UINT32) -> tuple[int, Any]:
    """``keys`` extra keys, each an array of ``count`` numbers (or distinct five-character strings)."""
    if kind == T_STRING:
        body = struct.pack("<IQ", kind, count) + b"".join(gstr(b"%05d" % i) for i in range(count))
    else:
        body = struct.pack("<IQ", kind, count) + struct.pack(_FMT[kind], 300 if kind != T_UINT8 else 3) * count

    def chunks():
        for i in range(keys):
            yield _kv_head(f"x.a{i:08d}", T_ARRAY) + body

    return keys, chunks()
