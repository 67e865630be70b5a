"""Multimodal projectors (``mmproj`` GGUFs): picked as llama.cpp's ``-hf`` picks them, pulled and verified
with the model, counted in the plan, recorded, shown, found beside models in the HF cache, removed with them,
and never taken for a model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from llmctl.errors import EXIT_NOT_FOUND, EXIT_USAGE
from llmctl.models.names import is_model_filename, is_projector_filename, pick_projector, quant_bits
from tests.support.gguf_factory import write_model, write_projector

VISION = "test/Vision-GGUF"
SHARED = "test/SharedProj-GGUF"


@pytest.fixture(scope="module")
def projectors(tmp_path_factory, hub_server, hub_files: dict[str, Path]) -> dict[str, Path]:
    """Projector files, and repos of the local Hub that hold them beside models."""
    folder = tmp_path_factory.mktemp("mmproj")
    files = {
        "f16": write_projector(folder / "mmproj-Tiny-f16.gguf"),
        "f32": write_projector(folder / "mmproj-Tiny-Q8_0.gguf", f16=False),  # named Q8_0: the name is what picks it
        "shared": write_projector(folder / "mmproj-shared-f16.gguf", n_embd=32),
        "bad": write_projector(folder / "mmproj-bad-f16.gguf", n_embd=48),
        "llama": write_model(folder / "mmproj-llama-f16.gguf", n_embd=96),  # named like a projector, holds a model
    }
    # the same size, one byte different: the Hub lists the good file's sha256 and serves these bytes
    corrupted = folder / "corrupted.gguf"
    data = bytearray(files["bad"].read_bytes())
    data[-1] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    hub_server.add_repo(
        VISION,
        {"Tiny-Q8_0.gguf": hub_files["q8"], "Tiny-F16.gguf": hub_files["f16"], "mmproj-Tiny-f16.gguf": files["f16"], "mmproj-Tiny-Q8_0.gguf": files["f32"]},
    )
    hub_server.add_repo(SHARED, {"Shared-Q8_0.gguf": hub_files["q8"], "Shared-F16.gguf": hub_files["f16"], "mmproj-shared-f16.gguf": files["shared"]})
    bad = hub_server.add_repo("test/BadProj-GGUF", {"Bad-Q8_0.gguf": hub_files["q8"], "mmproj-bad-f16.gguf": files["bad"]})
    bad.files["mmproj-bad-f16.gguf"].source = corrupted
    hub_server.add_repo("test/NotProj-GGUF", {"NotProj-Q8_0.gguf": hub_files["q8"], "mmproj-llama-f16.gguf": files["llama"]})
    hub_server.add_repo("test/OnlyProj-GGUF", {"mmproj-Tiny-f16.gguf": files["f16"]})
    return files


def models(cli) -> list[dict]:
    return json.loads(cli("list", "--json").stdout)["models"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- which file is a projector, and which one goes with a model ------------------------------


def test_projector_and_model_file_names() -> None:
    for name in ("mmproj-model-f16.gguf", "sub/Qwen2-VL-7B-mmproj-Q8_0.gguf", "MMPROJ.gguf"):
        assert is_projector_filename(name) and not is_model_filename(name), name
    for name in ("Tiny-Q8_0.gguf", "Tiny-Q8_0-00001-of-00002.gguf"):
        assert is_model_filename(name) and not is_projector_filename(name), name
    assert not is_model_filename("imatrix.gguf") and not is_projector_filename("mmproj.safetensors")
    assert [quant_bits(n) for n in ("a-Q4_K_M.gguf", "mmproj-model-f16.gguf", "b-BF16-00001-of-00002.gguf", "mmproj.gguf", "c-IQ2_XS.gguf")] == [
        4,
        16,
        16,
        0,
        2,
    ]


def test_the_projector_is_picked_as_llama_cpp_picks_it() -> None:
    both = ["mmproj-model-f16.gguf", "mmproj-model-Q8_0.gguf"]
    assert pick_projector("Model-Q4_K_M.gguf", both) == "mmproj-model-Q8_0.gguf"  # closest bits: 8 to 4, not 16
    assert pick_projector("Model-F16.gguf", both) == "mmproj-model-f16.gguf"
    assert pick_projector("Model-Q6_K.gguf", ["mmproj-F16.gguf", "mmproj-F32.gguf"]) == "mmproj-F16.gguf"
    assert pick_projector("Model-Q4_0.gguf", ["mmproj-b-Q8_0.gguf", "mmproj-a-Q8_0.gguf"]) == "mmproj-a-Q8_0.gguf"  # a tie: path order
    # the model's own folder first, then the folders above it; never a folder beside or below it
    nested = ["mmproj-f16.gguf", "Q4/mmproj-f16.gguf", "Q8/mmproj-Q8_0.gguf", "Q4/deeper/mmproj-Q4_0.gguf"]
    assert pick_projector("Q4/Model-Q4_K_M.gguf", nested) == "Q4/mmproj-f16.gguf"
    assert pick_projector("Q8/x/Model-Q8_0.gguf", nested) == "Q8/mmproj-Q8_0.gguf"
    assert pick_projector("Model-Q8_0.gguf", nested) == "mmproj-f16.gguf"
    assert pick_projector("Model-Q8_0.gguf", ["sub/mmproj-Q8_0.gguf"]) is None
    assert pick_projector("Model-Q8_0.gguf", []) is None


def test_the_listing_keeps_projectors_apart_from_models(hub, projectors) -> None:
    from llmctl.models import hub as hubapi

    listing = hubapi.list_repo(VISION)
    assert sorted(m.label for m in listing.models) == ["F16", "Q8_0"]
    assert [p.path for p in listing.projectors] == ["mmproj-Tiny-Q8_0.gguf", "mmproj-Tiny-f16.gguf"]
    assert all(p.sha256 and p.size for p in listing.projectors)
    by_label = {m.label: listing.projector_for(m) for m in listing.models}
    assert {label: p.path for label, p in by_label.items() if p} == {"Q8_0": "mmproj-Tiny-Q8_0.gguf", "F16": "mmproj-Tiny-f16.gguf"}


# --- pull ------------------------------------------------------------------------------------


def test_pull_fetches_and_verifies_the_projector_for_the_chosen_quant(cli, hub, projectors) -> None:
    r = cli("pull", f"{VISION}:Q8_0")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "vision:q8_0"
    assert "multimodal projector mmproj-Tiny-Q8_0.gguf" in r.stderr and "--no-mmproj" in r.stderr
    (entry,) = models(cli)
    projector = Path(entry["mmproj"]["path"])
    assert projector.name == "mmproj-Tiny-Q8_0.gguf" and projector.parent == Path(entry["files"][0]).parent  # the same snapshot
    assert entry["mmproj"]["size_bytes"] == projectors["f32"].stat().st_size
    blob = Path(os.path.realpath(projector))
    assert blob.name == sha256(projectors["f32"]) == sha256(blob)  # stored under its verified sha256
    assert entry["source"]["mmproj"] == "mmproj-Tiny-Q8_0.gguf"
    # the index records it, and serve finds it through mmproj_for
    from llmctl.config import get_settings
    from llmctl.models.store import Store, mmproj_for

    store = Store(get_settings())
    assert store.get("vision:q8_0").mmproj["sha256"] == blob.name
    assert mmproj_for(store.resolve("vision:q8_0")) == projector
    from llmctl.models.locate import locate

    located = locate(store, "vision:q8_0")
    assert located.mmproj == projector
    assert located.candidate().projector_size == 0  # run and bench load no projector
    assert located.candidate(with_mmproj=True).projector_size == projectors["f32"].stat().st_size
    # the other quant takes the other projector
    r = cli("pull", f"{VISION}:F16")
    assert r.exit_code == 0, r.stderr
    assert Path(store.get("vision:f16").mmproj["path"]).name == "mmproj-Tiny-f16.gguf"


def test_a_dry_run_counts_the_projector_in_the_download_and_the_plan(cli, hub, projectors) -> None:
    r = cli("pull", f"{VISION}:F16", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    size = projectors["f16"].stat().st_size
    assert doc["mmproj"] == {"file": "mmproj-Tiny-f16.gguf", "size_bytes": size}
    assert doc["download_bytes"] == doc["size_bytes"] + size
    memory = doc["plan"]["chosen"]["memory"]
    assert sum(d["projector"] for d in memory) == size
    assert all(d["total"] == d["weights"] + d["kv_cache"] + d["compute"] + d["overhead"] + d["projector"] for d in memory)
    r = cli("pull", f"{VISION}:F16", "--dry-run", "--json", "--no-mmproj")
    doc = json.loads(r.stdout)
    assert doc["mmproj"] is None and doc["download_bytes"] == doc["size_bytes"]
    assert sum(d["projector"] for d in doc["plan"]["chosen"]["memory"]) == 0
    assert models(cli) == []


def test_no_mmproj_skips_it_and_a_later_pull_adds_it(cli, hub, projectors) -> None:
    r = cli("pull", f"{VISION}:Q8_0", "--no-mmproj")
    assert r.exit_code == 0, r.stderr
    assert "projector" not in r.stderr
    (entry,) = models(cli)
    assert entry["mmproj"] is None
    assert not any("mmproj" in p.name for p in Path(entry["files"][0]).parent.iterdir())
    assert re.search(r"^projector +none$", cli("show", "vision:q8_0").stdout, re.M)
    # pulled again with its projector: not 'already pulled', and only the projector is fetched
    hub.log.clear()
    r = cli("pull", f"{VISION}:Q8_0")
    assert r.exit_code == 0 and "already pulled" not in r.stderr
    assert [rng for rng in hub.bytes_served() if rng is None] == [None]  # one whole-file GET: the projector
    (entry,) = models(cli)
    assert Path(entry["mmproj"]["path"]).name == "mmproj-Tiny-Q8_0.gguf"
    # now it is there: a second pull is a no-op, and one with --no-mmproj keeps what was fetched
    for extra in ((), ("--no-mmproj",)):
        r = cli("pull", f"{VISION}:Q8_0", *extra)
        assert r.exit_code == 0 and "already pulled" in r.stderr, extra
    assert models(cli)[0]["mmproj"] == entry["mmproj"]
    # the model's file gone, pulled again with --no-mmproj: the projector already there stays recorded
    os.unlink(entry["files"][0])
    r = cli("pull", f"{VISION}:Q8_0", "--no-mmproj")
    assert r.exit_code == 0 and "already pulled" not in r.stderr, r.stderr
    assert models(cli)[0]["mmproj"] == entry["mmproj"]


def test_a_projector_with_a_bad_checksum_is_refused_before_the_model_is_fetched(cli, hub, projectors, tmp_path: Path) -> None:
    r = cli("pull", "test/BadProj-GGUF")
    assert r.exit_code == 1
    assert "mmproj-bad-f16.gguf: downloaded file does not match the Hub's checksum" in r.stderr and "deleted" in r.stderr
    assert models(cli) == []
    leftovers = [p for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []  # nothing kept, and the model's bytes were never asked for
    r = cli("pull", "test/BadProj-GGUF", "--no-mmproj")
    assert r.exit_code == 0, r.stderr
    assert models(cli)[0]["mmproj"] is None


def test_a_file_named_mmproj_that_is_not_a_projector_is_refused(cli, hub, projectors) -> None:
    r = cli("pull", "test/NotProj-GGUF")
    assert r.exit_code == 1
    assert "not a multimodal projector (general.architecture 'llama', expected 'clip')" in r.stderr
    assert "--no-mmproj" in r.stderr
    assert [m for m in models(cli) if m["kind"] == "registered"] == []


def test_a_projector_is_never_offered_as_a_model(cli, hub, projectors) -> None:
    r = cli("pull", VISION, "--dry-run", "--json")
    labels = [c["label"] for c in json.loads(r.stdout)["plan"]["candidates"]]
    assert sorted(labels) == ["F16", "Q8_0"]
    r = cli("pull", f"{VISION}/mmproj-Tiny-f16.gguf", "--dry-run")
    assert r.exit_code == EXIT_NOT_FOUND and "has no file mmproj-Tiny-f16.gguf" in r.stderr
    r = cli("pull", "test/OnlyProj-GGUF", "--dry-run")
    assert r.exit_code == EXIT_NOT_FOUND and "has no GGUF model files" in r.stderr
    r = cli("search", VISION, "--files", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["files"]
    assert len(rows) == 2 and not any("mmproj" in f for row in rows for f in row["files"])


def test_a_projector_cannot_be_imported_as_a_model(cli, projectors) -> None:
    r = cli("import", projectors["f16"])
    assert r.exit_code == EXIT_USAGE
    assert "is a multimodal projector (mmproj), not a model" in r.stderr
    assert models(cli) == []


# --- show, list, rm -----------------------------------------------------------------------


def test_show_and_list_show_the_projector(cli, hub, projectors) -> None:
    assert cli("pull", f"{VISION}:F16").exit_code == 0
    (entry,) = models(cli)
    path, size = entry["mmproj"]["path"], projectors["f16"].stat().st_size
    assert entry["mmproj"] == {"path": path, "size_bytes": size}
    shown = json.loads(cli("show", "vision:f16", "--json").stdout)
    assert shown["mmproj"] == entry["mmproj"]
    text = cli("show", "vision:f16").stdout
    assert re.search(rf"^projector +{re.escape(path)} \(171\.7 KiB\)$", text, re.M), text
    os.unlink(path)  # gone: still listed, as missing; the model itself is fine
    (entry,) = models(cli)
    assert entry["mmproj"] == {"path": path, "size_bytes": None} and entry["status"] == "ok"
    assert f"{path} (missing)" in cli("show", "vision:f16").stdout


def test_rm_deletes_the_projector_once_no_model_uses_it(cli, hub, projectors) -> None:
    for quant in ("Q8_0", "F16"):
        assert cli("pull", f"{SHARED}:{quant}").exit_code == 0
    first, second = models(cli)
    assert first["mmproj"]["path"] == second["mmproj"]["path"]  # both quants share one snapshot link
    link = Path(first["mmproj"]["path"])
    blob = Path(os.path.realpath(link))
    r = cli("rm", first["name"], "-y", "--json")
    assert r.exit_code == 0, r.stderr
    assert str(link) not in json.loads(r.stdout)["removed"][0]["deleted_files"]
    assert link.is_symlink() and blob.exists()  # the other quant still uses it
    assert models(cli)[0]["mmproj"]["size_bytes"] == blob.stat().st_size
    r = cli("rm", second["name"], "-y")
    assert r.exit_code == 0, r.stderr
    assert f"will delete {second['files'][0]}, {link}" in r.stderr
    assert not link.is_symlink() and not blob.exists()
    assert not Path(second["files"][0]).parent.parent.parent.exists()  # the repo's folder went with its last file
    assert models(cli) == []


def _snapshot(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """A snapshot in the Hugging Face cache layout, as another tool leaves it; returns its folder."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("b" * 40)
    for name, source in files.items():
        blob = folder / "blobs" / sha256(source)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_model_found_in_the_hf_cache_picks_up_the_projector_of_its_snapshot(cli, projectors, hub_files, tmp_path: Path) -> None:
    snapshot = _snapshot(
        tmp_path / "hf" / "hub",
        "TheOrg/Vision-GGUF",
        {
            "Tiny-Q8_0.gguf": hub_files["q8"],
            "mmproj-Tiny-f16.gguf": projectors["f16"],
            "mmproj-Tiny-Q8_0.gguf": projectors["f32"],
            "other/Tiny-F16.gguf": hub_files["f16"],
        },
    )
    listed = {m["name"]: m for m in models(cli)}
    assert sorted(listed) == ["TheOrg/Vision-GGUF:F16", "TheOrg/Vision-GGUF:Q8_0"]  # the projectors are not models
    assert listed["TheOrg/Vision-GGUF:Q8_0"]["mmproj"]["path"] == str(snapshot / "mmproj-Tiny-Q8_0.gguf")
    assert listed["TheOrg/Vision-GGUF:F16"]["mmproj"]["path"] == str(snapshot / "mmproj-Tiny-f16.gguf")  # from the folder above
    from llmctl.config import get_settings
    from llmctl.models.store import Store, mmproj_for

    assert mmproj_for(Store(get_settings()).resolve("TheOrg/Vision-GGUF:Q8_0")) == snapshot / "mmproj-Tiny-Q8_0.gguf"
    # --delete-files takes the projector with the model, and leaves the one the other model uses
    r = cli("rm", "TheOrg/Vision-GGUF:Q8_0", "--delete-files", "-y")
    assert r.exit_code == 0, r.stderr
    assert not (snapshot / "mmproj-Tiny-Q8_0.gguf").exists() and (snapshot / "mmproj-Tiny-f16.gguf").exists()
    r = cli("rm", "TheOrg/Vision-GGUF:F16", "--delete-files", "-y")
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / "hf" / "hub" / "models--TheOrg--Vision-GGUF").exists()


