"""Write a GGUF holding only the demo model's tokenizer (no tensors, ~2 MB).

tests/support/loadable_models.py builds runnable random-weight models from the demo model's tokenizer;
this file carries that tokenizer to a machine that cannot fetch the demo model (the GPU check,
benchmarks/gpu_check.py), so the models built there are the very shapes built here.

    python tools/tokenizer_gguf.py DEMO.gguf OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path


def write(demo: Path, out: Path) -> Path:
    import gguf

    src = gguf.GGUFReader(demo)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    template = src.fields.get("tokenizer.chat_template")
    if template is not None:
        writer.add_chat_template(template.contents())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


if __name__ == "__main__":
    print(write(Path(sys.argv[1]), Path(sys.argv[2])))
