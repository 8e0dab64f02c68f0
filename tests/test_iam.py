"""Identity and IAM on the local stack: the fixture, the policy and its page, who the emulator lets in, and for every
binding of the policy a test that removes it and shows the run failing with the permission, the principal, the
resource and the fix named (at preflight where preflight can know, before the mirror or any GPU)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TESTER, as_tester, plumbing_headers, run_as
from google.api_core import exceptions as gexc
from google.cloud import aiplatform_v1, run_v2, storage
from test_preflight import _NoServing

from vlp.components import clients
from vlp.components.config import load_config
from vlp.components.iam.policy import RULES, Binding
from vlp.pipelines.iam_docs import markdown
from vlp.pipelines.local.emulator import create_emulator
from vlp.pipelines.local.emulator.iam import compute_default_account, project_number, vertex_service_agent
from vlp.pipelines.local.emulator.iam_methods import FIXTURE, METHOD_TABLE, fixture, method_of
from vlp.pipelines.setup import apply, default_pipeline_account, plan_setup


class _Serving(_NoServing):
    """No model servers: these tests are about who may start one, not what it answers."""

    def is_healthy(self, serving_id: str) -> bool:
        return False

    def known_ids(self) -> list[str]:
        return []


REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
REGION = "us-central1"
RUNTIME = "vlp-runtime"  # a Cloud Run runtime account other than the pipeline's


# ---------------------------------------------------------------- facts


def test_the_fixture_records_its_upstream_and_knows_every_method_the_emulator_checks() -> None:
    data = fixture()
    assert "iann0036/iam-dataset" in data["source"] and re.fullmatch(r"[0-9a-f]{40}", data["commit"])
    for _, _, method_id in METHOD_TABLE:
        assert method_id in data["methods"], method_id
        assert data["methods"][method_id]["source"], method_id  # the dataset, or a named page, or "unverified"
    assert FIXTURE.name == "gcp-iam.json"


def test_the_roles_hold_what_the_policy_says() -> None:
    roles = fixture()["roles"]
    for rule in RULES:
        assert set(rule.checks) <= set(roles.get(rule.role, [])), (rule.role, rule.checks)
    # What the checks found wrong with the roles docs/iam.md used to grant (docs/vertex-contract.md E9).
    assert "storage.buckets.get" not in roles["roles/storage.objectUser"]
    assert "storage.buckets.get" in roles["roles/storage.bucketViewer"]
    assert "aiplatform.endpoints.predict" not in roles["roles/aiplatform.viewer"]
    assert "aiplatform.endpoints.predict" in roles["roles/aiplatform.user"]
    assert "run.services.setIamPolicy" not in roles["roles/run.developer"]


def test_docs_iam_md_shows_the_policy() -> None:
    page = (REPO_ROOT / "docs" / "iam.md").read_text()
    shown = page.split("<!-- policy:begin", 1)[1].split("-->", 1)[1].split("<!-- policy:end -->", 1)[0]
    assert shown.strip() == markdown().strip(), "docs/iam.md drifted from components/iam/policy.py: regenerate it"


# ---------------------------------------------------------------- the emulator, with Cloud Storage behind it


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory, fake_gcs: Any) -> Iterator[Any]:
    emulator = create_emulator(
        tmp_path_factory.mktemp("iam") / "state", serving=_Serving(), storage_endpoint=fake_gcs.url
    )
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


_SAMPLES = [
    ("GET", "/v1/projects/p/locations/us-central1/endpoints"),
    ("POST", "/v1/projects/p/locations/us-central1/models:upload"),
    ("POST", "/v1/projects/p/locations/us-central1/endpoints/1:predict"),
    ("POST", "/v1beta1/projects/p/locations/us-central1/endpoints/1/chat/completions"),
    ("POST", "/v1/projects/p/locations/us-central1/endpoints/1/deployedModels/2/invoke/generate"),
    ("GET", "/ui/projects/p/locations/us-central1/operations/3"),
    ("GET", "/v1/projects/p/locations/us-central1/pipelineJobs"),
    ("GET", "/v2/projects/p/locations/us-central1/services"),
    ("DELETE", "/v2/projects/p/locations/us-central1/services/s/revisions/r"),
    ("GET", "/v1/projects/p/secrets/hf-token/versions/latest:access"),
    ("GET", "/v1/projects/p/locations/global/services/aiplatform.googleapis.com/quotaInfos/q"),
    ("POST", "/v2/entries:list"),
    ("POST", "/v1/projects/-/serviceAccounts/a@p.iam.gserviceaccount.com:generateIdToken"),
    ("POST", "/v1/projects/p:setIamPolicy"),
    ("GET", "/storage/v1/b/b"),
    ("GET", "/storage/v1/b/b/o"),
    ("GET", "/download/storage/v1/b/b/o/models%2Fx"),
    ("POST", "/upload/storage/v1/b/b/o"),
]


@pytest.mark.parametrize(("method", "path"), _SAMPLES)
def test_anonymous_calls_are_refused(emu: Any, method: str, path: str) -> None:
    """No route the pipeline calls answers without a principal: 401, as Google answers (E2)."""
    assert method_of(method, urllib.request.unquote(path)) is not None, "a route without an IAM entry"
    for headers in ({}, {"Authorization": "Bearer ya29.not-a-token-the-emulator-issued"}):
        request = urllib.request.Request(emu.url + path, data=b"{}" if method != "GET" else None, method=method)
        for key, value in headers.items():
            request.add_header(key, value)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 401, (path, caught.value.read()[:300])


def test_unknown_roles_are_refused(emu: Any) -> None:
    with pytest.raises(Exception, match="not known to the local emulator"):
        emu.set_policy("projects/p", {"bindings": [{"role": "roles/made.up", "members": ["user:x@example.com"]}]})


# ---------------------------------------------------------------- one project per test, set up as `vlp setup` does


_COUNTER = iter(range(1000))


def _configs() -> dict[str, Any]:
    return {
        "vertex": load_config(CONFIGS / "local-demo.yaml", []),
        "vertex-gated": load_config(CONFIGS / "local-demo.yaml", ["model.hf_token_secret=hf-token"]),
        "vertex-tgi": load_config(CONFIGS / "local-demo.yaml", ["serving.engine=tgi"]),
        "cloud-run": load_config(CONFIGS / "local-demo-cloud-run.yaml", []),
    }


def _project_setup(
    emu: Any, monkeypatch: pytest.MonkeyPatch, cfg: Any, name: str, *, submitter: str = ""
) -> dict[str, Any]:
    """A fresh project with `vlp setup` applied by its owner; this process then calls as the pipeline's account
    (or as `submitter`, when one is named: who starts runs)."""
    n = next(_COUNTER)
    project, bucket = f"iam-{name}-{n}", f"iam-{name}-{n}-bucket"
    submitter = submitter.replace("PROJECT", project)
    if cfg.target == "cloud_run" and name.endswith("runtime"):
        cfg = cfg.model_copy(deep=True)
        cfg.cloud_run.service_account = f"{RUNTIME}@{project}.iam.gserviceaccount.com"
    owner = f"vlp-admin@{project}.iam.gserviceaccount.com"
    emu.grant(f"projects/{project}", "roles/owner", f"serviceAccount:{owner}")
    creds = emu.credentials_for(owner)
    gcs = storage.Client(project=project, credentials=creds, client_options={"api_endpoint": emu.url})
    plan = plan_setup(
        cfg, project=project, bucket=bucket, region=REGION, project_number=project_number(project), submitter=submitter
    )
    changed = apply(plan, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None)
    assert changed and not apply(plan, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None)
    if cfg.model.hf_token_secret:
        request = urllib.request.Request(
            f"{emu.url}/_emulator/secrets",
            data=json.dumps({"name": "hf-token", "value": "hf_local_test_token"}).encode(),
            headers={"Content-Type": "application/json", **plumbing_headers(emu)},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()
    account = default_pipeline_account(project)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    monkeypatch.setenv("VLP_API_ENDPOINT", emu.url)
    run_as(monkeypatch, emu.url, submitter or account)
    return {
        "cfg": cfg,
        "project": project,
        "bucket": bucket,
        "account": account,
        "submitter": submitter,
        "plan": plan,
        "gcs": gcs,
        "plumbing": plumbing_headers(emu),
    }


def _bindings() -> list[tuple[str, str, str, str]]:
    """Every distinct binding of the policy for the local configs: (config, who, role, scope)."""
    seen: dict[tuple[str, str, str], str] = {}
    for name, cfg in _configs().items():
        for variant in (name, f"{name}-runtime") if cfg.target == "cloud_run" else (name,):
            cfg_v = cfg.model_copy(deep=True)
            if variant.endswith("runtime"):
                cfg_v.cloud_run.service_account = f"{RUNTIME}@p.iam.gserviceaccount.com"
            plan = plan_setup(cfg_v, project="p", bucket="b", region=REGION, project_number="1")
            for b in plan.bindings:
                seen.setdefault((b.rule.who, b.role, b.rule.on), variant)
    return [(config, who, role, on) for (who, role, on), config in seen.items()]


def test_the_local_policy_has_these_bindings() -> None:
    """The bindings the removal tests cover: every one the local configs' policy grants."""
    found = {(who, role, on) for _, who, role, on in _bindings()}
    assert len(found) == 12, sorted(found)


