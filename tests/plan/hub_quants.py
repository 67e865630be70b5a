"""Real-shaped quant sets: the files of well-known GGUF repos, with their sizes on the Hub, as planner candidates.

Each model's shape (layers, widths, heads, vocabulary, context, parameter count) is its
config's; each file's weights are spread over its tensors as the shape spreads its
parameters, so a candidate weighs what its file weighs and its KV cache and compute
buffers are the real model's. Sizes are the repos' file sizes (MB = 10^6 bytes, as the
Hub shows them; exact bytes where known).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmctl import gguf
from llmctl.models.names import quant_of_filename
from llmctl.plan import fit

MB = 10**6
GB = 10**9
FILE_TYPE_OF = {name: number for number, name in gguf.FILE_TYPES.items()}


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    context: int
    parameters: int
    tied: bool


SHAPES = {
    "SmolLM2-135M-Instruct": Shape(30, 576, 9, 3, 1536, 49152, 8192, 134_515_008, tied=True),
    "SmolLM2-360M-Instruct": Shape(32, 960, 15, 5, 2560, 49152, 8192, 361_821_120, tied=True),
    "SmolLM2-1.7B-Instruct": Shape(24, 2048, 32, 32, 8192, 49152, 8192, 1_711_376_384, tied=True),
    "Llama-2-7b-chat": Shape(32, 4096, 32, 32, 11008, 32000, 4096, 6_738_415_616, tied=False),
    "Meta-Llama-3.1-70B-Instruct": Shape(80, 8192, 64, 8, 28672, 128256, 131072, 70_553_706_496, tied=False),
}

# bartowski/<model>-GGUF and TheBloke/Llama-2-7B-Chat-GGUF, file name suffix → size in bytes.
HUB_FILES: dict[str, dict[str, int]] = {
    "SmolLM2-135M-Instruct": {
        "f16": 271 * MB, "Q8_0": 145 * MB, "Q6_K": 138 * MB, "Q5_K_M": 112 * MB, "Q4_K_M": 105 * MB,
        "Q4_1": 98_362_432, "Q3_K_L": 97_500_000, "Q4_0": 91_700_000, "Q2_K": 88_200_000,
    },
    "SmolLM2-360M-Instruct": {
        "f16": 726 * MB, "Q8_0": 386 * MB, "Q6_K": 367 * MB, "Q5_K_M": 290 * MB, "Q4_K_M": 271 * MB,
        "Q3_K_L": 246 * MB, "Q4_0": 229 * MB, "Q2_K": 219 * MB,
    },
    "SmolLM2-1.7B-Instruct": {
        "f16": 3420 * MB, "Q8_0": 1820 * MB, "Q6_K": 1410 * MB, "Q5_K_M": 1230 * MB, "Q4_K_M": 1060 * MB,
        "Q4_0": 991 * MB, "Q3_K_M": 860 * MB, "Q2_K": 675 * MB,
    },
    "Llama-2-7b-chat": {
        "Q8_0": 7160 * MB, "Q6_K": 5530 * MB, "Q5_K_M": 4780 * MB, "Q4_K_M": 4080 * MB, "Q4_0": 3830 * MB,
        "Q3_K_M": 3300 * MB, "Q2_K": 2830 * MB,
    },
    "Meta-Llama-3.1-70B-Instruct": {
        "f16": 141_120 * MB, "Q8_0": 74_980 * MB, "Q6_K": 57_890 * MB, "Q5_K_M": 49_950 * MB, "Q5_K_S": 48_660 * MB,
        "Q4_K_M": 42_520 * MB, "Q4_K_S": 40_350 * MB, "Q4_0": 40_120 * MB, "IQ4_XS": 37_900 * MB,
        "Q3_K_M": 34_270 * MB, "Q2_K": 26_380 * MB,
    },
}  # fmt: skip


def info_for(model: str, quant: str, size: int) -> gguf.ModelInfo:
    """A header summary for ``model``'s file of ``size`` bytes in ``quant``."""
    s = SHAPES[model]
    table = s.n_vocab * s.n_embd  # parameters of the token embeddings (and of an untied output)
    per_layer = (s.parameters - table * (1 if s.tied else 2)) // s.n_layer
    scale = size / s.parameters  # bytes per parameter in this file
    return gguf.ModelInfo(
        architecture="llama", name=model, quant=quant.upper(), parameter_count=s.parameters,
        layer_count=s.n_layer, context_length=s.context, embedding_length=s.n_embd,
        head_count=s.n_head, head_count_kv=s.n_head_kv, key_length=None, value_length=None,
        sliding_window=None, expert_count=None, expert_used_count=None, vocab_size=s.n_vocab,
        chat_template=None, size_label=None, license=None, gguf_version=3,
        file_type=FILE_TYPE_OF.get(quant.upper()), split_count=1, tensor_count=9 * s.n_layer + 3,
        layer_bytes=[int(per_layer * scale)] * s.n_layer, embedding_bytes=int(table * scale),
        output_bytes=0 if s.tied else int(table * scale), other_bytes=0, total_tensor_bytes=size,
        file_size=size, feed_forward_length=s.n_ff, tied_embeddings=s.tied,
    )  # fmt: skip


def hub_candidates(model: str, only: list[str] | None = None) -> list[fit.Candidate]:
    """The repo's files as ``pull`` would plan them (``only``: just these quants)."""
    out = []
    for suffix, size in HUB_FILES[model].items():
        if only is not None and suffix not in only:
            continue
        filename = f"{model}-{suffix}.gguf"
        label = quant_of_filename(filename) or suffix.upper()
        out.append(fit.Candidate(label, info_for(model, label, size), size, f"bartowski/{model}-GGUF/{filename}"))
    return out
