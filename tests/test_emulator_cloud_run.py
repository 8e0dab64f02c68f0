"""The emulator's Cloud Run Admin API v2, driven by the real google-cloud-run client over REST, and its
metadata-server stand-in, driven by google.oauth2.id_token.fetch_id_token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, policy_pb2

from pipelines.local.emulator import Emulator, create_emulator

PARENT = "projects/local-project/locations/us-central1"
TGI = (
    "us-docker.pkg.dev/deeplearning-platform-release/gcr.io/huggingface-text-generation-inference-cu124.2-4.ubuntu2204"
)


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    emulator = create_emulator(tmp_path / "state")  # a real serving manager; no model server starts here
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def client(emu: Emulator) -> run_v2.ServicesClient:
    return run_v2.ServicesClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=AnonymousCredentials()
    )


def _service(
    revision: str = "", args: tuple[str, ...] = ("--max-concurrent-requests=64",), **overrides
) -> run_v2.Service:
    """The tutorial's service: one L4, 8 CPU / 32 GiB, CPU always allocated, max 3 instances, concurrency 64."""
    container = run_v2.Container(
        image=TGI,
        args=list(args),
        ports=[run_v2.ContainerPort(name="http1", container_port=8080)],
        resources=run_v2.ResourceRequirements(
            limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}, cpu_idle=False, startup_cpu_boost=True
        ),
        startup_probe=run_v2.Probe(
            http_get=run_v2.HTTPGetAction(path="/health", port=8080),
            period_seconds=10,
            timeout_seconds=5,
            failure_threshold=60,
        ),
    )
    template = run_v2.RevisionTemplate(
        revision=revision,
        scaling=run_v2.RevisionScaling(max_instance_count=3),
        max_instance_request_concurrency=64,
        node_selector=run_v2.NodeSelector(accelerator="nvidia-l4"),
        containers=[container],
        labels={"vlp-deployment": "llama-awq"},
    )
    return run_v2.Service(template=template, labels={"vlp-deployment": "llama-awq"}, **overrides)


def test_create_get_list_and_delete_a_gpu_service(client: run_v2.ServicesClient, emu: Emulator) -> None:
    created = client.create_service(
        parent=PARENT, service=_service("llama-awq-abc1234-1"), service_id="llama-awq"
    ).result(timeout=30)
    assert created.name == f"{PARENT}/services/llama-awq"
    assert created.latest_ready_revision == f"{PARENT}/services/llama-awq/revisions/llama-awq-abc1234-1"
    assert created.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    assert created.uri.startswith(emu.url)
    assert [(t.revision, t.percent) for t in created.traffic_statuses] == [("llama-awq-abc1234-1", 100)]
    got = client.get_service(name=created.name)
    assert got.template.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert [s.name for s in client.list_services(parent=PARENT)] == [created.name]
    revisions = run_v2.RevisionsClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=AnonymousCredentials()
    )
    [revision] = revisions.list_revisions(parent=created.name)
    assert revision.max_instance_request_concurrency == 64 and revision.scaling.max_instance_count == 3
    client.delete_service(name=created.name).result(timeout=30)
    with pytest.raises(gexc.NotFound):
        client.get_service(name=created.name)
    audit = [(e["action"], e["resourceName"].rsplit("/", 1)[1]) for e in emu.audit]
    assert ("created", "llama-awq") in audit and ("deleted", "llama-awq") in audit