def test_an_index_written_before_projectors_reads_as_models_without_one(cli, make_gguf, isolated: Path) -> None:
    path = make_gguf()
    record = {
        "name": "old:q8_0",
        "files": [str(path)],
        "source": {"type": "import"},
        "owned": False,
        "size": path.stat().st_size,
        "sha256": [None],
        "added": "2024-01-01T00:00:00Z",
    }
    isolated.mkdir(parents=True, exist_ok=True)
    (isolated / "index.json").write_text(json.dumps({"version": 1, "models": [record]}))
    (entry,) = models(cli)
    assert entry["name"] == "old:q8_0" and entry["mmproj"] is None and entry["status"] == "ok"
    assert json.loads(cli("show", "old:q8_0", "--json").stdout)["mmproj"] is None
    # a record whose projector is not what llmctl writes reads as none, never as a crash
    for garbage in ("/some/path.gguf", ["x"], {"path": 7}, {}):
        (isolated / "index.json").write_text(json.dumps({"version": 1, "models": [{**record, "mmproj": garbage}]}))
        assert models(cli)[0]["mmproj"] is None, garbage
        assert cli("rm", "old:q8_0", "-y", "--json").exit_code == 0


# --- the plan --------------------------------------------------------------------------------


def test_the_projector_is_its_own_part_of_the_estimate(make_gguf) -> None:
    from llmctl import gguf
    from llmctl.plan import fit
    from llmctl.plan.hardware import load_profile, shipped_profiles_dir

    _, info = gguf.read_model([make_gguf()])
    cpu_only = fit.estimate_memory(info, fit.LoadConfig(n_ctx=256, projector_bytes=5_000_000))
    assert cpu_only.devices[0].projector == 5_000_000
    without = fit.estimate_memory(info, fit.LoadConfig(n_ctx=256))
    assert cpu_only.total - without.total == 5_000_000
    gpu = load_profile(shipped_profiles_dir() / "rtx4090-32gb.json")
    offloaded = fit.estimate_memory(info, fit.LoadConfig(n_ctx=256, n_gpu_layers=99, projector_bytes=5_000_000), gpu)
    assert [d.projector for d in offloaded.devices] == [0, 5_000_000]  # on the first GPU, beside the layers
    plan = fit.plan_candidate(fit.Candidate("x", info, 1000, projector_size=7_000_000), gpu)
    assert sum(d.projector for d in plan.estimate.devices) == 7_000_000
