"""Model names: what a user may type for a model, and the names llmctl gives models.

A reference to a model on the Hub (``HubRef``) is parsed from any of these forms
(what ``pull``, ``search --files`` and ``fit`` take):

- a short name (the catalog's): ``llama-2-7b-chat``, optionally ``:QUANT``
- ``owner/repo`` and ``owner/repo:QUANT`` (Ollama / llama.cpp ``-hf`` syntax)
- ``hf.co/owner/repo[:QUANT]`` and ``huggingface.co/…`` URLs of a repo, a
  ``tree/REV``, or a file (``blob/REV/f.gguf``, ``resolve/REV/f.gguf``)
- ``owner/repo/file.gguf``

A local name (``smollm2-135m-instruct:q4_1``) is lowercase letters, digits and
``. _ : + -``; names are made from a file name or a repo plus its quant. A
GGUF file found in the Hugging Face cache is named ``owner/repo/FILE@REVISION``.

This module is the bottom of ``llmctl.models``: it imports none of its siblings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import UsageError
from llmctl.gguf import SPLIT_RE

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._:+-]{0,127}$")
QUANT_IN_NAME_RE = re.compile(r"[-._](?P<quant>(?:I?Q\d(?:_[0-9A-Z]+)*)|BF16|F16|F32|MXFP4(?:_MOE)?)$", re.IGNORECASE)

_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# A branch or tag name as git allows it (git check-ref-format), short enough for a file name.
_BAD_REF = re.compile(r"^/|/$|//|\.\.|@\{|(^|/)\.|\.lock(/|$)|\.$|[\x00-\x20\x7f~^:?*\[\\]")


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub as the user named it."""

    repo_id: str
    quant: str | None = None
    filename: str | None = None
    revision: str | None = None
    alias: str | None = None  # the short (catalog) name, when one was used


def parse_ref(text: str, aliases: Mapping[str, str] | None = None) -> HubRef | None:
    """A HubRef for a short name in ``aliases`` (lowercase name → repo id) or a Hub reference;
    None if ``text`` is neither."""
    text = text.strip()
    base, _, quant = text.partition(":") if not text.lower().startswith(("http://", "https://")) else (text, "", "")
    repo = (aliases or {}).get(base.lower())
    if repo is not None:
        return HubRef(repo, quant or None, alias=base.lower())
    ref = text
    for prefix in _PREFIXES:
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix) :]
            break
    ref, _, quant = ref.partition(":")
    ref = ref.split("?", 1)[0].strip("/")
    parts = ref.split("/")
    if len(parts) < 2 or not (_NAME_PART.match(parts[0]) and _NAME_PART.match(parts[1])):
        return None
    repo_id = f"{parts[0]}/{parts[1]}"
    rest = parts[2:]
    revision = None
    if rest and rest[0] in ("resolve", "blob", "tree") and len(rest) >= 2:
        revision = rest[1]
        rest = rest[2:]
    filename = "/".join(rest) or None
    if filename and not filename.lower().endswith(".gguf"):
        return None
    return HubRef(repo_id, quant or None, filename, revision)


def check_revision(revision: str | None) -> str | None:
    """A branch, tag or commit the user named, which may become ``refs/<revision>`` in the cache."""
    if revision is not None and (not revision or len(revision) > 200 or _BAD_REF.search(revision)):
        raise UsageError(f"{revision!r:.80} is not a valid branch, tag or commit name", hint="check the revision in the name")
    return revision


def quant_of_filename(filename: str) -> str | None:
    """``Llama-3.2-1B-Instruct-Q4_K_M.gguf`` → ``Q4_K_M`` (split suffixes ignored)."""
    match = QUANT_IN_NAME_RE.search(_stem(filename.rsplit("/", 1)[-1]))
    return match["quant"].upper() if match else None


def is_projector_filename(filename: str) -> bool:
    """A multimodal projector (``mmproj-model-f16.gguf``, ``Qwen2-VL-mmproj-Q8_0.gguf``): loaded beside a
    model (llama-server ``--mmproj``), never as one."""
    name = filename.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and "mmproj" in name


def is_model_filename(filename: str) -> bool:
    """A GGUF file that holds a model: not a projector, not an importance matrix (``imatrix``)."""
    name = filename.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and "mmproj" not in name and "imatrix" not in name


_TAG_RE = re.compile(r"[-.](?P<tag>[A-Z0-9_]+)$", re.IGNORECASE)


def quant_bits(filename: str) -> int:
    """The bits of the quant a file name ends with, as llama.cpp reads it (``-Q4_K_M`` → 4, ``-f16`` → 16);
    0 when the name has none."""
    match = _TAG_RE.search(_stem(filename.rsplit("/", 1)[-1]))
    digits = re.search(r"\d+", match["tag"]) if match else None
    return int(digits[0]) if digits else 0


def pick_projector(model: str, projectors: list[str]) -> str | None:
    """The projector that goes with ``model`` (both paths inside one repo or snapshot), as llama.cpp's
    ``-hf`` picks it (common/download.cpp, ``find_best_sibling``): one in the model's folder or a folder
    above it, the deepest such folder first, then the one whose quant bits are closest to the model's
    (``mmproj-Q8_0`` for a Q4_K_M model rather than ``mmproj-f16``); the first in path order on a tie."""
    model_dir = model.split("/")[:-1]
    model_bits = quant_bits(model)
    best: tuple[int, int] | None = None
    chosen = None
    for path in sorted(projectors):
        folder = path.split("/")[:-1]
        if folder != model_dir[: len(folder)]:
            continue
        rank = (-len(folder), abs(quant_bits(path) - model_bits))
        if best is None or rank < best:
            best, chosen = rank, path
    return chosen


def _stem(filename: str) -> str:
    """A GGUF file's name without ``.gguf`` and without a split suffix (``-00001-of-00003.gguf``)."""
    split = SPLIT_RE.match(filename)
    return split["prefix"] if split else re.sub(r"\.gguf$", "", filename, flags=re.IGNORECASE)


def clean(text: str) -> str:
    """Text as a part of a local name: lowercase, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9._+-]+", "-", text.lower()).strip("-._") or "model"


def validate_name(name: str) -> str:
    """A name the user chose, normalised (lowercase); refused if it is not a valid local name."""
    normal = name.strip().lower()
    if not NAME_RE.match(normal):
        raise UsageError(
            f"invalid model name '{name}'",
            hint="use letters, digits and . _ : + - (up to 128 characters, no '/')",
        )
    return normal


def default_name(path: Path, quant: str) -> str:
    """An imported file's name: ``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``smollm2-135m-instruct:q4_1``."""
    stem = _stem(path.name)
    match = QUANT_IN_NAME_RE.search(stem)
    if match:
        quant = match["quant"]
        stem = stem[: match.start()]
    return f"{clean(stem)}:{quant.lower()}"


def default_pull_name(ref: HubRef, label: str) -> str:
    """A pulled model's name: the short name or the repo (less a ``-GGUF`` suffix), and the quant
    (``label``, the file's quant or its path when it has none)."""
    base = ref.alias or ref.repo_id.split("/")[-1]
    for suffix in ("-gguf", "_gguf", ".gguf"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    tag = label if "/" not in label and not label.lower().endswith(".gguf") else "gguf"
    return validate_name(f"{clean(base)}:{clean(tag)}")


def discovered_full_name(repo: str, revision: str, filename: str) -> str:
    """``owner/repo/FILE@REVISION`` (12 hex digits): names one file of one snapshot, whatever else is there."""
    return f"{repo}/{filename}@{revision[:12]}"
