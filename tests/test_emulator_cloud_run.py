"""The emulator's Cloud Run Admin API v2, driven by the real google-cloud-run client over REST, and its
metadata-server stand-in, driven by google.oauth2.id_token.fetch_id_token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import as_tester, plumbing_headers, run_as
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, policy_pb2

from vlp.pipelines.local.emulator import Emulator, create_emulator
from vlp.pipelines.local.emulator.iam import compute_default_account

PROJECT = "local-project"
PARENT = f"projects/{PROJECT}/locations/us-central1"
TGI = (
    "us-docker.pkg.dev/deeplearning-platform-release/gcr.io/huggingface-text-generation-inference-cu124.2-4.ubuntu2204"
)


class _Servers:
    """Model servers that are ready at once: these tests are about the API, not serving (see the end of the file)."""

    def __init__(self) -> None:
        self.running: dict[str, str] = {}

    def start(self, serving_id: str, weights: str, spec: dict, timeout_s: float) -> None:
        self.running[serving_id] = weights

    def stop(self, serving_id: str, remove_copy: bool = False) -> None:
        self.running.pop(serving_id, None)

    def stop_all(self) -> None:
        self.running.clear()

    def is_healthy(self, serving_id: str) -> bool:
        return serving_id in self.running

    def known_ids(self) -> list[str]:
        return sorted(self.running)


# Enough for two revisions of the tutorial's service at once (a blue/green rollout): 2 x 3 instances of 8 CPU,
# 32 GiB and one L4 with zonal redundancy. A new project's quotas are far below (test_quotas_…).
ROLLOUT_QUOTAS = {
    "CpuAllocPerProjectRegion": {"us-central1": 48000},
    "MemAllocPerProjectRegion": {"us-central1": 6 * 32 * 2**30},
    "NvidiaL4GpuAllocPerProjectRegion": {"us-central1": 6},
}


def _set_quotas(emu: Emulator, quotas: dict) -> None:
    import requests

    answer = requests.post(
        f"{emu.url}/_emulator/quotas", json={"quotas": quotas, "default": 8}, headers=plumbing_headers(emu), timeout=10
    )
    assert answer.ok


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    emulator = create_emulator(tmp_path / "state", serving=_Servers())
    emulator.start()
    _set_quotas(emulator, ROLLOUT_QUOTAS)
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def client(emu: Emulator) -> run_v2.ServicesClient:
    return run_v2.ServicesClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=as_tester(emu, PROJECT)
    )


def _service(
    revision: str = "",
    args: tuple[str, ...] = ("--max-concurrent-requests=64",),
    only_dir: str = "models/acme/tiny/rev1",
    **overrides,
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
    # The weights, as the pipeline mirrors them, mounted read-only (the research note's section 3).
    template.volumes = [
        run_v2.Volume(
            name="weights",
            gcs=run_v2.GCSVolumeSource(bucket="vlp-run-test", read_only=True, mount_options=[f"only-dir={only_dir}"]),
        )
    ]
    container.volume_mounts = [run_v2.VolumeMount(name="weights", mount_path="/mnt/model")]
    template.containers = [container]
    return run_v2.Service(template=template, labels={"vlp-deployment": "llama-awq"}, **overrides)


def _pinned(serving: str, candidate: str, tag: str = "cand") -> list[run_v2.TrafficTarget]:
    """Traffic pinned to the serving revision, with the candidate at 0% behind a tag (the research note's step 2)."""
    pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    return [
        run_v2.TrafficTarget(type_=pin, revision=serving, percent=100),
        run_v2.TrafficTarget(type_=pin, revision=candidate, percent=0, tag=tag),
    ]


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
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=as_tester(emu, PROJECT)
    )
    [revision] = revisions.list_revisions(parent=created.name)
    assert revision.max_instance_request_concurrency == 64 and revision.scaling.max_instance_count == 3
    assert list(emu.serving.running.values()) == ["gs://vlp-run-test/models/acme/tiny/rev1/"]  # the mounted dir
    client.delete_service(name=created.name).result(timeout=30)
    with pytest.raises(gexc.NotFound):
        client.get_service(name=created.name)
    deadline = time.monotonic() + 10
    while emu.serving.running and time.monotonic() < deadline:  # stopped in the background
        time.sleep(0.05)
    assert emu.serving.running == {}
    audit = [(e["action"], e["resourceName"].rsplit("/", 1)[1]) for e in emu.audit]
    assert ("created", "llama-awq") in audit and ("deleted", "llama-awq") in audit


