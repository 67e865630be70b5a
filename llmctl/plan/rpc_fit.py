"""``fit --rpc``: where llama.cpp would place a model across RPC workers, and whether it fits.

llmctl's own planner knows this machine's devices only; across workers the projection is llama.cpp's
own, ``llama-fit-params --rpc … -v`` (a dry run: the model is laid out and every buffer measured
without allocating anything, on the workers too). From what it logs, this module reads:

- the first ``common_memory_breakdown_print`` table, the projection for the settings asked for:
  one row per device (``RPC0 (HOST:PORT) | total = free + (self = model + context + compute) …``,
  MiB) and a ``Host`` row;
- the first pass of ``load_tensors: layer N assigned to device DEV`` lines, the layers per device
  (the output layer is layer ``n_layer``);
- on stdout, the "fitted CLI arguments": what llama.cpp's ``--fit`` would change to fit (``-c``,
  ``-ngl``, ``-ts`` …), shown as its suggestion when the asked-for plan does not fit.

A device fits when its projected use (``self``) is within its free memory; llama.cpp aims to leave
``FIT_TARGET_MIB`` free on each, so a device within its memory but not that margin is a warning.
Nothing here prints.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmctl.engine.rpc import Endpoint, WorkerInfo, format_endpoints
from llmctl.engine.server_process import _die_with_parent
from llmctl.errors import EXIT_DOES_NOT_FIT, LlmctlError

FIT_TARGET_MIB = 1024  # llama.cpp's default --fit-target: memory it keeps free per device
TIMEOUT_S = 600.0  # a large model's layout, every tensor described to each worker

_DEVICE = re.compile(
    r"\|\s+- (?P<name>\S+) \((?P<where>[^)]*)\)\s*\|\s*(?P<total>\d+)\s*=\s*(?P<free>-?\d+)\s*\+\s*\(\s*(?P<self>\d+)\s*=\s*(?P<model>\d+)\s*\+\s*(?P<context>\d+)\s*\+\s*(?P<compute>\d+)\s*\)"
)
_HOST = re.compile(r"\|\s+- Host\s*\|\s*(?P<self>\d+)\s*=\s*(?P<model>\d+)\s*\+\s*(?P<context>\d+)\s*\+\s*(?P<compute>\d+)")
_LAYER = re.compile(r"layer\s+(?P<index>\d+) assigned to device (?P<device>[^,\s]+)")


class RpcFitError(LlmctlError):
    """llama-fit-params could not project the model on the workers."""


class RpcDoesNotFitError(LlmctlError):
    """The plan asked for does not fit the workers' memory: exit 4, as ``fit`` for this machine."""

    exit_code = EXIT_DOES_NOT_FIT


@dataclass
class DeviceUse:
    """One device's projected memory (MiB, as llama.cpp prints them) and the layers placed on it."""

    name: str  # RPC0, CUDA0, Host
    endpoint: str | None  # HOST:PORT for an RPC device
    total_mib: int | None
    free_mib: int | None
    used_mib: int  # model + context + compute: llama.cpp's "self"
    model_mib: int
    context_mib: int
    compute_mib: int
    layers: list[int] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.free_mib is None or self.used_mib <= self.free_mib

    @property
    def within_margin(self) -> bool:
        return self.free_mib is None or self.free_mib - self.used_mib >= FIT_TARGET_MIB


@dataclass
class RpcProjection:
    model: str
    endpoints: list[str]
    n_ctx: int
    n_gpu_layers: int
    layer_count: int  # blocks + the output layer
    devices: list[DeviceUse]  # the host last
    fitted_args: str  # llama.cpp's suggestion (its --fit), as CLI arguments
    command: list[str]

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def reasons(self) -> list[str]:
        out = []
        for d in self.devices:
            where = f"{d.name} ({d.endpoint})" if d.endpoint else d.name
            if not d.fits:
                out.append(f"{where} needs {d.used_mib} MiB, has {d.free_mib} MiB free")
            elif not d.within_margin:
                out.append(f"{where} would have {(d.free_mib or 0) - d.used_mib} MiB left, under llama.cpp's {FIT_TARGET_MIB} MiB margin")
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "rpc": self.endpoints,
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "layer_count": self.layer_count,
            "fits": self.fits,
            "reasons": self.reasons(),
            "devices": [{**asdict(d), "fits": d.fits, "n_layers": len(d.layers)} for d in self.devices],
            "llama_cpp_fitted_args": self.fitted_args,
        }


def fit_params_args(
    model: Path,
    endpoints: list[Endpoint],
    *,
    n_ctx: int,
    n_gpu_layers: int,
    type_k: str | None = None,
    type_v: str | None = None,
    flash_attn: bool | None = None,
) -> list[str]:
    args = ["-m", str(model), "--rpc", format_endpoints(endpoints), "-c", str(n_ctx), "-ngl", str(n_gpu_layers), "-v"]
    if type_k:
        args += ["-ctk", type_k]
    if type_v:
        args += ["-ctv", type_v]
    if flash_attn is not None:
        args += ["-fa", "on" if flash_attn else "off"]
    return args


