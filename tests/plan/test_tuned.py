"""Tuned settings: kept per machine and model, read back, described in one phrase, and under the user's own flags."""

from __future__ import annotations

from pathlib import Path

from llmctl.plan.fit import Overrides
from llmctl.plan.tuned import describe_tuned, load_tuned, merge_tuned, save_tuned, tuned_path

PROFILE = {"threads": 6, "n_batch": 1024, "n_ubatch": 512, "n_gpu_layers": 0, "tg_ts": 41.27, "pp_ts": 812.5, "created": "x"}


def test_profiles_are_kept_per_machine_and_model(tmp_path: Path) -> None:
    model, other = tmp_path / "a.gguf", tmp_path / "b.gguf"
    model.write_bytes(b"1234")
    other.write_bytes(b"12345")
    assert load_tuned(tmp_path, "m1", [model]) is None  # no file yet
    save_tuned(tmp_path, "m1", [model], PROFILE)
    save_tuned(tmp_path, "m2", [model], {**PROFILE, "threads": 2})
    assert load_tuned(tmp_path, "m1", [model]) == PROFILE and load_tuned(tmp_path, "m2", [model])["threads"] == 2  # type: ignore[index]
    assert load_tuned(tmp_path, "m1", [other]) is None
    model.write_bytes(b"a different file")  # another size: another model
    assert load_tuned(tmp_path, "m1", [model]) is None
    tuned_path(tmp_path).write_text("not json")
    assert load_tuned(tmp_path, "m1", [other]) is None  # a damaged file reads as nothing tuned


def test_the_users_flags_win_over_the_profile() -> None:
    merged = merge_tuned(Overrides(n_ctx=2048), PROFILE)
    assert (merged.threads, merged.n_batch, merged.n_ubatch, merged.n_ctx) == (6, 1024, 512, 2048)
    assert merged.n_gpu_layers is None  # a profile's 0 GPU layers leaves the plan to choose
    mine = merge_tuned(Overrides(threads=2, n_gpu_layers=0), {**PROFILE, "n_gpu_layers": 12})
    assert (mine.threads, mine.n_gpu_layers, mine.n_batch) == (2, 0, 1024)
    assert merge_tuned(Overrides(threads=3), None) == Overrides(threads=3)


def test_one_phrase_wherever_it_is_shown() -> None:
    assert describe_tuned(PROFILE) == "6 threads, batch 1024/512, 0 GPU layers (tg 41.3 t/s, pp 812.5 t/s)"
    assert describe_tuned({**PROFILE, "threads": 1, "n_gpu_layers": 1}).startswith("1 thread, batch 1024/512, 1 GPU layer (")
