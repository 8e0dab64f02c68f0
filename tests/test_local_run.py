"""End to end on the local stack: the compiled DAG through kfp.local, a fault per step, no-op and blue/green redeploys."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from vlp.components.config import load_config
from vlp.pipelines.local.runner import run_local

ROOT = Path(__file__).resolve().parent.parent
TINY_REPO = "vlp-test/tiny-llama"

# Whole runs on the local stack (minutes each): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def tiny_config(name: str = "tiny", *overrides: str) -> Any:
    """The local demo config pointed at the tiny random Llama: structure, not semantics."""
    return load_config(
        ROOT / "configs" / "local-demo.yaml",
        [
            f"name={name}",
            f"endpoint.name={name}",
            f"model.repo={TINY_REPO}",
            "smoke_test.expect=",
            "smoke_test.max_tokens=8",
            "smoke_test.attempts=3",
            "serving.max_model_len=512",  # the tiny model's context
            *overrides,
        ],
    )


def emulator_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "emulator" / "emulator-state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def vertex_resources(state_dir: Path) -> dict[str, list[str]]:
    """What the emulator holds, read from its persisted state (independent of the run summary)."""
    state = emulator_state(state_dir)
    models = state.get("models", {})
    endpoints = state.get("endpoints", {})
    model_list = models.values() if isinstance(models, dict) else models
    endpoint_list = endpoints.values() if isinstance(endpoints, dict) else endpoints
    deployed = []
    for ep in endpoint_list:
        for dm in ep.get("deployedModels", ep.get("deployed_models", [])):
            deployed.append(dm.get("id"))
    return {
        "models": [m.get("name") for m in model_list],
        "endpoints": [e.get("name") for e in endpoint_list],
        "deployed_models": deployed,
    }


def run(state_dir: Path, cfg: Any, tiny_model_dir: Path, **kwargs: Any) -> dict[str, Any]:
    return run_local(cfg, state_dir=state_dir, model_dir=tiny_model_dir, quiet=True, **kwargs)


def test_full_dag_on_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    summary_path = tmp_path / "summary.json"
    summary = run_local(
        tiny_config(), state_dir=tmp_path / "state", model_dir=tiny_model_dir, summary_json=summary_path, quiet=True
    )
    assert summary["status"] == "succeeded", summary["error"]
    assert json.loads(summary_path.read_text())["status"] == "succeeded"
    names = [s["name"] for s in summary["steps"]]
    for step in ("preflight", "mirror-weights", "register-model", "deploy-model", "smoke-test", "promote"):
        assert step in names, names
    assert all(s["status"] == "succeeded" for s in summary["steps"])
    assert summary["model"]["resource_name"].startswith("projects/local-project/locations/us-central1/models/")
    assert summary["endpoint"].startswith("projects/local-project/locations/us-central1/endpoints/")
    assert len(summary["deployed_models"]) == 1 and summary["deployed_models"][0]["traffic_percent"] == 100
    assert summary["smoke"]["passed"] is True and summary["smoke"]["answer"]
    assert summary["smoke"]["latency_s"] > 0
    calls = summary["api_calls"]
    assert any(c.startswith("POST ") and c.endswith("/models:upload") for c in calls)
    assert any(c.endswith(":deployModel") for c in calls)
    assert summary["left_running"] == [f"{summary['endpoint']}/deployedModels/{summary['deployed_models'][0]['id']}"]
    # The weights went Hub -> GCS under the pinned revision, and serving loaded them from there.
    held = vertex_resources(tmp_path / "state")
    assert len(held["endpoints"]) == 1 and len(held["deployed_models"]) == 1


FAULTS = [
    # (fault, words the error must contain, whether the run creates Vertex resources before failing)
    ("quota-exhausted", "quota"),
    ("hub-gated", "gated"),
    ("upload-error", "Vertex AI Service Agent"),  # who reads artifactUri (contract A17)
    ("deploy-error", "Deploying"),
    ("deploy-timeout", "timed out"),
    ("server-crash", "exited with code"),
    ("smoke-fail", "smoke test failed"),
    ("kill-step:mirror-weights", "step mirror-weights was killed by SIGKILL"),
    ("kill-step:register-model", "step register-model was killed by SIGKILL"),
    ("kill-step:deploy-model", "step deploy-model was killed by SIGKILL"),
    ("kill-step:smoke-test", "step smoke-test was killed by SIGKILL"),
]
# Faults that strike after a model version is uploaded: the summary must list it as created and deleted.
CREATES_BEFORE_FAILING = {
    "deploy-error",
    "deploy-timeout",
    "server-crash",
    "smoke-fail",
    "kill-step:register-model",
    "kill-step:deploy-model",
    "kill-step:smoke-test",
}


@pytest.mark.parametrize(("fault", "message"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_leaves_nothing_behind(tmp_path: Path, tiny_model_dir: Path, fault: str, message: str) -> None:
    state = tmp_path / "state"
    # The tiny model says random words; "smoke-fail" makes it say "I am not sure.", which this rejects.
    cfg = tiny_config("tiny", "smoke_test.expect_regex=^(?!I am not sure)")
    summary = run(state, cfg, tiny_model_dir, faults=[fault])
    assert summary["status"] == "failed"
    assert message.lower() in (summary["error"] or "").lower(), summary["error"]
    held = vertex_resources(state)
    assert held == {"models": [], "endpoints": [], "deployed_models": []}, held
    assert summary["left_running"] == []
    # From the emulator's audit log: everything the run created, it also removed (and both are reported).
    assert set(summary["created"]) <= set(summary["deleted"]), summary
    if fault in CREATES_BEFORE_FAILING:
        assert any("/models/" in n for n in summary["created"]), summary["created"]
        if fault not in ("kill-step:register-model", "upload-error"):
            assert any(n.endswith("/endpoints/" + n.rsplit("/", 1)[1]) for n in summary["created"]), summary
    # The failing step, its last lines and its log on disk; for a kill, what the exit handler removed.
    failed = summary["failed_step"]
    assert Path(failed["log"]).is_file() and failed["last_lines"]
    assert not any("parameterValues" in ln for ln in failed["last_lines"])  # not kfp's dump of the inputs
    assert Path(failed["log"]).read_text().count("\n") >= len(failed["last_lines"])
    if fault == "kill-step:deploy-model":
        assert any("/deployedModels/" in r for r in summary["removed_by_exit_handler"]), summary


def test_predict_429_is_retried_and_passes(tmp_path: Path, tiny_model_dir: Path) -> None:
    summary = run(tmp_path / "state", tiny_config(), tiny_model_dir, faults=["predict-429"])
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["smoke"]["passed"] is True


def test_demo_answers_paris_and_a_second_identical_run_is_a_fast_noop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's main job: SmolLM2 through the whole DAG offline; then the same config again."""
    state = tmp_path / "state"
    cfg = load_config(ROOT / "configs" / "local-demo.yaml")
    t0 = time.monotonic()
    first = run_local(cfg, state_dir=state)  # as `make demo` runs it: the step view and the summary
    first_s = time.monotonic() - t0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) < 60, "\n".join(shown)
    assert "  smoke-test           succeeded" in "\n".join(shown)
    assert any("The capital of France is Paris." in ln for ln in shown[-10:])
    assert shown[-2].startswith("step logs: ") and Path(first["log_dir"], "smoke-test.log").is_file()
    # The last line says the stack (and so the endpoint) stopped with the run, and how to keep it up.
    assert shown[-1].startswith("the local stack stopped with this run") and "vlp local up" in shown[-1]
    assert first["status"] == "succeeded", first["error"]
    assert "paris" in first["smoke"]["answer"].lower()
    t1 = time.monotonic()
    second = run_local(cfg, state_dir=state, quiet=True)
    second_s = time.monotonic() - t1
    assert second["status"] == "noop", second
    assert not any(c.endswith(("/models:upload", ":deployModel")) for c in second["api_calls"])
    assert second["created"] == [] and second["deleted"] == []
    assert second["deployed_models"] == first["deployed_models"]
    # Fast because nothing after preflight runs (the exit handler finds nothing to remove). The times are printed,
    # not asserted: a ratio of wall times on a shared 2-core machine is a benchmark, not a test.
    assert [(s["name"], s["status"]) for s in second["steps"]] == [("preflight", "succeeded"), ("cleanup", "succeeded")]
    print(f"first run {first_s:.1f}s, no-op run {second_s:.1f}s ({second_s / first_s:.0%})")

    # A weights object deleted from the bucket: the next run does not vouch for the deployment (its container could
    # not load them again), it mirrors and deploys again, without first waiting out the serving model's health probe.
    from conftest import run_as

    from vlp.components.clients import storage_client
    from vlp.pipelines.local.peers import LocalStack

    with LocalStack(state) as stack, pytest.MonkeyPatch.context() as mp:
        run_as(mp, stack.api_endpoint, stack.bootstrap_owner("local-project"))
        mp.setenv("STORAGE_EMULATOR_HOST", stack.storage_endpoint)
        weights = next(b for b in storage_client("local-project").list_blobs("vlp-local") if b.name.endswith(".safetensors"))
        weights.delete()
    # Stopped once the mirror is done (the steps after it are the demo's first run again: not worth the suite's time).
    third = run_local(cfg, state_dir=state, quiet=True, faults=["kill-step:register-model"])
    assert third["status"] != "noop", third
    mirror = next(s for s in third["steps"] if s["name"] == "mirror-weights")
    assert mirror["status"] == "succeeded", third["steps"]
    assert any(c.startswith("POST /upload/storage/v1/b/vlp-local/o") for c in third["api_calls"])  # re-uploaded


