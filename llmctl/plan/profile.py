"""The hardware-profile schema: what a JSON file describing a machine may hold (docs/hardware-profiles.md).

One pydantic model states every field's type, whether it is required, its
range and the rules between fields; ``check`` words the first problem as one
line naming the field (``field 'gpus[0].memory_total_gib' must be a number, got
True``). Sizes are given in GiB (``*_gib``) or GB (``*_gb``), one unit per field. Values are typed as JSON types them: a number is never ``true`` or
``"8"``, a count is never ``4.0``. Fields the schema does not know are ignored.
``hardware.load_profile`` reads the file and turns the checked profile into the
``HardwareInfo`` the planner takes (this module imports pydantic, so only then).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

Backend = Literal["cpu", "cuda", "metal", "vulkan", "rocm"]
BACKENDS: tuple[str, ...] = get_args(Backend)
APPLE_GPU_SHARE = 0.75  # Metal lets a process keep about three quarters of unified memory resident on the GPU
RAM_AVAILABLE_SHARE = 0.85  # available memory when a profile does not say

PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveCount = Annotated[int, Field(gt=0)]
# A size is given in one of two units, named by its field's suffix: ``_gib`` (2^30 bytes: what
# RAM and GPU makers mean by "8 GB", and what ``free -g`` or nvidia-smi's MiB count in) or ``_gb``
# (10^9 bytes, as the name says).
UNITS = {"gib": 1024**3, "gb": 10**9}


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    def given(self, size: str) -> str | None:
        """The field that holds ``size`` (``total_gib`` or ``total_gb`` for ``total``), None if neither."""
        return next((f"{size}_{unit}" for unit in UNITS if getattr(self, f"{size}_{unit}") is not None), None)

    def size_bytes(self, size: str) -> int | None:
        """``size`` in bytes, from whichever unit it was given in."""
        name = self.given(size)
        return None if name is None else int(getattr(self, name) * UNITS[name.rsplit("_", 1)[1]])


class CPUProfile(_Part):
    physical_cores: PositiveCount  # the default thread count
    logical_cores: PositiveCount | None = None
    brand: str | None = None
    arch: str | None = None
    features: list[str] = Field(default_factory=list)
    bandwidth_gbs: PositiveNumber | None = None  # memory read bandwidth, for expected speeds


class RAMProfile(_Part):
    total_gib: PositiveNumber | None = None  # required, in one unit or the other
    total_gb: PositiveNumber | None = None
    available_gib: PositiveNumber | None = None  # default: RAM_AVAILABLE_SHARE of the total
    available_gb: PositiveNumber | None = None


class GPUProfile(_Part):
    name: str
    vendor: str | None = None  # nvidia (default; apple with the metal backend) or apple (unified memory)
    memory_total_gib: PositiveNumber | None = None  # required except for Apple GPUs
    memory_total_gb: PositiveNumber | None = None
    memory_free_gib: PositiveNumber | None = None  # default: all of it
    memory_free_gb: PositiveNumber | None = None
    bandwidth_gbs: PositiveNumber | None = None
    compute_capability: str | None = None


class HardwareProfile(_Part):
    """A described machine, checked whole."""

    name: str | None = None  # default: the file's name
    os: str | None = None
    backend: Backend = "cpu"  # what the llama.cpp build can offload to
    cpu: CPUProfile
    ram: RAMProfile
    gpus: list[GPUProfile] = Field(default_factory=list)
    disk_free_gib: PositiveNumber | None = None
    disk_free_gb: PositiveNumber | None = None

    def vendor(self, gpu: GPUProfile) -> str:
        return gpu.vendor or ("apple" if self.backend == "metal" else "nvidia")

    @property
    def ram_total(self) -> int:
        total = self.ram.size_bytes("total")
        assert total is not None  # checked by _consistent
        return total

    def gpu_memory_total(self, gpu: GPUProfile) -> int:
        """A GPU's memory in bytes; an Apple GPU without one has Metal's share of the RAM."""
        total = gpu.size_bytes("memory_total")
        return total if total is not None else int(self.ram_total * APPLE_GPU_SHARE)

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        sizes: list[tuple[str, _Part, str]] = [("ram.", self.ram, "total"), ("ram.", self.ram, "available"), ("", self, "disk_free")]
        for index, gpu in enumerate(self.gpus):
            sizes += [(f"gpus[{index}].", gpu, "memory_total"), (f"gpus[{index}].", gpu, "memory_free")]
        for where, part, size in sizes:
            if all(getattr(part, f"{size}_{unit}") is not None for unit in UNITS):
                raise _rule(f"fields '{where}{size}_gib' and '{where}{size}_gb' are both given: use one (GiB = 2^30 bytes, GB = 10^9)")
        if self.ram.given("total") is None:
            raise _rule("missing field 'ram.total_gib' (or 'ram.total_gb')")
        available = self.ram.size_bytes("available")
        if available is not None and available > self.ram_total:
            raise _rule(f"field 'ram.{self.ram.given('available')}' is larger than 'ram.{self.ram.given('total')}'")
        for index, gpu in enumerate(self.gpus):
            where = f"gpus[{index}]."
            if gpu.given("memory_total") is None and self.vendor(gpu) != "apple":
                raise _rule(f"missing field '{where}memory_total_gib' (or '{where}memory_total_gb')")
            free = gpu.size_bytes("memory_free")
            if free is not None and free > self.gpu_memory_total(gpu):
                total_name = gpu.given("memory_total") or "memory_total_gib"
                raise _rule(f"field '{where}{gpu.given('memory_free')}' is larger than '{where}{total_name}'")
        if self.backend != "cpu" and not self.gpus:
            raise _rule(f"backend '{self.backend}' needs at least one entry in 'gpus'")
        return self


def check(data: Any) -> HardwareProfile:
    """``data`` (a parsed JSON document) as a checked profile; ValueError saying the first problem in one line."""
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_problem(exc.errors(include_url=False)[0])) from None


def _rule(text: str) -> PydanticCustomError:
    return PydanticCustomError("profile_rule", "{text}", {"text": text})


_MUST_BE = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "an object",
    "dict_type": "an object",
    "greater_than": "positive",
    "finite_number": "a finite number",
}


def _problem(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "profile_rule":
        return error["msg"]
    where = _dotted(error["loc"])
    if not where:
        return "must be a JSON object"
    if kind == "missing":
        return f"missing field '{where}'"
    given = _shown(error.get("input"))
    if kind == "literal_error" and where == "backend":
        return f"field 'backend' must be one of {', '.join(BACKENDS)}, got {given}"
    if kind in _MUST_BE:
        return f"field '{where}' must be {_MUST_BE[kind]}, got {given}"
    return f"field '{where}': {error['msg']}, got {given}"


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``('gpus', 0, 'name')`` as ``gpus[0].name``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
