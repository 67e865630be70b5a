"""Memory estimate and fit planner: how to load a model on this machine, and why.

Everything is derived from the GGUF header (``ModelInfo``) and a
``HardwareInfo`` (live probe or profile); nothing is loaded. The estimate
follows what llama.cpp (through llama-cpp-python's defaults) actually
allocates; docs/fit.md derives each term and records how it was measured.

- weights: tensor bytes per device, with llama.cpp's placement: the output
  layer goes to the GPU first, then the last blocks (``i_gpu_start = n_layer +
  1 - n_gpu_layers``); token embeddings stay on the CPU (a tied output layer is
  a GPU copy of them).
- KV cache: per layer, n_cells × n_head_kv × (key_length × s_k + value_length
  × s_v) at the cache type's true block size; sliding-window layers hold fewer
  cells only when ``swa_full`` is off (llama-cpp-python's default is on,
  llama-server's off). A server with n parallel slots holds n streams of
  n_ctx cells each (one stream of n × n_ctx when the cache is unified).
- compute: the larger of the attention + feed-forward working set and the
  logits, for a micro-batch against the KV cells in use (of one stream).
- fixed: the tokenizer's tables, the runtime, and per-GPU backend contexts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from llmctl.errors import DoesNotFitError
from llmctl.gguf import ModelInfo
from llmctl.plan.hardware import GPUInfo, HardwareInfo

MIB = 1024**2
GIB = 1024**3

DEFAULT_CTX = 8192  # what a model gets by default, when its trained context is larger
MIN_AUTO_CTX = 2048  # the planner shrinks the context down to this before giving up
KV_PAD = 256  # llama.cpp pads the KV cache to a multiple of this many cells
SPEED_DEPTH = 512  # tokens in context when the expected generation speed is quoted
# Parallel slots a serving plan tries, most first. 4 is llama-server's own count when
# -np is left to it ("auto"); fewer when four contexts do not fit beside the weights.
SLOT_LADDER = (4, 3, 2)

# Bytes per element of each KV cache type: (elements per block, bytes per block).
KV_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18),
    "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "iq4_nl": (32, 18),
}  # fmt: skip

# Fixed costs. The CPU ones were measured with llama-cpp-python 0.3.36 (docs/fit.md):
# the tokenizer's tables grow with the vocabulary and the BPE merges.
VOCAB_BYTES_PER_TOKEN = 300
VOCAB_BYTES_PER_MERGE = 116
CPU_RUNTIME_BYTES = 4 * MIB
# Per-GPU memory outside llama.cpp's buffers (CUDA context, cuBLAS workspace): measured
# 696-716 MiB for a llama-server child on an H200 (CUDA 13.0, driver 580; NVML's figure for
# the process minus the buffers llama.cpp logs; docs/fit.md). Apple's is a typical figure.
GPU_BACKEND_BYTES = {"nvidia": 700 * MIB, "apple": 64 * MIB}
# Host memory a CUDA process holds beyond llama.cpp's buffers (the CUDA and cuBLAS
# libraries and the driver's host allocations): measured 472-534 MiB of RSS on the same
# machine. Resident only: llama.cpp's own projection leaves it out.
CUDA_HOST_RUNTIME_BYTES = 500 * MIB
# With layers on a GPU, llama.cpp runs the graph there (big batches of host layers too:
# ``op_offload``) and the host keeps a pinned staging buffer of about this many bytes per
# token of the micro-batch and per embedding dimension (measured 26.0 on CUDA, three shapes).
HOST_STAGING_BYTES_PER_TOKEN_DIM = 26
# Head-room the planner leaves: llama.cpp's own fitting keeps 1 GiB free per GPU.
GPU_MARGIN = 1 * GIB
RAM_MARGIN = 512 * MIB

# Architectures whose sliding-window layers follow a fixed pattern: of every n
# layers, the first n-1 use the window (llama.cpp's ``set_swa_pattern``).
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "llama4": 4, "gpt-oss": 2, "exaone4": 4}


@dataclass
class LoadConfig:
    """How a model is loaded: the knobs the plan sets and the user may override."""

    n_ctx: int
    n_gpu_layers: int = 0  # 0 … n_layer + 1 (the +1 is the output layer)
    n_batch: int = 512
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    swa_full: bool = True
    tensor_split: list[float] | None = None  # share of offloaded layers per GPU
    # Sequences decoded at once (llama-server's slots, llama.cpp's n_seq_max): the KV cache
    # holds n_ctx cells for each, so a server is started with -c n_ctx × n_seq.
    n_seq: int = 1
    kv_unified: bool = False  # one KV stream shared by all slots (llama-server --kv-unified)
    projector_bytes: int = 0  # a multimodal projector loaded beside the model (llama-server --mmproj)

    @property
    def total_ctx(self) -> int:
        """The context size llama.cpp is given (``-c``): every slot's context together."""
        return self.n_ctx * self.n_seq