ENDPOINT_KINDS = {
    # (config overrides, how users call the endpoint): the two kinds a redeploy must work on.
    # Canary steps on the shared kind: promote reads them from a KFP struct (floats) and must send integers.
    "shared": (("endpoint.traffic_steps=[50,100]",), "chat"),
    "dedicated": (("endpoint.dedicated=true",), "invoke"),
}


def _hammer(endpoint: str, stack: Any, kind: str, stop: threading.Event, results: list[Any]) -> None:
    """A user calling the endpoint the way its kind is called: chat completions on the regional host, or the
    endpoint-level invoke route on a dedicated endpoint's own DNS (both routed to the emulator by http_session).
    The user is the project's owner, with credentials of its own (the run's steps call as the pipeline's account).
    Any error lands in `results`, so the test sees it."""
    try:
        _hammer_as_owner(endpoint, stack, kind, stop, results)
    except Exception as exc:  # noqa: BLE001 - reported to the test through results
        results.append(repr(exc))


def _hammer_as_owner(endpoint: str, stack: Any, kind: str, stop: threading.Event, results: list[Any]) -> None:
    from google.cloud import aiplatform_v1

    from vlp.components.serving.calls import http_session
    from vlp.components.vertex.prediction import parse_endpoint, vertex_base_url

    api = stack.api_endpoint
    credentials = stack.credentials(stack.bootstrap_owner(parse_endpoint(endpoint)["project"]))
    parts = parse_endpoint(endpoint)
    endpoints = aiplatform_v1.EndpointServiceClient(
        client_options={"api_endpoint": api}, transport="rest", credentials=credentials
    )
    base_url = vertex_base_url(parts["region"], api, endpoints.get_endpoint(name=endpoint).dedicated_endpoint_dns)
    session = http_session(api)
    session.credentials = credentials
    messages = [{"role": "user", "content": "hi"}]
    # Long enough answers that some request is always in flight when the old model is retired (the drain's case).
    # vLLM's own image: its /v1/chat/completions, through invoke or :rawPredict (its predict route).
    body: dict[str, Any] = {"messages": messages, "max_tokens": 48}
    if kind == "invoke":
        url = f"{base_url}/v1/{endpoint}/invoke/v1/chat/completions"
    else:
        url = f"{base_url}/v1/{endpoint}:rawPredict"
    while not stop.is_set():
        try:
            results.append(session.post(url, json=body, timeout=60).status_code)
        except requests.RequestException:
            results.append(-1)
        time.sleep(0.05)


