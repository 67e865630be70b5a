"""What a new user trips over in the shell around the models: names that `list` prints, what `rm` leaves,
parser errors, piped tables, shell completion, progress lines, a missing config file."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from llmctl.errors import EXIT_USAGE


def listed(cli) -> list[dict]:
    r = cli("list", "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["models"]


def put_in_hf_cache(cache: Path, repo: str, source: Path, filename: str, revision: str, blob_name: str) -> Path:
    """Lay a file out as huggingface_hub does: a blob, a snapshot link to it, refs/main."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    blob = repo_dir / "blobs" / blob_name
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, blob)
    link = repo_dir / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return link


def scan_warnings(cache: Path) -> list[str]:
    """What huggingface_hub's own cache scan finds wrong in ``cache``."""
    from huggingface_hub import scan_cache_dir

    return [str(w) for w in scan_cache_dir(cache).warnings]


# --- 1. every name `list` prints resolves ------------------------------------------------


def test_every_listed_name_resolves_when_two_caches_hold_the_same_repo(cli, hub, make_gguf, tmp_path: Path, monkeypatch) -> None:
    """A pull into one cache, then the same repo (three revisions of the file) in another: `show` and `rm`
    accept every name `list` prints, and each name means the files of its own row."""
    assert cli("pull", "test/Tiny-GGUF:Q8_0").exit_code == 0
    other = tmp_path / "other-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    for index, revision in enumerate(("a" * 40, "b" * 40, "c" * 40)):
        put_in_hf_cache(other, "test/Tiny-GGUF", make_gguf(f"v{index}.Q8_0.gguf", n_embd=64 + 32 * index), "Tiny-Q8_0.gguf", revision, f"blob{index}")
    rows = listed(cli)
    names = [row["name"] for row in rows]
    assert len(rows) == 4 and len({n.lower() for n in names}) == 4, names
    for row in rows:
        r = cli("show", row["name"], "--json")
        assert r.exit_code == 0, (row["name"], r.stderr)
        assert json.loads(r.stdout)["files"] == row["files"], row["name"]
    # The repo's name means what llmctl pulled; the copies elsewhere are named by file and revision.
    pulled = next(row for row in rows if row["kind"] == "registered")
    assert json.loads(cli("show", "test/Tiny-GGUF:Q8_0", "--json").stdout)["files"] == pulled["files"]
    # A name once printed keeps meaning its file while others are removed, never another one.
    for row in rows:
        r = cli("rm", row["name"], "-y", "--delete-files", "--json")
        assert r.exit_code == 0, (row["name"], r.stderr)
        assert json.loads(r.stdout)["removed"][0]["deleted_files"][0] == row["files"][0]
    assert listed(cli) == []