def test_blue_green_candidate_at_zero_with_a_tag_then_promoted(client: run_v2.ServicesClient) -> None:
    """The research note's flow: pin traffic, add the candidate at 0% with a tag, smoke it on the tag URL, move."""
    svc = client.create_service(parent=PARENT, service=_service("llama-awq-0000001-1"), service_id="llama-awq").result(
        timeout=30
    )
    svc.template.revision = "llama-awq-0000002-1"
    svc.template.containers[0].args.append("--max-total-tokens=4096")
    svc.traffic = [
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
            revision="llama-awq-0000001-1",
            percent=100,
        ),
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
            revision="llama-awq-0000002-1",
            percent=0,
            tag="cand",
        ),
    ]
    updated = client.update_service(service=svc).result(timeout=30)
    statuses = {t.revision: t for t in updated.traffic_statuses}
    assert statuses["llama-awq-0000001-1"].percent == 100 and statuses["llama-awq-0000002-1"].percent == 0
    assert statuses["llama-awq-0000002-1"].tag == "cand" and statuses["llama-awq-0000002-1"].uri.endswith("/cand")
    promote = run_v2.Service(
        name=updated.name,
        traffic=[
            run_v2.TrafficTarget(
                type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
                revision="llama-awq-0000002-1",
                percent=100,
                tag="cand",
            )
        ],
    )
    moved = client.update_service(service=promote, update_mask={"paths": ["traffic"]}).result(timeout=30)
    assert [(t.revision, t.percent) for t in moved.traffic_statuses] == [("llama-awq-0000002-1", 100)]
    assert moved.template.containers[0].args[-1] == "--max-total-tokens=4096"  # the mask kept the template


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        (lambda s: setattr(s.template, "revision", "other-1"), gexc.BadRequest, "prefixed by the service name"),
        (
            lambda s: s.template.containers[0].resources.limits.update({"nvidia.com/gpu": "2"}),
            gexc.BadRequest,
            "one GPU",
        ),
        (lambda s: s.template.containers[0].resources.limits.update({"cpu": "2"}), gexc.BadRequest, "at least 4 CPU"),
        (lambda s: setattr(s.template.containers[0].resources, "cpu_idle", True), gexc.BadRequest, "always allocated"),
        (lambda s: setattr(s.template.containers[0].startup_probe, "period_seconds", 300), gexc.BadRequest, "240"),
        (lambda s: s.labels.update({"run.googleapis.com/x": "y"}), gexc.BadRequest, "reserved"),
    ],
)
def test_what_cloud_run_refuses(client: run_v2.ServicesClient, change, status, says: str) -> None:
    service = _service("llama-awq-abc-1")
    change(service)
    with pytest.raises(status, match=says):
        client.create_service(parent=PARENT, service=service, service_id="llama-awq").result(timeout=30)


def test_a_revision_name_is_never_reused_for_another_template(client: run_v2.ServicesClient) -> None:
    svc = client.create_service(parent=PARENT, service=_service("llama-awq-x-1"), service_id="llama-awq").result(
        timeout=30
    )
    svc.template.containers[0].args.append("--changed")
    with pytest.raises(gexc.Conflict, match="different configuration already exists"):
        client.update_service(service=svc).result(timeout=30)
    with pytest.raises(gexc.BadRequest, match="under 50 characters"):
        client.create_service(parent=PARENT, service=_service(), service_id="Bad_Name").result(timeout=30)


def test_iam_policy_round_trips_its_etag(client: run_v2.ServicesClient) -> None:
    svc = client.create_service(parent=PARENT, service=_service("llama-awq-i-1"), service_id="llama-awq").result(
        timeout=30
    )
    policy = client.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=svc.name))
    policy.bindings.append(
        policy_pb2.Binding(role="roles/run.invoker", members=["serviceAccount:pipe@p.iam.gserviceaccount.com"])
    )
    stored = client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=svc.name, policy=policy))
    assert [(b.role, list(b.members)) for b in stored.bindings] == [
        ("roles/run.invoker", ["serviceAccount:pipe@p.iam.gserviceaccount.com"])
    ]
    with pytest.raises(gexc.Conflict, match="concurrent policy changes"):  # a stale etag: 409 ABORTED
        client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=svc.name, policy=policy))


def test_fetch_id_token_works_unchanged_against_the_metadata_stand_in(emu: Emulator) -> None:
    host = emu.url.removeprefix("http://")
    code = (
        "import google.auth.transport.requests, google.oauth2.id_token, google.auth.jwt, json\n"
        "t = google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), 'https://svc.a.run.app')\n"
        "print(json.dumps(google.auth.jwt.decode(t, verify=False)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(GCE_METADATA_HOST=host, GCE_METADATA_IP=host)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    claims = json.loads(done.stdout)
    assert claims["aud"] == "https://svc.a.run.app" and claims["email"].endswith(".iam.gserviceaccount.com")
