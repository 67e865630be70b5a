"""fit --rpc: llama-fit-params' projection read (devices, layers, its suggestion), the verdict and exit 4,
and the real thing across two ggml-rpc-servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.bench.serving import free_port
from llmctl.commands.fit_cmd import _layer_span
from llmctl.engine import rpc
from llmctl.errors import EXIT_DOES_NOT_FIT, EXIT_USAGE
from llmctl.plan import rpc_fit
from tests.support.rpc_workers import endpoints_of, running_workers

# What llama-fit-params -v logs (trimmed): a first trial load, its breakdown, then a second trial.
LOG = "\n".join(
    [
        "0.00.149 D load_tensors: layer   0 assigned to device RPC0, is_swa = 0",
        "0.00.149 D load_tensors: layer   1 assigned to device RPC0, is_swa = 0",
        "0.00.149 D load_tensors: layer   2 assigned to device RPC1, is_swa = 0",
        "0.00.149 D load_tensors: layer   3 assigned to device CPU, is_swa = 0",
        "0.00.207 I common_memory_breakdown_print: | memory breakdown [MiB]     | total    free     self   model   context   compute    unaccounted |",
        "0.00.207 I common_memory_breakdown_print: |   - RPC0 (127.0.0.1:50611) | 24105 = 24105 + (17986 =    23 +   12086 +    5876) +      -17986 |",
        "0.00.207 I common_memory_breakdown_print: |   - RPC1 (127.0.0.1:50612) | 24105 =  2000 + (26911 =    68 +   20876 +    5966) +      -26911 |",
        "0.00.207 I common_memory_breakdown_print: |   - Host                   |                   5894 =    28 +       0 +    5865                |",
        "0.00.300 D load_tensors: layer   0 assigned to device RPC1, is_swa = 0",
        "0.00.307 I common_memory_breakdown_print: |   - RPC0 (127.0.0.1:50611) | 24105 = 24105 + (   1 =    1 +   0 +    0) +      -1 |",
    ]
)


def test_the_first_breakdown_and_the_first_layer_pass_are_the_projection() -> None:
    devices, layers = rpc_fit.parse(LOG)
    assert [(d.name, d.endpoint) for d in devices] == [("RPC0", "127.0.0.1:50611"), ("RPC1", "127.0.0.1:50612"), ("Host", None)]
    rpc0, rpc1, host = devices
    assert (rpc0.total_mib, rpc0.free_mib, rpc0.used_mib, rpc0.model_mib, rpc0.context_mib, rpc0.compute_mib) == (24105, 24105, 17986, 23, 12086, 5876)
    assert rpc0.layers == [0, 1] and rpc1.layers == [2] and layers["CPU"] == [3] and host.layers == []
    assert rpc0.fits and rpc0.within_margin and not rpc1.fits and host.fits and host.used_mib == 5894
    projection = rpc_fit.RpcProjection("big", ["127.0.0.1:50611", "127.0.0.1:50612"], 4096, 5, 5, devices, "", [])
    assert not projection.fits and projection.reasons() == ["RPC1 (127.0.0.1:50612) needs 26911 MiB, has 2000 MiB free"]
    error = rpc_fit.refusal(projection)
    assert error.exit_code == EXIT_DOES_NOT_FIT and "big does not fit on the RPC workers: RPC1 (127.0.0.1:50612) needs 26911 MiB" in error.message
    doc = projection.to_dict()
    assert doc["fits"] is False and doc["devices"][1]["fits"] is False and doc["devices"][0]["n_layers"] == 2


def test_llama_fit_params_gets_the_workers_and_the_settings() -> None:
    args = rpc_fit.fit_params_args(
        Path("/m.gguf"), rpc.parse_endpoints("10.0.0.2:50052,10.0.0.3:50052"), n_ctx=4096, n_gpu_layers=31,
        type_k="q8_0", flash_attn=True,
    )  # fmt: skip
    assert args == ["-m", "/m.gguf", "--rpc", "10.0.0.2:50052,10.0.0.3:50052", "-c", "4096", "-ngl", "31", "-v", "-ctk", "q8_0", "-fa", "on"]


def test_layer_spans_read_as_ranges() -> None:
    assert _layer_span([0, 1, 2, 3]) == "0-3 (4)" and _layer_span([16, 17, 30]) == "16-17,30 (3)" and _layer_span([]) == "-"


def test_fit_rpc_refuses_an_unreachable_worker_and_serving_options(cli, make_gguf) -> None:
    model = make_gguf(n_layers=4)
    gone = f"127.0.0.1:{free_port()}"
    r = cli("fit", model, "--rpc", gone)
    assert r.exit_code == 1 and f"rpc worker {gone} is unreachable" in r.stderr and r.stdout == ""
    r = cli("fit", model, "--rpc", gone, "--serve")
    assert r.exit_code == EXIT_USAGE and "--rpc plans one context" in r.stderr


@pytest.mark.slow
def test_fit_rpc_shows_each_workers_memory_and_layers_and_refuses_what_does_not_fit(cli, native_tools, demo_model) -> None:
    with running_workers(native_tools.path("ggml-rpc-server")) as workers:
        endpoints = endpoints_of(workers)
        r = cli("fit", demo_model, "--rpc", endpoints, "--ctx", "2048", "--json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        remote = [d for d in doc["devices"] if d["endpoint"]]
        assert [d["endpoint"] for d in remote] == [str(w.endpoint) for w in workers] and doc["fits"] is True
        assert sum(d["n_layers"] for d in remote) == 31 == doc["n_gpu_layers"]  # 30 blocks and the output layer, all on the workers
        assert all(d["model_mib"] > 0 and d["context_mib"] > 0 and d["used_mib"] <= d["free_mib"] for d in remote)
        assert doc["llama_cpp_fitted_args"].startswith("-c 2048") and [w["endpoint"] for w in doc["workers"]] == [d["endpoint"] for d in remote]
        # A context whose KV cache (~22.5 KiB a token for this model) is twice what the workers have free together.
        free = sum(d.free for w in rpc.preflight([w.endpoint for w in workers]) for d in w.devices)
        huge = int(2 * free / (22.5 * 1024))
        refused = cli("fit", demo_model, "--rpc", endpoints, "--ctx", str(huge))
    assert refused.exit_code == EXIT_DOES_NOT_FIT, refused.stderr
    assert "does not fit on the RPC workers" in refused.stderr and "NO" in refused.stdout and str(workers[0].endpoint) in refused.stdout


def test_llama_fit_params_does_not_outlive_a_killed_llmctl(make_gguf, tmp_path: Path) -> None:

    from tests.support.processes import outlives_a_killed_parent, sleeping_tool

    model = make_gguf(n_layers=4)
    binary, pid_file = sleeping_tool(tmp_path, "llama-fit-params")
    script = (
        "import sys\nfrom pathlib import Path\nfrom llmctl.engine.rpc import parse_endpoints\nfrom llmctl.plan import rpc_fit\n"
        "rpc_fit.project(Path(sys.argv[2]), 'm', Path(sys.argv[1]), parse_endpoints('127.0.0.1:50611'), layer_count=5, n_ctx=256)\n"
    )
    assert not outlives_a_killed_parent(script, [str(model), str(binary)], pid_file), "llama-fit-params kept running after llmctl was killed"


@pytest.mark.parametrize(("flag", "passed"), [([], None), (["--flash-attn"], True), (["--no-flash-attn"], False)])
def test_fit_rpc_hands_the_flash_attention_choice_to_llama_fit_params(cli, make_gguf, monkeypatch, flag: list[str], passed: bool | None) -> None:
    from tests.support.fake_rpc_worker import FakeRpcWorker

    asked: dict = {}

    def project(binary, label, model, endpoints, **settings):
        asked.update(settings)
        raise rpc_fit.RpcFitError("stop here")

    monkeypatch.setattr(rpc_fit, "project", project)
    monkeypatch.setattr("llmctl.engine.native.require", lambda name: Path("/nowhere") / name)
    model = make_gguf(n_layers=4)
    with FakeRpcWorker() as worker:
        r = cli("fit", model, "--rpc", worker.endpoint, *flag)
    assert "stop here" in r.stderr and asked["flash_attn"] is passed  # off stays off, not llama.cpp's auto