HAMMERS = 3  # callers at once: constant load, so the cutover always has requests in flight


@pytest.mark.parametrize("kind", list(ENDPOINT_KINDS))
def test_redeploy_new_revision_is_blue_green_without_downtime(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    overrides, call = ENDPOINT_KINDS[kind]
    state = tmp_path / "state"
    first = run(state, tiny_config("tiny", *overrides), tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    old_id = first["deployed_models"][0]["id"]
    # A new revision: same model with a changed generation config, published as a new commit.
    changed = tmp_path / "tiny-v2"
    import shutil

    shutil.copytree(tiny_model_dir, changed)
    gen = json.loads((changed / "generation_config.json").read_text())
    gen["max_new_tokens"] = 7
    (changed / "generation_config.json").write_text(json.dumps(gen))

    # Keep the endpoint busy from another thread for the whole redeploy, through a fresh emulator start.
    results: list[Any] = []  # status codes, or the error that stopped the caller
    stop = threading.Event()
    from vlp.pipelines.local import peers

    original_start, original_stop = peers.LocalStack.start, peers.LocalStack.stop
    threads: list[threading.Thread] = []

    def start_and_hammer(self: Any) -> Any:
        out = original_start(self)
        for _ in range(HAMMERS):
            thread = threading.Thread(target=_hammer, args=(first["endpoint"], self, call, stop, results), daemon=True)
            thread.start()
            threads.append(thread)
        return out

    def stop_hammer_then_stack(self: Any) -> None:
        # The run is over once the stack stops (the endpoint does not outlive a local run).
        stop.set()
        for thread in threads:
            thread.join(timeout=70)
        original_stop(self)

    monkeypatch.setattr(peers.LocalStack, "start", start_and_hammer)
    monkeypatch.setattr(peers.LocalStack, "stop", stop_hammer_then_stack)
    second = run_local(tiny_config("tiny", *overrides), state_dir=state, model_dir=changed, quiet=True)
    stop.set()
    assert second["status"] == "succeeded", second["error"]
    # The smoke test reached the new model by the route its endpoint kind serves.
    new_id = second["deployed_models"][0]["id"]
    if kind == "dedicated":
        assert any(c.endswith(f"/deployedModels/{new_id}/invoke/v1/chat/completions") for c in second["api_calls"])
    else:
        assert any(c.endswith(":rawPredict") for c in second["api_calls"])
        assert not any("/invoke" in c for c in second["api_calls"])
    assert len(second["deployed_models"]) == 1
    assert second["deployed_models"][0]["id"] != old_id
    assert second["deployed_models"][0]["traffic_percent"] == 100
    # The restarted emulator brings the old model back up first; count from its first answer on.
    assert not [r for r in results if isinstance(r, str)], results  # the caller's thread never failed
    answered = results[next((i for i, s in enumerate(results) if s == 200), len(results)) :]
    assert len(answered) > 5
    assert all(s == 200 for s in answered), results
    if kind == "shared":
        # The run after: nothing changed, and its summary names the version that serves (2), not the model's first.
        third = run_local(tiny_config("tiny", *overrides), state_dir=state, model_dir=changed, quiet=True)
        assert third["status"] == "noop", third
        assert third["model"]["version_id"] == second["model"]["version_id"] == "2", (third["model"], second["model"])


@pytest.mark.parametrize("kind", list(ENDPOINT_KINDS))
def test_redeploy_with_failing_smoke_keeps_old_model(tmp_path: Path, tiny_model_dir: Path, kind: str) -> None:
    overrides, _ = ENDPOINT_KINDS[kind]
    state = tmp_path / "state"
    first = run(state, tiny_config("tiny", *overrides), tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    second = run(
        state,
        tiny_config("tiny", "smoke_test.expect_regex=^(?!I am not sure)", *overrides),
        tiny_model_dir,
        faults=["smoke-fail"],
        force=True,
    )
    assert second["status"] == "failed"
    assert second["deployed_models"] == first["deployed_models"]
    assert second["deployed_models"][0]["traffic_percent"] == 100
    held = vertex_resources(state)
    assert len(held["deployed_models"]) == 1
    # No trace of the new version: the model has the one version the first run registered.
    assert len(held["models"]) == 1


def test_dedicated_endpoint_unchanged_redeploy_is_a_noop(tmp_path: Path, tiny_model_dir: Path) -> None:
    """No-op detection probes the serving model through the per-model invoke route a dedicated endpoint serves."""
    state = tmp_path / "state"
    cfg = tiny_config("tiny", "endpoint.dedicated=true")
    first = run(state, cfg, tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    second = run(state, cfg, tiny_model_dir)
    assert second["status"] == "noop", second
    dm = first["deployed_models"][0]["id"]
    assert any(c.endswith(f"/deployedModels/{dm}/invoke/v1/chat/completions") for c in second["api_calls"])
    assert not any(c.endswith(("/models:upload", ":deployModel")) for c in second["api_calls"])


def test_benchmark_runs_in_the_pipeline_from_float_struct_parameters(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """KFP hands the config to every step as a struct, every number a float: the benchmark reads it typed. Its
    report is an .html file the summary names; a canary redeploy says why it could not benchmark."""
    from vlp.pipelines.summary import print_summary

    cfg = tiny_config(
        "tiny", "smoke_test.benchmark=true", "smoke_test.benchmark_concurrency=[1,2]", "smoke_test.benchmark_requests=2"
    )
    summary = run(tmp_path / "state", cfg, tiny_model_dir)
    assert summary["status"] == "succeeded", summary["error"]
    report = Path(summary["report"])
    assert report.suffix == ".html" and "tokens/s" in report.read_text()
    print_summary(summary)
    printed = capsys.readouterr().out
    assert f"report:   {report}" in printed and "benchmark c=2:" in printed
    levels = summary["smoke"]["benchmark"]
    assert [int(lv["concurrency"]) for lv in levels] == [1, 2]
    assert all(lv["output_tokens_per_s"] > 0 for lv in levels), levels
    # Measured and estimated USD per 1M output tokens side by side, priced at the local catalog's CPU server.
    from vlp.components.planning.throughput import LOCAL_PRICE_PER_HOUR

    for lv in levels:
        measured = LOCAL_PRICE_PER_HOUR / (lv["output_tokens_per_s"] * 3600) * 1e6
        assert lv["cost_per_million_output_tokens_usd"] == pytest.approx(measured, rel=1e-3)
        assert lv["estimated_output_tokens_per_s"] > 0 and lv["estimated_cost_per_million_output_tokens_usd"] > 0

    # A redeploy on the shared endpoint tests the new model as a 5% canary: no streaming request can be pinned to
    # it, and the summary (and the terminal) say so instead of a step log alone.
    again = run(tmp_path / "state", cfg, tiny_model_dir, force=True)
    assert again["status"] == "succeeded", again["error"]
    assert "holds 5% of a shared endpoint's traffic" in again["smoke"]["benchmark_skipped"]
    print_summary(again)
    assert "benchmark skipped: the new model holds 5%" in capsys.readouterr().out


def test_multi_host_off_the_documented_path_is_refused_at_preflight_before_anything_is_created(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A replica over two L4 nodes is outside Google's documented multi-host path (2+ x a3-highgpu-8g only;
    serving.multi_host_outside): preflight refuses it, with the reason and the fix, before the mirror or any deploy."""
    state = tmp_path / "state"
    (state / "emulator").mkdir(parents=True)
    (state / "emulator" / "quotas.json").write_text(json.dumps({"quotas": {}, "default": 64}))
    cfg = tiny_config(
        "tiny",
        # The tiny model has 4 attention heads: 4 GPUs per node.
        "hardware={machine_type: g2-standard-48, accelerator_type: NVIDIA_L4, accelerator_count: 4}",
        "serving.tensor_parallel_size=4",
        "serving.pipeline_parallel_size=2",
        "endpoint.dedicated=true",
    )
    summary = run(state, cfg, tiny_model_dir)
    assert summary["status"] == "failed"
    assert "outside Google's documented multi-host path" in summary["error"]
    assert "g2-standard-48 (4 x NVIDIA_L4) is not the page's machine" in summary["error"]
    assert [s["name"] for s in summary["steps"]] == ["preflight", "cleanup"]
    assert summary["created"] == []
    assert not any(":deployModel" in c for c in summary["api_calls"])


def test_the_405b_bf16_multi_host_preset_runs_end_to_end_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Seed 003's preset (2 x a3-highgpu-8g, TP 8 x PP 2, Model Garden's multi-host image) with the tiny Llama in
    place of 405B: preflight plans the multi-host image, the upload carries the Ray launcher first, the deploy goes
    to v1beta1 with multihostGpuNodeCount 2 on a dedicated endpoint (the emulator's V-MH rules), and the model answers
    the smoke test through invoke."""
    import shutil

    state = tmp_path / "state"
    (state / "emulator").mkdir(parents=True)
    (state / "emulator" / "quotas.json").write_text(json.dumps({"quotas": {}, "default": 64}))
    # TP 8 needs heads divisible by 8: the same weights read as 8 heads of 4 (q 8 x 4 = 32, k/v 4 x 4 = 16 rows).
    model = tmp_path / "tiny-llama-8-heads"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    cfg = load_config(
        ROOT / "configs" / "llama-3.1-405b-bf16-vllm-2xa3.yaml",
        [
            "name=tiny-mh",
            "endpoint.name=tiny-mh",
            f"model.repo={TINY_REPO}",
            "model.hf_token_secret=",
            "placement.regions=[us-central1]",
            "smoke_test.expect=",
            "smoke_test.max_tokens=8",
            "smoke_test.attempts=3",
            "serving.max_model_len=512",  # the tiny model's context
        ],
    )
    summary = run(state, cfg, model)
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["smoke"]["passed"] is True
    calls = summary["api_calls"]
    assert any(c.startswith("POST ") and "/v1beta1/" in c and c.endswith(":deployModel") for c in calls), calls
    assert not any("/v1/" in c and c.endswith(":deployModel") for c in calls)
    state_json = emulator_state(state)
    (endpoint,) = state_json["endpoints"].values()
    assert endpoint["dedicatedEndpointEnabled"]
    (deployed,) = endpoint["deployedModels"]
    assert state_json["multihost"] == {deployed["id"]: 2}
    machine = deployed["dedicatedResources"]["machineSpec"]
    assert (machine["machineType"], machine["acceleratorType"], machine["acceleratorCount"]) == (
        "a3-highgpu-8g",
        "NVIDIA_H100_80GB",
        8,
    )
    (model_entry,) = state_json["models"].values()
    (version,) = model_entry["versions"].values()
    spec = version["containerSpec"]
    assert spec["imageUri"].endswith("pytorch-vllm-serve:20250312_0916_RC01")
    assert spec["args"][0] == "/vllm-workspace/ray_launcher.sh"
    assert "--tensor-parallel-size=8" in spec["args"] and "--pipeline-parallel-size=2" in spec["args"]


def test_a_run_whose_job_names_no_account_runs_as_the_compute_default_and_fails_preflight_naming_the_fix(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A PipelineJob without serviceAccount (a console run with Advanced options left empty) runs every step as the
    Compute Engine default account, which holds no role here (as with no automatic Editor grant): preflight stops it
    before anything is created, and says why and how to run as the pipeline's account."""
    summary = run(tmp_path / "state", tiny_config(), tiny_model_dir, faults=["no-service-account"])
    assert summary["status"] == "failed"
    error = summary["error"] or ""
    assert "-compute@developer.gserviceaccount.com, the Compute Engine default service account" in error, error
    assert "its PipelineJob named no service account" in error
    assert "vlp-pipeline@local-project.iam.gserviceaccount.com" in error and "Advanced options > Service account" in error
    assert [s["name"] for s in summary["steps"]] == ["preflight", "cleanup"]
    assert summary["created"] == []


def test_big_model_branch_runs_as_a_custom_job_as_the_pipeline_account_with_the_gated_repos_token(
    tmp_path: Path, tiny_model_dir: Path, keep_stack_up: Any
) -> None:
    """The DAG's big-model branch end to end (issue 33 item 2): `model.mirror_job_above_gb: 0` sends even the tiny
    model to it. GCPC's launcher creates a CustomJob on the emulator, which runs the mirror step's container command as
    the job's account. The repo is gated and the config names no service account: the run's account (decided in
    preflight) is the job's, and it reads the Hub token from Secret Manager; only that token opens the gate."""
    from vlp.pipelines.local import background
    from vlp.pipelines.local.emulator import plumbing

    state = tmp_path / "state"
    keep_stack_up(state)
    api = background.running(state)["emulator"]
    headers = {"Content-Type": "application/json", **plumbing.headers(state / "emulator")}

    def plumb(path: str, body: dict[str, Any]) -> None:
        requests.post(f"{api}/_emulator/{path}", json=body, headers=headers, timeout=10).raise_for_status()

    plumb("secrets", {"name": "hf-token", "value": "hf_accepted_terms_token"})
    cfg = tiny_config("tiny-job", "model.mirror_job_above_gb=0", "model.hf_token_secret=hf-token")
    assert not cfg.placement.service_account
    # A token whose user has not accepted the terms: preflight stops the run before any job, naming the repo.
    refused = run(state, cfg, tiny_model_dir, faults=["hub-gated"])
    assert refused["status"] == "failed" and "vlp-test/tiny-llama" in refused["error"], refused["error"]
    assert not emulator_state(state)["customJobs"]

    plumb("hub-access", {"tokens": ["hf_accepted_terms_token"]})
    summary = run(state, cfg, tiny_model_dir, faults=["hub-gated"])
    assert summary["status"] == "succeeded", summary["error"]
    assert [s["status"] for s in summary["steps"] if s["name"] == "mirror-weights"] == ["succeeded"]
    assert any(c.startswith("POST ") and c.endswith("/customJobs") for c in summary["api_calls"])
    (job,) = emulator_state(state)["customJobs"].values()
    account = "vlp-pipeline@local-project.iam.gserviceaccount.com"
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["jobSpec"]["serviceAccount"] == account
    assert job["_runAs"] == account
    assert job["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]["machineType"] == "n2-standard-8"
    # The mirror ran inside the job (its log is the job's), and the weights it wrote are the ones deployed.
    log = (state / "emulator" / "custom-jobs" / f"{job['name'].rsplit('/', 1)[1]}.log").read_text()
    assert "mirrored vlp-test/tiny-llama" in log, log[-2000:]
    assert summary["smoke"]["passed"] is True