def test_blue_green_candidate_at_zero_with_a_tag_then_promoted(client: run_v2.ServicesClient) -> None:
    """The research note's flow: pin traffic, add the candidate at 0% with a tag, smoke it on the tag URL, move."""
    svc = client.create_service(parent=PARENT, service=_service("llama-awq-0000001-1"), service_id="llama-awq").result(
        timeout=30
    )
    svc.template.revision = "llama-awq-0000002-1"
    svc.template.containers[0].args.append("--max-total-tokens=4096")
    svc.traffic = _pinned("llama-awq-0000001-1", "llama-awq-0000002-1")
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
        (  # 181 x 10 s: over the 1800 s a GPU instance's startup probe may take in all
            lambda s: setattr(s.template.containers[0].startup_probe, "failure_threshold", 181),
            gexc.BadRequest,
            "1800",
        ),
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


def test_quotas_count_max_instances_and_both_revisions_of_a_rollout(
    client: run_v2.ServicesClient, emu: Emulator
) -> None:
    """A new project's quotas refuse the tutorial's 3 x (8 CPU, 32 GiB) (the codelab's error) and any GPU; GPU quota
    with and without zonal redundancy are separate; a candidate at 0% with a tag counts beside the serving revision."""
    _set_quotas(emu, {})
    with pytest.raises(gexc.TooManyRequests, match="CpuAllocPerProjectRegion requested: 24000 allowed: 20000"):
        client.create_service(parent=PARENT, service=_service("llama-awq-q-1"), service_id="llama-awq").result(
            timeout=30
        )
    _set_quotas(emu, {k: v for k, v in ROLLOUT_QUOTAS.items() if not k.startswith("Nvidia")})
    with pytest.raises(gexc.TooManyRequests, match="NvidiaL4GpuAllocPerProjectRegion requested: 3 allowed: 0"):
        client.create_service(parent=PARENT, service=_service("llama-awq-q-1"), service_id="llama-awq").result(
            timeout=30
        )
    no_zr = _service("llama-awq-q-1")
    no_zr.template.gpu_zonal_redundancy_disabled = True
    # Nor any without zonal redundancy: a new project has no Cloud Run GPU quota until its owner requests some (F10).
    with pytest.raises(gexc.TooManyRequests, match="NoZonalRedundancyPerProjectRegion requested: 3 allowed: 0"):
        client.create_service(parent=PARENT, service=no_zr, service_id="llama-awq").result(timeout=30)
    no_zr_quota = {"NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion": {"us-central1": 3}}
    _set_quotas(emu, {**{k: v for k, v in ROLLOUT_QUOTAS.items() if not k.startswith("Nvidia")}, **no_zr_quota})
    svc = client.create_service(parent=PARENT, service=no_zr, service_id="llama-awq").result(timeout=30)
    svc.template.revision = "llama-awq-q-2"
    svc.template.containers[0].args.append("--changed")
    svc.traffic = _pinned("llama-awq-q-1", "llama-awq-q-2")
    with pytest.raises(gexc.TooManyRequests, match="NoZonalRedundancyPerProjectRegion requested: 6 allowed: 3"):
        client.update_service(service=svc).result(timeout=30)


def test_fetch_id_token_works_unchanged_against_the_metadata_stand_in(emu: Emulator) -> None:
    host = emu.url.removeprefix("http://") + f"/_md/{INVOKER}"
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
    assert claims["aud"] == "https://svc.a.run.app" and claims["email"] == INVOKER


# ----- revisions that serve: a model server per revision with traffic or a tag, and the invoker check -----

BUCKET = "vlp-run-test"
INVOKER = "invoker@local-project.iam.gserviceaccount.com"  # a caller of the service (its metadata server's account)


@pytest.fixture(scope="module")
def run_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from google.cloud import storage

    from vlp.pipelines.local.models import build_tiny_llama
    from vlp.pipelines.local.peers import start_fake_gcs

    work = tmp_path_factory.mktemp("run-serving")
    model = build_tiny_llama(work / "tiny-llama")
    peer = start_fake_gcs(None, work / "logs")
    client = storage.Client(
        project="local", credentials=AnonymousCredentials(), client_options={"api_endpoint": peer.url}
    )
    bucket = client.create_bucket(BUCKET)
    for path in sorted(model.iterdir()):
        bucket.blob(f"models/acme/tiny/rev1/{path.name}").upload_from_filename(str(path))
        broken = b"{ this is not json" if path.name == "config.json" else path.read_bytes()
        bucket.blob(f"models/acme/broken/rev1/{path.name}").upload_from_string(broken)
    yield peer.url
    peer.stop()