def test_a_lone_copy_in_the_cache_is_named_by_repo_and_quant(cli, make_gguf, tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    first = put_in_hf_cache(cache, "org/One-GGUF", make_gguf("one.Q8_0.gguf"), "One-Q8_0.gguf", "1" * 40, "blob1")
    assert [m["name"] for m in listed(cli)] == ["org/One-GGUF:Q8_0"]
    second = put_in_hf_cache(cache, "org/One-GGUF", make_gguf("two.Q8_0.gguf", n_embd=96), "One-Q8_0.gguf", "2" * 40, "blob2")
    names = sorted(m["name"] for m in listed(cli))
    assert names == ["org/One-GGUF/One-Q8_0.gguf@111111111111", "org/One-GGUF/One-Q8_0.gguf@222222222222"]
    r = cli("show", "org/One-GGUF:Q8_0")
    assert r.exit_code == EXIT_USAGE and "matches 2 models" in r.stderr
    assert cli("rm", names[1], "-y", "--delete-files").exit_code == 0
    assert not second.exists()
    assert [m["name"] for m in listed(cli)] == ["org/One-GGUF:Q8_0"]
    r = cli("show", names[0], "--json")  # its full name still works
    assert r.exit_code == 0 and json.loads(r.stdout)["files"] == [str(first)]


# --- 2. rm leaves nothing behind -------------------------------------------------------------


def test_rm_of_a_pulled_model_leaves_no_lock_and_no_empty_snapshot(cli, hub, tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    repo_dir = cache / "models--test--Tiny-GGUF"
    assert cli("pull", "test/Tiny-GGUF:Q8_0").exit_code == 0
    assert cli("pull", "test/Tiny-GGUF:F16", "--name", "tiny-f16").exit_code == 0
    assert len(list(repo_dir.glob("blobs/*.llmctl.lock"))) == 2
    q8 = next(m for m in listed(cli) if m["quant"] == "Q8_0")
    assert cli("rm", q8["name"], "-y").exit_code == 0
    # The F16 file still lives in the same snapshot: only the Q8_0 blob and its lock went.
    assert len(list(repo_dir.glob("blobs/*.llmctl.lock"))) == 1
    assert [p.name for p in repo_dir.glob("snapshots/*/*")] == ["Tiny-F16.gguf"]
    assert scan_warnings(cache) == []
    assert cli("rm", "tiny-f16", "-y").exit_code == 0
    assert not repo_dir.exists(), sorted(str(p) for p in repo_dir.rglob("*"))
    assert scan_warnings(cache) == []


def test_rm_removes_an_emptied_revision_and_its_ref_but_keeps_other_revisions(cli, make_gguf, tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    old = put_in_hf_cache(cache, "org/Two-GGUF", make_gguf("old.Q8_0.gguf"), "Two-Q8_0.gguf", "1" * 40, "blob1")
    new = put_in_hf_cache(cache, "org/Two-GGUF", make_gguf("new.Q8_0.gguf", n_embd=96), "Two-Q8_0.gguf", "2" * 40, "blob2")
    refs = cache / "models--org--Two-GGUF" / "refs"
    (refs / "main").write_text("2" * 40)
    (refs / "old-branch").write_text("1" * 40)
    row = next(m for m in listed(cli) if m["files"] == [str(old)])
    assert cli("rm", row["name"], "-y", "--delete-files").exit_code == 0
    assert not old.parent.exists() and not (refs / "old-branch").exists()
    assert new.exists() and (refs / "main").read_text() == "2" * 40
    assert scan_warnings(cache) == []


def test_rm_of_an_import_copy_removes_its_folder_and_lock(cli, make_gguf, isolated: Path) -> None:
    assert cli("import", make_gguf("copied.Q8_0.gguf"), "--copy", "--name", "copied").exit_code == 0
    models = isolated / "models"
    assert (models / "copied.llmctl.lock").exists()
    assert cli("rm", "copied", "-y").exit_code == 0
    assert list(models.iterdir()) == []


def test_rm_partials_keeps_a_lock_in_use_and_removes_a_free_one(cli, tmp_path: Path) -> None:
    blobs = tmp_path / "hf" / "hub" / "models--org--Part-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / ("ab" * 32 + ".llmctl.partial")
    lock = blobs / ("ab" * 32 + ".llmctl.lock")
    partial.write_bytes(b"x" * 1000)
    lock.touch()
    with open(lock, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a pull downloading it now
        r = cli("rm", "--partials")
        assert r.exit_code == 0 and "skipping" in r.stderr
        assert partial.exists() and lock.exists()
    r = cli("rm", "--partials", "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["removed_partials"]) == 1
    assert not (tmp_path / "hf" / "hub" / "models--org--Part-GGUF").exists()  # nothing else was in it


# --- 3. parser errors in llmctl's style --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (["run", "m", "--max-tokens"], "error: option '--max-tokens' requires an argument\nhint: see `llmctl run --help`\n"),
        (["list", "--jsn"], "error: no such option: --jsn\nhint: did you mean --json? see `llmctl list --help`\n"),
        (["show"], "error: missing argument 'MODEL'\nhint: see `llmctl show --help`\n"),
        (["rnu"], "error: no such command 'rnu'\nhint: did you mean 'run'? see `llmctl --help`\n"),
        (["--bogus"], "error: no such option: --bogus\nhint: see `llmctl --help`\n"),
    ],
)
def test_parser_errors_are_one_lower_case_line_and_name_the_subcommands_help(cli, args: list[str], stderr: str) -> None:
    r = cli(*args)
    assert r.exit_code == EXIT_USAGE
    assert r.stderr == stderr and r.stdout == ""


# --- 4. piped tables carry no trailing blanks --------------------------------------------------


def test_piped_key_value_tables_and_tables_have_no_trailing_blanks(cli, make_gguf, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # as in `llmctl show m | less`: Rich's own width for a pipe
    model = make_gguf("tiny.Q8_0.gguf")
    assert cli("import", model, "--name", "tiny").exit_code == 0
    for args in (["hwinfo", "--hw-profile", "laptop-8gb"], ["show", "tiny"], ["fit", "tiny", "--hw-profile", "laptop-8gb"], ["list"]):
        r = cli(*args)
        assert r.exit_code == 0, (args, r.stderr)
        lines = r.stdout.splitlines()
        assert len(lines) >= 3, args
        assert [line for line in lines if line != line.rstrip()] == [], args


# --- 5. shell completion ------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_a_script_for_each_shell(cli, shell: str) -> None:
    r = cli("completion", shell)
    assert r.exit_code == 0, r.stderr
    assert "llmctl" in r.stdout and "_LLMCTL_COMPLETE=complete_" + shell in r.stdout.replace('"', "")
    r = cli("completion", "tcsh")
    assert r.exit_code == EXIT_USAGE and r.stderr.startswith("error: invalid value for 'shell'")


def test_completion_answers_commands_and_model_names(make_gguf, cli) -> None:
    """What the zsh script asks llmctl (Typer's protocol): subcommands, and model names from the store."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    assert cli("import", make_gguf("tiny.Q8_0.gguf"), "--name", "tiny-one").exit_code == 0
    assert cli("import", make_gguf("other.Q8_0.gguf"), "--name", "other").exit_code == 0

    def complete(line: str) -> str:
        result = CliRunner().invoke(app, [], env={"_LLMCTL_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": line})
        assert result.exit_code == 0, result.output
        return result.stdout

    assert '"run"' in complete("llmctl ru") and '"rm"' not in complete("llmctl ru")
    answer = complete("llmctl show ti")
    assert "tiny-one" in answer and "other" not in answer
    assert "tiny-one" in complete("llmctl rm ti")


@pytest.mark.slow
def test_the_bash_script_completes_in_a_real_bash(tmp_path: Path, make_gguf, cli, isolated: Path) -> None:
    import subprocess
    import sys

    assert cli("import", make_gguf("tiny.Q8_0.gguf"), "--name", "tiny-one").exit_code == 0
    script = tmp_path / "llmctl.bash"
    script.write_text(cli("completion", "bash").stdout)
    bin_dir = str(Path(sys.executable).parent)
    probe = f'source {script}; COMP_WORDS=(llmctl run ti); COMP_CWORD=2; _llmctl_completion llmctl ti run; printf "%s\\n" "${{COMPREPLY[@]}}"'
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "LLMCTL_HOME": str(isolated)}
    done = subprocess.run(["bash", "--norc", "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["tiny-one"], (done.stdout, done.stderr)


# --- 6. progress: binary units, and a resumed transfer's rate ------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_resumed_transfers_rate_counts_only_the_bytes_moved_now(monkeypatch, capsys) -> None:
    """62 MiB already on disk, then 5 MiB in one second: 5.0 MiB/s, not 67."""
    from llmctl import output

    clock = Clock()
    monkeypatch.setattr(output.time, "monotonic", clock)
    mib = 1 << 20
    with output.ByteProgress("Pulling m", 100 * mib, every=0) as progress:
        progress.resumed(62 * mib)
        clock.now += 1
        progress.advance(5 * mib)
    err = capsys.readouterr().err
    assert err == "Pulling m: 67.0 MiB of 100.0 MiB (67%, 5.0 MiB/s)\n"
    assert progress.eta_text(clock.now) == "0:00:06 left"


def test_the_progress_bar_shows_binary_units_and_the_rate_of_this_run(monkeypatch) -> None:
    import io

    from rich.console import Console

    from llmctl import output

    clock = Clock()
    monkeypatch.setattr(output.time, "monotonic", clock)
    monkeypatch.setattr(output, "interactive_stderr", lambda: True)
    mib = 1 << 20
    with output.ByteProgress("Pulling m", 100 * mib) as progress:
        progress.resumed(62 * mib)
        clock.now += 2
        progress.advance(10 * mib)
        shown = io.StringIO()
        Console(file=shown, width=160).print(progress._bar.get_renderable())
    text = shown.getvalue()
    assert "72.0/100.0 MiB" in text and "5.0 MiB/s" in text and "0:00:05 left" in text, text
    assert "MB/s" not in text


# --- 7. LLMCTL_CONFIG naming a missing file -------------------------------------------------------


def test_a_config_file_named_but_missing_warns_once(cli, monkeypatch, tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "config.toml"
    monkeypatch.setenv("LLMCTL_CONFIG", str(missing))
    r = cli("list", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["models"] == []
    assert r.stderr == f"warning: LLMCTL_CONFIG names {missing}, which does not exist; using the defaults\n"
    present = tmp_path / "config.toml"
    present.write_text(f'hf_hub_cache = "{tmp_path / "hub"}"\n')
    monkeypatch.setenv("LLMCTL_CONFIG", str(present))
    r = cli("list", "--json")
    assert r.exit_code == 0 and r.stderr == ""
    monkeypatch.delenv("LLMCTL_CONFIG")  # the default file may well be absent: no warning
    assert cli("list", "--json").stderr == ""
