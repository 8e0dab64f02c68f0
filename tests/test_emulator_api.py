"""The Vertex AI emulator's API, driven by the real google-cloud-aiplatform SDK and GAPIC REST clients."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TESTER, as_tester, auth_header, let_vertex_read, plumbing_headers, run_as
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform, aiplatform_v1
from google.protobuf import struct_pb2

from vlp.components.serving import images
from vlp.pipelines.local.emulator import Emulator, create_emulator, plumbing

PROJECT = "demo-project"
LOCATION = "us-central1"
PARENT = f"projects/{PROJECT}/locations/{LOCATION}"
VLLM_IMAGE = "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:latest"
REPO_ROOT = Path(__file__).resolve().parents[1]


STREAM_GAP_S = 0.4


class ServingDouble:
    """Stands in for serving.ServingManager, the boundary to model-server processes, so these tests stay fast.

    The real manager (transformers serve) is exercised in tests/test_emulator_serving.py.
    """

    def __init__(self, *, start_delay: float = 0.0, fail_with: Exception | None = None) -> None:
        self.start_delay = start_delay
        self.fail_with = fail_with
        self.started: dict[str, tuple[str, dict[str, Any], float]] = {}
        self.start_calls: list[str] = []
        self.stopped: list[str] = []
        self.forwarded: list[tuple[str, str, bytes, str | None]] = []

    def start(self, deployed_model_id: str, artifact_uri: str, container_spec: dict, timeout_s: float) -> None:
        self.start_calls.append(deployed_model_id)
        time.sleep(self.start_delay)
        if self.fail_with is not None:
            raise self.fail_with
        self.started[deployed_model_id] = (artifact_uri, container_spec, timeout_s)

    def stop(self, deployed_model_id: str, remove_copy: bool = False) -> None:
        self.stopped.append(deployed_model_id)
        self.started.pop(deployed_model_id, None)

    def stop_all(self) -> None:
        for deployed_model_id in list(self.started):
            self.stop(deployed_model_id)

    def forward(self, deployed_model_id: str, kind: str, body: bytes, subpath: str | None = None) -> tuple:
        self.forwarded.append((deployed_model_id, kind, body, subpath))
        if b'"stream": true' in body:
            # An event stream as the real manager hands one on (an iterator of lines, serving._lines), with the
            # model server's pace: a chunk every STREAM_GAP_S.
            def events() -> Iterator[bytes]:
                for i in range(4):
                    if i:
                        time.sleep(STREAM_GAP_S)
                    yield f'data: {{"choices": [{{"delta": {{"content": "t{i}"}}}}]}}\n\n'.encode()
                yield b"data: [DONE]\n\n"

            return 200, events(), "text/event-stream"
        if kind in ("predict", "rawPredict"):  # a Vertex-format container answers both alike
            answer: dict[str, Any] = {"predictions": [f"answer from {deployed_model_id}"]}
        else:
            answer = {"object": "chat.completion", "served_by": deployed_model_id, "kind": kind, "path": subpath}
        return 200, json.dumps(answer).encode(), "application/json"


class FailedStart(Exception):
    """The shape of serving.ServingError: a message plus the model server's last log lines."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail


@pytest.fixture
def serving() -> ServingDouble:
    return ServingDouble()


@pytest.fixture
def emu(tmp_path: Path, serving: ServingDouble) -> Iterator[Emulator]:
    emulator = create_emulator(tmp_path / "state", serving=serving)
    emulator.start()
    _init_sdk(emulator)
    try:
        yield emulator
    finally:
        emulator.stop()


def _init_sdk(emulator: Emulator) -> None:
    _auth(emulator)
    aiplatform.init(
        project=PROJECT,
        location=LOCATION,
        api_endpoint=emulator.url,
        api_transport="rest",
        credentials=as_tester(emulator, PROJECT),
    )


def _gapic(cls: Any, emulator: Emulator) -> Any:
    return cls(
        client_options=ClientOptions(api_endpoint=emulator.url),
        transport="rest",
        credentials=as_tester(emulator, PROJECT),
    )


_AUTH: dict[str, str] = {}  # the tester's Authorization header, set by _init_sdk's callers through _auth()


def _auth(emulator: Emulator) -> None:
    _AUTH.clear()
    _AUTH.update(auth_header(emulator, PROJECT))


def _http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **_AUTH, **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), dict(err.headers)


