"""The Cloud Run target end to end on the local stack (the compiled DAG through kfp.local, the emulator's Cloud Run
Admin API v2), and its config, plan and render without one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import run_as

from vlp.components.config import ConfigError, load_config
from vlp.pipelines.local.runner import run_local

ROOT = Path(__file__).resolve().parent.parent
DEMO_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # configs/local-demo-cloud-run.yaml's model
TINY_REPO = "vlp-test/tiny-llama"
# The pipeline's account: the deploy step grants it roles/run.invoker on the service it deploys.
ACCOUNT = "vlp-pipeline@local-project.iam.gserviceaccount.com"


def run_config(name: str = "tiny-run", *overrides: str) -> Any:
    """The Cloud Run local demo pointed at the tiny random Llama: structure, not semantics."""
    return load_config(
        ROOT / "configs" / "local-demo-cloud-run.yaml",
        [
            f"name={name}",
            f"model.repo={TINY_REPO}",
            "smoke_test.expect=",
            "smoke_test.max_tokens=8",
            "smoke_test.attempts=3",
            "serving.max_model_len=512",
            *overrides,
        ],
    )


def run(state: Path, cfg: Any, model_dir: Path, **kwargs: Any) -> dict[str, Any]:
    return run_local(cfg, state_dir=state, model_dir=model_dir, quiet=True, **kwargs)


def _token(url: str, email: str) -> str:
    """An ID token for the service at `url`, signed by the stack's metadata stand-in, as `email` would fetch it."""
    api = url.split("/_run/")[0]
    answer = requests.get(
        f"{api}/_md/{email}/computeMetadata/v1/instance/service-accounts/default/identity",
        params={"audience": url},
        headers={"Metadata-Flavor": "Google"},
        timeout=30,
    )
    answer.raise_for_status()
    return answer.text