@pytest.mark.slow
def test_with_the_whole_policy_preflight_finds_nothing_missing(emu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp.components.iam.access import check_access

    for name, cfg in _configs().items():
        ctx = _project_setup(emu, monkeypatch, cfg, name)
        assert check_access(ctx["cfg"], project=ctx["project"], bucket=ctx["bucket"], api_endpoint=emu.url) == []


@pytest.mark.parametrize(("config", "who", "role", "on"), _bindings())
def test_each_binding_removed_fails_with_the_permission_principal_resource_and_fix(
    emu: Any, monkeypatch: pytest.MonkeyPatch, config: str, who: str, role: str, on: str
) -> None:
    cfg = _configs()[config.removesuffix("-runtime")]
    ctx = _project_setup(emu, monkeypatch, cfg, config)
    (binding,) = [b for b in ctx["plan"].bindings if (b.rule.who, b.role, b.rule.on) == (who, role, on)]
    emu.revoke(binding.resource, binding.role, binding.member)
    if binding.rule.checks:
        _fails_at_preflight(emu, ctx, binding)
    _the_real_call_is_refused(emu, ctx, binding)


def _fails_at_preflight(emu: Any, ctx: dict[str, Any], binding: Binding) -> None:
    """Preflight names it before the Hub, the mirror or any GPU: nothing is created."""
    from vlp.components.preflight import PreflightError, run_preflight

    before = emu.snapshot()
    with pytest.raises(PreflightError) as caught:
        run_preflight(
            ctx["cfg"], project=ctx["project"], bucket=ctx["bucket"], api_endpoint=emu.url, hub_endpoint=emu.url + "/x"
        )
    message = str(caught.value)
    assert ctx["account"] in message  # the principal
    assert any(p in message for p in binding.rule.checks)  # the permission
    assert binding.resource.split("/")[-1] in message  # the resource
    assert binding.role in message and "gcloud " in message  # the fix
    assert emu.snapshot() == before


def _the_real_call_is_refused(emu: Any, ctx: dict[str, Any], binding: Binding) -> None:
    """The call the step makes is refused by the emulator as Google refuses it, naming what is missing."""
    project, bucket, api = ctx["project"], ctx["bucket"], emu.url
    parent = f"projects/{project}/locations/{REGION}"
    key = (binding.rule.who, binding.role, binding.rule.on)
    if key == ("pipeline", "roles/aiplatform.user", "project"):
        endpoints = aiplatform_v1.EndpointServiceClient(**clients.gapic_kwargs(REGION, api))
        with pytest.raises(gexc.GoogleAPICallError, match="aiplatform.endpoints.list"):
            list(endpoints.list_endpoints(parent=parent))
    elif key == ("pipeline", "roles/cloudquotas.viewer", "project"):
        name = f"projects/{project}/locations/global/services/aiplatform.googleapis.com/quotaInfos/q"
        with pytest.raises(gexc.GoogleAPICallError, match="cloudquotas.quotas.get"):
            clients.quotas_client(api).get_quota_info(name=name)
    elif key == ("pipeline", "roles/logging.viewer", "project"):
        with pytest.raises(gexc.GoogleAPICallError, match="logging.logEntries.list"):
            list(clients.logging_client(project, api).list_entries(max_results=1))
    elif key == ("pipeline", "roles/storage.objectUser", "bucket"):
        blob = clients.storage_client(project).bucket(bucket).blob("models/x")
        with pytest.raises(gexc.Forbidden, match=f"{ctx['account']} does not have storage.objects.create"):
            blob.upload_from_string(b"x")
    elif key == ("pipeline", "roles/storage.bucketViewer", "bucket"):
        with pytest.raises(gexc.Forbidden, match=f"{ctx['account']} does not have storage.buckets.get"):
            clients.storage_client(project).lookup_bucket(bucket)
    elif key == ("pipeline", "roles/secretmanager.secretAccessor", "secret"):
        with pytest.raises(gexc.GoogleAPICallError, match="secretmanager.versions.access"):
            clients.read_secret(project, "hf-token", api)
    elif key == ("pipeline", "roles/iam.serviceAccountUser", "pipeline_sa"):
        _deploy_as(ctx, api, ctx["account"], match="iam.serviceAccounts.actAs")
    elif key == ("pipeline", "roles/run.developer", "project"):
        services = run_v2.ServicesClient(**clients.gapic_kwargs(None, api))
        with pytest.raises(gexc.GoogleAPICallError, match="run.services.list"):
            list(services.list_services(parent=parent))
    elif key == ("pipeline", "roles/iam.serviceAccountUser", "runtime_sa"):
        runtime = ctx["cfg"].cloud_run.service_account or ctx["account"]
        with pytest.raises(gexc.GoogleAPICallError, match=f"iam.serviceAccounts.actAs.*{runtime}"):
            _create_service(ctx, api, runtime)
    elif key == ("pipeline", "roles/iam.serviceAccountOpenIdTokenCreator", "pipeline_sa"):
        from vlp.components.cloud_run.probe import _generate_id_token
        from vlp.components.runtime import StepError

        with pytest.raises(StepError, match="roles/iam.serviceAccountOpenIdTokenCreator") as caught:
            _generate_id_token(ctx["account"], "https://svc.run.app")
        assert ctx["account"] in str(caught.value) and "gcloud iam service-accounts" in str(caught.value)
    elif key == ("pipeline", "roles/artifactregistry.reader", "serving_repository"):
        from vlp.components.serving.images import default_image

        image = default_image("vllm", "cloud_run").uri(project, REGION)  # through the repository `vlp setup` made
        denial = f"artifactregistry.repositories.downloadArtifacts.*{re.escape(image)}"
        with pytest.raises(gexc.Forbidden, match=denial):
            _create_service(ctx, api, ctx["account"], image=image)
    elif key == ("runtime", "roles/storage.objectViewer", "bucket"):
        runtime = ctx["cfg"].cloud_run.service_account
        with pytest.raises(gexc.GoogleAPICallError, match=f"runs as {runtime}, which cannot read gs://{bucket}"):
            _create_service(ctx, api, runtime).result(timeout=60)
    else:
        raise AssertionError(f"no witness call for {key}: add one")


_TGI = {
    "image_uri": "us-docker.pkg.dev/deeplearning-platform-release/gcr.io/huggingface-text-generation-inference-cu124.2-4.ubuntu2204.py311"
}
_VLLM = "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20241001_0916_RC00"


def _deploy_as(ctx: dict[str, Any], api: str, account: str, *, match: str) -> None:
    parent = f"projects/{ctx['project']}/locations/{REGION}"
    models = aiplatform_v1.ModelServiceClient(**clients.gapic_kwargs(REGION, api))
    spec = {
        "image_uri": _VLLM,
        "args": [f"--model=gs://{ctx['bucket']}/models/x", "--max-model-len=512"],
        "ports": [{"container_port": 7080}],
        "predict_route": "/generate",
        "health_route": "/ping",
    }
    model = models.upload_model(parent=parent, model={"display_name": "m", "container_spec": spec}).result(timeout=30)
    endpoints = aiplatform_v1.EndpointServiceClient(**clients.gapic_kwargs(REGION, api))
    endpoint = endpoints.create_endpoint(parent=parent, endpoint={"display_name": "e"}).result(timeout=30)
    deployed = {
        "model": model.model,
        "service_account": account,
        "dedicated_resources": {"machine_spec": {"machine_type": "n1-standard-4"}, "min_replica_count": 1},
    }
    with pytest.raises(gexc.GoogleAPICallError, match=match):
        endpoints.deploy_model(endpoint=endpoint.name, deployed_model=deployed).result(timeout=30)


def _create_service(ctx: dict[str, Any], api: str, runtime: str, *, image: str = "") -> Any:
    from test_emulator_cloud_run import _service

    service = _service(only_dir="models/x")
    if image:
        service.template.containers[0].image = image
    service.template.service_account = runtime
    service.template.scaling.max_instance_count = 1
    service.template.gpu_zonal_redundancy_disabled = True
    service.template.containers[0].resources.limits.update({"cpu": "4", "memory": "16Gi"})
    # A new project has no Cloud Run GPU quota: its owner requests one L4 without zonal redundancy first.
    quota = {"quotas": {"NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion": {REGION: 1}}, "default": 8}
    request = urllib.request.Request(
        f"{api}/_emulator/quotas",
        data=json.dumps(quota).encode(),
        headers={"Content-Type": "application/json", **ctx["plumbing"]},
    )
    urllib.request.urlopen(request, timeout=10).close()
    service.template.volumes[0].gcs.bucket = ctx["bucket"]
    services = run_v2.ServicesClient(**clients.gapic_kwargs(None, api))
    parent = f"projects/{ctx['project']}/locations/{REGION}"
    return services.create_service(parent=parent, service=service, service_id="iam-witness")


# ---------------------------------------------------------------- what the checks found


def test_a_vllm_deploy_whose_serving_identity_cannot_read_the_bucket_fails_as_on_vertex(
    emu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM has no artifactUri: the container downloads --model=gs://... as the deployed model's account. Without
    one it runs as a Vertex-managed identity that reads only AIP_STORAGE_URI (E5); the deploy step now always sets
    one, and preflight checks the pipeline's account (the same) can read the bucket (the objectUser removal test)."""
    ctx = _project_setup(emu, monkeypatch, _configs()["vertex"], "vllm")
    _deploy_as(ctx, emu.url, "", match="Vertex-managed serving identity")
    other = f"reader-less@{ctx['project']}.iam.gserviceaccount.com"
    emu.grant(
        f"projects/{ctx['project']}/serviceAccounts/{other}",
        "roles/iam.serviceAccountUser",
        f"serviceAccount:{ctx['account']}",
    )
    _deploy_as(ctx, emu.url, other, match=f"runs as {other}, which cannot read gs://{ctx['bucket']}")


def test_resource_manager_is_enabled_by_setup_and_preflight_names_it_when_off(
    emu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preflight asks Resource Manager which project grants the pipeline's account holds; a new project does not have
    that API on (F2), so `vlp setup` enables it, and with it off preflight says which API and how to enable it (not
    a bare 403 from the permission check)."""
    from vlp.components.iam.access import check_access

    for target in ("vertex", "cloud-run"):
        plan = plan_setup(_configs()[target], project="p", bucket="b", region=REGION, project_number="1")
        assert "cloudresourcemanager.googleapis.com" in plan.apis
    ctx = _project_setup(emu, monkeypatch, _configs()["vertex"], "crm")
    request = urllib.request.Request(
        f"{emu.url}/_emulator/apis",
        data=json.dumps({"project": ctx["project"], "disabled": ["cloudresourcemanager.googleapis.com"]}).encode(),
        headers=plumbing_headers(emu),
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()
    problems = check_access(ctx["cfg"], project=ctx["project"], bucket=ctx["bucket"], api_endpoint=emu.url)
    assert problems == [
        "cloudresourcemanager.googleapis.com is disabled in this project: enable it (gcloud services enable "
        f"cloudresourcemanager.googleapis.com --project {ctx['project']}, or `vlp setup`), wait a minute for it to "
        "take effect, then run again"
    ]


def test_a_disabled_api_is_named_with_its_fix(emu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp.components.cloud_quotas import read_quota_limit
    from vlp.components.iam.access import disabled_api
    from vlp.components.vertex.quota import SERVICE

    ctx = _project_setup(emu, monkeypatch, _configs()["vertex"], "apis")
    request = urllib.request.Request(
        f"{emu.url}/_emulator/apis",
        data=json.dumps(
            {"project": ctx["project"], "disabled": ["cloudquotas.googleapis.com", "aiplatform.googleapis.com"]}
        ).encode(),
        headers=plumbing_headers(emu),
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()
    limit, note = read_quota_limit(SERVICE, ctx["project"], "CustomModelServingL4GPUsPerProjectPerRegion", REGION, emu.url)
    assert limit is None and "gcloud services enable cloudquotas.googleapis.com" in note
    endpoints = aiplatform_v1.EndpointServiceClient(**clients.gapic_kwargs(REGION, emu.url))
    with pytest.raises(gexc.GoogleAPICallError) as caught:
        list(endpoints.list_endpoints(parent=f"projects/{ctx['project']}/locations/{REGION}"))
    assert caught.value.code == 403 and "aiplatform.googleapis.com" in disabled_api(caught.value)
    # Preflight says so before anything else, with the command that fixes it.
    from vlp.components.iam.access import check_access

    problems = check_access(ctx["cfg"], project=ctx["project"], bucket=ctx["bucket"], api_endpoint=emu.url)
    assert problems == [
        "aiplatform.googleapis.com is disabled in this project: enable it (gcloud services enable "
        f"aiplatform.googleapis.com --project {ctx['project']}, or `vlp setup`), wait a minute for it to take effect, "
        "then run again"
    ]


def test_storage_gate_session_uris_media_links_and_the_default_bucket_policy(
    emu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumable session URI is its own credential; media links point back at the gate; the project's viewers
    read a new bucket through its default policy (convenience values), and no one else (E8)."""
    ctx = _project_setup(emu, monkeypatch, _configs()["vertex"], "gate")
    bucket = clients.storage_client(ctx["project"]).bucket(ctx["bucket"])
    blob = bucket.blob("models/a.txt")
    session = blob.create_resumable_upload_session(size=5)
    assert session.startswith(emu.url)
    urllib.request.urlopen(urllib.request.Request(session, data=b"hello", method="PUT"), timeout=10).close()
    listed = list(clients.storage_client(ctx["project"]).list_blobs(ctx["bucket"]))
    assert [b.name for b in listed] == ["models/a.txt"] and listed[0].media_link.startswith(emu.url)
    assert listed[0].download_as_bytes() == b"hello"

    viewer, stranger = "viewer@example.com", "stranger@example.com"
    emu.grant(f"projects/{ctx['project']}", "roles/viewer", f"user:{viewer}")
    as_viewer = storage.Client(credentials=emu.credentials_for(viewer), client_options={"api_endpoint": emu.url})
    assert as_viewer.bucket(ctx["bucket"]).blob("models/a.txt").download_as_bytes() == b"hello"
    as_stranger = storage.Client(credentials=emu.credentials_for(stranger), client_options={"api_endpoint": emu.url})
    with pytest.raises(gexc.Forbidden, match=f"{stranger} does not have storage.objects.get"):
        as_stranger.bucket(ctx["bucket"]).blob("models/a.txt").download_as_bytes()


def test_the_service_agents_hold_their_automatic_roles_and_an_upload_from_the_projects_bucket_works(
    emu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F6: Google grants the Vertex AI Service Agent roles/aiplatform.serviceAgent (and the Custom Code Service Agent
    its own role) on the project, so Google's own upload_model_sample with an artifactUri in the project's bucket
    needs no bucket grant; the policy grants the agents nothing for it. The agent of another project has no access."""
    ctx = _project_setup(emu, monkeypatch, _configs()["vertex-tgi"], "agents")
    project, bucket = ctx["project"], ctx["bucket"]
    policy = emu.policy_of(f"projects/{project}")
    assert {"role": "roles/aiplatform.serviceAgent", "members": [f"serviceAccount:{vertex_service_agent(project)}"]} in [
        {"role": b["role"], "members": b["members"]} for b in policy["bindings"]
    ]
    assert not [b for b in ctx["plan"].bindings if b.rule.who == "vertex_agent"]
    models = aiplatform_v1.ModelServiceClient(**clients.gapic_kwargs(REGION, emu.url))
    model = {"display_name": "tgi", "artifact_uri": f"gs://{bucket}/models/x/", "container_spec": _TGI}
    ctx["gcs"].bucket(bucket).blob("models/x/config.json").upload_from_string(b"{}")
    parent = f"projects/{project}/locations/{REGION}"
    assert models.upload_model(parent=parent, model=model).result(timeout=30).model
    # The Service Agent of another project holds its role there, not here.
    other = _project_setup(emu, monkeypatch, _configs()["vertex-tgi"], "agents-other")  # now calls as its account
    models = aiplatform_v1.ModelServiceClient(**clients.gapic_kwargs(REGION, emu.url))
    with pytest.raises(gexc.GoogleAPICallError, match=f"{vertex_service_agent(other['project'])} does not have"):
        models.upload_model(parent=f"projects/{other['project']}/locations/{REGION}", model=model).result(timeout=30)


def test_overwriting_an_object_also_needs_delete(emu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create-only principal writes a new object but cannot replace it (F14: Cloud Storage asks
    storage.objects.delete to overwrite), by a simple upload or a resumable one; the pipeline's own role can."""
    ctx = _project_setup(emu, monkeypatch, _configs()["vertex"], "overwrite")
    creator = "creator@example.com"
    emu.grant(f"buckets/{ctx['bucket']}", "roles/storage.objectCreator", f"user:{creator}")
    as_creator = storage.Client(credentials=emu.credentials_for(creator), client_options={"api_endpoint": emu.url})
    blob = as_creator.bucket(ctx["bucket"]).blob("models/new.txt")
    blob.upload_from_string(b"first")
    with pytest.raises(gexc.Forbidden, match=f"{creator} does not have storage.objects.delete"):
        blob.upload_from_string(b"second")
    with pytest.raises(gexc.Forbidden, match="storage.objects.delete"):
        blob.create_resumable_upload_session(size=6)
    as_creator.bucket(ctx["bucket"]).blob("models/other.txt").upload_from_string(b"fresh")  # a new name: fine
    own = clients.storage_client(ctx["project"]).bucket(ctx["bucket"]).blob("models/new.txt")
    own.upload_from_string(b"second")  # the pipeline's account (roles/storage.objectUser) replaces it
    assert own.download_as_bytes() == b"second"


def test_the_demo_identities_are_principals(emu: Any) -> None:
    """The accounts the policy names resolve to their project (E4): the compute default and the agents."""
    project = "iam-agents"
    assert compute_default_account(project).startswith(project_number(project))
    emu.grant(f"projects/{project}", "roles/owner", f"user:{TESTER}")
    as_tester(emu, project)
    from vlp.pipelines.local.emulator.iam import _account_project

    assert _account_project(compute_default_account(project)) == project
    assert _account_project(vertex_service_agent(project)) == project


def test_runs_schedules_and_render_name_the_pipeline_account_when_none_is_given(
    emu: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """F1: with no --service-account and none in the config, `vlp run` and `vlp schedule create` name the pipeline's
    account on the PipelineJob (and pass it in its parameters), never leaving it to the Compute Engine default;
    `vlp render --project P` shows the same account on the deploy request."""
    from vlp.pipelines import schedules
    from vlp.pipelines.cli import main
    from vlp.pipelines.compile import spec_path
    from vlp.pipelines.submit import submit_run

    monkeypatch.chdir(REPO_ROOT)
    ctx = _project_setup(emu, monkeypatch, _configs()["vertex"], "named", submitter="ci@PROJECT.iam.gserviceaccount.com")
    assert not ctx["cfg"].placement.service_account
    args = dict(project=ctx["project"], region=REGION, bucket=ctx["bucket"], api_endpoint=emu.url)
    name = submit_run(ctx["cfg"], **args)["pipeline_job"]
    jobs = aiplatform_v1.PipelineServiceClient(**clients.gapic_kwargs(REGION, emu.url))
    job = jobs.get_pipeline_job(name=name)
    assert job.service_account == ctx["account"] == default_pipeline_account(ctx["project"])
    assert job.runtime_config.parameter_values["service_account"] == ctx["account"]
    info = schedules.create_schedule(ctx["cfg"], cron="0 3 * * 1", template_path=spec_path(), **args)
    schedule = aiplatform_v1.ScheduleServiceClient(**clients.gapic_kwargs(REGION, emu.url)).get_schedule(name=info.name)
    assert schedule.create_pipeline_job_request.pipeline_job.service_account == ctx["account"]
    capsys.readouterr()  # what submit and schedule printed
    assert main(["render", "configs/llama-3.1-8b-vllm-l4.yaml", "--project", "myproj", "--json"]) == 0
    rendered = json.loads(capsys.readouterr().out)
    assert rendered["deploy_model"]["deployedModel"]["serviceAccount"] == "vlp-pipeline@myproj.iam.gserviceaccount.com"


@pytest.mark.parametrize("role", ["roles/aiplatform.user", "roles/iam.serviceAccountUser"])
def test_each_submitter_binding_removed_refuses_the_run_naming_the_permission_and_role(
    emu: Any, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    """`vlp run` on Vertex (here: the emulator's pipelineJobs) as CI: with the policy's two submitter grants the job
    is created; without either, the submit fails naming the missing permission and the role that holds it."""
    from vlp.pipelines.submit import submit_run

    monkeypatch.chdir(REPO_ROOT)
    ctx = _project_setup(
        emu, monkeypatch, _configs()["vertex"], "submit", submitter="ci@PROJECT.iam.gserviceaccount.com"
    )
    args = dict(project=ctx["project"], region=REGION, bucket=ctx["bucket"], api_endpoint=emu.url)
    assert submit_run(ctx["cfg"], service_account=ctx["account"], **args)["pipeline_job"]
    (binding,) = [b for b in ctx["plan"].bindings if b.rule.who == "submitter" and b.role == role]
    emu.revoke(binding.resource, binding.role, binding.member)
    permission = {"roles/aiplatform.user": "aiplatform.pipelineJobs.create"}.get(role, "iam.serviceAccounts.actAs")
    with pytest.raises(RuntimeError) as caught:
        submit_run(ctx["cfg"], service_account=ctx["account"], **args)
    message = str(caught.value)
    assert permission in message and role in message and "docs/iam.md" in message, message
