"""From a name to what the planner needs: resolve it, read its header, size its files.

``locate`` does this for a local model (a registered or discovered name, or a
path). ``read_repo`` does it for every quant of a repo on the Hub, reading the
headers with range requests; ``candidates`` takes a local model when the name
means one and otherwise the repo it names on the Hub (``fit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl import gguf
from llmctl.errors import AmbiguousNameError, NotFoundError
from llmctl.models import catalog, hub, pull
from llmctl.models.names import HubRef, parse_ref
from llmctl.models.store import ResolvedModel, Store, mmproj_for
from llmctl.plan import fit


@dataclass
class Located:
    """A local model with its header read: what ``show``, ``fit``, ``run`` and ``bench`` start from."""

    model: ResolvedModel
    headers: list[gguf.GGUFHeader]
    info: gguf.ModelInfo
    size: int  # of all its files, in bytes

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def paths(self) -> list[Path]:
        return self.model.paths

    @classmethod
    def of(cls, model: ResolvedModel) -> Located:
        """Read the header of a model already resolved."""
        headers, info = gguf.read_model(model.paths)
        return cls(model, headers, info, sum(p.stat().st_size for p in model.paths))

    @property
    def mmproj(self) -> Path | None:
        """The multimodal projector to load with it (llama-server ``--mmproj``), if it has one (``mmproj_for``)."""
        return mmproj_for(self.model)

    def candidate(self, *, with_mmproj: bool = False) -> fit.Candidate:
        """The model as the planner takes it; ``with_mmproj`` counts its projector (a server that loads it)."""
        projector = self.mmproj if with_mmproj else None
        return fit.Candidate(self.model.name, self.info, self.size, str(self.model.paths[0]), projector.stat().st_size if projector else 0)


def locate(store: Store, name: str, *, paths: bool = True) -> Located:
    """Resolve ``name`` (see ``Store.resolve``) and read its header: llama.cpp never sees a file llmctl rejects."""
    return Located.of(store.resolve(name, paths=paths))


@dataclass
class RepoQuants:
    """Every GGUF model of a repo (or those the name picked: a file, a quant), with its header read remotely."""

    ref: HubRef
    listing: hub.RepoListing
    models: list[hub.RemoteModel]
    candidates: list[fit.Candidate]  # one per model, in the same order


def read_repo(ref: HubRef, *, status: hub.Status = hub.silent) -> RepoQuants:
    listing = hub.list_repo(ref.repo_id, ref.revision)
    models = pull.pick_models(ref, listing, None)
    with status(f"Reading GGUF headers of {ref.repo_id} on the Hub…"):
        candidates = pull.remote_candidates(listing, models)
    return RepoQuants(ref, listing, models, candidates)


def candidates(store: Store, name: str, *, status: hub.Status = hub.silent) -> list[fit.Candidate]:
    """A model in the store (or a file); several pulled quants of the repo ``name`` means; else every quant
    of that repo on the Hub."""
    try:
        model = store.resolve(name)
    except AmbiguousNameError:
        local = store.repo_models(name)
        if len(local) < 2:
            raise
        return [Located.of(m).candidate() for m in local]
    except NotFoundError:
        ref = parse_ref(name, catalog.aliases())
        if ref is None or name.startswith((".", "/", "~")) or name.lower().endswith(".gguf") and ref.filename is None:
            raise
        return read_repo(ref, status=status).candidates
    return [Located.of(model).candidate()]