def _point_at_emulator(endpoint: aiplatform.Endpoint, emu: Emulator) -> None:
    """The SDK's raw and streaming predict call Google's regional host, hard-coded: the endpoint's session is pointed
    at the emulator underneath, so the SDK's own code runs unchanged."""
    import requests
    from google.auth.transport.requests import AuthorizedSession

    class _ToEmulator(requests.adapters.HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            request.url = request.url.replace("https://us-central1-aiplatform.googleapis.com", emu.url)
            return super().send(request, **kwargs)

    endpoint.authorized_session = AuthorizedSession(aiplatform.initializer.global_config.credentials)
    endpoint.authorized_session.mount("https://", _ToEmulator())


def _upload(display_name: str = "tiny-llama", **kwargs: Any) -> aiplatform.Model:
    kwargs.setdefault("artifact_uri", "gs://demo-bucket/models/org/tiny/abc123/")
    kwargs.setdefault("serving_container_image_uri", VLLM_IMAGE)
    return aiplatform.Model.upload(display_name=display_name, **kwargs)


def test_model_upload_versions_aliases_labels_and_filters(emu: Emulator) -> None:
    v1 = _upload(labels={"hf-repo": "org--tiny", "run": "r1"}, serving_container_args=["--max-model-len=512"])
    assert v1.version_id == "1" and v1.version_aliases == ["default"]
    assert v1.gca_resource.artifact_uri == "gs://demo-bucket/models/org/tiny/abc123/"
    assert list(v1.gca_resource.container_spec.args) == ["--max-model-len=512"]

    v2 = _upload(parent_model=v1.resource_name, version_aliases=["candidate"], is_default_version=False)
    v3 = _upload(parent_model=v1.resource_name, version_aliases=["blue"], labels={"hf-repo": "org--tiny"})
    assert v2.resource_name == v3.resource_name == v1.resource_name
    assert (v2.version_id, v3.version_id) == ("2", "3")

    # No version means the default one; versions are addressable by number and by alias.
    assert aiplatform.Model(v1.resource_name).version_id == "3"
    assert aiplatform.Model(v1.resource_name, version="candidate").version_id == "2"
    assert aiplatform.Model(f"{v1.resource_name}@1").version_aliases == []

    other = _upload(display_name="other-model", labels={"hf-repo": "org--other"})
    by_label = aiplatform.Model.list(filter='labels.hf-repo="org--tiny"')
    assert [m.resource_name for m in by_label] == [v1.resource_name]
    by_name = aiplatform.Model.list(filter='display_name="other-model"')
    assert [m.resource_name for m in by_name] == [other.resource_name]

    registry = aiplatform.models.ModelRegistry(v1.resource_name)
    assert sorted(v.version_id for v in registry.list_versions()) == ["1", "2", "3"]
    registry.add_version_aliases(["default", "stable"], version="2")
    assert aiplatform.Model(v1.resource_name).version_id == "2"
    assert set(aiplatform.Model(v1.resource_name, version="stable").version_aliases) == {
        "candidate",
        "default",
        "stable",
    }
    registry.delete_version("1")
    assert sorted(v.version_id for v in registry.list_versions()) == ["2", "3"]
    with pytest.raises(gexc.NotFound):
        aiplatform.Model(v1.resource_name, version="1")


def test_endpoint_deploy_traffic_split_predict_undeploy_and_delete(emu: Emulator, serving: ServingDouble) -> None:
    model = _upload(serving_container_predict_route="/generate", serving_container_health_route="/health")
    blue = _upload(parent_model=model.resource_name, version_aliases=["blue"], is_default_version=False)
    endpoint = aiplatform.Endpoint.create(display_name="llm", labels={"team": "ml"}, endpoint_id="tiny-llm")
    assert endpoint.resource_name == f"{PARENT}/endpoints/tiny-llm"
    assert [e.resource_name for e in aiplatform.Endpoint.list(filter="labels.team=ml")] == [endpoint.resource_name]

    with pytest.raises(gexc.BadRequest, match="no deployed model with traffic"):
        endpoint.predict(instances=[{"prompt": "hi"}])

    endpoint.deploy(model, machine_type="g2-standard-12", accelerator_type="NVIDIA_L4", accelerator_count=1)
    (first,) = endpoint.list_models()
    assert endpoint.traffic_split == {first.id: 100}
    artifact_uri, container_spec, _ = serving.started[first.id]
    assert artifact_uri == model.gca_resource.artifact_uri
    assert container_spec["imageUri"] == VLLM_IMAGE and container_spec["predictRoute"] == "/generate"

    endpoint.deploy(blue, traffic_percentage=20, machine_type="g2-standard-12")
    second = next(dm for dm in endpoint.list_models() if dm.id != first.id)
    assert second.model_version_id == "2"
    assert endpoint.traffic_split == {first.id: 80, second.id: 20}
    assert aiplatform.Model(model.resource_name, version="blue").gca_resource.deployed_models[0].deployed_model_id == (
        second.id
    )

    served = {endpoint.predict(instances=[{"prompt": "hi"}]).deployed_model_id for _ in range(40)}
    assert served == {first.id, second.id}

    # The SDK's raw path reads which model answered from the answer's headers (KeyError without them). Its URL is
    # Google's host, hard-coded: the session is pointed at the emulator underneath, the SDK's code runs unchanged.
    _point_at_emulator(endpoint, emu)
    raw = endpoint.predict(instances=[{"prompt": "hi"}], use_raw_predict=True)
    assert raw.deployed_model_id in {first.id, second.id} and raw.model_resource_name == model.resource_name
    assert raw.model_version_id in {"1", "2", "3"}

    # ChatCompletions is a v1beta1 method only.
    status, body, _ = _http("POST", f"{emu.url}/v1/{endpoint.resource_name}/chat/completions", {"messages": []})
    assert status == 404
    status, body, headers = _http(
        "POST", f"{emu.url}/v1beta1/{endpoint.resource_name}/chat/completions", {"messages": []}
    )
    assert status == 200 and body["kind"] == "chat" and headers["X-Vertex-AI-Deployed-Model-Id"] == body["served_by"]

    # Shift all traffic to the blue version; a shared endpoint then has no route to the old one.
    endpoint.update(traffic_split={first.id: 0, second.id: 100})
    assert {endpoint.predict(instances=[{}]).deployed_model_id for _ in range(10)} == {second.id}
    invoke = f"{emu.url}/v1/{endpoint.resource_name}/deployedModels/{first.id}/invoke/v1/chat/completions"
    status, body, _ = _http("POST", invoke, {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "only supported on dedicated endpoints" in body["error"]["message"]

    with pytest.raises(gexc.BadRequest, match="has deployed or being deployed"):
        endpoint.delete()
    with pytest.raises(gexc.BadRequest, match="deployed"):
        model.delete()

    endpoint.undeploy(first.id)
    assert first.id in serving.stopped
    assert endpoint.traffic_split == {second.id: 100}
    endpoint.delete(force=True)
    assert second.id in serving.stopped
    with pytest.raises(gexc.NotFound):
        aiplatform.Endpoint(endpoint.resource_name).list_models()  # Endpoint() alone fetches lazily
    model.delete()
    assert aiplatform.Model.list() == []


def test_undeploy_with_traffic_needs_a_new_split(emu: Emulator) -> None:
    model = _upload()
    client = _gapic(aiplatform_v1.EndpointServiceClient, emu)
    endpoint = client.create_endpoint(parent=PARENT, endpoint={"display_name": "e"}).result()
    deployed = {"model": f"{model.resource_name}@1", "dedicated_resources": {"machine_spec": {"machine_type": "n1"}}}
    a = client.deploy_model(endpoint=endpoint.name, deployed_model=deployed).result().deployed_model.id
    b = (
        client.deploy_model(endpoint=endpoint.name, deployed_model=deployed, traffic_split={a: 50, "0": 50})
        .result()
        .deployed_model.id
    )
    assert dict(client.get_endpoint(name=endpoint.name).traffic_split) == {a: 50, b: 50}

    with pytest.raises(gexc.BadRequest, match="add up to 100"):
        client.deploy_model(endpoint=endpoint.name, deployed_model=deployed, traffic_split={a: 50, "0": 10})
    with pytest.raises(gexc.BadRequest, match="still receives traffic"):
        client.undeploy_model(endpoint=endpoint.name, deployed_model_id=a).result()
    client.undeploy_model(endpoint=endpoint.name, deployed_model_id=a, traffic_split={b: 100}).result()
    assert dict(client.get_endpoint(name=endpoint.name).traffic_split) == {b: 100}

    mutated = client.mutate_deployed_model(
        endpoint=endpoint.name,
        deployed_model={"id": b, "dedicated_resources": {"min_replica_count": 1, "max_replica_count": 3}},
        update_mask={"paths": ["dedicated_resources.max_replica_count"]},
    ).result()
    assert mutated.deployed_model.dedicated_resources.max_replica_count == 3
    assert mutated.deployed_model.dedicated_resources.machine_spec.machine_type == "n1"

    client.undeploy_model(endpoint=endpoint.name, deployed_model_id=b).result()
    assert not client.get_endpoint(name=endpoint.name).traffic_split


@pytest.mark.slow
def test_deploy_operation_is_polled_until_the_model_server_is_ready(tmp_path: Path) -> None:
    serving = ServingDouble(start_delay=0.6)
    emulator = create_emulator(tmp_path, serving=serving)
    emulator.start()
    try:
        _init_sdk(emulator)
        model = _upload()
        endpoint = aiplatform.Endpoint.create(display_name="slow", dedicated_endpoint_enabled=True)
        assert endpoint.gca_resource.dedicated_endpoint_dns.endswith(".prediction.vertexai.goog")
        endpoint.deploy(model, machine_type="g2-standard-12")
        op_polls = [c for c in emulator.calls if c.startswith("GET ") and "/operations/" in c]
        assert op_polls, "the SDK should have polled the deploy operation"
        assert len(endpoint.list_models()) == 1

        # The longrunning surface a raw REST client uses: :wait, list, :cancel.
        client = _gapic(aiplatform_v1.EndpointServiceClient, emulator)
        deployed = {"model": model.resource_name, "dedicated_resources": {"machine_spec": {"machine_type": "n1"}}}
        pending = client.deploy_model(endpoint=endpoint.resource_name, deployed_model=deployed)
        assert not pending.done()
        status, waited, _ = _http("POST", f"{emulator.url}/v1/{pending.operation.name}:wait", {"timeout": "10s"})
        assert status == 200 and waited["done"] and "DeployModelResponse" in waited["response"]["@type"]
        listed = _http("GET", f"{emulator.url}/v1/{endpoint.resource_name}/operations")[1]["operations"]
        assert pending.operation.name in [op["name"] for op in listed]

        cancelled = client.deploy_model(endpoint=endpoint.resource_name, deployed_model=deployed)
        # Raw POST: api-core's REST operations client cannot send CancelOperation with aiplatform's http options.
        assert _http("POST", f"{emulator.url}/v1/{cancelled.operation.name}:cancel", {})[0] == 200
        with pytest.raises(gexc.Cancelled):
            cancelled.result()
        assert len(endpoint.list_models()) == 2
    finally:
        emulator.stop()
    assert serving.started == {}  # stop() stops every model server


def test_failed_model_server_start_fails_the_operation_with_the_log_tail(tmp_path: Path) -> None:
    failure = FailedStart("model server exited with code 1", ["Traceback ...", "OSError: no config.json"])
    emulator = create_emulator(tmp_path, serving=ServingDouble(fail_with=failure))
    emulator.start()
    try:
        _init_sdk(emulator)
        endpoint = aiplatform.Endpoint.create(display_name="e")
        with pytest.raises(gexc.FailedPrecondition, match="(?s)exited with code 1.*no config.json"):
            endpoint.deploy(_upload(), machine_type="n1-standard-4")
        assert aiplatform.Endpoint(endpoint.resource_name).list_models() == []
    finally:
        emulator.stop()


def test_unknown_or_mistyped_fields_answer_400_invalid_argument(emu: Emulator) -> None:
    url = f"{emu.url}/v1/{PARENT}/models:upload"
    for bad in (
        {"model": {"displayName": "m", "artifactUri": "gs://b/m", "notAField": 1}},
        {"model": {"displayName": "m", "labels": ["not", "a", "map"]}},
        b"{not json",
    ):
        data = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        request = urllib.request.Request(url, data=data, headers=_AUTH)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        payload = json.loads(caught.value.read())
        error = gexc.from_http_status(caught.value.code, payload["error"]["message"])
        assert isinstance(error, gexc.BadRequest)
        assert payload["error"]["status"] == "INVALID_ARGUMENT" and payload["error"]["code"] == 400
    assert _http("GET", f"{emu.url}/v1/{PARENT}/models/404")[0] == 404
    assert _http("GET", f"{emu.url}/v1/{PARENT}/nothingHere")[1]["error"]["status"] == "NOT_FOUND"


def _pipeline_job(display_name: str) -> aiplatform_v1.PipelineJob:
    spec = struct_pb2.Struct()
    spec.update({"pipelineInfo": {"name": "llm-deploy"}, "root": {"dag": {"tasks": {}}}, "schemaVersion": "2.1.0"})
    return aiplatform_v1.PipelineJob(
        display_name=display_name,
        pipeline_spec=spec,
        labels={"vlp": "deploy"},
        runtime_config=aiplatform_v1.PipelineJob.RuntimeConfig(
            gcs_output_directory="gs://demo-bucket/pipeline-root",
            parameter_values={"model_id": struct_pb2.Value(string_value="org/tiny")},
        ),
    )


def test_schedule_create_is_parsed_and_stored(emu: Emulator) -> None:
    client = _gapic(aiplatform_v1.ScheduleServiceClient, emu)
    request = aiplatform_v1.CreatePipelineJobRequest(parent=PARENT, pipeline_job=_pipeline_job("weekly"))
    created = client.create_schedule(
        parent=PARENT,
        schedule=aiplatform_v1.Schedule(
            display_name="weekly-redeploy",
            cron="TZ=UTC 0 3 * * 1",
            max_concurrent_run_count=1,
            create_pipeline_job_request=request,
            start_time={"seconds": 1_900_000_000},
        ),
    )
    assert created.state == aiplatform_v1.Schedule.State.ACTIVE
    assert created.create_pipeline_job_request.pipeline_job.pipeline_spec["pipelineInfo"]["name"] == "llm-deploy"
    assert created.create_pipeline_job_request.pipeline_job.runtime_config.parameter_values["model_id"] == "org/tiny"
    assert [s.name for s in client.list_schedules(parent=PARENT)] == [created.name]

    client.pause_schedule(name=created.name)
    assert client.get_schedule(name=created.name).state == aiplatform_v1.Schedule.State.PAUSED
    client.resume_schedule(name=created.name)
    assert client.get_schedule(name=created.name).state == aiplatform_v1.Schedule.State.ACTIVE
    with pytest.raises(gexc.BadRequest, match="cron"):
        client.create_schedule(
            parent=PARENT,
            schedule={
                "display_name": "bad",
                "cron": "every monday",
                "max_concurrent_run_count": 1,
                "create_pipeline_job_request": request,
            },
        )
    client.delete_schedule(name=created.name).result()
    with pytest.raises(gexc.NotFound):
        client.get_schedule(name=created.name)


def _wait_for_job(client: Any, name: str) -> aiplatform_v1.PipelineJob:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = client.get_pipeline_job(name=name)
        if job.state not in (
            aiplatform_v1.PipelineState.PIPELINE_STATE_PENDING,
            aiplatform_v1.PipelineState.PIPELINE_STATE_RUNNING,
        ):
            return job
        time.sleep(0.2)
    raise AssertionError(f"pipeline job {name} did not finish")


def test_pipeline_jobs_run_to_success_or_to_the_injected_failure(emu: Emulator) -> None:
    client = _gapic(aiplatform_v1.PipelineServiceClient, emu)
    job = client.create_pipeline_job(parent=PARENT, pipeline_job=_pipeline_job("run-1"), pipeline_job_id="run-1")
    assert job.name == f"{PARENT}/pipelineJobs/run-1"
    assert job.state == aiplatform_v1.PipelineState.PIPELINE_STATE_PENDING
    assert _wait_for_job(client, job.name).state == aiplatform_v1.PipelineState.PIPELINE_STATE_SUCCEEDED

    emu.faults.add("pipeline-fail")
    failed = client.create_pipeline_job(parent=PARENT, pipeline_job=_pipeline_job("run-2"))
    finished = _wait_for_job(client, failed.name)
    assert finished.state == aiplatform_v1.PipelineState.PIPELINE_STATE_FAILED
    assert "pipeline-fail" in finished.error.message
    assert len(list(client.list_pipeline_jobs(request={"parent": PARENT, "filter": 'display_name="run-2"'}))) == 1
    client.delete_pipeline_job(name=failed.name).result()
    assert [j.display_name for j in client.list_pipeline_jobs(parent=PARENT)] == ["run-1"]


def test_state_survives_a_restart_and_deployed_models_are_served_again(tmp_path: Path) -> None:
    first = create_emulator(tmp_path, serving=ServingDouble())
    first.start()
    _init_sdk(first)
    model = _upload(labels={"run": "r1"})
    endpoint = aiplatform.Endpoint.create(display_name="persist")
    endpoint.deploy(model, machine_type="n1-standard-4")
    (deployed,) = endpoint.list_models()
    first.stop()

    serving = ServingDouble()
    second = create_emulator(tmp_path, serving=serving)
    second.start()
    try:
        _init_sdk(second)
        assert aiplatform.Model(model.resource_name).gca_resource.labels == {"run": "r1"}
        restored = aiplatform.Endpoint(endpoint.resource_name)
        assert restored.traffic_split == {deployed.id: 100}
        deadline = time.monotonic() + 5
        while deployed.id not in serving.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restored.predict(instances=[{}]).deployed_model_id == deployed.id
        # New ids do not collide with restored ones.
        assert _upload(display_name="next").resource_name != model.resource_name
    finally:
        second.stop()

    broken = create_emulator(tmp_path, serving=ServingDouble(fail_with=FailedStart("weights gone", [])))
    broken.start()
    try:
        _init_sdk(broken)
        url = f"{broken.url}/v1/{endpoint.resource_name}:predict"
        deadline = time.monotonic() + 5
        status, body, _ = _http("POST", url, {"instances": [{}]})
        while "still starting" in body["error"]["message"] and time.monotonic() < deadline:
            time.sleep(0.05)
            status, body, _ = _http("POST", url, {"instances": [{}]})
        assert status == 503 and "weights gone" in body["error"]["message"]
        assert aiplatform.Endpoint(endpoint.resource_name).list_models()[0].id == deployed.id
    finally:
        broken.stop()


def test_fault_upload_error(emu: Emulator) -> None:
    emu.faults.add("upload-error")
    with pytest.raises(gexc.InternalServerError, match="broken-model"):
        _upload(display_name="broken-model")
    assert aiplatform.Model.list() == []


def test_fault_deploy_error_fails_without_starting_a_server(emu: Emulator, serving: ServingDouble) -> None:
    endpoint = aiplatform.Endpoint.create(display_name="e")
    model = _upload()
    emu.faults.add("deploy-error")
    with pytest.raises(gexc.FailedPrecondition, match="Model server never became ready"):
        endpoint.deploy(model, machine_type="n1-standard-4")
    assert serving.start_calls == []
    assert aiplatform.Endpoint(endpoint.resource_name).list_models() == []


@pytest.mark.slow
def test_fault_deploy_timeout(emu: Emulator, serving: ServingDouble) -> None:
    endpoint = aiplatform.Endpoint.create(display_name="e")
    model = _upload()
    emu.faults.add("deploy-timeout")
    started = time.monotonic()
    with pytest.raises(gexc.DeadlineExceeded, match=r"Deployment of \d+ timed out after 2 s"):
        endpoint.deploy(model, machine_type="n1-standard-4")
    assert time.monotonic() - started >= 2
    assert serving.start_calls == [] and aiplatform.Endpoint(endpoint.resource_name).list_models() == []


def test_stream_raw_predict_passes_each_chunk_on_as_the_model_server_sends_it(emu: Emulator) -> None:
    """Issue 35: :streamRawPredict (and every streaming route: the same forwarding) hands each event on when the model
    server sends it, through the SDK's own Endpoint.stream_raw_predict; it used to arrive in one burst at the end, so
    a local benchmark's time to first token was its total time."""
    endpoint = aiplatform.Endpoint.create(display_name="streams")
    endpoint.deploy(_upload(), machine_type="n1-standard-4")
    _point_at_emulator(endpoint, emu)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    started, arrivals = time.monotonic(), []
    for line in endpoint.stream_raw_predict(body=body, headers={"Content-Type": "application/json"}):
        if line:
            arrivals.append((time.monotonic() - started, line))
    assert [line for _, line in arrivals][-1] == b"data: [DONE]" and len(arrivals) == 5, arrivals
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last >= 3 * STREAM_GAP_S  # the model server's pace
    assert first < last - 2 * STREAM_GAP_S, arrivals  # the first chunk came long before the last
    # :serverStreamingPredict is Vertex's LLM streaming (Tensors): a custom-container endpoint refuses it, naming the
    # routes that stream from one (contract A38), where it used to answer 404 as a route the emulator lacked.
    client = _gapic(aiplatform_v1.PredictionServiceClient, emu)
    request = aiplatform_v1.StreamingPredictRequest(
        endpoint=endpoint.resource_name, inputs=[aiplatform_v1.Tensor(string_val=["hi"])]
    )
    with pytest.raises(gexc.BadRequest, match=":streamRawPredict") as refused:
        list(client.server_streaming_predict(request=request))
    assert "serverStreamingPredict streams Vertex AI's own LLMs" in str(refused.value)
    status, answer, _ = _http("POST", f"{emu.url}/v1/{endpoint.resource_name}:serverStreamingPredict", {"input": []})
    assert status == 400 and "input" in answer["error"]["message"]  # the request is parsed: unknown field


def test_fault_predict_429_throttles_the_first_two_calls(emu: Emulator) -> None:
    emu.faults.add("predict-429")
    endpoint = aiplatform.Endpoint.create(display_name="e")
    endpoint.deploy(_upload(), machine_type="n1-standard-4")
    url = f"{emu.url}/v1/{endpoint.resource_name}:predict"
    codes = [_http("POST", url, {"instances": [{}]})[0] for _ in range(2)]
    assert codes == [429, 429]
    assert endpoint.predict(instances=[{}]).predictions


def test_control_routes(emu: Emulator) -> None:
    key = plumbing_headers(emu)
    assert _http("GET", f"{emu.url}/healthz")[0] == 200
    _upload()
    assert _http("GET", f"{emu.url}/_emulator/calls", headers=key)[1]["calls"][0] == f"POST /v1/{PARENT}/models:upload"
    _http("POST", f"{emu.url}/_emulator/calls:clear", {}, headers=key)
    assert emu.calls == []
    faults = _http("POST", f"{emu.url}/_emulator/faults", {"faults": ["predict-429"]}, headers=key)[1]
    assert faults == {"faults": ["predict-429"]}
    assert emu.faults == {"predict-429"}
    state = _http("GET", f"{emu.url}/_emulator/state", headers=key)[1]
    assert [m["versionId"] for m in state["models"]] == ["1"] and state["endpoints"] == []
    assert emu.calls == []  # control routes are not API calls


def test_plumbing_routes_refuse_a_caller_without_the_stacks_key(emu: Emulator) -> None:
    """Minting a token, granting a role, setting quotas or faults, reading the state: any local user can reach the
    loopback port, so these need the key only the stack's owner can read (0600), even with a valid OAuth token."""
    path = plumbing.key_path(emu.state_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    grant = {"resource": f"projects/{PROJECT}", "role": "roles/owner", "member": "user:mallory@example.com"}
    attempts = [
        ("POST", "/_emulator/token", {"principal": f"vlp-admin@{PROJECT}.iam.gserviceaccount.com"}),
        ("POST", "/_emulator/iam:grant", grant),
        ("POST", "/_emulator/quotas", {"quotas": {}, "default": 1000}),
        ("POST", "/_emulator/secrets", {"name": "hf-token", "value": "hf_x"}),
        ("POST", "/_emulator/faults", {"faults": ["smoke-fail"]}),
        ("GET", "/_emulator/state", None),
    ]
    for wrong in ({}, {plumbing.HEADER: "not-the-key"}, {plumbing.HEADER: ""}):
        for method, route, body in attempts:
            code, answer, _ = _http(method, f"{emu.url}{route}", body, headers=wrong)
            assert code == 403, (route, wrong, answer)
            assert str(path) in answer["error"]["message"] and answer["error"]["status"] == "PERMISSION_DENIED"
    assert "user:mallory@example.com" not in json.dumps(emu.policy_of(f"projects/{PROJECT}"))
    assert emu.faults == set()
    # The same key opens them, and it survives a restart of the emulator on the same state dir.
    assert _http("POST", f"{emu.url}/_emulator/token", attempts[0][2], headers=plumbing_headers(emu))[0] == 200
    assert plumbing.ensure_key(emu.state_dir) == emu.plumbing_key


def test_cli_prints_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "vlp.pipelines.local.emulator", "--state-dir", str(tmp_path), "--fault", "predict-429"],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
        text=True,
    )
    try:
        line = _readline(process, timeout=30)
        assert line.startswith("READY http://127.0.0.1:")
        url = line.split()[1]
        key = {plumbing.HEADER: plumbing.read_key(tmp_path)}
        assert _http("GET", f"{url}/_emulator/faults", headers=key)[1] == {"faults": ["predict-429"]}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


def _readline(process: subprocess.Popen, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines, "the emulator did not print its READY line"
    return lines[0].strip()


@pytest.mark.slow
def test_real_model_server_answers_through_the_emulator(tmp_path: Path, fake_gcs: Any, tiny_model_dir: Path) -> None:
    """End to end with the real peers: weights in fake-gcs-server, `transformers serve` behind the endpoint."""
    from google.cloud import storage

    client = storage.Client(
        project="vlp-local", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    )
    bucket = client.create_bucket(f"api-e2e-{os.getpid()}")
    for path in sorted(p for p in tiny_model_dir.iterdir() if p.is_file()):
        bucket.blob(f"models/acme/tiny/rev1/{path.name}").upload_from_filename(str(path))

    emulator = create_emulator(tmp_path / "state", storage_endpoint=fake_gcs.url)
    emulator.start()
    try:
        _init_sdk(emulator)
        let_vertex_read(emulator, bucket.name, PROJECT)
        model = _upload(artifact_uri=f"gs://{bucket.name}/models/acme/tiny/rev1/")
        endpoint = aiplatform.Endpoint.create(display_name="tiny")
        endpoint.deploy(model, machine_type="n1-standard-4")
        (deployed,) = endpoint.list_models()
        chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        status, body, headers = _http("POST", f"{emulator.url}/v1beta1/{endpoint.resource_name}/chat/completions", chat)
        assert status == 200, body
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert headers["X-Vertex-AI-Deployed-Model-Id"] == deployed.id

        # A model the image's engine does not serve: the 2024 Model Garden image (vLLM 0.6.2) on a Qwen3 checkout
        # stops at start with vLLM's own error, the deploy fails, and the serving model keeps all traffic.
        qwen3 = json.loads((tiny_model_dir / "config.json").read_text())
        qwen3.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
        for path in sorted(p for p in tiny_model_dir.iterdir() if p.is_file()):
            data = json.dumps(qwen3).encode() if path.name == "config.json" else path.read_bytes()
            bucket.blob(f"models/acme/qwen3/rev1/{path.name}").upload_from_string(data)
        old_vllm = images.by_id("model-garden-vllm-20241001").image
        unsupported = _upload(
            display_name="qwen3-on-2024-vllm",
            serving_container_image_uri=old_vllm,
            serving_container_args=["python", "-m", "vllm.entrypoints.api_server", "--model=gs://x"],
            artifact_uri=f"gs://{bucket.name}/models/acme/qwen3/rev1/",
        )
        with pytest.raises(gexc.FailedPrecondition) as failed:
            endpoint.deploy(unsupported, machine_type="n1-standard-4", traffic_percentage=0)
        assert "Model architectures ['Qwen3ForCausalLM'] are not supported for now" in str(failed.value)
        endpoint = aiplatform.Endpoint(endpoint.resource_name)
        assert [m.id for m in endpoint.list_models()] == [deployed.id]
        assert endpoint.traffic_split == {deployed.id: 100}
        endpoint.delete(force=True)
        assert emulator.serving.known_ids() == []
    finally:
        emulator.stop()


def _host_http(url: str, host: str, body: Any) -> tuple[int, dict[str, Any]]:
    """A POST to the emulator as if to `host` (the Host header is what tells Vertex's front ends apart)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", parts.path, body=data, headers={"Host": host, "Content-Type": "application/json", **_AUTH})
    response = conn.getresponse()
    out = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, out


def _spec(**fields: Any) -> dict[str, Any]:
    return {"image_uri": VLLM_IMAGE, "args": ["python", "-m", "vllm.entrypoints.api_server"], **fields}


def test_container_spec_rules_refuse_what_vertex_refuses(emu: Emulator) -> None:
    models = _gapic(aiplatform_v1.ModelServiceClient, emu)

    def upload(**spec: Any) -> Any:
        model = {"display_name": "m", "container_spec": _spec(**spec)}
        return models.upload_model(parent=PARENT, model=model).result()

    with pytest.raises(gexc.BadRequest, match="Only one of container_spec.predict_route or"):
        upload(predict_route="/generate", invoke_route_prefix="/*")
    with pytest.raises(gexc.BadRequest, match='"/\\*" is the only supported value'):
        upload(invoke_route_prefix="/v1/*")
    probe = {"http_get": {"path": "/ping", "port": 8080}, "period_seconds": 30, "timeout_seconds": 10}
    with pytest.raises(gexc.BadRequest, match="period_seconds \\(30\\) must be less than timeout_seconds"):
        upload(health_probe=probe)
    with pytest.raises(gexc.BadRequest, match="over the 2 hour limit"):
        upload(deployment_timeout={"seconds": 3 * 3600})
    assert upload(invoke_route_prefix="/*", health_route="/ping", health_probe={**probe, "timeout_seconds": 31}).model


def test_invoke_models_deploy_to_dedicated_endpoints_and_answer_on_their_dns_only(
    emu: Emulator, serving: ServingDouble
) -> None:
    models = _gapic(aiplatform_v1.ModelServiceClient, emu)
    endpoints = _gapic(aiplatform_v1.EndpointServiceClient, emu)
    spec = _spec(invoke_route_prefix="/*", health_route="/ping")
    invoke_model = models.upload_model(parent=PARENT, model={"display_name": "i", "container_spec": spec}).result()
    predict_model = models.upload_model(
        parent=PARENT, model={"display_name": "p", "container_spec": _spec(predict_route="/generate")}
    ).result()
    machine = {"machine_spec": {"machine_type": "g2-standard-12"}}
    shared = endpoints.create_endpoint(parent=PARENT, endpoint={"display_name": "shared"}).result()
    with pytest.raises(gexc.BadRequest, match="can only be deployed to a dedicated endpoint"):
        endpoints.deploy_model(
            endpoint=shared.name, deployed_model={"model": invoke_model.model, "dedicated_resources": machine}
        ).result()
    dedicated = endpoints.create_endpoint(
        parent=PARENT, endpoint={"display_name": "ded", "dedicated_endpoint_enabled": True}
    ).result()
    dns = dedicated.dedicated_endpoint_dns
    assert dns.endswith(".prediction.vertexai.goog")
    blue = (
        endpoints.deploy_model(
            endpoint=dedicated.name, deployed_model={"model": invoke_model.model, "dedicated_resources": machine}
        )
        .result()
        .deployed_model.id
    )
    green = (
        endpoints.deploy_model(
            endpoint=dedicated.name,
            deployed_model={"model": invoke_model.model, "dedicated_resources": machine},
            traffic_split={"0": 0, blue: 100},
        )
        .result()
        .deployed_model.id
    )
    one = f"{emu.url}/v1/{dedicated.name}/deployedModels/{green}/invoke/generate"
    # The per-model route reaches the model at 0% traffic, on the endpoint's own DNS only.
    status, body = _host_http(one, dns, {"instances": [{}]})
    assert status == 200 and serving.forwarded[-1][0] == green and serving.forwarded[-1][3] == "/generate"
    status, body = _host_http(one, f"{LOCATION}-aiplatform.googleapis.com", {"instances": [{}]})
    assert status == 400 and "dedicated DNS" in body["error"]["message"]
    # The container serves only its own routes; predict is off for an invoke model.
    status, body = _host_http(f"{emu.url}/v1/{dedicated.name}/deployedModels/{green}/invoke/v1/models", dns, {})
    assert status == 404 and "does not serve /v1/models" in body["error"]["message"]
    status, body = _host_http(f"{emu.url}/v1/{dedicated.name}:predict", dns, {"instances": [{}]})
    assert status == 400 and "serves invoke routes only" in body["error"]["message"]
    status, body = _host_http(f"{emu.url}/v1/{dedicated.name}/invoke/generate", dns, {"instances": [{}]})
    assert status == 200 and serving.forwarded[-1][0] == blue  # the endpoint-level route follows the split
    # A shared endpoint does not answer on a dedicated DNS name; a model without the prefix has no invoke.
    endpoints.deploy_model(
        endpoint=shared.name, deployed_model={"model": predict_model.model, "dedicated_resources": machine}
    ).result()
    status, _ = _host_http(f"{emu.url}/v1/{shared.name}:predict", dns, {"instances": [{}]})
    assert status == 404
    status, _ = _host_http(
        f"{emu.url}/v1/{shared.name}:predict", f"{LOCATION}-aiplatform.googleapis.com", {"instances": [{}]}
    )
    assert status == 200
    # 1.5 MB request bodies on a shared endpoint, 10 MB on a dedicated one.
    big = json.dumps({"instances": [{"prompt": "x" * 1_600_000}]}).encode()
    status, body = _host_http(f"{emu.url}/v1/{shared.name}:predict", f"{LOCATION}-aiplatform.googleapis.com", big)
    assert status == 400 and "exceeds the limit of 1500000 bytes" in body["error"]["message"]
    status, _ = _host_http(f"{emu.url}/v1/{dedicated.name}/invoke/generate", dns, big)
    assert status == 200
    huge = json.dumps({"instances": [{"prompt": "x" * 10_000_001}]}).encode()
    status, body = _host_http(f"{emu.url}/v1/{dedicated.name}/invoke/generate", dns, huge)
    assert status == 400 and "exceeds the limit of 10000000 bytes" in body["error"]["message"]


MULTI_HOST_MACHINE = {
    "machine_spec": {
        "machine_type": "a3-highgpu-8g",
        "accelerator_type": "NVIDIA_H100_80GB",
        "accelerator_count": 8,
        "multihost_gpu_node_count": 2,
    }
}


def _multi_host_setup(emu: Emulator, *, launcher: bool = True, dedicated: bool = True) -> tuple[Any, Any, Any]:
    """A Model Garden vLLM model (the Ray launcher first in its args, as the multi-host page uploads it), an endpoint,
    and a v1beta1 endpoint client."""
    from google.cloud import aiplatform_v1beta1

    args = ["python", "-m", "vllm.entrypoints.api_server"]
    spec = _spec(predict_route="/generate", args=(["/vllm-workspace/ray_launcher.sh"] if launcher else []) + args)
    models = _gapic(aiplatform_v1.ModelServiceClient, emu)
    model = models.upload_model(parent=PARENT, model={"display_name": "mh", "container_spec": spec}).result()
    endpoints = _gapic(aiplatform_v1.EndpointServiceClient, emu)
    endpoint = endpoints.create_endpoint(
        parent=PARENT, endpoint={"display_name": "mh", "dedicated_endpoint_enabled": dedicated}
    ).result()
    return model, endpoint, _gapic(aiplatform_v1beta1.EndpointServiceClient, emu)


def test_v1beta1_deploy_takes_multihost_nodes_and_logs_only_when_asked(
    emu: Emulator, serving: ServingDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, endpoint, beta = _multi_host_setup(emu)
    machine = MULTI_HOST_MACHINE
    quiet = (
        beta.deploy_model(endpoint=endpoint.name, deployed_model={"model": model.model, "dedicated_resources": machine})
        .result()
        .deployed_model.id
    )
    logged = (
        beta.deploy_model(
            endpoint=endpoint.name,
            deployed_model={"model": model.model, "dedicated_resources": machine, "enable_container_logging": True},
            traffic_split={"0": 0, quiet: 100},
        )
        .result()
        .deployed_model.id
    )
    assert emu._multihost == {quiet: 2, logged: 2}
    assert quiet in emu._logging_off and logged not in emu._logging_off
    # v1 has no multihost_gpu_node_count; v1beta1 shows it, and quota usage counts both nodes of each replica.
    (listed,) = beta.list_endpoints(parent=PARENT)
    assert {dm.dedicated_resources.machine_spec.multihost_gpu_node_count for dm in listed.deployed_models} == {2}
    from vlp.components.vertex.quota import serving_usage

    run_as(monkeypatch, emu.url, TESTER)

    usage = serving_usage(PROJECT, LOCATION, {"a3-highgpu-8g": 208}, emu.url)
    # replicas x nodes x GPUs per node (the page: two a3-highgpu-8g "for a total of 16 H100 GPUs" per replica).
    assert usage[("NVIDIA_H100_80GB", False)] == 2 * 2 * 8 and usage[("CPU", False)] == 2 * 2 * 208


def test_a_multi_host_deploy_outside_the_documented_form_is_refused(emu: Emulator) -> None:
    """V-MH-*: multi-host only on v1beta1, only as vertex-ai/docs/predictions/use-multihost-gpu does it: the Ray
    launcher first in the model's args, a dedicated endpoint, N >= 2 x a3-highgpu-8g with 8 x H100 per node."""
    model, endpoint, beta = _multi_host_setup(emu)

    def deploy(client: Any, where: Any = endpoint, machine: dict[str, Any] = MULTI_HOST_MACHINE, m: Any = model) -> Any:
        return client.deploy_model(
            endpoint=where.name, deployed_model={"model": m.model, "dedicated_resources": machine}
        ).result()

    # v1's MachineSpec has no field 6: a REST body naming it is an unknown field.
    body = {"deployedModel": {"model": model.model, "dedicatedResources": {"machineSpec": {"machineType": "a3-highgpu-8g",
            "acceleratorType": "NVIDIA_H100_80GB", "acceleratorCount": 8, "multihostGpuNodeCount": 2}}}}  # fmt: skip
    status, answer = _host_http(
        f"{emu.url}/v1/{endpoint.name}:deployModel", f"{LOCATION}-aiplatform.googleapis.com", body
    )
    assert status == 400 and 'Unknown name "multihostGpuNodeCount"' in answer["error"]["message"]
    # Another machine, or GPUs per node other than 8: outside the page's form.
    for spec in (
        {"machine_type": "a3-megagpu-8g", "accelerator_type": "NVIDIA_H100_MEGA_80GB", "accelerator_count": 8},
        {"machine_type": "a3-ultragpu-8g", "accelerator_type": "NVIDIA_H200_141GB", "accelerator_count": 8},
        {"machine_type": "a3-highgpu-4g", "accelerator_type": "NVIDIA_H100_80GB", "accelerator_count": 4},
    ):
        machine = {"machine_spec": {**spec, "multihost_gpu_node_count": 2}}
        with pytest.raises(gexc.BadRequest, match="outside the documented multi-host GPU deployment"):
            deploy(beta, machine=machine)
    # No launcher first in the model's args.
    plain, _, _ = _multi_host_setup(emu, launcher=False)
    with pytest.raises(gexc.BadRequest, match="must start with /vllm-workspace/ray_launcher.sh"):
        deploy(beta, m=plain)
    # A shared endpoint.
    _, shared, _ = _multi_host_setup(emu, dedicated=False)
    with pytest.raises(gexc.BadRequest, match="is not a dedicated endpoint"):
        deploy(beta, where=shared)
    # One node is no multi-host deploy: the same model deploys on v1beta1 with node count 1 (the notebook's H200 case).
    single = {"machine_spec": {**MULTI_HOST_MACHINE["machine_spec"], "multihost_gpu_node_count": 1}}
    assert deploy(beta, machine=single).deployed_model.id
    assert emu._multihost == {}


@pytest.mark.slow
def test_cleanup_waits_for_a_deploy_still_running_and_removes_what_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy the step gave up on keeps going on Vertex; the exit handler waits for it, then removes it."""
    from vlp.components.vertex.teardown import remove_run_resources

    serving = ServingDouble(start_delay=30.0)
    emulator = create_emulator(tmp_path / "state", serving=serving)
    emulator.start()
    run_as(monkeypatch, emulator.url, TESTER)
    try:
        models = _gapic(aiplatform_v1.ModelServiceClient, emulator)
        endpoints = _gapic(aiplatform_v1.EndpointServiceClient, emulator)
        # Another team's slow deploy in the same region: not the run's to wait for.
        theirs = models.upload_model(
            parent=PARENT, model={"display_name": "theirs", "container_spec": _spec(predict_route="/g")}
        ).result()
        other = endpoints.create_endpoint(parent=PARENT, endpoint={"display_name": "theirs"}).result()
        machine = {"machine_spec": {"machine_type": "g2-standard-12"}}
        their_deploy = endpoints.deploy_model(
            endpoint=other.name, deployed_model={"model": theirs.model, "dedicated_resources": machine}
        )
        serving.start_delay = 3.0
        labels = {"vlp-deployment": "late", "vlp-run": "run-late"}
        model = models.upload_model(
            parent=PARENT, model={"display_name": "late", "labels": labels, "container_spec": _spec(predict_route="/g")}
        ).result()
        endpoint = endpoints.create_endpoint(
            parent=PARENT, endpoint={"display_name": "late", "labels": labels}
        ).result()
        machine = {"machine_spec": {"machine_type": "g2-standard-12"}}
        operation = endpoints.deploy_model(
            endpoint=endpoint.name, deployed_model={"model": model.model, "dedicated_resources": machine}
        )
        assert not operation.done()  # the step stops waiting here
        removed = remove_run_resources(PROJECT, [LOCATION], "late", "run-late", emulator.url, pending_wait_s=60)
        assert len(removed.undeployed) == 1 and endpoint.name in removed.deleted
        assert [e["name"] for e in emulator.snapshot()["endpoints"]] == [other.name]  # theirs stays
        # It returned without waiting for the other team's deploy (30 s), which is still running.
        assert not their_deploy.done()
    finally:
        emulator.stop()


def test_artifacts_must_be_in_a_bucket_of_the_models_region(tmp_path: Path, fake_gcs: Any) -> None:
    from google.cloud import storage

    gcs = storage.Client(
        project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": fake_gcs.url}
    )
    bucket = gcs.create_bucket("weights-region")
    assert bucket.location == "US-CENTRAL1"  # fake-gcs-server puts every bucket there
    emulator = create_emulator(tmp_path / "state", serving=ServingDouble(), storage_endpoint=fake_gcs.url)
    emulator.start()
    try:
        let_vertex_read(emulator, "weights-region", PROJECT)
        models = _gapic(aiplatform_v1.ModelServiceClient, emulator)
        model = {
            "artifact_uri": "gs://weights-region/m",
            "container_spec": {"image_uri": "us-docker.pkg.dev/acme/serving/tgi:1"},
        }
        with pytest.raises(gexc.BadRequest, match="same region"):
            models.upload_model(
                parent=f"projects/{PROJECT}/locations/europe-west4", model={"display_name": "eu", **model}
            ).result()
        assert models.upload_model(parent=PARENT, model={"display_name": "us", **model}).result().model
    finally:
        emulator.stop()


def test_a_damaged_state_file_is_named_with_the_way_out(tmp_path: Path) -> None:
    """A state file cut short (a full disk, a kill mid-write of another tool): the emulator says which file and
    that `vlp local reset` starts afresh, instead of a JSON traceback."""
    from vlp.pipelines.local.emulator.core import STATE_FILE
    from vlp.pipelines.local.emulator.errors import DamagedStateError

    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text('{"counter": 3, "models": {"projects/p/loc')
    with pytest.raises(DamagedStateError, match=r"state file .*state.* is damaged .*`vlp local reset`"):
        create_emulator(state).start()


def test_the_metadata_stand_in_names_its_accounts_project_as_google_auth_reads_it(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 35: google.auth.default() on a VM takes the project from the metadata server (project/project-id);
    the stand-in answered 404, so code that relies on it found no project."""
    from google.auth.compute_engine import _metadata
    from google.auth.transport.requests import Request

    from vlp.components import clients
    from vlp.pipelines.local.emulator.iam import project_number

    run_as(monkeypatch, emu.url, f"vlp-pipeline@{PROJECT}.iam.gserviceaccount.com")
    clients.sync_metadata_host()
    assert _metadata.get_project_id(Request()) == PROJECT
    root = f"{emu.url}/_md/vlp-pipeline@{PROJECT}.iam.gserviceaccount.com/computeMetadata/v1/project"
    status, numeric, _ = _http("GET", f"{root}/numeric-project-id")
    assert status == 200 and str(numeric) == project_number(PROJECT)
    run_as(monkeypatch, emu.url, f"{project_number(PROJECT)}-compute@developer.gserviceaccount.com")
    clients.sync_metadata_host()
    assert _metadata.get_project_id(Request()) == PROJECT
    # A principal that is no project's account has none, as no VM runs as a person.
    status, answer, _ = _http("GET", f"{emu.url}/_md/someone@example.com/computeMetadata/v1/project/project-id")
    assert status == 404 and "no project" in answer["error"]["message"]


def test_v1beta1_answers_every_v1_method_as_google_does(emu: Emulator) -> None:
    """Issue 35: Vertex AI's v1beta1 is a superset of v1 at the same paths; samples written against v1beta1 (get an
    endpoint, list models, predict) answered 404 where only the v1 form was served."""
    from google.cloud import aiplatform_v1beta1 as beta

    model = _upload()
    endpoint = aiplatform.Endpoint.create(display_name="beta")
    endpoint.deploy(model, machine_type="n1-standard-4")
    kw = {
        "client_options": ClientOptions(api_endpoint=emu.url),
        "transport": "rest",
        "credentials": as_tester(emu, PROJECT),
    }
    endpoints, models = beta.EndpointServiceClient(**kw), beta.ModelServiceClient(**kw)
    got = endpoints.get_endpoint(name=endpoint.resource_name)
    assert got.display_name == "beta" and len(got.deployed_models) == 1
    assert [m.name for m in models.list_models(parent=PARENT)] == [model.resource_name]
    prediction = beta.PredictionServiceClient(**kw).predict(
        endpoint=endpoint.resource_name, instances=[{"prompt": "hi"}]
    )
    assert prediction.deployed_model_id == got.deployed_models[0].id
    # What v1beta1 does not serve stays unserved: the emulator's own 404 for an unknown collection.
    status, _, _ = _http("GET", f"{emu.url}/v1beta1/{PARENT}/noSuchCollection/x")
    assert status == 404


GRPC_SAMPLE = """
from google.api_core import exceptions
from google.cloud import aiplatform_v1

options = {"api_endpoint": ENDPOINT}
endpoints = aiplatform_v1.EndpointServiceClient(client_options=options)
created = endpoints.create_endpoint(parent=PARENT, endpoint=aiplatform_v1.Endpoint(display_name="grpc-sample"))
endpoint = created.result(timeout=60)
print("created", endpoint.name)
print("listed", [e.display_name for e in endpoints.list_endpoints(parent=PARENT)])
print("got", endpoints.get_endpoint(name=endpoint.name).display_name)
try:
    endpoints.get_endpoint(name=PARENT + "/endpoints/404")
except exceptions.NotFound as err:
    print("not found:", err.message)
models = aiplatform_v1.ModelServiceClient(client_options=options)
print("models", list(models.list_models(parent=PARENT)))

# The high-level SDK, no api_transport: REST over HTTPS at the stack's HTTPS endpoint (REQUESTS_CA_BUNDLE trusts it).
from google.cloud import aiplatform

aiplatform.init(location="us-central1", api_endpoint=HTTPS_ENDPOINT)
print("sdk", [e.display_name for e in aiplatform.Endpoint.list()])
"""


def test_googles_gapic_clients_on_their_default_transport_reach_the_emulator_over_grpc_and_tls(tmp_path: Path) -> None:
    """Issue 35: gapic clients speak gRPC over TLS unless told otherwise, the aiplatform SDK REST over HTTPS; the
    emulator answered plain HTTP only, so every unchanged sample failed its TLS handshake. With TLS on, a sample in a
    fresh interpreter, given only the endpoints and the environment `vlp local status` prints (the metadata stand-in,
    the stack's CA), creates an endpoint (a long-running operation) over gRPC, lists and gets it, gets NOT_FOUND as a
    gRPC status, and lists it again through the SDK without api_transport; as the account the metadata server names,
    with its IAM checked (a caller without a grant is refused)."""
    emulator = create_emulator(tmp_path / "state", serving=ServingDouble(), grpc=True)
    emulator.start()
    try:
        account = f"sample@{PROJECT}.iam.gserviceaccount.com"
        info = json.loads((tmp_path / "state" / "grpc.json").read_text())
        assert info["endpoint"] == emulator.grpc_endpoint and Path(info["ca"]).is_file()
        assert stat.S_IMODE((tmp_path / "state" / "tls" / "server-key.pem").stat().st_mode) == 0o600
        metadata = f"{emulator.url.removeprefix('http://')}/_md/{account}"
        drop = ("GOOGLE_", "GCE_", "GRPC_", "VLP_", "STORAGE_EMULATOR_HOST")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(GCE_METADATA_HOST=metadata, GCE_METADATA_IP=metadata)
        env.update(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=info["ca"], REQUESTS_CA_BUNDLE=info["bundle"])
        code = (
            f"ENDPOINT = {emulator.grpc_endpoint!r}\nHTTPS_ENDPOINT = {emulator.https_endpoint!r}\nPARENT = {PARENT!r}\n"
            + GRPC_SAMPLE
        )

        def sample() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
            )

        refused = sample()  # no grant yet: IAM answers over gRPC as over REST
        assert refused.returncode == 1 and "PermissionDenied" in refused.stderr, refused.stderr[-2000:]
        emulator.grant(f"projects/{PROJECT}", "roles/aiplatform.user", f"serviceAccount:{account}")
        done = sample()
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"created {PARENT}/endpoints/") and lines[1] == "listed ['grpc-sample']"
        assert lines[2] == "got grpc-sample" and lines[3].startswith("not found:") and lines[4] == "models []"
        assert lines[-1] == "sdk ['grpc-sample']"
        assert f"POST /v1/{PARENT}/endpoints" in emulator.calls  # the same handlers as REST
    finally:
        emulator.stop()


def test_googles_system_parameters_are_accepted_and_fields_gives_a_partial_response(emu: Emulator) -> None:
    """Issue 35: every Google REST API takes the system parameters (cloud.google.com/apis/docs/system-parameters:
    alt, fields, key, prettyPrint, quotaUser..., also with a leading $) besides the method's own fields; the emulator
    refused them as unknown fields, which broke gcloud (it sends alt=json). A name that is neither is still refused."""
    _auth(emu)
    endpoint = aiplatform.Endpoint.create(display_name="params", labels={"team": "a"})
    url = f"{emu.url}/v1/{PARENT}/endpoints"
    for query in (
        "alt=json",
        "$alt=json;enum-encoding=int",
        "prettyPrint=false&quotaUser=me&key=k",
        "$prettyPrint=true",
    ):
        status, answer, _ = _http("GET", f"{url}?{query}")
        assert status == 200 and answer["endpoints"][0]["displayName"] == "params", (query, answer)
    status, answer, _ = _http("GET", f"{url}?fields=endpoints(name,labels)")
    assert status == 200 and answer == {"endpoints": [{"name": endpoint.resource_name, "labels": {"team": "a"}}]}
    status, answer, _ = _http("GET", f"{emu.url}/v1/{endpoint.resource_name}?$fields=displayName")
    assert status == 200 and answer == {"displayName": "params"}
    assert _http("GET", f"{url}?alt=proto")[0] == 400  # a form this emulator does not produce: refused, not guessed
    assert _http("GET", f"{url}?bogus=1")[0] == 400


# ----------------------------------------------------------------------------- custom jobs (custom_jobs.py)


def _custom_job(display_name: str, command: list[str], service_account: str = "") -> aiplatform_v1.CustomJob:
    pool = aiplatform_v1.WorkerPoolSpec(
        machine_spec=aiplatform_v1.MachineSpec(machine_type="n2-standard-8"),
        replica_count=1,
        container_spec=aiplatform_v1.ContainerSpec(image_uri="python:3.11-slim", command=command),
    )
    spec = aiplatform_v1.CustomJobSpec(worker_pool_specs=[pool], service_account=service_account)
    return aiplatform_v1.CustomJob(display_name=display_name, job_spec=spec)


def _wait_for_custom_job(client: Any, name: str, until: tuple[str, ...] = ()) -> aiplatform_v1.CustomJob:
    deadline = time.monotonic() + 30
    active = ("JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_CANCELLING")
    while time.monotonic() < deadline:
        job = client.get_custom_job(name=name)
        if (job.state.name in until) if until else job.state.name not in active:
            return job
        time.sleep(0.1)
    raise AssertionError(f"custom job {name} is still {job.state.name}")


def test_custom_jobs_run_their_command_as_their_account_and_end_by_its_exit_status(emu: Emulator) -> None:
    from vlp.pipelines.local.emulator.iam import custom_code_service_agent

    client = _gapic(aiplatform_v1.JobServiceClient, emu)
    with pytest.raises(gexc.BadRequest, match="display_name is required"):
        client.create_custom_job(parent=PARENT, custom_job=_custom_job("", ["true"]))
    # No service account named: the job runs as the project's Vertex AI Custom Code Service Agent (custom_job.proto).
    who = 'echo "metadata server: $GCE_METADATA_HOST job $CLOUD_ML_JOB_ID"; echo "cannot go on" >&2; exit 3'
    failed = client.create_custom_job(parent=PARENT, custom_job=_custom_job("fails", ["sh", "-c", who]))
    assert failed.state.name == "JOB_STATE_PENDING"
    done = _wait_for_custom_job(client, failed.name)
    assert done.state.name == "JOB_STATE_FAILED"
    assert "The replica workerpool0-0 exited with a non-zero status of 3" in done.error.message
    assert f"/_md/{custom_code_service_agent(PROJECT)} job {failed.name.rsplit('/', 1)[1]}" in done.error.message
    assert "cannot go on" in done.error.message  # the replica's last lines, and its log's path
    # A named account: it runs as that one; an exit status of 0 succeeds.
    account = f"trainer@{PROJECT}.iam.gserviceaccount.com"
    ok = client.create_custom_job(
        parent=PARENT, custom_job=_custom_job("ok", ["sh", "-c", "echo $GCE_METADATA_HOST"], service_account=account)
    )
    assert _wait_for_custom_job(client, ok.name).state.name == "JOB_STATE_SUCCEEDED"
    log = emu.state_dir / "custom-jobs" / f"{ok.name.rsplit('/', 1)[1]}.log"
    assert log.read_text().strip().endswith(f"/_md/{account}")
    # Cancel: the replica's processes stop, the job ends CANCELLED with code 1 (job_service.proto CancelCustomJob).
    marker = emu.state_dir / "slow.pid"
    slow = client.create_custom_job(
        parent=PARENT, custom_job=_custom_job("slow", ["sh", "-c", f"echo $$ > {marker}; exec sleep 60"])
    )
    _wait_for_custom_job(client, slow.name, until=("JOB_STATE_RUNNING",))
    deadline = time.monotonic() + 10
    while not marker.is_file() or not marker.read_text().strip():
        assert time.monotonic() < deadline, "the slow job's replica did not start"
        time.sleep(0.05)
    client.cancel_custom_job(name=slow.name)
    cancelled = _wait_for_custom_job(client, slow.name)
    assert (cancelled.state.name, cancelled.error.code) == ("JOB_STATE_CANCELLED", 1)
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)
    with pytest.raises(gexc.BadRequest, match="only a running job cancels"):  # FAILED_PRECONDITION, HTTP 400
        client.cancel_custom_job(name=slow.name)
    listed = [j.display_name for j in client.list_custom_jobs(parent=PARENT)]
    assert sorted(listed) == ["fails", "ok", "slow"]
    client.delete_custom_job(name=failed.name).result()
    with pytest.raises(gexc.NotFound):
        client.get_custom_job(name=failed.name)