@pytest.fixture
def serving_emu(tmp_path: Path, run_gcs: str) -> Iterator[Emulator]:
    emulator = create_emulator(tmp_path / "state", storage_endpoint=run_gcs, deploy_timeout_s=120)
    emulator.start()
    # The revisions run as the Compute Engine default account (they name none), which reads the weights.
    emulator.grant(
        f"buckets/{BUCKET}", "roles/storage.objectViewer", f"serviceAccount:{compute_default_account(PROJECT)}"
    )
    _set_quotas(emulator, ROLLOUT_QUOTAS)
    try:
        yield emulator
    finally:
        emulator.stop()


def _mounted(revision: str, only_dir: str) -> run_v2.Service:
    return _service(revision, args=("--model-id=/mnt/model",), only_dir=only_dir)


def _id_token(emu: Emulator, audience: str) -> str:
    import requests

    url = f"{emu.url}/_md/{INVOKER}/computeMetadata/v1/instance/service-accounts/default/identity"
    return requests.get(url, params={"audience": audience}, headers={"Metadata-Flavor": "Google"}, timeout=10).text


@pytest.mark.slow
def test_a_private_service_answers_only_its_invokers_and_a_broken_revision_keeps_the_old_traffic(
    serving_emu: Emulator,
) -> None:
    import requests

    client = run_v2.ServicesClient(
        client_options=ClientOptions(api_endpoint=serving_emu.url),
        transport="rest",
        credentials=as_tester(serving_emu, PROJECT),
    )
    svc = client.create_service(
        parent=PARENT, service=_mounted("llama-awq-0000001-1", "models/acme/tiny/rev1"), service_id="llama-awq"
    ).result(timeout=180)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    url = svc.uri + "/v1/chat/completions"
    token = _id_token(serving_emu, svc.uri)
    assert requests.post(url, json=chat, timeout=60).status_code == 403  # private: no token
    assert requests.post(url, json=chat, headers={"Authorization": f"Bearer {token}"}, timeout=60).status_code == 403
    policy = client.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=svc.name))
    policy.bindings.append(policy_pb2.Binding(role="roles/run.invoker", members=[f"serviceAccount:{INVOKER}"]))
    client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=svc.name, policy=policy))
    granted = time.monotonic()
    # The grant takes a while to be honoured (access change propagation): 403 at first, then 200.
    assert requests.post(url, json=chat, headers={"Authorization": f"Bearer {token}"}, timeout=60).status_code == 403
    while (answer := requests.post(url, json=chat, headers={"Authorization": f"Bearer {token}"}, timeout=60)).status_code == 403:
        assert time.monotonic() - granted < 30, "the grant never took effect"
        time.sleep(0.5)
    assert time.monotonic() - granted >= 2.5  # VLP_IAM_PROPAGATION_S defaults to 3
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
    assert answer.json()["model"] == "/mnt/model"  # TGI answers with its own model id
    # The URL reaches TGI's router as it is: its routes only, each with its own method.
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.post(svc.uri + "/chat/completions", json=chat, headers=auth, timeout=60).status_code == 404
    assert requests.get(url, headers=auth, timeout=60).status_code == 405
    assert requests.get(svc.uri + "/health", headers=auth, timeout=60).status_code == 200

    # An ID token is checked as Cloud Run checks it: signature, expiry, audience (401), then the invoker (403).
    def refused(bad: str) -> int:
        return requests.post(url, json=chat, headers={"Authorization": f"Bearer {bad}"}, timeout=60).status_code

    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.auth import crypt, jwt

    from vlp.pipelines.local.emulator.iam import ID_TOKEN_KEY_ID, id_token_claims

    assert refused(_id_token(serving_emu, "https://elsewhere.example.com")) == 401  # another audience
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "email": "mallory@example.com"}).encode()).decode()
    assert refused(f"{header}.{forged.rstrip('=')}.{signature}") == 401  # claims changed under the signature
    key_file = (serving_emu.state_dir / "id-token-key.pem").read_bytes()
    expired = {**id_token_claims(INVOKER, svc.uri), "iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}
    signer = crypt.RSASigner.from_string(key_file, key_id=ID_TOKEN_KEY_ID)
    assert refused(jwt.encode(signer, expired).decode()) == 401  # past its exp
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    impostor = crypt.RSASigner.from_string(other_key, key_id=ID_TOKEN_KEY_ID)
    assert refused(jwt.encode(impostor, id_token_claims(INVOKER, svc.uri)).decode()) == 401  # signed by another key
    assert refused(jwt.encode(signer, id_token_claims(INVOKER, svc.uri)).decode()) == 200  # the same, signed right

    # A candidate whose weights do not load: the update fails with code 9 and the old revision keeps 100%.
    candidate = _mounted("llama-awq-0000002-1", "models/acme/broken/rev1")
    candidate.name = svc.name
    candidate.traffic = _pinned("llama-awq-0000001-1", "llama-awq-0000002-1")
    with pytest.raises(gexc.GoogleAPICallError, match="is not ready and cannot serve traffic"):
        client.update_service(service=candidate).result(timeout=180)
    after = client.get_service(name=svc.name)
    assert [(t.revision, t.percent, t.tag) for t in after.traffic_statuses] == [("llama-awq-0000001-1", 100, "")]
    again = requests.post(url, json=chat, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert again.status_code == 200  # the service answered throughout
    # service.proto `reconciling`: the spec stays as submitted, the failed revision is the latest created, and the
    # service is not Ready; Cloud Run will not delete that revision while the template names it.
    assert after.template.revision == "llama-awq-0000002-1"
    assert after.latest_created_revision.endswith("/llama-awq-0000002-1")
    assert after.latest_ready_revision.endswith("/llama-awq-0000001-1")
    assert after.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    revisions = run_v2.RevisionsClient(
        client_options=ClientOptions(api_endpoint=serving_emu.url),
        transport="rest",
        credentials=as_tester(serving_emu, PROJECT),
    )
    with pytest.raises(gexc.BadRequest, match="it is the latest revision of service"):
        revisions.delete_revision(name=f"{svc.name}/revisions/llama-awq-0000002-1").result(timeout=30)

    # Roll-back as the pipeline does it: the template goes back to the serving revision, then the candidate goes.
    from vlp.components.cloud_run.service import remove_revision

    assert remove_revision(client, revisions, svc.name, "llama-awq-0000002-1") == [
        f"{svc.name}/revisions/llama-awq-0000002-1"
    ]
    back = client.get_service(name=svc.name)
    assert back.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    assert back.latest_created_revision.endswith("/llama-awq-0000001-1") and back.template.revision == "llama-awq-0000001-1"
    assert [(t.revision, t.percent) for t in back.traffic_statuses] == [("llama-awq-0000001-1", 100)]
    assert [r.name.rsplit("/", 1)[1] for r in revisions.list_revisions(parent=svc.name)] == ["llama-awq-0000001-1"]
    last = requests.post(url, json=chat, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert last.status_code == 200


def test_cloud_quotas_lists_cloud_runs_quotas_at_a_new_projects_limits(emu: Emulator) -> None:
    """What preflight will read for the Cloud Run target: Cloud Quotas v1, service run.googleapis.com."""
    from google.cloud import cloudquotas_v1

    _set_quotas(emu, {})
    quotas = cloudquotas_v1.CloudQuotasClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=as_tester(emu, PROJECT)
    )
    infos = {
        q.quota_id: q
        for q in quotas.list_quota_infos(parent="projects/local-project/locations/global/services/run.googleapis.com")
    }
    assert {
        "CpuAllocPerProjectRegion",
        "MemAllocPerProjectRegion",
        "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion",
    } <= set(infos)
    cpu = {d.dimensions["region"]: d.details.value for d in infos["CpuAllocPerProjectRegion"].dimensions_infos}
    assert cpu["us-central1"] == 20000
    assert infos["MemAllocPerProjectRegion"].metric == "run.googleapis.com/mem_allocation"


def test_a_serving_revision_cannot_be_deleted_and_gc_collects_a_crashed_runs_candidate(
    client: run_v2.ServicesClient, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """D14, and `vlp gc` on Cloud Run: a candidate a crashed run left (0%, tagged) is a leftover; the revision
    another run serves is kept."""
    from datetime import UTC, datetime, timedelta

    from vlp.pipelines import gc

    run_a = {"vlp-deployment": "llama-awq", "vlp-run": "run-a"}
    svc = _service("llama-awq-0000001-1")
    svc.labels = run_a
    svc.template.labels = run_a
    created = client.create_service(parent=PARENT, service=svc, service_id="llama-awq").result(timeout=30)
    created.template.revision = "llama-awq-0000002-1"
    created.template.labels = {"vlp-deployment": "llama-awq", "vlp-run": "run-b"}
    created.traffic = _pinned("llama-awq-0000001-1", "llama-awq-0000002-1", tag="candidate")
    client.update_service(service=created).result(timeout=30)
    revisions = run_v2.RevisionsClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=as_tester(emu, PROJECT)
    )
    with pytest.raises(gexc.BadRequest, match="receiving traffic or has a tag"):  # FAILED_PRECONDITION is HTTP 400
        revisions.delete_revision(name=f"{created.name}/revisions/llama-awq-0000002-1").result(timeout=30)

    later = datetime.now(UTC) + timedelta(days=2)
    run_as(monkeypatch, emu.url, "tester@example.com")
    dry = gc.collect_garbage(
        "local-project", ["us-central1"], timedelta(hours=1), dry_run=True, api_endpoint=emu.url, now=later
    )
    assert [r.run_label for r in dry.collected] == ["run-b"] and dry.collected[0].revisions
    assert [(r.run_label, why.split(" (")[0]) for r, why in dry.kept] == [("run-a", "serving traffic")]
    assert len(list(revisions.list_revisions(parent=created.name))) == 2  # a dry run removes nothing

    report = gc.collect_garbage("local-project", ["us-central1"], timedelta(hours=1), api_endpoint=emu.url, now=later)
    assert report.removed.deleted == [f"{created.name}/revisions/llama-awq-0000002-1"]
    assert [r.name.rsplit("/", 1)[1] for r in revisions.list_revisions(parent=created.name)] == ["llama-awq-0000001-1"]
    after = client.get_service(name=created.name)
    assert [(t.revision, t.percent, t.tag) for t in after.traffic_statuses] == [("llama-awq-0000001-1", 100, "")]


def test_a_maskless_update_replaces_the_service_and_a_stale_etag_is_refused(client: run_v2.ServicesClient) -> None:
    """AIP-134 (update without a mask replaces the resource) and AIP-154 (a stale etag is ABORTED, HTTP 409)."""
    svc = client.create_service(parent=PARENT, service=_service("llama-awq-0000001-1"), service_id="llama-awq")
    svc = svc.result(timeout=30)
    svc.annotations = {"example.com/owner": "team-a"}
    svc.custom_audiences = ["https://llm.example.com"]
    read = client.update_service(service=svc).result(timeout=30)
    assert dict(read.annotations) == {"example.com/owner": "team-a"} and list(read.custom_audiences)
    stale = run_v2.Service.wrap(type(run_v2.Service.pb(svc))())
    run_v2.Service.pb(stale).CopyFrom(run_v2.Service.pb(svc))  # the etag of before the last write
    with pytest.raises(gexc.Conflict, match="modified since it was read"):
        client.update_service(service=stale).result(timeout=30)

    rebuilt = _service("llama-awq-0000001-1")  # built from scratch, as if the service had nothing else
    rebuilt.name = read.name
    after = client.update_service(service=rebuilt).result(timeout=30)
    assert not after.annotations and not after.custom_audiences  # what a from-scratch write wipes


def test_tags_the_service_name_leaves_no_room_for_and_internal_ingress(
    client: run_v2.ServicesClient, emu: Emulator
) -> None:
    import requests

    long_id = "a" * 38  # + "candidate" = 47
    svc = _service(f"{long_id}-0000001-1")
    svc.traffic = [
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
            revision=f"{long_id}-0000001-1",
            percent=100,
            tag="candidate",
        )
    ]
    with pytest.raises(gexc.BadRequest, match="cannot exceed 46 characters"):
        client.create_service(parent=PARENT, service=svc, service_id=long_id).result(timeout=30)
    inner = _service("inner-0000001-1", ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY)
    created = client.create_service(parent=PARENT, service=inner, service_id="inner").result(timeout=30)
    assert requests.post(created.uri + "/v1/chat/completions", json={}, timeout=30).status_code == 404


def test_rtx_pro_6000_quota_counts_milli_gpus(client: run_v2.ServicesClient, emu: Emulator) -> None:
    """One RTX PRO 6000 instance draws 1000 of its quota (milli-GPUs; unverified, strict): a limit of 3 refuses
    it, 1000 takes it; the plan's check asks for the same amount."""
    from vlp.components.cloud_run.quota import instance_allocation
    from vlp.components.config import CloudRunSpec

    quota_id = "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion"
    _set_quotas(emu, {**ROLLOUT_QUOTAS, quota_id: {"us-central1": 3}, "CpuAllocPerProjectRegion": {"us-central1": 20000},
                      "MemAllocPerProjectRegion": {"us-central1": 80 * 2**30}})  # fmt: skip
    svc = _service("rtx-0000001-1")
    svc.template.node_selector.accelerator = "nvidia-rtx-pro-6000"
    svc.template.gpu_zonal_redundancy_disabled = True
    svc.template.scaling.max_instance_count = 1
    svc.template.containers[0].resources.limits.update({"cpu": "20", "memory": "80Gi"})
    with pytest.raises(gexc.GoogleAPICallError, match=f"{quota_id} requested: 1000 allowed: 3"):
        client.create_service(parent=PARENT, service=svc, service_id="rtx").result(timeout=30)
    _set_quotas(emu, {**ROLLOUT_QUOTAS, quota_id: {"us-central1": 1000}, "CpuAllocPerProjectRegion": {"us-central1": 20000},
                      "MemAllocPerProjectRegion": {"us-central1": 80 * 2**30}})  # fmt: skip
    client.create_service(parent=PARENT, service=svc, service_id="rtx").result(timeout=30)
    spec = CloudRunSpec(gpu_type="nvidia-rtx-pro-6000", cpu=20, memory="80Gi", max_instances=1, zonal_redundancy=False)
    assert instance_allocation(spec)[quota_id] == 1000


def test_a_named_revision_is_reused_only_for_its_spec_and_roll_back_moves_traffic_alone_when_refused(
    client: run_v2.ServicesClient, emu: Emulator
) -> None:
    """Knative reuses a named revision only for a template whose spec equals the revision's (F3; labels and
    annotations aside): a changed argument under the serving revision's name is refused with 409. Users report the
    same 409 for templates read back through v2 (the revision-conflict fault): vlp's roll-back then moves the
    traffic alone; the old revision keeps 100%, the candidate loses its tag and stays as the latest revision (not
    deletable until another replaces it). Twice is fine; without the fault the template goes back and it is deleted."""
    from vlp.components.cloud_run.service import remove_revision

    svc = client.create_service(parent=PARENT, service=_service("llama-awq-0000001-1"), service_id="llama-awq").result(
        timeout=30
    )
    svc.template.revision = "llama-awq-0000002-1"
    svc.template.containers[0].args.append("--max-total-tokens=4096")
    svc.traffic = _pinned("llama-awq-0000001-1", "llama-awq-0000002-1")
    svc = client.update_service(service=svc).result(timeout=30)
    changed = client.get_service(name=svc.name)
    changed.template = _service("llama-awq-0000001-1", args=("--max-concurrent-requests=32",)).template
    with pytest.raises(gexc.Conflict, match="Revision named 'llama-awq-0000001-1' with different configuration"):
        client.update_service(service=changed).result(timeout=30)
    revisions = run_v2.RevisionsClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=as_tester(emu, PROJECT)
    )
    emu.faults.add("revision-conflict")
    for _ in range(2):
        assert remove_revision(client, revisions, svc.name, "llama-awq-0000002-1") == []
        after = client.get_service(name=svc.name)
        assert [(t.revision, t.percent, t.tag) for t in after.traffic_statuses] == [("llama-awq-0000001-1", 100, "")]
        assert after.latest_created_revision.endswith("/llama-awq-0000002-1")
    names = sorted(r.name.rsplit("/", 1)[1] for r in revisions.list_revisions(parent=svc.name))
    assert names == ["llama-awq-0000001-1", "llama-awq-0000002-1"]
    emu.faults.discard("revision-conflict")
    # The serving revision's template, annotated differently (metadata), names it again and creates nothing.
    assert remove_revision(client, revisions, svc.name, "llama-awq-0000002-1") == [
        f"{svc.name}/revisions/llama-awq-0000002-1"
    ]
    back = client.get_service(name=svc.name)
    assert back.latest_created_revision.endswith("/llama-awq-0000001-1")
    assert [r.name.rsplit("/", 1)[1] for r in revisions.list_revisions(parent=svc.name)] == ["llama-awq-0000001-1"]