def _chat(url: str, token: str | None, model: str = TINY_REPO) -> int:
    """A chat request's status: vLLM's own image answers only to its served model name (the repo id)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120).status_code


def _service_url(api: str, name: str) -> str:
    return f"{api}/_run/local-project/us-central1/{name}"


# ----------------------------------------------------------------------------- config, plan, render (no stack)


def _cfg(**cloud_run: Any) -> dict[str, Any]:
    return {
        "name": "svc",
        "target": "cloud_run",
        "model": {"repo": "a/b"},
        "serving": {"engine": "tgi"},
        "cloud_run": cloud_run,
    }


@pytest.mark.parametrize(
    ("cloud_run", "words"),
    [
        ({"cpu": 2}, "cloud_run: nvidia-l4 needs at least 4 CPU and 16Gi"),
        ({"memory": "8Gi"}, "cloud_run: nvidia-l4 needs at least 4 CPU and 16Gi"),
        ({"gpu_type": "nvidia-rtx-pro-6000"}, "nvidia-rtx-pro-6000 needs at least 20 CPU and 80Gi"),
        ({"cpu": 16}, "take at most 8 CPU and 32Gi"),
        ({"concurrency": 0}, "cloud_run.concurrency"),
        ({"concurrency": 1001}, "cloud_run.concurrency"),
        ({"min_instances": 4, "max_instances": 3}, "min_instances is above max_instances"),
        ({"memory": "32GB"}, "cloud_run.memory: '32GB': write memory as a number of Gi or Mi"),
        ({"service": "Bad_Name"}, "cloud_run.service"),
        ({"gpu_type": "nvidia-h100"}, "cloud_run.gpu_type"),
        ({"service": "a" * 38}, "is 38 characters: Cloud Run refuses a traffic tag whose length plus"),
        ({"ingress": "internal"}, "which internal ingress refuses (404)"),
        ({"ingress": "internal-and-cloud-load-balancing"}, "use ingress: all"),
        ({"startup_timeout_s": 3600}, "cloud_run.startup_timeout_s"),
    ],
)
def test_cloud_run_config_errors_name_the_field(cloud_run: dict, words: str) -> None:
    from vlp.components.config import config_from_dict

    with pytest.raises(ConfigError) as exc:
        config_from_dict(_cfg(**cloud_run))
    assert words in str(exc.value)


def test_cloud_run_target_takes_no_vertex_hardware() -> None:
    from vlp.components.config import config_from_dict

    with pytest.raises(ConfigError, match="hardware is for Vertex machines"):
        config_from_dict(
            {
                **_cfg(),
                "hardware": {"machine_type": "g2-standard-8", "accelerator_type": "NVIDIA_L4", "accelerator_count": 1},
            }
        )
    cfg = config_from_dict(_cfg())
    assert cfg.endpoint.name == "svc" and cfg.service_id == "svc"  # no endpoint section needed on this target


def test_the_vllm_preset_streams_its_weights_with_vllms_own_image() -> None:
    """Cloud Run beside the TGI preset: vLLM's image through the project's Artifact Registry remote repository,
    `vllm serve gs://…` streaming the weights (no copy in instance memory), or a volume with weights: mount; every
    flag one vLLM 0.34 accepts."""
    from test_serving import seed

    from vlp.components.cloud_run.service_spec import revision_template
    from vlp.components.serving import images

    weights = "gs://vlp-bucket/models/hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4/sha"
    (container,) = revision_template(seed("llama-3.1-8b-awq-int4-vllm-cloud-run"), weights, {}).containers
    assert container.image == "us-docker.pkg.dev/test-project/vlp-docker-hub/vllm/vllm-openai:v0.34.0"
    assert list(container.command) == ["vllm", "serve"]
    assert list(container.args[:2]) == [weights, "--load-format=runai_streamer"]
    assert "--served-model-name=hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4" in container.args
    assert "--max-num-seqs=64" in container.args and "--max-model-len=8192" in container.args
    assert not images.by_id("vllm-0.34.0").unknown_flags(list(container.args))
    assert {e.name for e in container.env} == {"HF_HUB_OFFLINE"}  # no AIP_STORAGE_URI, MODEL_ID or token
    assert container.startup_probe.http_get.path == "/health"
    mounted = revision_template(
        seed("llama-3.1-8b-awq-int4-vllm-cloud-run", overrides=["cloud_run.weights=mount"]), weights, {}
    )
    assert mounted.containers[0].args[0] == "/mnt/model" and mounted.volumes[0].gcs.bucket == "vlp-bucket"


def test_render_shows_the_tutorials_service() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vlp.pipelines.cli", "render", "configs/llama-3.1-8b-awq-int4-tgi-cloud-run.yaml", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    service = data["service"]
    template = service["template"]
    [container] = template["containers"]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["cpuIdle"] is False  # CPU always allocated (--no-cpu-throttling)
    assert template["nodeSelector"] == {"accelerator": "nvidia-l4"}
    assert template["scaling"]["maxInstanceCount"] == 3
    assert template["maxInstanceRequestConcurrency"] == 64
    assert "--max-concurrent-requests=64" in container["args"] and "--quantize=awq" in container["args"]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AIP_STORAGE_URI"].startswith("gs://") and "HF_TOKEN" not in out.stdout
    assert service["ingress"] == "INGRESS_TRAFFIC_ALL" and "allUsers" not in json.dumps(service)  # IAM decides
    assert "invokerIamDisabled" not in service
    assert [t["tag"] for t in service["traffic"]] == ["candidate"]


def test_plan_shows_the_instance_price_and_regions(tiny_model_dir: Path, hub_mirror: Any) -> None:
    from vlp.components.config import config_from_dict
    from vlp.components.preflight import plan_deployment

    hub_mirror.publish(tiny_model_dir, TINY_REPO)
    placement = {"regions": ["us-west1", "us-central1"]}
    cfg = config_from_dict({**_cfg(cpu=8, memory="32Gi"), "model": {"repo": TINY_REPO}, "placement": placement})
    plan = plan_deployment(cfg, check_quota=False, hub_endpoint=hub_mirror.url)
    assert plan.fits, plan.errors
    run = plan.cloud_run
    # 8 vCPU x $0.000018 + 32 GiB x $0.000002 + L4 with zonal redundancy.
    assert run["price_per_second_usd"] == pytest.approx(8 * 0.000018 + 32 * 0.000002 + 0.0002909, rel=1e-4)
    assert run["price_per_hour_usd"] == pytest.approx(run["price_per_second_usd"] * 3600, rel=1e-3)
    assert "2026-12" in run["prices_note"] and plan.machine_type == "cloud-run-nvidia-l4"
    assert plan.region == "us-central1"  # us-west1 has no Cloud Run L4


# ----------------------------------------------------------------------------- on the local stack


@pytest.mark.slow
def test_demo_answers_paris_noop_redeploys_and_403(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Cloud Run target end to end, in order: Paris; a no-op; a failing redeploy that keeps the old revision while the
    service answers throughout; a forced redeploy that moves all traffic; 403 without roles/run.invoker."""
    state = tmp_path / "state"
    cfg = load_config(ROOT / "configs" / "local-demo-cloud-run.yaml")
    first = run_local(cfg, state_dir=state, quiet=True)
    assert first["status"] == "succeeded", first["error"]
    assert "paris" in first["smoke"]["answer"].lower()
    [old] = first["revisions"]
    assert old["traffic_percent"] == 100 and first["service"].endswith("/services/smollm2-demo-run")
    assert first["left_running"] == [f"{first['service']}/revisions/{old['name']}"]

    second = run_local(cfg, state_dir=state, quiet=True)
    assert second["status"] == "noop", second
    assert [s["name"] for s in second["steps"]] == ["preflight", "cleanup"]

    # A failing redeploy, with the service called every 0.2 s from the moment the stack is up.
    from vlp.pipelines.local import peers

    results: list[int | str] = []  # a status, or the error a call raised: every call's outcome is recorded
    stop = threading.Event()
    threads: list[threading.Thread] = []
    original_start, original_stop = peers.LocalStack.start, peers.LocalStack.stop

    def hammer(url: str) -> None:
        try:
            token = _token(url, ACCOUNT)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results.append(f"no token: {exc!r}")
            return
        while not stop.is_set():
            try:
                results.append(_chat(url, token, DEMO_REPO))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                results.append(repr(exc))
            stop.wait(0.2)

    def start_and_hammer(self: Any) -> Any:
        out = original_start(self)
        thread = threading.Thread(target=hammer, args=(_service_url(self.api_endpoint, "smollm2-demo-run"),))
        thread.start()
        threads.append(thread)
        return out

    def stop_hammer_then_stack(self: Any) -> None:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)  # the call in flight ends before the stack it calls goes
        original_stop(self)

    monkeypatch.setattr(peers.LocalStack, "start", start_and_hammer)
    monkeypatch.setattr(peers.LocalStack, "stop", stop_hammer_then_stack)
    failed = run_local(cfg, state_dir=state, quiet=True, force=True, faults=["smoke-fail"])
    monkeypatch.undo()
    assert failed["status"] == "failed" and "smoke test failed" in failed["error"]
    assert failed["revisions"] == [old], failed["revisions"]  # no trace of the new revision
    [candidate] = [n for n in failed["created"] if "/revisions/" in n]
    assert candidate in failed["deleted"]
    assert len(results) > 5 and all(s == 200 for s in results), results

    forced = run_local(cfg, state_dir=state, quiet=True, force=True)
    assert forced["status"] == "succeeded", forced["error"]
    serving = [r for r in forced["revisions"] if r["traffic_percent"]]
    assert len(serving) == 1 and serving[0]["traffic_percent"] == 100 and serving[0]["name"] != old["name"]
    assert {r["name"] for r in forced["revisions"]} == {old["name"], serving[0]["name"]}

    # Private: the emulator's Cloud Run answers 403 without an ID token of an account holding roles/run.invoker.
    from vlp.pipelines.local.peers import LocalStack

    with LocalStack(state) as stack:
        url = _service_url(stack.api_endpoint, "smollm2-demo-run")
        assert _chat(url, None, DEMO_REPO) == 403
        assert _chat(url, _token(url, "someone@example.com"), DEMO_REPO) == 403
        assert _chat(url, _token(url, ACCOUNT), DEMO_REPO) == 200
        # `vlp teardown` knows Cloud Run: the runs' revisions and the service the first run created all go. The
        # project's owner runs it, with credentials of its own.
        from vlp.pipelines.cli import main

        for key, value in stack.env(stack.bootstrap_owner("local-project")).items():
            if key.startswith("GCE_METADATA"):
                monkeypatch.setenv(key, value)
        # main() sets it for its process, as the CLI does; here the process is this test's worker, so undo it after.
        monkeypatch.setenv("VLP_API_ENDPOINT", stack.api_endpoint)
        config = str(ROOT / "configs" / "local-demo-cloud-run.yaml")
        assert main(["--api-endpoint", stack.api_endpoint, "teardown", config, "--dry-run"]) == 0
        assert _chat(url, _token(url, ACCOUNT), DEMO_REPO) == 200
        assert main(["--api-endpoint", stack.api_endpoint, "teardown", config, "--yes"]) == 0
        assert _chat(url, _token(url, ACCOUNT), DEMO_REPO) == 404