@dataclass
class DeviceEstimate:
    """One device's memory for a load: what llama.cpp allocates there (``total``) and, for host
    memory, what the process holds in use (``resident``).

    The two differ in RAM only: llama.cpp reserves its compute buffer for the worst graph (a
    micro-batch of logits rows), but a generation touches one row per sequence, and the pages
    never touched are never resident. On a GPU the allocation is what is taken. So a GPU fits
    on ``total``, the host on ``resident`` (the planner keeps a margin beside it).
    """

    device: str
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0
    projector: int = 0  # a multimodal projector's weights
    available: int | None = None  # what the planner lets this device use
    bandwidth_gbs: float | None = None
    bytes_per_token: int = 0  # read per generated token (weights + KV at the assumed depth)
    layers: int = 0
    host: bool = False  # system RAM (decided on resident memory)
    compute_resident: int | None = None  # the part of the compute buffer a generation touches (host only)
    runtime_resident: int = 0  # resident memory outside llama.cpp's allocations (the CUDA libraries)

    @property
    def buffers(self) -> int:
        """llama.cpp's own buffers: what ``llama-fit-params`` projects for this device."""
        return self.weights + self.kv_cache + self.compute + self.projector

    @property
    def total(self) -> int:
        """Allocated: llama.cpp's buffers and the runtime beside them (a GPU's context, the tokenizer)."""
        return self.buffers + self.overhead

    @property
    def resident(self) -> int:
        """In use: for the host, what the process's RSS grows by; for a GPU, its allocation."""
        if not self.host:
            return self.total
        compute = self.compute if self.compute_resident is None else self.compute_resident
        return self.weights + self.kv_cache + compute + self.projector + self.overhead + self.runtime_resident

    @property
    def needed(self) -> int:
        """What the fit is decided on: resident memory in RAM, the allocation on a GPU."""
        return self.resident if self.host else self.total

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available


@dataclass
class MemoryEstimate:
    config: LoadConfig
    devices: list[DeviceEstimate]
    unified_total_available: int | None = None  # Apple: GPU and CPU share RAM

    @property
    def total(self) -> int:
        """Allocated, all devices together."""
        return sum(d.total for d in self.devices)

    @property
    def resident(self) -> int:
        """In use, all devices together (host memory as resident, GPU memory as allocated)."""
        return sum(d.resident for d in self.devices)

    @property
    def fits(self) -> bool:
        if self.unified_total_available is not None and self.resident > self.unified_total_available:
            return False
        return all(d.fits for d in self.devices)


# --- the estimate -----------------------------------------------------------------


def _per_layer(value: int | list[int] | None, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list):
        if len(value) != n_layer:
            return [max(value) if value else default] * n_layer
        return list(value)
    return [default if value is None else value] * n_layer


