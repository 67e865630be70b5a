"""Models llama.cpp can load and run, with random weights: other shapes, architectures, templates.

They borrow the demo model's tokenizer (so llama.cpp loads and runs them).
The benchmark uses the larger ones to check the memory estimate on shapes and
architectures other than the demo model's (width, GQA vs MHA, depth,
feed-forward size, weight type, tied or separate output, llama vs qwen2 with
attention biases); the tests use the tiny one, for example with a hostile
chat template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECS: dict[str, tuple] = {
    # name: (arch, n_embd, n_head, n_head_kv, n_layer, n_ff, weight type, tied output[, extras])
    # extras: "vocab" (tokens: the demo's 49152 cut, or padded with control tokens), "experts"
    # ((count, used): a mixture of experts in every layer), "window" (sliding window, gemma2)
    "llama-gqa-f16": ("llama", 1024, 16, 4, 6, 2816, "F16", False),
    "qwen2-mha-q8": ("qwen2", 768, 12, 12, 8, 2048, "Q8_0", True),
    "tiny-llama": ("llama", 64, 4, 2, 2, 128, "F16", True),
    "tiny-gemma2": ("gemma2", 64, 4, 2, 2, 128, "F16", True),  # sliding-window attention on every other layer
    # the fit zoo (benchmarks/bench_fit.py): MoE, sliding windows and vocabularies of 32k, 150k and 262k
    "llama-moe-q8": ("llama", 512, 8, 4, 4, 1024, "Q8_0", False, {"experts": (8, 2)}),
    "gemma2-swa-262k": ("gemma2", 256, 4, 2, 6, 1024, "Q8_0", True, {"vocab": 262144, "window": 512}),
    "qwen2-150k": ("qwen2", 512, 8, 2, 4, 1536, "Q8_0", True, {"vocab": 151936}),
    "llama-32k": ("llama", 512, 8, 8, 4, 1536, "Q8_0", False, {"vocab": 32000}),
}


def _vocabulary(src, size: int | None) -> tuple[list, list, list]:
    """The demo's tokens, types and merges, cut to ``size`` (dropping the merges that need a
    token cut away) or padded to it with control tokens."""
    tokens = list(src.fields["tokenizer.ggml.tokens"].contents())
    types = list(src.fields["tokenizer.ggml.token_type"].contents())
    merges = list(src.fields["tokenizer.ggml.merges"].contents())
    if size is None or size == len(tokens):
        return tokens, types, merges
    if size < len(tokens):
        kept = set(tokens[:size])
        merges = [m for m in merges if all(part in kept for part in m.split(" ")) and m.replace(" ", "") in kept]
        return tokens[:size], types[:size], merges
    extra = size - len(tokens)
    return tokens + [f"<|extra_{i}|>" for i in range(extra)], types + [3] * extra, merges


def build(demo: Path, folder: Path, name: str, chat_template: str | None = None) -> Path:
    import gguf

    out = folder / f"{name}.gguf"
    if out.exists():
        return out
    arch, n_embd, n_head, n_kv, n_layer, n_ff, wtype, tied = SPECS[name][:8]
    extras = SPECS[name][8] if len(SPECS[name]) > 8 else {}
    src = gguf.GGUFReader(demo)
    tokens, token_types, merges = _vocabulary(src, extras.get("vocab"))
    writer = gguf.GGUFWriter(out.with_suffix(".tmp"), arch)
    writer.add_name(name)
    writer.add_block_count(n_layer)
    writer.add_context_length(32768)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma2":
        writer.add_sliding_window(extras.get("window", 64))
    if "experts" in extras:
        writer.add_expert_count(extras["experts"][0])
        writer.add_expert_used_count(extras["experts"][1])
    writer.add_file_type(1 if wtype == "F16" else 7)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    head_dim = n_embd // n_head
    qtype = gguf.GGMLQuantizationType.Q8_0

    def tensor(tname: str, *shape: int, norm: bool = False, bias: bool = False) -> None:
        data = (np.ones if norm else rng.standard_normal)(tuple(reversed(shape))).astype(np.float32)
        if not norm:
            data *= 0.02
        if norm or bias or wtype == "F16":
            writer.add_tensor(tname, data if norm or bias else data.astype(np.float16))
        else:
            writer.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    vocab = len(tokens)
    tensor("token_embd.weight", n_embd, vocab)
    for i in range(n_layer):
        tensor(f"blk.{i}.attn_norm.weight", n_embd, norm=True)
        tensor(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        tensor(f"blk.{i}.attn_k.weight", n_embd, head_dim * n_kv)
        tensor(f"blk.{i}.attn_v.weight", n_embd, head_dim * n_kv)
        if arch == "qwen2":
            tensor(f"blk.{i}.attn_q.bias", n_embd, bias=True)
            tensor(f"blk.{i}.attn_k.bias", head_dim * n_kv, bias=True)
            tensor(f"blk.{i}.attn_v.bias", head_dim * n_kv, bias=True)
        tensor(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        if arch == "gemma2":
            tensor(f"blk.{i}.post_attention_norm.weight", n_embd, norm=True)
            tensor(f"blk.{i}.post_ffw_norm.weight", n_embd, norm=True)
        tensor(f"blk.{i}.ffn_norm.weight", n_embd, norm=True)
        if "experts" in extras:
            count = extras["experts"][0]
            tensor(f"blk.{i}.ffn_gate_inp.weight", n_embd, count, bias=True)  # the router: kept in F32
            tensor(f"blk.{i}.ffn_gate_exps.weight", n_embd, n_ff, count)
            tensor(f"blk.{i}.ffn_up_exps.weight", n_embd, n_ff, count)
            tensor(f"blk.{i}.ffn_down_exps.weight", n_ff, n_embd, count)
            continue
        tensor(f"blk.{i}.ffn_gate.weight", n_embd, n_ff)
        tensor(f"blk.{i}.ffn_up.weight", n_embd, n_ff)
        tensor(f"blk.{i}.ffn_down.weight", n_ff, n_embd)
    tensor("output_norm.weight", n_embd, norm=True)
    if not tied:
        tensor("output.weight", n_embd, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.with_suffix(".tmp").rename(out)
    return out
