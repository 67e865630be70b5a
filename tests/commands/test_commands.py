"""list / show / import / rm through the CLI, on the real demo model and generated files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llmctl.errors import EXIT_NOT_FOUND, EXIT_USAGE
from tests.support.gguf_factory import RawGGUF

DEMO_NAME = "smollm2-135m-instruct:q4_1"


@pytest.fixture
def demo_copy(demo_model: Path, tmp_path: Path) -> Path:
    """A private hard link (or copy) of the demo model that a test may register and delete."""
    target = tmp_path / "dl" / demo_model.name
    target.parent.mkdir()
    try:
        os.link(demo_model, target)
    except OSError:
        shutil.copy(demo_model, target)
    return target


def test_import_list_show_the_demo_model(cli, demo_copy: Path) -> None:
    r = cli("import", demo_copy)
    assert r.exit_code == 0, r.stderr
    assert f"as '{DEMO_NAME}'" in r.stderr
    assert r.stdout == ""

    r = cli("list")
    assert r.exit_code == 0
    line = next(line for line in r.stdout.splitlines() if line.startswith(DEMO_NAME))
    for cell in ("Q4_1", "93.8 MiB", "135M", "llama", "8192", "import", "never"):
        assert cell in line

    r = cli("show", "smollm2")  # a unique prefix
    assert r.exit_code == 0
    assert "Smollm2 135M" in r.stdout
    assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in r.stdout
    assert "Q8_0" in r.stdout and "F32" in r.stdout  # the tensor-type histogram


def test_list_json_schema(cli, demo_copy: Path) -> None:
    cli("import", demo_copy, "--name", "demo")
    doc = json.loads(cli("list", "--json").stdout)
    (model,) = doc["models"]
    assert model == {
        "name": "demo",
        "kind": "registered",
        "status": "ok",
        "source": {"type": "import", "path": str(demo_copy.resolve())},
        "files": [str(demo_copy.resolve())],
        "size_bytes": 98_362_432,
        "mmproj": None,
        "quant": "Q4_1",
        "parameters": 134_515_008,
        "architecture": "llama",
        "context_length": 8192,
        "added": model["added"],
        "last_used": None,
    }


def test_show_json_and_template(cli, demo_copy: Path) -> None:
    cli("import", demo_copy)
    doc = json.loads(cli("show", DEMO_NAME, "--json").stdout)
    assert doc["info"]["layer_count"] == 30
    assert doc["info"]["head_count_kv"] == 3
    assert doc["sha256"] == ["b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"]
    assert doc["metadata"]["tokenizer.ggml.tokens"]["count"] == 49152
    r = cli("show", DEMO_NAME, "--template")
    assert r.stdout.startswith("{% for message in messages %}")
    assert "<|im_start|>" in r.stdout


def test_show_accepts_a_plain_path(cli, demo_copy: Path) -> None:
    r = cli("show", demo_copy, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["kind"] == "path"


def test_show_without_template_fails_cleanly(cli, make_gguf) -> None:
    path = make_gguf(chat_template=None)
    r = cli("show", path, "--template")
    assert r.exit_code == 1
    assert "no chat template" in r.stderr


def test_control_characters_from_metadata_are_escaped(cli, make_gguf) -> None:
    path = make_gguf(model_name="evil\x1b]0;pwned\x07\x1b[31mred", chat_template="hi\x1b[2J{{ x }}\nnext")
    r = cli("show", path)
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "evil\\x1b]0;pwned\\x07" in r.stdout
    r = cli("show", path, "--template")
    assert r.stdout == "hi\\x1b[2J{{ x }}\nnext\n"
    doc = json.loads(cli("show", path, "--json").stdout)  # JSON escapes by itself
    assert doc["info"]["name"] == "evil\x1b]0;pwned\x07\x1b[31mred"


def test_import_rejects_bad_files_and_registers_nothing(cli, tmp_path: Path) -> None:
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    r = cli("import", bad)
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 2  # one error line, one hint line
    assert "not a valid GGUF model" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads(cli("list", "--json").stdout)["models"] == []

    r = cli("import", tmp_path / "missing.gguf")
    assert r.exit_code == EXIT_NOT_FOUND


def test_import_twice_and_name_clash(cli, make_gguf) -> None:
    a = make_gguf("a.Q8_0.gguf")
    b = make_gguf("b.Q8_0.gguf")
    assert cli("import", a, "--name", "same").exit_code == 0
    r = cli("import", a)
    assert r.exit_code == EXIT_USAGE and "already registered as 'same'" in r.stderr
    r = cli("import", b, "--name", "same")
    assert r.exit_code == EXIT_USAGE and "already exists" in r.stderr
    r = cli("import", b, "--name", "Bad/Name")
    assert r.exit_code == EXIT_USAGE and "invalid model name" in r.stderr


def test_default_names_come_from_the_file_name(cli, make_gguf) -> None:
    cli("import", make_gguf("Llama-3.2-1B-Instruct-Q4_K_M.gguf"))
    cli("import", make_gguf("weird name.gguf", file_type=1))
    names = [m["name"] for m in json.loads(cli("list", "--json").stdout)["models"]]
    assert names == ["llama-3.2-1b-instruct:q4_k_m", "weird-name:f16"]


def test_import_split_model(cli, make_gguf) -> None:
    first = make_gguf("big.gguf", split_max_tensors=7)
    third = first.with_name(first.name.replace("00001-of", "00003-of"))
    r = cli("import", third, "--name", "big")  # any part names the whole model
    assert r.exit_code == 0, r.stderr
    doc = json.loads(cli("list", "--json").stdout)["models"][0]
    assert len(doc["files"]) == 3
    third.unlink()
    r = cli("import", first, "--name", "big2")
    assert r.exit_code == EXIT_NOT_FOUND and "part 3 of 3" in r.stderr


def test_import_copy_then_rm_deletes_the_copy_only(cli, make_gguf, isolated: Path) -> None:
    src = make_gguf("orig.Q8_0.gguf")
    r = cli("import", src, "--copy", "--name", "mine", "--json")
    doc = json.loads(r.stdout)
    copy = Path(doc["files"][0])
    assert copy.is_file() and copy.is_relative_to(isolated / "models")
    assert copy.read_bytes() == src.read_bytes()
    assert not list(copy.parent.glob("*.partial"))
    r = cli("rm", "mine", "-y")
    assert r.exit_code == 0
    assert not copy.exists() and src.exists()
    assert json.loads(cli("list", "--json").stdout)["models"] == []


def test_rm_keeps_files_it_does_not_own(cli, make_gguf) -> None:
    src = make_gguf()
    cli("import", src, "--name", "keep")
    assert cli("rm", "keep", "-y").exit_code == 0
    assert src.exists()
    cli("import", src, "--name", "gone")
    assert cli("rm", "gone", "-y", "--delete-files").exit_code == 0
    assert not src.exists()


def test_rm_needs_confirmation(cli, make_gguf) -> None:
    cli("import", make_gguf(), "--name", "m")
    r = cli("rm", "m")  # stdin is not a terminal
    assert r.exit_code == EXIT_USAGE and "pass -y" in r.stderr
    assert [m["name"] for m in json.loads(cli("list", "--json").stdout)["models"]] == ["m"]


def test_rm_asks_on_a_terminal(cli, make_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.commands import rm as rm_module

    monkeypatch.setattr(rm_module, "_can_ask", lambda: True)
    cli("import", make_gguf(), "--name", "m")
    r = cli("rm", "m", input="n\n")
    assert r.exit_code == 0 and "Nothing removed" in r.stderr
    assert len(json.loads(cli("list", "--json").stdout)["models"]) == 1
    r = cli("rm", "m", input="y\n")
    assert r.exit_code == 0 and "Removed m" in r.stderr
    assert json.loads(cli("list", "--json").stdout)["models"] == []


def test_rm_never_follows_a_symlink_out_of_the_store(cli, make_gguf, isolated: Path, tmp_path: Path) -> None:
    src = make_gguf("victim.Q8_0.gguf")
    doc = json.loads(cli("import", make_gguf("owned.Q8_0.gguf"), "--copy", "--name", "owned", "--json").stdout)
    copy = Path(doc["files"][0])
    copy.unlink()
    copy.symlink_to(src)
    r = cli("rm", "owned", "-y")
    assert r.exit_code == 1 and "outside" in r.stderr
    assert src.exists()


def test_unknown_and_ambiguous_names(cli, make_gguf) -> None:
    cli("import", make_gguf(), "--name", "qwen-a:q8_0")
    cli("import", make_gguf(), "--name", "qwen-b:q8_0")
    r = cli("show", "qwen")
    assert r.exit_code == EXIT_USAGE
    assert "matches 2 models: qwen-a:q8_0, qwen-b:q8_0" in r.stderr
    r = cli("show", "qwen-c:q8_0")
    assert r.exit_code == EXIT_NOT_FOUND
    assert "did you mean" in r.stderr and "qwen-a:q8_0" in r.stderr


def test_broken_and_missing_files_do_not_break_list(cli, make_gguf) -> None:
    good = make_gguf("good.Q8_0.gguf")
    gone = make_gguf("gone.Q8_0.gguf")
    cli("import", good, "--name", "good")
    cli("import", gone, "--name", "gone")
    gone.unlink()
    good.write_bytes(good.read_bytes()[:100])  # corrupted after import
    r = cli("list")
    assert r.exit_code == 0
    assert "missing" in r.stdout and "invalid: truncated" in r.stdout
    models = {m["name"]: m for m in json.loads(cli("list", "--json").stdout)["models"]}
    assert models["gone"]["status"].startswith("missing")
    assert models["good"]["status"].startswith("invalid")
    r = cli("show", "good")
    assert r.exit_code == 1 and "truncated" in r.stderr


def test_list_uses_the_header_cache(cli, make_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_gguf()
    cli("import", path, "--name", "cached")
    from llmctl import gguf

    calls = []
    real = gguf.read_model
    monkeypatch.setattr(gguf, "read_model", lambda paths: calls.append(paths) or real(paths))
    cli("list")
    assert calls == []  # unchanged file: no parse
    os.utime(path, ns=(1, 1))
    cli("list")
    cli("list")
    assert len(calls) == 1  # changed once, parsed once, cached again


def _put_in_hf_cache(hf_hub: Path, repo: str, source: Path, filename: str) -> Path:
    """Lay a file out as huggingface_hub does: blobs + snapshot symlink."""
    repo_dir = hf_hub / ("models--" + repo.replace("/", "--"))
    blob = repo_dir / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    shutil.copy(source, blob)
    link = repo_dir / "snapshots" / ("a" * 40) / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def test_models_in_the_hf_cache_are_listed_and_resolvable(cli, make_gguf, tmp_path: Path) -> None:
    link = _put_in_hf_cache(tmp_path / "hf" / "hub", "TheOrg/Tiny-GGUF", make_gguf(), "tiny.Q8_0.gguf")
    doc = json.loads(cli("list", "--json").stdout)
    (model,) = doc["models"]
    assert model["name"] == "TheOrg/Tiny-GGUF:Q8_0"
    assert model["kind"] == "discovered"
    assert "not pulled by llmctl" in cli("list").stdout
    for ref in ("TheOrg/Tiny-GGUF", "theorg/tiny-gguf:q8_0", "hf.co/TheOrg/Tiny-GGUF:Q8_0",
                "https://huggingface.co/TheOrg/Tiny-GGUF/blob/main/tiny.Q8_0.gguf"):  # fmt: skip
        r = cli("show", ref, "--json")
        assert r.exit_code == 0, (ref, r.stderr)
        assert json.loads(r.stdout)["files"] == [str(link)]
    r = cli("rm", "TheOrg/Tiny-GGUF", "-y")
    assert r.exit_code == EXIT_USAGE and "--delete-files" in r.stderr
    assert link.exists()


def test_index_survives_a_crash_during_write(cli, make_gguf, isolated: Path, monkeypatch) -> None:
    cli("import", make_gguf(), "--name", "first")
    before = (isolated / "index.json").read_text()

    def crash(*_a, **_k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        r = cli("import", make_gguf(), "--name", "second")
    assert r.exit_code == 1
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert (isolated / "index.json").read_text() == before
    assert not [p for p in isolated.iterdir() if p.name.endswith(".tmp")]
    assert [m["name"] for m in json.loads(cli("list", "--json").stdout)["models"]] == ["first"]


def test_corrupt_index_gets_a_clear_error(cli, isolated: Path) -> None:
    isolated.mkdir(parents=True, exist_ok=True)
    (isolated / "index.json").write_text("{not json")
    r = cli("list")
    assert r.exit_code == 1
    assert "index" in r.stderr and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_raw_minimal_file_imports(cli, tmp_path: Path) -> None:
    path = RawGGUF.minimal().write(tmp_path / "raw.gguf")
    r = cli("import", path)
    assert r.exit_code == 0, r.stderr
    assert "raw:f32" in r.stderr


def test_rm_of_one_model_under_two_names_and_import_through_a_symlink(cli, make_gguf, tmp_path: Path) -> None:
    target = make_gguf("0123abcd.bin.gguf")
    link = tmp_path / "Nice-Model-Q8_0.gguf"
    link.symlink_to(target)
    r = cli("import", link, "--copy", "--json")
    assert json.loads(r.stdout)["name"] == "nice-model:q8_0"  # named after the link, not its target
    r = cli("rm", "nice-model", "nice-model:q8_0", "-y", "--json")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["removed"]) == 1


def test_bad_index_entries_are_a_clear_error(cli, isolated: Path) -> None:
    isolated.mkdir(parents=True, exist_ok=True)
    (isolated / "index.json").write_text(json.dumps({"version": 1, "models": [{"name": "x"}]}))
    r = cli("list")
    assert r.exit_code == 1 and "corrupt" in r.stderr and "Traceback" not in r.stderr