def padded_cells(n: int) -> int:
    return max(KV_PAD, -(-n // KV_PAD) * KV_PAD)


def kv_streams(config: LoadConfig) -> tuple[int, int]:
    """(cells per stream, streams) of the KV cache, as llama.cpp sizes it for ``n_seq`` slots.

    llama_context pads the total context to 256 cells, then gives each sequence its own
    stream of ``pad(n_ctx_total / n_seq)`` cells, or, unified, one stream of them all.
    """
    if config.kv_unified:
        return padded_cells(config.n_ctx * config.n_seq), 1
    return padded_cells(config.n_ctx), config.n_seq


def swa_layers(info: ModelInfo) -> list[bool]:
    """Which layers use the sliding window."""
    n_layer = info.layer_count or 0
    if not info.sliding_window:
        return [False] * n_layer
    pattern = info.sliding_window_pattern
    if isinstance(pattern, list) and len(pattern) == n_layer:
        return list(pattern)
    period = pattern if isinstance(pattern, int) and pattern > 0 else SWA_PATTERNS.get(info.architecture)
    if period is None:
        return [True] * n_layer  # every layer windowed (Mistral-style)
    return [(il % period) < (period - 1) for il in range(n_layer)]


def kv_cache_bytes_per_layer(info: ModelInfo, config: LoadConfig) -> list[int]:
    """KV cache bytes of each layer for ``config.n_ctx`` cells in each of ``config.n_seq`` slots."""
    n_layer = info.layer_count or 0
    heads = info.max_head_count or 1
    n_embd = info.embedding_length or 0
    kv_heads = _per_layer(info.head_count_kv, n_layer, heads)
    key_length = info.key_length or (n_embd // heads if heads else 0)
    value_length = info.value_length or key_length
    block_k, size_k = KV_TYPES[config.type_k]
    block_v, size_v = KV_TYPES[config.type_v]
    full_cells, streams = kv_streams(config)
    # A unified windowed cache keeps a window for each sequence (llama_kv_cache_iswa).
    window_seqs = config.n_seq if config.kv_unified else 1
    windowed = swa_layers(info)
    out = []
    for il in range(n_layer):
        cells = full_cells
        if windowed[il] and not config.swa_full and info.sliding_window:
            cells = min(full_cells, padded_cells(info.sliding_window * window_seqs + config.n_ubatch))
        per_cell = kv_heads[il] * (key_length * size_k / block_k + value_length * size_v / block_v)
        out.append(int(cells * per_cell) * streams)
    return out


def compute_buffer_bytes(info: ModelInfo, n_tokens: int, n_kv: int, n_outputs: int, flash_attn: bool) -> int:
    """Working memory of one forward pass over ``n_tokens`` attending to ``n_kv`` cells.

    Attention holds the scores (n_kv × n_tokens × n_head floats) and the mask,
    beside a few embedding-sized activations; the feed-forward block holds its
    gate/up/product activations; the output holds the logits. llama.cpp's
    allocator reuses memory between phases, so the larger of the two sides
    counts.
    """
    e = info.embedding_length or 0
    h = info.max_head_count or 1
    ff_value = info.feed_forward_length
    if isinstance(ff_value, list):  # per-layer sizes: the largest layer decides the buffer
        ff = max(ff_value) if ff_value else 4 * e
    else:
        ff = ff_value or 4 * e
    b = n_tokens
    if flash_attn:
        attention = 4 * b * (1 + 4 * e) + 2 * b * n_kv
    else:
        attention = 4 * b * (1 + 4 * e + n_kv * (1 + h))
    feed_forward = 12 * b * ff
    logits = 4 * (b * e + n_outputs * (info.vocab_size or 0))
    return max(attention + feed_forward, logits)


def tokenizer_bytes(info: ModelInfo) -> int:
    return VOCAB_BYTES_PER_TOKEN * (info.vocab_size or 0) + VOCAB_BYTES_PER_MERGE * (info.merges_count or 0)


def _gpu_shares(gpus: list[GPUInfo], split: list[float] | None) -> list[float]:
    weights = split if split and len(split) == len(gpus) else [max(g.memory_free, 1) for g in gpus]
    total = sum(weights) or 1
    return [w / total for w in weights]


def _layer_devices(n_layer: int, ngl: int, shares: list[float]) -> list[int]:
    """Device of each layer: -1 for the CPU, else the GPU index (llama.cpp's layer split)."""
    start = max(n_layer + 1 - ngl, 0)
    offloaded = max(n_layer - start, 0)
    devices = []
    bounds = []
    acc = 0.0
    for share in shares:
        acc += share
        bounds.append(acc)
    for il in range(n_layer):
        if il < start or not shares:
            devices.append(-1)
            continue
        position = (il - start) / max(offloaded, 1)
        devices.append(next((i for i, bound in enumerate(bounds) if position < bound - 1e-12), len(shares) - 1))
    return devices


def estimate_memory(
    info: ModelInfo,
    config: LoadConfig,
    hw: HardwareInfo | None = None,
    *,
    depth: int | None = None,
    n_outputs: int | None = None,
) -> MemoryEstimate:
    """Memory per device for loading ``info`` with ``config`` on ``hw``.

    ``depth`` is how many KV cells are in use (default: all of ``n_ctx``, the
    worst case a long conversation reaches); ``n_outputs`` how many logits a
    batch returns (default: a full micro-batch, as llama.cpp reserves).
    """
    n_layer = info.layer_count or 0
    gpus = hw.usable_gpus if hw else []
    ngl = min(max(config.n_gpu_layers, 0), n_layer + 1) if gpus else 0
    config = replace(config, n_gpu_layers=ngl)
    shares = _gpu_shares(gpus, config.tensor_split)
    layer_device = _layer_devices(n_layer, ngl, shares)
    output_device = (len(gpus) - 1) if ngl >= 1 and gpus else -1
    kv_layers = kv_cache_bytes_per_layer(info, config)
    layer_bytes = info.layer_bytes if len(info.layer_bytes) == n_layer else [0] * n_layer

    cpu = DeviceEstimate("CPU", available=None if hw is None else max(hw.ram_available - RAM_MARGIN, 0), host=True)
    cpu.bandwidth_gbs = hw.cpu.bandwidth_gbs if hw else None
    gpu_estimates = [DeviceEstimate(f"GPU {g.index}: {g.name}", available=max(g.memory_free - GPU_MARGIN, 0), bandwidth_gbs=g.bandwidth_gbs) for g in gpus]

    def device(index: int) -> DeviceEstimate:
        return cpu if index < 0 else gpu_estimates[index]

    stream_cells, streams = kv_streams(config)
    # Attention runs over one stream's cells (each slot's own, or the whole unified pool).
    kv_depth = padded_cells(min(depth, config.n_ctx)) if depth is not None else stream_cells
    # Speed is quoted early in a conversation: the KV cache read per token at this depth.
    read_depth = min(depth if depth is not None else SPEED_DEPTH, config.n_ctx)
    for il in range(n_layer):
        dev = device(layer_device[il])
        dev.weights += layer_bytes[il]
        dev.kv_cache += kv_layers[il]
        dev.layers += 1
        active = layer_bytes[il]
        if info.expert_count and info.expert_used_count and info.expert_bytes:
            # Only the routed experts' weights are read for a token.
            idle = info.expert_bytes / max(n_layer, 1) * (1 - info.expert_used_count / info.expert_count)
            active = max(int(active - idle), 0)
        # One sequence's KV cache at the read depth: of its own stream (a slot's share of a unified one).
        dev.bytes_per_token += active + int(kv_layers[il] * read_depth / (stream_cells * streams))
    out_dev = device(output_device)
    out_dev.weights += info.output_bytes
    out_dev.bytes_per_token += info.output_bytes
    cpu.weights += info.embedding_bytes + info.other_bytes
    if info.tied_embeddings:
        out_dev.bytes_per_token += info.embedding_bytes  # the output layer reads the whole matrix
        if output_device >= 0:
            out_dev.weights += info.embedding_bytes  # llama.cpp copies it to the GPU as the output layer

    batch = min(config.n_ubatch, config.total_ctx)
    n_kv = kv_depth
    outputs = batch if n_outputs is None else n_outputs
    full = compute_buffer_bytes(info, batch, n_kv, outputs, config.flash_attn)
    # A generation asks for one row of logits per sequence, not the micro-batch reserved.
    touched = compute_buffer_bytes(info, batch, n_kv, min(config.n_seq, batch) if n_outputs is None else n_outputs, config.flash_attn)
    for index, dev in enumerate(gpu_estimates):
        if dev.layers or index == output_device:
            dev.compute = full
        dev.overhead = GPU_BACKEND_BYTES.get(gpus[index].vendor, GPU_BACKEND_BYTES["nvidia"])
    if ngl >= 1 and gpus:
        # The graph runs on the GPU (host layers' big batches too); the host only stages inputs.
        cpu.compute = HOST_STAGING_BYTES_PER_TOKEN_DIM * batch * (info.embedding_length or 0)
        if any(g.vendor == "nvidia" for g in gpus):
            cpu.runtime_resident = CUDA_HOST_RUNTIME_BYTES
    else:
        cpu.compute = full
        cpu.compute_resident = touched
    cpu.overhead = tokenizer_bytes(info) + CPU_RUNTIME_BYTES
    # llama.cpp's mtmd puts a projector on the first GPU; with no layer offloaded, llmctl keeps it in RAM.
    (gpu_estimates[0] if ngl >= 1 and gpus else cpu).projector = config.projector_bytes

    unified = None
    if gpus and all(g.unified for g in gpus) and hw is not None:
        unified = max(hw.ram_available - RAM_MARGIN, 0)
    return MemoryEstimate(config=config, devices=[cpu, *gpu_estimates], unified_total_available=unified)


def expected_tokens_per_second(estimate: MemoryEstimate) -> float | None:
    """Generation speed bound: bytes read per token on each device ÷ its bandwidth."""
    seconds = 0.0
    for dev in estimate.devices:
        if not dev.bytes_per_token:
            continue
        if not dev.bandwidth_gbs:
            return None
        seconds += dev.bytes_per_token / (dev.bandwidth_gbs * 1e9)
    return 1 / seconds if seconds else None


# --- the planner ------------------------------------------------------------------

FULL_GPU = "full GPU offload"
PARTIAL = "partial offload"
CPU_ONLY = "CPU only"
TOO_LARGE = "too large"
_CLASS_RANK = {FULL_GPU: 0, PARTIAL: 1, CPU_ONLY: 2, TOO_LARGE: 3}
# Unquantised weights: no better than Q8_0 in use, while twice its size and half its
# speed. They are chosen only when no quantised file fits. Decided by the file's type,
# not by bits per weight: a small model's Q8_0 file has more than 8.5 bits per weight
# (its tokenizer and norms weigh more), an F16 file less than 16.
UNQUANTISED_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


@dataclass
class Candidate:
    """One file (or split set) that could be loaded: a local model or a quant in a repo."""

    label: str
    info: ModelInfo
    size: int
    location: str | None = None
    projector_size: int = 0  # the multimodal projector loaded with it, if any

    @property
    def bits_per_weight(self) -> float:
        return self.size * 8 / max(self.info.parameter_count, 1)

    @property
    def unquantised(self) -> bool:
        """F16/BF16/F32 weights (``general.file_type``, else the dominant tensor type)."""
        return self.info.quant.upper() in UNQUANTISED_TYPES


@dataclass
class Overrides:
    """What the user fixed; the planner chooses the rest.

    ``serving`` asks for a plan for llama-server (``serve``) rather than for one
    in-process sequence (``run``, ``chat``, ``bench``): it gets parallel slots, the
    most of ``SLOT_LADDER`` that fit beside the weights, or exactly ``parallel``.
    ``parallel`` implies ``serving``; ``n_ctx`` is then each slot's context.
    """

    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    threads: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    flash_attn: bool | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    parallel: int | None = None
    serving: bool = False
    # chat: each turn reuses the conversation's KV cache, which a sliding-window cache cut to
    # its window cannot always roll back to, so chat keeps the full-size one.
    multi_turn: bool = False

    @property
    def for_server(self) -> bool:
        return self.serving or self.parallel is not None


@dataclass
class CandidatePlan:
    candidate: Candidate
    fit: str
    estimate: MemoryEstimate
    tokens_per_second: float | None
    reason: str

    @property
    def fits(self) -> bool:
        return self.fit != TOO_LARGE

    @property
    def config(self) -> LoadConfig:
        return self.estimate.config


@dataclass
class Plan:
    chosen: CandidatePlan
    candidates: list[CandidatePlan]
    threads: int
    hardware: str
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    serving: bool = False  # planned for llama-server's parallel slots (``Overrides.for_server``)

    @property
    def config(self) -> LoadConfig:
        return self.chosen.config

    @property
    def parallel(self) -> int:
        """Slots: requests served at once (llama-server ``-np``); 1 for an in-process load."""
        return self.config.n_seq

    @property
    def total_ctx(self) -> int:
        """The context to start llama-server with (``-c``): ``parallel`` × each slot's ``config.n_ctx``."""
        return self.config.total_ctx

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "hardware": self.hardware,
            "chosen": _candidate_json(self.chosen, self.serving),
            "threads": self.threads,
            "reasons": self.reasons,
            "warnings": self.warnings,
            "candidates": [_candidate_json(c, self.serving) for c in self.candidates],
        }
        if self.serving:
            doc["serving"] = True
        return doc


def _candidate_json(plan: CandidatePlan, serving: bool = False) -> dict[str, Any]:
    cfg = plan.config
    doc: dict[str, Any] = {
        "label": plan.candidate.label,
        "location": plan.candidate.location,
        "size_bytes": plan.candidate.size,
        "quant": plan.candidate.info.quant,
        "bits_per_weight": round(plan.candidate.bits_per_weight, 2),
        "fit": plan.fit,
        "reason": plan.reason,
        "n_ctx": cfg.n_ctx,
        "n_gpu_layers": cfg.n_gpu_layers,
        "n_layers": (plan.candidate.info.layer_count or 0) + 1,
        "type_k": cfg.type_k,
        "type_v": cfg.type_v,
        "flash_attn": cfg.flash_attn,
        "tensor_split": cfg.tensor_split,
        "expected_tokens_per_second": round(plan.tokens_per_second, 1) if plan.tokens_per_second else None,
        "memory": [
            {
                "device": d.device,
                "weights": d.weights,
                "kv_cache": d.kv_cache,
                "compute": d.compute,
                "overhead": d.overhead,
                "projector": d.projector,
                "total": d.total,
                "allocated": d.total,
                "resident": d.resident,
                "available": d.available,
                "fits": d.fits,
            }
            for d in plan.estimate.devices
        ],
        "total_bytes": plan.estimate.total,
        "resident_bytes": plan.estimate.resident,
    }
    if serving:
        doc |= {
            "parallel": cfg.n_seq,
            "ctx_per_slot": cfg.n_ctx,
            "total_ctx": cfg.total_ctx,
            "kv_unified": cfg.kv_unified,
            "swa_full": cfg.swa_full,
            "kv_cache_bytes": sum(d.kv_cache for d in plan.estimate.devices),
        }
    return doc


def default_flash_attn(info: ModelInfo) -> bool:
    """Flash attention unless asked otherwise: the same results without holding the attention
    scores (the compute buffer shrinks by n_kv × micro-batch × heads floats), on every backend
    llama.cpp has (llama.cpp's own ``auto`` turns it on there too). Not for models whose keys
    and values differ in width (MLA): not every backend has those kernels."""
    return not (info.key_length and info.value_length and info.key_length != info.value_length)


def default_context(info: ModelInfo) -> int:
    trained = info.context_length or 4096
    return min(trained, DEFAULT_CTX)


def _contexts(info: ModelInfo, wanted: int | None) -> list[int]:
    if wanted:
        return [wanted]
    ctx = default_context(info)
    options = [ctx]
    while ctx // 2 >= MIN_AUTO_CTX:
        ctx //= 2
        options.append(ctx)
    return options


def plan_candidate(candidate: Candidate, hw: HardwareInfo, overrides: Overrides | None = None) -> CandidatePlan:
    """The best way to load one candidate on ``hw``, or why it cannot be loaded.

    A serving plan (``Overrides.for_server``) gets ``parallel`` slots, or else the most
    of ``SLOT_LADDER`` whose contexts fit beside the weights as placed for one slot:
    slots never move a layer off the GPU, and never shorten a slot's context below
    the one asked for (or the default). Otherwise the plan is for one sequence.
    """
    o = overrides or Overrides()
    if not o.for_server:
        return _plan_slots(candidate, hw, o, 1, swa_full=o.multi_turn)
    # llama-server keeps only the window of sliding-window layers (its --swa-full is off).
    if o.parallel is not None:
        return _plan_slots(candidate, hw, o, o.parallel, swa_full=False)
    one = _plan_slots(candidate, hw, o, 1, swa_full=False)
    if not one.fits or one.config.n_ctx < (o.n_ctx or default_context(candidate.info)):
        return one
    for slots in SLOT_LADDER:
        estimate = estimate_memory(candidate.info, replace(one.config, n_seq=slots), hw)
        if estimate.fits:
            return _describe(candidate, estimate, hw, candidate.info.layer_count or 0)
    return one


def _plan_slots(candidate: Candidate, hw: HardwareInfo, o: Overrides, slots: int, *, swa_full: bool) -> CandidatePlan:
    """The plan for ``slots`` sequences: the longest context of the ladder, then the most GPU layers."""
    info = candidate.info
    n_layer = info.layer_count or 0
    gpus = hw.usable_gpus
    base = LoadConfig(
        n_ctx=0,
        type_k=o.type_k or "f16",
        type_v=o.type_v or "f16",
        flash_attn=default_flash_attn(info) if o.flash_attn is None else o.flash_attn,
        n_batch=o.n_batch or 512,
        n_ubatch=o.n_ubatch or 512,
        projector_bytes=candidate.projector_size,
        swa_full=swa_full,
        n_seq=slots,
    )
    first: MemoryEstimate | None = None
    for n_ctx in _contexts(info, o.n_ctx):
        config = replace(base, n_ctx=n_ctx)
        if o.n_gpu_layers is not None:
            estimate = estimate_memory(info, replace(config, n_gpu_layers=o.n_gpu_layers), hw)
        else:
            estimate = _most_layers_that_fit(info, config, hw) if gpus else estimate_memory(info, config, hw)
        first = first or estimate
        if estimate.fits:
            return _describe(candidate, estimate, hw, n_layer)
    assert first is not None
    biggest = max(first.devices, key=lambda d: d.needed - (d.available or 0))
    context = f"{first.config.n_ctx} tokens of context" if slots == 1 else f"{slots} slots of {first.config.n_ctx} tokens of context"
    reason = f"needs {_gib(first.resident)} at {context}; {biggest.device} would need {_gib(biggest.needed)} of {_gib(biggest.available or 0)} available"
    return CandidatePlan(candidate, TOO_LARGE, first, expected_tokens_per_second(first), reason)


def _most_layers_that_fit(info: ModelInfo, config: LoadConfig, hw: HardwareInfo) -> MemoryEstimate:
    n_layer = info.layer_count or 0
    best = None
    # More layers on the GPU only ever add GPU memory, so search from the top.
    low, high = 0, n_layer + 1
    while low <= high:
        middle = (low + high) // 2
        estimate = estimate_memory(info, replace(config, n_gpu_layers=middle), hw)
        if all(d.fits for d in estimate.devices[1:]) and (estimate.unified_total_available is None or estimate.resident <= estimate.unified_total_available):
            best = estimate
            low = middle + 1
        else:
            high = middle - 1
    return best or estimate_memory(info, replace(config, n_gpu_layers=0), hw)


def _describe(candidate: Candidate, estimate: MemoryEstimate, hw: HardwareInfo, n_layer: int) -> CandidatePlan:
    ngl = estimate.config.n_gpu_layers
    speed = expected_tokens_per_second(estimate)
    gpu_devices = estimate.devices[1:]
    if gpu_devices and ngl >= n_layer + 1:
        fit = FULL_GPU
        used = sum(d.total for d in gpu_devices)
        room = sum(d.available or 0 for d in gpu_devices)
        reason = f"all {n_layer} layers and the output on the GPU: {_gib(used)} of {_gib(room)}"
    elif ngl > 0:
        fit = PARTIAL
        reason = f"{max(ngl - 1, 0)} of {n_layer} layers and the output on the GPU, the rest in RAM"
    else:
        fit = CPU_ONLY
        cpu = estimate.devices[0]
        why = "" if not hw.gpus else (" (no layer fits the GPU)" if hw.usable_gpus else " (llama.cpp build cannot use the GPU)")
        reason = f"in RAM: {_gib(cpu.resident)} in use ({_gib(cpu.total)} allocated) of {_gib(cpu.available or 0)} available{why}"
    return CandidatePlan(candidate, fit, estimate, speed, reason)


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def make_plan(
    candidates: list[Candidate],
    hw: HardwareInfo,
    overrides: Overrides | None = None,
    *,
    force: bool = False,
    elsewhere: bool = False,
) -> Plan:
    """Choose among candidates (one local model, or every quant of a repo).

    The highest-quality candidate in the best fit class wins (full GPU offload,
    then partial offload, then CPU only); unquantised files (F16, BF16, F32) only
    when no quantised one fits;
    in partial offload and CPU-only classes a candidate must also reach at least
    half the fastest one's expected speed. Nothing that does not fit is chosen
    unless ``force`` is set. A serving plan's candidates each carry their slots
    (``plan_candidate``); the choice among them is the same. ``elsewhere``: the weights go to RPC
    workers, whose memory is checked apart (``plan.rpc_fit``), so not fitting here refuses nothing.
    """
    o = overrides or Overrides()
    plans = [plan_candidate(c, hw, o) for c in candidates]
    threads = o.threads or hw.cpu.physical_cores
    reasons: list[str] = []
    warnings: list[str] = []
    refused: DoesNotFitError | None = None
    fitting = [p for p in plans if p.fits]
    quantised = [p for p in fitting if not p.candidate.unquantised]
    passed_over = [p.candidate.label for p in fitting if p.candidate.unquantised] if quantised else []
    fitting = quantised or fitting
    if fitting:
        best_class = min(_CLASS_RANK[p.fit] for p in fitting)
        pool = [p for p in fitting if _CLASS_RANK[p.fit] == best_class]
        chosen = _pick_quality(pool)
        if len(plans) > 1:
            reasons.append(f"{chosen.candidate.label}: {_why_chosen(chosen, pool)}")
        if passed_over:
            reasons.append(f"{', '.join(passed_over)} not chosen: unquantised weights only when no quantised file fits")
    else:
        chosen = min(plans, key=lambda p: p.estimate.total)
        if elsewhere:
            pass
        elif not force:
            refused = DoesNotFitError(chosen)
            if o.parallel is not None and o.parallel > 1:
                fewer = _most_slots_that_fit(candidates, hw, o)
                refused.hint = (
                    f"try --parallel {fewer} (the most slots that fit), a shorter --ctx, or a smaller quantisation"
                    if fewer
                    else "not even one slot fits: try a shorter --ctx or a smaller quantisation"
                )
        else:
            warnings.append(f"{chosen.candidate.label} does not fit ({chosen.reason}); loading anyway because of --force")
    reasons.append(f"{chosen.fit}: {chosen.reason}")
    cfg = chosen.config
    if o.for_server:
        reasons.append(_why_slots(chosen, o))
    reasons += _why_memory_settings(chosen, o)
    trained = chosen.candidate.info.context_length
    if trained and cfg.n_ctx > trained:
        warnings.append(f"context {cfg.n_ctx} is longer than the {trained} tokens the model was trained on")
    elif o.n_ctx is None and trained and cfg.n_ctx < trained:
        reasons.append(f"context {cfg.n_ctx} of the model's {trained}" + (" (the default cap)" if cfg.n_ctx == DEFAULT_CTX else " (more does not fit)"))
    if o.n_gpu_layers and not hw.usable_gpus:
        reasons.append(_why_no_gpu_layers(hw, o.n_gpu_layers))
    if hw.gpus and not hw.usable_gpus:
        warnings.append("a GPU is present but the installed llama.cpp cannot use it (see `llmctl hwinfo`)")
    plan = Plan(chosen, plans, threads, hw.source, reasons, warnings, serving=o.for_server)
    if refused is not None:
        refused.full_plan = plan  # what `fit` shows before it exits 4
        raise refused
    return plan


def _why_memory_settings(chosen: CandidatePlan, o: Overrides) -> list[str]:
    """The settings the planner chose to save memory, each with what it saves."""
    info, cfg = chosen.candidate.info, chosen.config
    out = []
    if o.flash_attn is None and cfg.flash_attn:
        batch = min(cfg.n_ubatch, cfg.total_ctx)
        cells = kv_streams(cfg)[0]
        without = compute_buffer_bytes(info, batch, cells, batch, False)
        with_fa = compute_buffer_bytes(info, batch, cells, batch, True)
        if without > with_fa:
            out.append(f"flash attention on: the attention scores are never held, so the compute buffer is {_gib(with_fa)} instead of {_gib(without)}")
    if info.sliding_window and any(swa_layers(info)):
        if not cfg.swa_full:
            full = sum(kv_cache_bytes_per_layer(info, replace(cfg, swa_full=True)))
            cut = sum(kv_cache_bytes_per_layer(info, cfg))
            out.append(f"sliding-window layers keep only their window ({info.sliding_window} tokens): KV cache {_gib(cut)} instead of {_gib(full)}")
        elif o.multi_turn:
            out.append("chat keeps the full-size sliding-window cache, so every turn reuses the conversation's cache")
    return out


def _why_no_gpu_layers(hw: HardwareInfo, asked: int) -> str:
    """Why ``--gpu-layers N`` left every layer on the CPU."""
    if hw.build.gpu_offload:
        return f"no GPU this llama.cpp build ({hw.build.backend}) can use was found: --gpu-layers {asked} has nothing to offload to"
    return (
        f"this llama.cpp build has no GPU backend: --gpu-layers {asked} cannot offload anything; "
        "rebuild llama-cpp-python with CUDA or Metal to use a GPU (docs/gpu.md)"
    )


def _why_slots(chosen: CandidatePlan, o: Overrides) -> str:
    cfg = chosen.config
    kv = _gib(sum(d.kv_cache for d in chosen.estimate.devices))
    slots = f"{cfg.n_seq} parallel slot{'s' if cfg.n_seq > 1 else ''} of {cfg.n_ctx} tokens ({kv} of KV cache)"
    if o.parallel is not None:
        return f"{slots}: --parallel"
    if cfg.n_seq == SLOT_LADDER[0]:
        return f"{slots}: llama-server's own default count"
    if cfg.n_seq > 1:
        return f"{slots}: {cfg.n_seq + 1} do not fit beside the weights"
    if not chosen.fits:
        return slots
    if cfg.n_ctx < (o.n_ctx or default_context(chosen.candidate.info)):
        return f"{slots}: the context was already shortened to fit one"
    return f"{slots}: a second does not fit beside the weights"


def _most_slots_that_fit(candidates: list[Candidate], hw: HardwareInfo, o: Overrides) -> int:
    """The most slots, below ``o.parallel``, with which some candidate fits (0: not even one)."""
    low, high, best = 1, (o.parallel or 1) - 1, 0
    while low <= high:  # more slots only ever need more memory
        middle = (low + high) // 2
        if any(plan_candidate(c, hw, replace(o, parallel=middle)).fits for c in candidates):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


def _pick_quality(pool: list[CandidatePlan]) -> CandidatePlan:
    if pool[0].fit != FULL_GPU:
        fastest = max((p.tokens_per_second or 0) for p in pool)
        if fastest:
            pool = [p for p in pool if (p.tokens_per_second or 0) >= fastest / 2] or pool
    return max(pool, key=lambda p: p.candidate.bits_per_weight)


def _why_chosen(chosen: CandidatePlan, pool: list[CandidatePlan]) -> str:
    if chosen.fit == FULL_GPU:
        return "the highest-quality quant that fits entirely on the GPU"
    if chosen.fit == PARTIAL:
        return "nothing fits entirely on the GPU; the highest-quality quant that keeps at least half the best speed"
    return "the highest-quality quant that fits in RAM at a usable speed"
