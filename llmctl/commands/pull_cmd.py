"""``llmctl pull``: download the quantisation of a model that fits this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl import output
from llmctl.commands import open_store
from llmctl.commands.fit_cmd import render_candidates
from llmctl.config import get_settings
from llmctl.models import pull
from llmctl.options import CtxOpt, HwProfileOpt, JsonOpt
from llmctl.plan.fit import Overrides
from llmctl.plan.hardware import get_hardware


def pull_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A catalog name (llama-2-7b-chat), owner/repo[:QUANT], hf.co/… or a huggingface.co URL, or owner/repo/file.gguf.",
            show_default=False,
            metavar="MODEL",
        ),
    ],
    quant: Annotated[str | None, typer.Option("--quant", "-q", help="Take this quantisation (e.g. Q4_K_M) instead of the planner's choice.")] = None,
    ctx: CtxOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Register under this name (default: catalog name or repo, plus the quant).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be downloaded, its size and fit; download nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Pull even if the planner says it does not fit.")] = False,
    no_mmproj: Annotated[
        bool, typer.Option("--no-mmproj", help="Skip the repo's multimodal projector (mmproj), which is otherwise fetched with the model.")
    ] = False,
    hw_profile: HwProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Download a model from the Hugging Face Hub, choosing the quantisation that fits this machine."""
    store = open_store()
    ref = pull.parse_or_suggest(model)
    hw = get_hardware(get_settings(), hw_profile, with_bandwidth=True)
    with output.status(f"Reading {ref.repo_id} on the Hub…"):
        pull_plan = pull.plan_pull(store, ref, hw, quant=quant, overrides=Overrides(n_ctx=ctx), force=force, name=name, mmproj=not no_mmproj)
    chosen, projector = pull_plan.plan.chosen, pull_plan.projector
    if not json_output:
        if len(pull_plan.plan.candidates) > 1:
            render_candidates(pull_plan.plan, stderr=True)
        output.info(f"Chose {chosen.candidate.label} ({output.human_bytes(chosen.candidate.size)}): " + "; ".join(pull_plan.plan.reasons))
        if projector is not None:
            output.info(f"With its multimodal projector {projector.path} ({output.human_bytes(projector.size)}; --no-mmproj skips it)")
        for warning in pull_plan.plan.warnings:
            output.warn(warning)
    existing = pull.already_pulled(store, ref, pull_plan.listing.commit, chosen.candidate.label, projector)
    if dry_run or existing is not None:
        if json_output:
            output.emit_json(_json(pull_plan, existing.name if existing else None, dry_run))
        elif existing is not None:
            output.info(f"{existing.name} is already pulled at revision {pull_plan.listing.commit[:12]}")
            output.emit_text(existing.name)
        else:
            output.info(f"Would download {output.human_bytes(pull_plan.to_download)} as '{pull_plan.name}' (dry run)")
        return
    waiting = lambda: output.info("Another llmctl is downloading this file; waiting for it…")  # noqa: E731
    try:
        with output.ByteProgress(f"Pulling {pull_plan.name}", pull_plan.size) as progress:
            entry = pull.execute(store, pull_plan, progress=progress.advance, resumed=progress.resumed, on_wait=waiting)
    except KeyboardInterrupt:
        again = _command(model, quant=quant, ctx=ctx, name=name, force=force, no_mmproj=no_mmproj, hw_profile=hw_profile)
        raise pull.interrupted(store, pull_plan, again) from None
    if json_output:
        output.emit_json(_json(pull_plan, entry.name, False))
        return
    output.info(f'Pulled {entry.name}. Try: llmctl run {entry.name} "Hello"  or  llmctl chat {entry.name}')
    output.emit_text(entry.name)


def _command(model: str, **options: str | int | bool | None) -> str:
    """This pull as a command line (the options that choose the file), to run again."""
    import shlex

    words = ["llmctl", "pull", model]
    for option, value in options.items():
        flag = "--" + option.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, str(value)]
    return shlex.join(words)


def _json(pull_plan: pull.PullPlan, name: str | None, dry_run: bool) -> dict:
    return {
        "name": name or pull_plan.name,
        "repo": pull_plan.listing.repo_id,
        "revision": pull_plan.listing.commit,
        "files": [f.path for f in pull_plan.model.files],
        "size_bytes": pull_plan.model.size,
        "mmproj": {"file": pull_plan.projector.path, "size_bytes": pull_plan.projector.size} if pull_plan.projector else None,
        "download_bytes": 0 if (name and not dry_run) else pull_plan.to_download,
        "dry_run": dry_run,
        "plan": pull_plan.plan.to_dict(),
    }