def test_a_custom_job_naming_an_account_needs_act_as_on_it(emu: Emulator) -> None:
    """custom_job.proto CustomJobSpec.service_account: "Users submitting jobs must have act-as permission on this
    run-as account." roles/aiplatform.user alone creates jobs that run as the Custom Code Service Agent only."""
    from google.cloud import aiplatform_v1 as v1

    user = "alice@example.com"
    emu.grant(f"projects/{PROJECT}", "roles/aiplatform.user", f"user:{user}")
    client = v1.JobServiceClient(
        client_options=ClientOptions(api_endpoint=emu.url), transport="rest", credentials=emu.credentials_for(user)
    )
    account = f"trainer@{PROJECT}.iam.gserviceaccount.com"
    with pytest.raises(gexc.Forbidden, match="iam.serviceAccounts.actAs"):
        client.create_custom_job(parent=PARENT, custom_job=_custom_job("as-trainer", ["true"], account))
    job = client.create_custom_job(parent=PARENT, custom_job=_custom_job("as-agent", ["true"]))
    assert _wait_for_custom_job(client, job.name).state.name == "JOB_STATE_SUCCEEDED"


def test_the_exit_handler_cancels_the_runs_mirror_job_left_running(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big model's mirror job whose launcher died keeps running; the exit handler finds it by the run's label and
    cancels it, and leaves another run's job and a finished one alone."""
    from vlp.components.mirror.jobs import cancel_run_mirror_jobs

    client = _gapic(aiplatform_v1.JobServiceClient, emu)

    def job(name: str, run: str, command: str) -> aiplatform_v1.CustomJob:
        made = _custom_job(name, ["sh", "-c", command])
        made.labels = {"vlp-deployment": "tiny", "vlp-run": run}
        return client.create_custom_job(parent=PARENT, custom_job=made)

    ours, theirs, done = (
        job("ours", "run-1", "exec sleep 60"),
        job("theirs", "run-2", "exec sleep 60"),
        job("done", "run-1", "true"),
    )
    for running in (ours, theirs):
        _wait_for_custom_job(client, running.name, until=("JOB_STATE_RUNNING",))
    _wait_for_custom_job(client, done.name)
    run_as(monkeypatch, emu.url, TESTER)
    assert cancel_run_mirror_jobs(PROJECT, [LOCATION], "run-1", emu.url) == [ours.name]
    assert _wait_for_custom_job(client, ours.name).state.name == "JOB_STATE_CANCELLED"
    assert client.get_custom_job(name=theirs.name).state.name == "JOB_STATE_RUNNING"
    assert client.get_custom_job(name=done.name).state.name == "JOB_STATE_SUCCEEDED"
    assert cancel_run_mirror_jobs(PROJECT, [LOCATION], "run-1", emu.url) == []  # safe to call twice
    client.cancel_custom_job(name=theirs.name)
