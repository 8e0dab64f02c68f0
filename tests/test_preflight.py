"""Preflight against real local peers: the olah Hub mirror and the Vertex emulator (quotas, endpoints, secrets)."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import auth_header, let_vertex_read, pipeline_identity, plumbing_headers, project_bucket
from kfp import dsl

from vlp.components import clients
from vlp.components.config import load_config
from vlp.components.planning.report import render_markdown
from vlp.components.preflight import PreflightError, label_value, plan_deployment, preflight_op, run_preflight
from vlp.pipelines.local.emulator import create_emulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_planning import LLAMA_8B, write_header_only_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT = "vlp-test"
L4 = "CustomModelServingL4GPUsPerProjectPerRegion"
CPUS = "CustomModelServingCPUsPerProjectPerRegion"
REPO = "meta-llama/Llama-3.1-8B-Instruct"


class _NoServing:
    """Stands in for the emulator's model-server launcher: these tests need deployment records, not a model server."""

    def start(self, deployed_model_id: str, artifact_uri: str, container_spec: dict, timeout_s: float = 300) -> None:
        return None

    def stop(self, deployed_model_id: str, remove_copy: bool = False) -> None:
        return None

    def stop_all(self) -> None:
        return None

    def logged_ids(self) -> list[str]:
        return []

    def log_path(self, deployed_model_id: str) -> Path:
        return Path("/dev/null")

    def logs(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no model server in this test")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, hub_mirror: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("preflight-models")
    with_template = write_header_only_model(root / "8b", LLAMA_8B)
    no_template = write_header_only_model(root / "8b-base", LLAMA_8B, chat_template=False)
    return {
        "sha": hub_mirror.publish(with_template, REPO),
        "base_sha": hub_mirror.publish(no_template, "meta-llama/Llama-3.1-8B"),
        "dir": with_template,
    }


@pytest.fixture
def emulator(tmp_path: Path, hub_mirror: Any, fake_gcs: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    emu = create_emulator(
        tmp_path / "emulator", hub_upstream=hub_mirror.url, serving=_NoServing(), storage_endpoint=fake_gcs.url
    )
    emu.start()
    # Preflight runs as the pipeline's account, holding what `vlp setup` grants (the preset's Hub token included),
    # and reaches Cloud Storage through the emulator's IAM gate.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    # A multi-region bucket: these tests are about quota, and the region fallback may go anywhere in the US.
    project_bucket(emu, fake_gcs.url, "vlp-us-bucket", PROJECT, location="US")
    pipeline_identity(monkeypatch, emu, PROJECT, bucket="vlp-us-bucket")
    _post(emu, "/_emulator/secrets", {"name": "hf-token", "value": "hf_local_test_token"})
    try:
        yield emu
    finally:
        emu.stop()


def _post(emu: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", **auth_header(emu, PROJECT), **plumbing_headers(emu)}
    req = urllib.request.Request(f"{emu.url}{path}", data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def _cfg(**overrides: Any) -> Any:
    return load_config(REPO_ROOT / "configs" / "llama-3.1-8b-vllm-l4.yaml", [f"{k}={v}" for k, v in overrides.items()])


def _load_with(*sets: str) -> Any:
    return load_config(REPO_ROOT / "configs" / "llama-3.1-8b-vllm-l4.yaml", list(sets))


MODEL_GARDEN_VLLM = "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:latest"


def _deploy_l4(emu: Any, region: str, replicas: int = 1) -> None:
    """A model already serving on 1 x L4 in `region`: the usage preflight must subtract from the limit."""
    from google.cloud import aiplatform_v1 as v1

    kwargs = clients.gapic_kwargs(region, emu.url)
    parent = f"projects/{PROJECT}/locations/{region}"
    # The other team's artifacts sit in a bucket of their region; Vertex copies them as its service agent.
    project_bucket(emu, emu.storage_endpoint, f"other-team-{region}", PROJECT, location=region)
    let_vertex_read(emu, f"other-team-{region}", PROJECT)
    model = (
        v1.ModelServiceClient(**kwargs)
        .upload_model(
            parent=parent,
            model=v1.Model(
                display_name="other-team",
                artifact_uri=f"gs://other-team-{region}/model",
                container_spec=v1.ModelContainerSpec(image_uri=MODEL_GARDEN_VLLM),
            ),
        )
        .result(timeout=60)
    )
    endpoints = v1.EndpointServiceClient(**kwargs)
    endpoint = endpoints.create_endpoint(parent=parent, endpoint=v1.Endpoint(display_name="other")).result(timeout=60)
    endpoints.deploy_model(
        endpoint=endpoint.name,
        deployed_model=v1.DeployedModel(
            model=model.model,
            dedicated_resources=v1.DedicatedResources(
                machine_spec=v1.MachineSpec(
                    machine_type="g2-standard-12", accelerator_type="NVIDIA_L4", accelerator_count=1
                ),
                min_replica_count=replicas,
                max_replica_count=replicas,
            ),
        ),
        traffic_split={"0": 100},
    ).result(timeout=60)


def test_quota_exhausted_in_a_region_picks_the_next(emulator: Any, hub_mirror: Any, models: dict[str, Any]) -> None:
    _post(emulator, "/_emulator/quotas", {"quotas": {L4: {"us-central1": 1, "us-east4": 2}, CPUS: {}}, "default": 48})
    _post(emulator, "/_emulator/secrets", {"name": "hf-token", "value": "hf_local_test_token"})
    _deploy_l4(emulator, "us-central1")  # holds the only L4 us-central1 has
    cfg = _cfg()
    dep = run_preflight(
        cfg,
        project=PROJECT,
        region="",
        bucket="gs://vlp-us-bucket/",
        service_account="sa@x",
        run_name="Run 2026/11 #7",
        api_endpoint=emulator.url,
        hub_endpoint=hub_mirror.url,
    ).to_dict()  # the struct preflight hands on
    assert dep["region"] == "us-east4"
    quota = dep["plan"]["quota"]
    assert quota["us-central1"]["limit"] == 1 and quota["us-central1"]["usage"] == 1 and not quota["us-central1"]["ok"]
    assert quota["us-east4"]["ok"] and quota["us-east4"]["need"] == 1
    assert any("no quota in us-central1" in w for w in dep["plan"]["warnings"])
    assert dep["revision_sha"] == models["sha"]
    assert dep["bucket"] == "vlp-us-bucket" and dep["project"] == PROJECT
    assert dep["labels"] == {"vlp-deployment": "llama-3-1-8b-vllm", "vlp-run": "run-2026-11-7"}
    assert dep["config"]["name"] == cfg.name and dep["api_endpoint"] == emulator.url
    assert dep["plan"]["fits"] and dep["plan"]["machine_type"] == "g2-standard-12"
    assert dep["plan"]["weights_bytes"] == 16_060_522_496
    assert dep["plan"]["weights_source"] == "safetensors headers"  # ranged reads through the mirror


def test_no_quota_anywhere_lists_each_region(emulator: Any, hub_mirror: Any, models: dict[str, Any]) -> None:
    _post(
        emulator,
        "/_emulator/quotas",
        {"quotas": {L4: {"us-central1": 0, "us-east4": 0, "europe-west4": 1}}, "default": 48},
    )
    _deploy_l4(emulator, "europe-west4")
    with pytest.raises(PreflightError) as err:
        run_preflight(
            _cfg(**{"model.hf_token_secret": "''"}),
            project=PROJECT,
            run_name="r",
            api_endpoint=emulator.url,
            hub_endpoint=hub_mirror.url,
        )
    msg = str(err.value)
    assert "no candidate region has quota for 1 x NVIDIA_L4" in msg
    assert "us-central1: CustomModelServingL4GPUsPerProjectPerRegion limit 0, in use 0, need 1" in msg
    assert "us-east4: CustomModelServingL4GPUsPerProjectPerRegion limit 0, in use 0, need 1" in msg
    assert "europe-west4: CustomModelServingL4GPUsPerProjectPerRegion limit 1, in use 1, need 1" in msg
    assert "console.cloud.google.com/iam-admin/quotas" in msg and "custom_model_serving_nvidia_l4_gpus" in msg
    assert "gcloud beta quotas preferences create" in msg
    assert err.value.plan is not None and not err.value.plan.fits


def test_companion_cpu_quota_is_checked(emulator: Any, hub_mirror: Any, models: dict[str, Any]) -> None:
    _post(emulator, "/_emulator/quotas", {"quotas": {L4: {"us-central1": 4}, CPUS: {"us-central1": 8}}, "default": 0})
    plan = plan_deployment(
        _cfg(), project=PROJECT, regions=["us-central1"], api_endpoint=emulator.url, hub_endpoint=hub_mirror.url
    )
    # Unverified whether GPU machines draw on the serving CPU quota: reported, never blocking (contract Q-CPU).
    assert plan.fits and not plan.errors
    assert any(
        w.startswith("CustomModelServingCPUsPerProjectPerRegion in us-central1: limit 8, in use 0, need 12")
        for w in plan.warnings
    ), plan.warnings
    # The GPU quota still blocks.
    _post(emulator, "/_emulator/quotas", {"quotas": {L4: {"us-central1": 0}, CPUS: {"us-central1": 8}}, "default": 0})
    plan = plan_deployment(
        _cfg(), project=PROJECT, regions=["us-central1"], api_endpoint=emulator.url, hub_endpoint=hub_mirror.url
    )
    assert not plan.fits and "CustomModelServingL4GPUsPerProjectPerRegion limit 0" in plan.errors[0]


def test_a_multi_host_replica_draws_quota_for_every_nodes_gpus(emulator: Any, tmp_path: Path) -> None:
    """The 405B BF16 preset over 2 x a3-highgpu-8g: "a total of 16 H100 GPUs" per replica (use-multihost-gpu), so
    replicas x nodes x GPUs per node of the H100 serving quota, and every node's vCPUs of the companion quota."""
    from test_planning import LLAMA_405B

    h100 = "CustomModelServingH100GPUsPerProjectPerRegion"
    model = write_header_only_model(tmp_path / "405b", LLAMA_405B)
    cfg = load_config(
        REPO_ROOT / "configs" / "llama-3.1-405b-bf16-vllm-2xa3.yaml",
        ["hardware.max_replica_count=2", "placement.regions=[us-central1]"],
    )
    _post(emulator, "/_emulator/quotas", {"quotas": {h100: {"us-central1": 31}}, "default": 1000})
    kw = {"project": PROJECT, "regions": ["us-central1"], "api_endpoint": emulator.url, "model_dir": str(model)}
    short = plan_deployment(cfg, **kw)
    assert not short.fits and f"{h100} limit 31" in short.errors[0], short.errors
    assert short.quota["us-central1"]["need"] == 2 * 2 * 8
    _post(emulator, "/_emulator/quotas", {"quotas": {h100: {"us-central1": 32}}, "default": 1000})
    plan = plan_deployment(cfg, **kw)
    assert plan.fits, plan.errors
    assert plan.quota["us-central1"]["need"] == 32 and plan.node_count == 2
    (cpus,) = plan.quota["us-central1"]["companions"]
    assert cpus["need"] == 2 * 2 * 208


def test_gated_repo_without_access(emulator: Any, models: dict[str, Any]) -> None:
    _post(emulator, "/_emulator/faults", {"faults": ["hub-gated"]})
    _post(emulator, "/_emulator/secrets", {"name": "hf-token", "value": "hf_not_a_real_token"})
    with pytest.raises(PreflightError) as err:
        run_preflight(_cfg(), project=PROJECT, api_endpoint=emulator.url, hub_endpoint=emulator.url + "/hf")
    msg = str(err.value)
    assert f"{REPO} is gated and the token has no access: accept the licence on the model page" in msg
    assert "model.hf_token_secret" in msg
    assert "hf_not_a_real_token" not in msg  # never a secret in a message


def test_a_revision_the_repo_lacks_is_named_as_such(
    emulator: Any, hub_mirror: Any, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repo exists, the branch does not: the Hub answers RevisionNotFound (and so does the local Hub gate), and
    preflight names the revision and how to list the repo's branches and tags, not "check model.repo"."""
    monkeypatch.setenv("VLP_HUB_MIRRORS_DIR", str(hub_mirror.mirrors_dir))  # the gate knows the mirror's repos
    with pytest.raises(PreflightError) as err:
        run_preflight(
            _cfg(**{"model.revision": "some-branch"}),
            project=PROJECT,
            api_endpoint=emulator.url,
            hub_endpoint=emulator.url + "/hf",
        )
    msg = str(err.value)
    assert f"{REPO} has no revision 'some-branch' (the repo exists" in msg and "list_repo_refs" in msg, msg
    assert "was not found" not in msg and "check model.repo" not in msg
    dep = run_preflight(
        _cfg(**{"model.revision": "main"}), project=PROJECT, api_endpoint=emulator.url, hub_endpoint=emulator.url + "/hf"
    )
    assert dep.revision_sha == models["sha"]


def test_a_quota_id_google_does_not_know_is_unknown_not_zero(emulator: Any) -> None:
    """F9: a NotFound for a quota id is a wrong id (the RTX PRO 6000 serving id has no source), not an empty quota:
    the limit reads as unknown, with the fix, so the plan warns instead of refusing every deploy on that GPU."""
    from vlp.components.cloud_quotas import read_quota_limit
    from vlp.components.vertex.quota import GPU_QUOTAS, SERVICE

    rtx = GPU_QUOTAS["NVIDIA_RTX_PRO_6000"][0][0]
    limit, note = read_quota_limit(SERVICE, PROJECT, rtx, "us-central1", emulator.url)
    assert limit is None and f"{rtx} is not a quota id the Cloud Quotas API knows" in note
    l4 = GPU_QUOTAS["NVIDIA_L4"][0][0]
    assert read_quota_limit(SERVICE, PROJECT, l4, "us-central1", emulator.url)[0] == 8  # the emulator's default


def test_missing_token_secret_is_named(emulator: Any, hub_mirror: Any, models: dict[str, Any]) -> None:
    with pytest.raises(PreflightError) as err:
        run_preflight(
            _cfg(**{"model.hf_token_secret": "hub-token-prod"}),
            project=PROJECT,
            api_endpoint=emulator.url,
            hub_endpoint=hub_mirror.url,
        )
    assert "hub-token-prod" in str(err.value) and "does not exist" in str(err.value)


def test_no_chat_template_needs_serving_chat_template(emulator: Any, hub_mirror: Any, models: dict[str, Any]) -> None:
    _post(emulator, "/_emulator/quotas", {"quotas": {}, "default": 48})
    cfg = _cfg(**{"model.repo": "meta-llama/Llama-3.1-8B", "model.hf_token_secret": "''"})
    with pytest.raises(PreflightError) as err:
        run_preflight(cfg, project=PROJECT, api_endpoint=emulator.url, hub_endpoint=hub_mirror.url)
    assert "meta-llama/Llama-3.1-8B has no chat template: set serving.chat_template" in str(err.value)
    cfg.serving.chat_template = "{{ messages[0]['content'] }}"
    dep = run_preflight(cfg, project=PROJECT, api_endpoint=emulator.url, hub_endpoint=hub_mirror.url)
    assert dep.revision_sha == models["base_sha"] and dep.region == "us-central1"


def test_seed_common_issues_fail_before_spending(emulator: Any, hub_mirror: Any, models: dict[str, Any]) -> None:
    _post(emulator, "/_emulator/quotas", {"quotas": {}, "default": 48})
    too_long = _cfg(**{"serving.max_model_len": 65536, "model.hf_token_secret": "''"})
    with pytest.raises(PreflightError) as err:
        run_preflight(too_long, project=PROJECT, api_endpoint=emulator.url, hub_endpoint=hub_mirror.url)
    assert "The model's max seq len (65536) is larger than the maximum number of tokens" in str(err.value)
    # What register would refuse (a setting the TGI preset cannot render) is refused here, before the mirror.
    float32 = _load_with(
        "serving.engine=tgi", "serving.dtype=float32", "model.hf_token_secret=", "hardware=auto"
    )
    with pytest.raises(PreflightError, match="TGI serves float16 or bfloat16 only, not serving.dtype=float32"):
        run_preflight(float32, project=PROJECT, api_endpoint=emulator.url, hub_endpoint=hub_mirror.url)


def test_preflight_op_writes_report_and_metrics(
    emulator: Any, hub_mirror: Any, models: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _post(emulator, "/_emulator/quotas", {"quotas": {}, "default": 48})
    monkeypatch.setenv("HF_ENDPOINT", hub_mirror.url)
    report = dsl.Markdown(name="report", uri=str(tmp_path / "report.md"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    cfg = _cfg(**{"model.hf_token_secret": "''"}).model_dump(mode="json")
    from vlp.components.run_form import FORM_FIELDS

    blank = {f.name: 0 if f.kind is int else "" for f in FORM_FIELDS}  # a form left empty: the config holds
    out = preflight_op(
        project=PROJECT,
        region="us-east4",
        bucket="vlp-us-bucket",
        service_account="",
        config=cfg,
        preset={},
        **blank,
        run_name="run-1",
        api_endpoint=emulator.url,
        force=False,
        report=report,
        metrics=metrics,
    )
    assert out.region == "us-east4" and out.deployment["region"] == "us-east4"
    assert out.action == "deploy"  # nothing serves this deployment yet
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Preflight plan") and "g2-standard-12" in text
    assert metrics.metadata["weights_gb"] == pytest.approx(16.06, abs=0.01)
    assert metrics.metadata["accelerator_count"] == 1 and metrics.metadata["price_per_hour_usd"] > 0
    assert render_markdown(out.deployment["plan"]) == text


def test_label_value() -> None:
    assert label_value("My Run: 2026-11-05T10:00") == "my-run-2026-11-05t10-00"
    assert len(label_value("x" * 100)) == 63


def test_the_weights_bucket_bounds_the_candidate_regions(
    emulator: Any, hub_mirror: Any, models: dict[str, Any], fake_gcs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vertex serves a model's artifacts from a bucket in the endpoint's region: the quota fallback stays there."""

    project_bucket(emulator, fake_gcs.url, "vlp-regional", PROJECT)  # fake-gcs-server: US-CENTRAL1
    pipeline_identity(monkeypatch, emulator, PROJECT, bucket="vlp-regional")
    _post(
        emulator, "/_emulator/quotas", {"quotas": {L4: {"us-central1": 0, "europe-west4": 8}, CPUS: {}}, "default": 48}
    )
    _post(emulator, "/_emulator/secrets", {"name": "hf-token", "value": "hf_local_test_token"})
    args = dict(project=PROJECT, bucket="vlp-regional", api_endpoint=emulator.url, hub_endpoint=hub_mirror.url)
    # Quota exists only in europe-west4, but the bucket is in us-central1: not a region the fallback may take.
    with pytest.raises(PreflightError, match="no candidate region has quota"):
        run_preflight(_load_with("placement.regions=[us-central1, europe-west4]"), **args)
    with pytest.raises(PreflightError, match="bucket gs://vlp-regional is in US-CENTRAL1") as err:
        run_preflight(_load_with("placement.regions=[europe-west4]"), **args)
    assert "--location=europe-west4" in str(err.value) and "vlp setup" in str(err.value)
    # `vlp setup` makes a bucket per fallback region (BUCKET-REGION): the fallback may take europe-west4 now, and the
    # weights go to that region's bucket. A bucket of that name in another region does not count.
    project_bucket(emulator, fake_gcs.url, "vlp-regional-us-east4", PROJECT, location="europe-west4")
    project_bucket(emulator, fake_gcs.url, "vlp-regional-europe-west4", PROJECT, location="europe-west4")
    pipeline_identity(monkeypatch, emulator, PROJECT, bucket="vlp-regional-europe-west4")
    deployment = run_preflight(_load_with("placement.regions=[us-central1, us-east4, europe-west4]"), **args)
    assert (deployment.region, deployment.bucket) == ("europe-west4", "vlp-regional-europe-west4")
