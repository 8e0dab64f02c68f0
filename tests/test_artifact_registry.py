"""The Docker Hub remote repository: `vlp setup` plans and creates it (Artifact Registry REST, against the emulator)
and grants the pipeline's account roles/artifactregistry.reader on it for a Cloud Run deployment, the emulator's
Vertex AI and Cloud Run refuse a serving image they could not pull, and its Cloud Run refuses a deployer who cannot
read the image's repository (docs/vertex-contract.md)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import as_tester, plumbing_headers
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.cloud import aiplatform_v1, run_v2, storage
from test_emulator_cloud_run import _Servers  # the emulator's model servers, stood in: these tests deploy, not serve

from vlp.components.config import load_config
from vlp.components.serving.images import REMOTE_REPOSITORY_NAME, default_image, multi_region
from vlp.pipelines.local.emulator import Emulator, create_emulator
from vlp.pipelines.local.emulator.artifact_registry import check_upload_image, create_repository
from vlp.pipelines.local.emulator.iam import project_number
from vlp.pipelines.local.emulator.iam_methods import role_permissions
from vlp.pipelines.setup import apply, default_pipeline_account, plan_setup

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROJECT = "ar-project"
REGION = "us-central1"
REPOSITORY = f"projects/{PROJECT}/locations/us/repositories/{REMOTE_REPOSITORY_NAME}"
# vLLM's own image, as a deployment names it: through the project's remote repository (components/serving/images.py).
VLLM = default_image("vllm").uri(PROJECT, REGION)


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    emulator = create_emulator(tmp_path / "state", serving=_Servers())
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


def _rest(emu: Emulator, method: str, path: str, principal: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(emu.url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {emu.token_for(principal)}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _config(name: str, *overrides: str) -> Any:
    return load_config(CONFIGS / name, list(overrides))


# ----------------------------------------------------------------------------- `vlp setup`'s plan


def test_setup_plans_the_remote_repository_for_a_docker_hub_image_only() -> None:
    vllm = plan_setup(_config("llama-3.1-8b-vllm-l4.yaml"), project="p", bucket="b", region=REGION, project_number="1")
    regions = [REGION, *_config("llama-3.1-8b-vllm-l4.yaml").placement.regions]
    assert [r.split("/")[3] for r in vllm.repositories] == list(dict.fromkeys(map(multi_region, regions)))
    assert all(r.endswith(f"/repositories/{REMOTE_REPOSITORY_NAME}") for r in vllm.repositories)
    assert "artifactregistry.googleapis.com" in vllm.apis
    lines = [line for line in vllm.gcloud() if line.startswith("gcloud artifacts repositories create")]
    assert len(lines) == len(vllm.repositories)
    assert "--mode=remote-repository --remote-docker-repo=DOCKER-HUB" in lines[0] and "--location us " in lines[0]
    assert vllm.gcloud().index(lines[0]) > 0  # after `gcloud services enable`, which turns the API on
    # TGI's DLC and Model Garden's image are on Artifact Registry already: nothing to create, no API to enable.
    for name in ("llama-3.1-8b-awq-int4-tgi.yaml", "llama-3.1-8b-awq-int4-tgi-cloud-run.yaml"):
        tgi = plan_setup(_config(name), project="p", bucket="b", region=REGION, project_number="1")
        assert tgi.repositories == [] and "artifactregistry.googleapis.com" not in tgi.apis, name
    garden = plan_setup(
        _config("llama-3.2-11b-vision-vllm-a100.yaml"), project="p", bucket="b", region=REGION, project_number="1"
    )
    assert garden.repositories == []
    # Who pulls needs no grant in its own project: the agents' automatic roles hold the pull permission.
    for agent_role in ("roles/aiplatform.serviceAgent", "roles/run.serviceAgent"):
        assert "artifactregistry.repositories.downloadArtifacts" in role_permissions(agent_role)


READER = "roles/artifactregistry.reader"


def test_the_policy_gives_the_cloud_run_deployer_the_reader_role_on_the_repository_only() -> None:
    """ "To deploy to Cloud Run, you must have the Artifact Registry Reader role (roles/artifactregistry.reader) on the
    project or repository containing the images you want to deploy" (artifact-registry/docs/integrate-cloud-run): the
    pipeline's account deploys the service, so for vLLM's image on Cloud Run it gets the role on each remote
    repository, and nowhere else; a Vertex deployment (Vertex pulls with its service agent) and TGI (Google's image)
    get none."""
    cfg = _config("llama-3.1-8b-awq-int4-vllm-cloud-run.yaml")
    plan = plan_setup(cfg, project="p", bucket="b", region="europe-west4", project_number="1")
    reader = [b for b in plan.bindings if b.role == READER]
    assert plan.repositories and [b.resource for b in reader] == plan.repositories
    pipeline = f"serviceAccount:{cfg.placement.service_account or default_pipeline_account('p')}"
    assert {b.member for b in reader} == {pipeline} and {b.rule.on for b in reader} == {"serving_repository"}
    assert reader[0].rule.checks == ("artifactregistry.repositories.downloadArtifacts",)
    assert not [b for b in plan.bindings if b.role == READER and b.resource == "projects/p"]  # least privilege
    for name in plan.repositories:  # --dry-run prints the gcloud line, after the repository's creation
        location = name.split("/")[3]
        line = (
            f"gcloud artifacts repositories add-iam-policy-binding {REMOTE_REPOSITORY_NAME} --location {location} "
            f'--project p --member "{pipeline}" --role {READER}'
        )
        assert line in plan.gcloud()
        assert plan.gcloud().index(line) > plan.gcloud().index(
            next(
                x
                for x in plan.gcloud()
                if x.startswith(f"gcloud artifacts repositories create {REMOTE_REPOSITORY_NAME}")
            )
        )
    for name in ("llama-3.1-8b-vllm-l4.yaml", "llama-3.1-8b-awq-int4-tgi-cloud-run.yaml", "local-demo.yaml"):
        other = plan_setup(_config(name), project="p", bucket="b", region=REGION, project_number="1")
        assert not [b for b in other.bindings if b.rule.on == "serving_repository"], name


# ----------------------------------------------------------------------------- `vlp setup` against the emulator


def test_setup_creates_the_repository_once_and_enables_its_api(tmp_path: Path, fake_gcs: Any) -> None:
    emu = create_emulator(tmp_path / "state", serving=_Servers(), storage_endpoint=fake_gcs.url)
    emu.start()
    try:
        _setup_against(emu)
    finally:
        emu.stop()


def _setup_against(emu: Emulator) -> None:
    owner = f"vlp-admin@{PROJECT}.iam.gserviceaccount.com"
    emu.grant(f"projects/{PROJECT}", "roles/owner", f"serviceAccount:{owner}")
    # A new project: Artifact Registry's API is off, and a call to it says so.
    request = urllib.request.Request(
        f"{emu.url}/_emulator/apis",
        data=json.dumps({"project": PROJECT, "disabled": ["artifactregistry.googleapis.com"]}).encode(),
        headers=plumbing_headers(emu),
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()
    status, answer = _rest(emu, "GET", f"/v1/{REPOSITORY}", owner)
    assert status == 403 and answer["error"]["details"][0]["reason"] == "SERVICE_DISABLED"

    cfg = _config("local-demo.yaml")
    creds = emu.credentials_for(owner)
    gcs = storage.Client(project=PROJECT, credentials=creds, client_options={"api_endpoint": emu.url})
    plan = plan_setup(
        cfg, project=PROJECT, bucket=f"{PROJECT}-bucket", region=REGION, project_number=project_number(PROJECT)
    )
    assert plan.repositories == [REPOSITORY]
    changed = apply(plan, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None)
    assert "enabled artifactregistry.googleapis.com" in changed
    assert f"created Artifact Registry remote repository {REPOSITORY} (upstream: Docker Hub)" in changed
    assert apply(plan, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None) == []

    # A gated model on a fresh project (issue 36): Secret Manager enabled, the secret created empty before its grant,
    # and the owner told how to put the token in (from an environment variable: never on a command line or a log).
    gated = plan_setup(
        _config("local-demo.yaml", "model.hf_token_secret=hf-token-new"),
        project=PROJECT,
        bucket=f"{PROJECT}-bucket",
        region=REGION,
        project_number=project_number(PROJECT),
    )
    assert "secretmanager.googleapis.com" in gated.apis and gated.secret == "hf-token-new"
    assert f"gcloud secrets create hf-token-new --replication-policy=automatic --project {PROJECT}" in gated.gcloud()
    changed = apply(gated, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None)
    created = [c for c in changed if c.startswith("created the empty secret hf-token-new")]
    assert created and 'printf %s "$HF_TOKEN" | gcloud secrets versions add hf-token-new --data-file=-' in created[0]
    assert any(c.startswith("granted roles/secretmanager.secretAccessor on") for c in changed), changed
    assert _rest(emu, "GET", f"/v1/projects/{PROJECT}/secrets/hf-token-new", owner)[0] == 200
    assert apply(gated, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None) == []

    # Fallback regions (issue 36): a weights bucket in each, BUCKET-REGION, with the bucket's grants; preflight falls
    # back only where one is (test_preflight::test_the_weights_bucket_bounds_the_candidate_regions). Not on Cloud Run,
    # whose service reads any bucket.
    bucket = f"{PROJECT}-bucket"
    spread = plan_setup(
        _config("local-demo.yaml", "placement.regions=[us-central1, europe-west4]"),
        project=PROJECT,
        bucket=bucket,
        region=REGION,
        project_number=project_number(PROJECT),
    )
    assert spread.regional_buckets == {"europe-west4": f"{bucket}-europe-west4"}
    assert (
        f"gcloud storage buckets create gs://{bucket}-europe-west4 --project {PROJECT} --location europe-west4 "
        "--uniform-bucket-level-access"
    ) in spread.gcloud()
    on_it = {(b.role, b.member) for b in spread.bindings if b.resource == f"buckets/{bucket}-europe-west4"}
    assert on_it == {(b.role, b.member) for b in spread.bindings if b.resource == f"buckets/{bucket}"} != set()
    changed = apply(spread, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None)
    assert f"created gs://{bucket}-europe-west4 in europe-west4" in changed
    assert gcs.lookup_bucket(f"{bucket}-europe-west4").location.lower() == "europe-west4"
    run_only = plan_setup(
        _config("local-demo-cloud-run.yaml", "placement.regions=[us-central1, europe-west4]"),
        project=PROJECT,
        bucket=bucket,
        region=REGION,
        project_number=project_number(PROJECT),
    )
    assert run_only.regional_buckets == {}

    status, repository = _rest(emu, "GET", f"/v1/{REPOSITORY}", owner)
    assert status == 200 and repository["name"] == REPOSITORY
    assert repository["format"] == "DOCKER" and repository["mode"] == "REMOTE_REPOSITORY"
    assert repository["remoteRepositoryConfig"]["dockerRepository"] == {"publicRepository": "DOCKER_HUB"}
    # Creating it again is ALREADY_EXISTS; creating one needs artifactregistry.repositories.create, which a reader lacks.
    path = f"/v1/projects/{PROJECT}/locations/us/repositories?repositoryId={REMOTE_REPOSITORY_NAME}"
    status, answer = _rest(emu, "POST", path, owner, {"format": "DOCKER"})
    assert status == 409 and answer["error"]["status"] == "ALREADY_EXISTS"
    reader = "reader@example.com"
    emu.grant(f"projects/{PROJECT}", "roles/artifactregistry.reader", f"user:{reader}")
    assert _rest(emu, "GET", f"/v1/{REPOSITORY}", reader)[0] == 200
    status, answer = _rest(emu, "POST", path.replace(REMOTE_REPOSITORY_NAME, "other"), reader, {"format": "DOCKER"})
    assert status == 403 and "artifactregistry.repositories.create" in answer["error"]["message"]
    # The request is parsed as Google parses it: a field Repository lacks is refused.
    status, answer = _rest(emu, "POST", path.replace(REMOTE_REPOSITORY_NAME, "typo"), owner, {"formats": "DOCKER"})
    assert status == 400 and 'Unknown name "formats"' in answer["error"]["message"]


# ----------------------------------------------------------------------------- what Vertex AI and Cloud Run pull


def test_an_image_vertex_cannot_pull_from_is_refused_at_upload() -> None:
    for image in ("docker.io/vllm/vllm-openai:v0.34.0", "vllm/vllm-openai:latest", "ghcr.io/acme/server:1"):
        with pytest.raises(Exception, match="pulls serving images only from Artifact Registry") as caught:
            check_upload_image(image, REGION)
        assert image in str(caught.value)
    with pytest.raises(Exception, match=f"us-docker.pkg.dev/PROJECT/{REMOTE_REPOSITORY_NAME}/vllm/vllm-openai:latest"):
        check_upload_image("vllm/vllm-openai:latest", REGION)
    for image in (VLLM, "gcr.io/p/i:1", "eu.gcr.io/p/i:1", default_image("tgi").image):
        check_upload_image(image, REGION)


def test_upload_of_a_docker_hub_image_is_refused(emu: Emulator) -> None:
    models = aiplatform_v1.ModelServiceClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=as_tester(emu, PROJECT)
    )
    parent = f"projects/{PROJECT}/locations/{REGION}"
    model = {"display_name": "hub", "container_spec": {"image_uri": "docker.io/vllm/vllm-openai:v0.34.0"}}
    with pytest.raises(gexc.BadRequest, match=f"vlp setup` creates {REMOTE_REPOSITORY_NAME}"):
        models.upload_model(parent=parent, model=model)
    assert models.upload_model(parent=parent, model={**model, "container_spec": {"image_uri": VLLM}}).result(timeout=30)


def test_deploying_an_image_from_a_missing_repository_fails_as_a_pull_failure(emu: Emulator) -> None:
    kwargs = {
        "client_options": ClientOptions(api_endpoint=emu.url),
        "transport": "rest",
        "credentials": as_tester(emu, PROJECT),
    }
    models, endpoints = aiplatform_v1.ModelServiceClient(**kwargs), aiplatform_v1.EndpointServiceClient(**kwargs)
    parent = f"projects/{PROJECT}/locations/{REGION}"
    model = models.upload_model(
        parent=parent, model={"display_name": "vllm", "container_spec": {"image_uri": VLLM}}
    ).result(timeout=30)
    endpoint = endpoints.create_endpoint(parent=parent, endpoint={"display_name": "e"}).result(timeout=30)
    deployed = {
        "model": model.model,
        "dedicated_resources": {"machine_spec": {"machine_type": "g2-standard-12"}, "min_replica_count": 1},
    }
    with pytest.raises(gexc.GoogleAPICallError) as caught:
        endpoints.deploy_model(endpoint=endpoint.name, deployed_model=deployed).result(timeout=30)
    message = str(caught.value)
    assert caught.value.code == 400  # FAILED_PRECONDITION
    assert VLLM in message and "repository not found" in message and "vlp setup" in message
    assert emu.serving.running == {}  # the server never started

    # With the repository there (as `vlp setup` leaves it), the same deploy succeeds.
    path = f"/v1/projects/{PROJECT}/locations/us/repositories?repositoryId={REMOTE_REPOSITORY_NAME}"
    body = {"format": "DOCKER", "mode": "REMOTE_REPOSITORY", "remoteRepositoryConfig": {"dockerRepository": {}}}
    body["remoteRepositoryConfig"]["dockerRepository"]["publicRepository"] = "DOCKER_HUB"
    status, op = _rest(emu, "POST", path, "tester@example.com", body)
    assert status == 200 and op["done"] and op["response"]["name"] == REPOSITORY
    endpoints.deploy_model(endpoint=endpoint.name, deployed_model=deployed).result(timeout=30)
    assert len(emu.serving.running) == 1
    # An image in a project the emulator holds nothing of (Google's public images) is pulled as before.
    other = f"us-docker.pkg.dev/vertex-ai/{REMOTE_REPOSITORY_NAME}/vllm/vllm-openai:v0.34.0"
    public = models.upload_model(
        parent=parent, model={"display_name": "public", "container_spec": {"image_uri": other}}
    ).result(timeout=30)
    endpoints.deploy_model(endpoint=endpoint.name, deployed_model={**deployed, "model": public.model}).result(
        timeout=30
    )


def test_a_cloud_run_revision_from_a_missing_repository_is_not_ready(emu: Emulator) -> None:
    client = run_v2.ServicesClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=as_tester(emu, PROJECT)
    )
    container = run_v2.Container(
        image=VLLM,
        args=["serve", "gs://weights/models/acme/tiny/rev1/"],
        resources=run_v2.ResourceRequirements(limits={"cpu": "2", "memory": "4Gi"}),
    )
    template = run_v2.RevisionTemplate(containers=[container], scaling=run_v2.RevisionScaling(max_instance_count=1))
    service = run_v2.Service(template=template)
    service.template.volumes = [run_v2.Volume(name="weights", gcs=run_v2.GCSVolumeSource(bucket="weights"))]
    container.volume_mounts = [run_v2.VolumeMount(name="weights", mount_path="/mnt/model")]
    service.template.containers = [container]
    parent = f"projects/{PROJECT}/locations/{REGION}"
    with pytest.raises(gexc.GoogleAPICallError, match="is not ready and cannot serve traffic") as caught:
        client.create_service(parent=parent, service=service, service_id="vllm").result(timeout=30)
    assert f"Image '{VLLM}' not found" in str(caught.value) and "vlp setup" in str(caught.value)
    assert emu.serving.running == {}
    create_repository(emu, REPOSITORY, {"format": "DOCKER", "mode": "REMOTE_REPOSITORY"})  # as `vlp setup` leaves it
    client.delete_service(name=f"{parent}/services/vllm").result(timeout=30)
    created = client.create_service(parent=parent, service=service, service_id="vllm").result(timeout=30)
    assert created.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED


def test_a_cloud_run_deployer_without_the_reader_grant_is_refused_until_setup_grants_it(
    tmp_path: Path, fake_gcs: Any
) -> None:
    """The pipeline's account holds every grant but the reader role on the repository: Cloud Run refuses its deploy
    of vLLM's image with the permission, the image, the repository and the fix; `vlp setup` grants it (once, through
    the repository's getIamPolicy / setIamPolicy, etag checked), and the same deploy succeeds."""
    project = "ar-run-project"
    repository = f"projects/{project}/locations/us/repositories/{REMOTE_REPOSITORY_NAME}"
    emu = create_emulator(tmp_path / "state", serving=_Servers(), storage_endpoint=fake_gcs.url)
    emu.start()
    try:
        owner = f"vlp-admin@{project}.iam.gserviceaccount.com"
        emu.grant(f"projects/{project}", "roles/owner", f"serviceAccount:{owner}")
        creds = emu.credentials_for(owner)
        gcs = storage.Client(project=project, credentials=creds, client_options={"api_endpoint": emu.url})
        cfg = _config("local-demo-cloud-run.yaml")
        bucket = f"{project}-bucket"
        plan = plan_setup(cfg, project=project, bucket=bucket, region=REGION, project_number=project_number(project))
        (grant,) = [b for b in plan.bindings if b.role == READER]
        assert grant.resource == repository and plan.repositories == [repository]
        without = dataclasses.replace(plan, bindings=[b for b in plan.bindings if b is not grant])

        def setup(p: Any) -> list[str]:
            return apply(p, api_endpoint=emu.url, credentials=creds, storage_client=gcs, log=lambda _: None)

        assert f"created Artifact Registry remote repository {repository} (upstream: Docker Hub)" in setup(without)
        account = default_pipeline_account(project)
        image = default_image("vllm", "cloud_run").uri(project, REGION)
        client = run_v2.ServicesClient(
            client_options=ClientOptions(api_endpoint=emu.url),
            transport="rest",
            credentials=emu.credentials_for(account),
        )
        parent = f"projects/{project}/locations/{REGION}"
        with pytest.raises(gexc.Forbidden) as caught:
            client.create_service(parent=parent, service=_vllm_service(image, bucket, account), service_id="vllm")
        message = str(caught.value)
        assert "artifactregistry.repositories.downloadArtifacts" in message and image in message
        assert repository in message and READER in message and "`vlp setup`" in message
        assert emu.serving.running == {} and not any("/services/vllm/revisions/" in r for r in emu._run_revisions)
        # An image in a project the emulator holds nothing of (Google's public ones) is not checked.
        public = f"us-docker.pkg.dev/vertex-ai/{REMOTE_REPOSITORY_NAME}/vllm/vllm-openai:v0.34.0"
        client.create_service(
            parent=parent, service=_vllm_service(public, bucket, account), service_id="public"
        ).result(timeout=30)
        # (Deleted again: a second service in the region trips the emulator's quota sum, cloud_run.py
        # _run_check_quota adding _serving_revisions' list to a set.)
        client.delete_service(name=f"{parent}/services/public").result(timeout=30)

        # `vlp setup` grants it on the repository (not the project), once.
        assert setup(plan) == [f"granted {READER} on {repository} to serviceAccount:{account}"]
        assert setup(plan) == []
        status, policy = _rest(emu, "GET", f"/v1/{repository}:getIamPolicy", owner)
        assert status == 200 and {"role": READER, "members": [f"serviceAccount:{account}"]} in policy["bindings"]
        assert READER not in {b["role"] for b in emu.policy_of(f"projects/{project}")["bindings"]}
        status, held = _rest(
            emu, "POST", f"/v1/{repository}:testIamPermissions", account,
            {"permissions": ["artifactregistry.repositories.downloadArtifacts", "artifactregistry.repositories.create"]},
        )  # fmt: skip
        assert status == 200 and held == {"permissions": ["artifactregistry.repositories.downloadArtifacts"]}
        # setIamPolicy checks the etag, and the repository's IAM methods need it to exist.
        stale = {"policy": {**policy, "etag": "c3RhbGU="}}
        assert _rest(emu, "POST", f"/v1/{repository}:setIamPolicy", owner, stale)[0] == 409
        assert _rest(emu, "POST", f"/v1/{repository}:setIamPolicy", account, {"policy": policy})[0] == 403
        missing = repository.replace("/us/", "/europe/")
        assert _rest(emu, "GET", f"/v1/{missing}:getIamPolicy", owner)[0] == 404

        created = client.create_service(
            parent=parent, service=_vllm_service(image, bucket, account), service_id="vllm"
        ).result(timeout=30)
        assert created.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    finally:
        emu.stop()


def _vllm_service(image: str, bucket: str, account: str) -> run_v2.Service:
    """A service of vLLM's image as the deploy step makes one, small enough for a new project's quotas."""
    container = run_v2.Container(
        image=image,
        command=["vllm", "serve"],
        args=[f"gs://{bucket}/models/acme/tiny/rev1/"],
        resources=run_v2.ResourceRequirements(limits={"cpu": "2", "memory": "4Gi"}),
    )
    template = run_v2.RevisionTemplate(
        containers=[container], scaling=run_v2.RevisionScaling(max_instance_count=1), service_account=account
    )
    return run_v2.Service(template=template)