@pytest.mark.slow
def test_quota_shortfall_fails_preflight_before_the_mirror(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The tutorial's size: 3 x 8 CPU / 32 GiB with zonal-redundant L4s, above a new project's Cloud Run quotas.
    cfg = run_config(
        "tiny-big",
        "cloud_run.cpu=8",
        "cloud_run.memory=32Gi",
        "cloud_run.max_instances=3",
        "cloud_run.zonal_redundancy=true",
    )
    summary = run(tmp_path / "state", cfg, tiny_model_dir)
    assert summary["status"] == "failed"
    assert [s["name"] for s in summary["steps"]] == ["preflight", "cleanup"]
    error = summary["error"]
    for quota in ("NvidiaL4GpuAllocPerProjectRegion", "CpuAllocPerProjectRegion", "MemAllocPerProjectRegion"):
        assert quota in error, error
    assert "SHORT" in error and "gcloud beta quotas preferences create --service=run.googleapis.com" in error
    assert summary["created"] == []


FAULTS = [
    # (fault, words the error must contain, whether a service is created before the failure)
    ("quota-exhausted", "quota", False),
    ("hub-gated", "gated", False),
    ("deploy-error", "failed to start and listen on the port", True),
    ("deploy-timeout", "timed out", True),
    ("server-crash", "exited with code", True),
    ("smoke-fail", "smoke test failed", True),
    ("kill-step:deploy-service", "step deploy-service was killed by SIGKILL", True),
    ("kill-step:smoke-test-service", "step smoke-test-service was killed by SIGKILL", True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "message", "creates"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_leaves_nothing_behind(
    tmp_path: Path, tiny_model_dir: Path, fault: str, message: str, creates: bool
) -> None:
    cfg = run_config("tiny-run", "smoke_test.expect_regex=^(?!I am not sure)")
    summary = run(tmp_path / "state", cfg, tiny_model_dir, faults=[fault])
    assert summary["status"] == "failed"
    assert message.lower() in (summary["error"] or "").lower(), summary["error"]
    assert summary["service"] is None and summary["revisions"] == [] and summary["left_running"] == []
    assert set(summary["created"]) <= set(summary["deleted"]), summary
    assert any(n.endswith("/services/tiny-run") for n in summary["created"]) == creates, summary["created"]
    if fault == "server-crash":
        # The revision's own output, read back from Cloud Logging (resource.type cloud_run_revision).
        assert "Last log lines of revision" in summary["error"] and "(no log lines" not in summary["error"]
    if fault.startswith("kill-step:"):
        assert any(n.endswith("/services/tiny-run") for n in summary["removed_by_exit_handler"]), summary


@pytest.mark.slow
def test_cold_service_429_is_retried_and_a_canary_redeploy_moves_in_steps(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    # Room for three revisions at once: a tag someone puts on the old revision (below) keeps it counted.
    (state / "emulator").mkdir(parents=True)
    quotas = {
        "CpuAllocPerProjectRegion": {"us-central1": 3 * 4000},
        "MemAllocPerProjectRegion": {"us-central1": 3 * 16 * 2**30},
        "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion": {"us-central1": 3},
    }
    (state / "emulator" / "quotas.json").write_text(json.dumps({"quotas": quotas, "default": 8}))
    first = run(state, run_config(), tiny_model_dir, faults=["predict-429"])
    assert first["status"] == "succeeded", first["error"]
    # The deploy makes no IAM change (the pipeline's account invokes through its project role): nothing to wait for.
    assert not any(":setIamPolicy" in c for c in first["api_calls"]), first["api_calls"]
    [old] = first["revisions"]
    assert old["traffic_percent"] == 100
    # The no-op probe meets the cold start's 429s too (a fresh stack: the revision is scaled to zero): it waits.
    noop = run(state, run_config(), tiny_model_dir, faults=["predict-429"])
    assert noop["status"] == "noop", noop
    # Someone sets fields vlp does not own; the redeploys below must keep them (read, modify, write with the etag).
    outside = {"annotations": {"example.com/owner": "team-a"}, "custom_audiences": ["https://llm.example.com"]}

    def service_now(change: Any = None) -> Any:
        from vlp.components.cloud_run.service_spec import services_client
        from vlp.pipelines.local.peers import LocalStack

        with LocalStack(state) as stack, pytest.MonkeyPatch.context() as mp:
            run_as(mp, stack.api_endpoint, stack.bootstrap_owner("local-project"))
            services = services_client(stack.api_endpoint)
            name = "projects/local-project/locations/us-central1/services/tiny-run"
            if change is not None:
                services.update_service(service=change(services.get_service(name=name))).result(timeout=60)
            return services.get_service(name=name)

    def set_outside(svc: Any) -> Any:
        from google.cloud import run_v2

        svc.annotations = outside["annotations"]
        svc.custom_audiences = outside["custom_audiences"]
        pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
        svc.traffic = [run_v2.TrafficTarget(type_=pin, revision=old["name"], percent=100, tag="stable")]
        return svc

    service_now(set_outside)
    canary = run(state, run_config("tiny-run", "endpoint.traffic_steps=[50, 100]"), tiny_model_dir, force=True)
    assert canary["status"] == "succeeded", canary["error"]
    new = next(r for r in canary["revisions"] if r["name"] != old["name"])
    assert new["traffic_percent"] == 100 and "tag" not in new
    promoted = Path(next(s["log"] for s in canary["steps"] if s["name"] == "promote-service")).read_text()
    # The canary step held half the traffic, the old revision the other half, before all of it moved.
    assert f"'{new['name']}': 50, '{old['name']}': 50" in promoted, promoted[-2000:]
    assert f"{{'{new['name']}': 100}}" in promoted
    kept = service_now()
    assert dict(kept.annotations) == outside["annotations"], kept
    assert list(kept.custom_audiences) == outside["custom_audiences"]
    # A tag someone put on the old revision stays through the redeploy and the promotion (at 0%).
    assert (old["name"], 0, "stable") in [(t.revision, t.percent, t.tag) for t in kept.traffic_statuses], kept

    # A redeploy whose revision never starts: Cloud Run keeps the submitted template (the failed revision is the
    # latest created, which it will not delete); the exit handler puts the template back on the serving revision,
    # then deletes the candidate. Nothing is refused, the service is Ready on its revision, nothing else is lost.
    broken = run(state, run_config(), tiny_model_dir, force=True, faults=["deploy-error"])
    assert broken["status"] == "failed" and "failed to start" in broken["error"], broken["error"]
    [candidate] = [n for n in broken["created"] if "/revisions/" in n]
    assert candidate in broken["deleted"], broken
    after = service_now()
    assert [(t.revision, t.percent) for t in after.traffic_statuses if t.percent] == [(new["name"], 100)]
    assert (old["name"], "stable") in [(t.revision, t.tag) for t in after.traffic_statuses]
    assert after.latest_created_revision.endswith(f"/{new['name']}") and after.template.revision == new["name"]
    assert after.terminal_condition.state.name == "CONDITION_SUCCEEDED", after.terminal_condition
    assert dict(after.annotations) == outside["annotations"]
    again = run(state, run_config(), tiny_model_dir, force=True)  # the next run trips over nothing
    assert again["status"] == "succeeded", again["error"]