def parse(log: str) -> tuple[list[DeviceUse], dict[str, list[int]]]:
    """The first memory breakdown's devices (host last) and the first pass of layer placements."""
    devices: list[DeviceUse] = []
    host: DeviceUse | None = None
    layers: dict[str, list[int]] = {}
    seen_layers: set[int] = set()
    layers_done = False
    table_done = False
    for line in log.splitlines():
        if not layers_done and (m := _LAYER.search(line)):
            index = int(m["index"])
            if index in seen_layers:  # the next trial load begins: the first pass is complete
                layers_done = True
            else:
                seen_layers.add(index)
                layers.setdefault(m["device"], []).append(index)
            continue
        if table_done:
            continue
        if m := _DEVICE.search(line):
            devices.append(
                DeviceUse(m["name"], m["where"] if ":" in m["where"] else None, int(m["total"]), int(m["free"]),
                          int(m["self"]), int(m["model"]), int(m["context"]), int(m["compute"]))
            )  # fmt: skip
        elif m := _HOST.search(line):
            host = DeviceUse("Host", None, None, None, int(m["self"]), int(m["model"]), int(m["context"]), int(m["compute"]))
            table_done = True
    if host is not None:
        devices.append(host)
    for device in devices:
        device.layers = layers.get(device.name, [])
    return devices, layers


def project(
    binary: Path,
    label: str,
    model: Path,
    endpoints: list[Endpoint],
    *,
    layer_count: int,
    n_ctx: int,
    n_gpu_layers: int | None = None,
    type_k: str | None = None,
    type_v: str | None = None,
    flash_attn: bool | None = None,
) -> RpcProjection:
    """Ask llama-fit-params for the layout of ``model`` on ``endpoints`` (and this machine)."""
    ngl = layer_count if n_gpu_layers is None else n_gpu_layers
    command = [str(binary), *fit_params_args(model, endpoints, n_ctx=n_ctx, n_gpu_layers=ngl, type_k=type_k, type_v=type_v, flash_attn=flash_attn)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            check=False,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - not left holding the workers if llmctl is killed
        )
    except subprocess.TimeoutExpired:
        raise RpcFitError(f"llama-fit-params did not finish within {TIMEOUT_S:g} s", hint="check the workers' logs") from None
    devices, _ = parse(done.stderr)
    # It exits 1 when its --fit finds no way to fit (the layers and context asked for are fixed):
    # the projection for what was asked is still in its log, and that is the answer.
    if not devices:
        said = [line for line in done.stderr.splitlines() if line.strip()]
        last = next((line for line in reversed(said) if "error" in line.lower() or "failed" in line.lower()), said[-1] if said else "")
        raise RpcFitError(
            f"llama-fit-params could not lay out {label} on the workers (exit {done.returncode}): {last.strip()}",
            hint="LLMCTL_DEBUG=1 shows the command; run it by hand to see llama.cpp's whole log",
        )
    fitted = " ".join(line.strip() for line in done.stdout.splitlines() if line.strip().startswith("-")) if done.returncode == 0 else ""
    return RpcProjection(label, [str(e) for e in endpoints], n_ctx, ngl, layer_count, devices, fitted, command)


def check_workers(
    label: str,
    model: Path,
    endpoints: list[Endpoint],
    *,
    layer_count: int,
    n_ctx: int,
    n_gpu_layers: int | None = None,
    type_k: str | None = None,
    type_v: str | None = None,
    flash_attn: bool | None = None,
) -> tuple[list[WorkerInfo], RpcProjection]:
    """Each worker checked first (llama.cpp aborts on one it cannot reach or that runs another
    build), then llama.cpp's own projection of the load across them; what ``fit --rpc`` shows and
    ``run``/``chat``/``serve --rpc`` decide on."""
    from llmctl.engine import native
    from llmctl.engine.rpc import preflight

    workers = preflight(endpoints)
    projection = project(native.require("llama-fit-params"), label, model, endpoints, layer_count=layer_count, n_ctx=n_ctx,
                         n_gpu_layers=n_gpu_layers, type_k=type_k, type_v=type_v, flash_attn=flash_attn)  # fmt: skip
    return workers, projection


def refusal(projection: RpcProjection) -> RpcDoesNotFitError:
    """The error for a projection that does not fit, with llama.cpp's own suggestion."""
    suggestion = f"llama.cpp would fit it with `{projection.fitted_args}`; " if projection.fitted_args else ""
    return RpcDoesNotFitError(
        f"{projection.model} does not fit on the RPC workers: " + "; ".join(r for r in projection.reasons() if "needs" in r),
        hint=f"{suggestion}try a shorter --ctx, fewer --gpu-layers, a smaller quantisation or another worker",
    )
