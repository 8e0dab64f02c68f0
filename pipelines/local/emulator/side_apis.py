"""The Google APIs around Vertex AI that the emulator also serves: secrets, quotas and logs (and, by path, the Hub
gate of hub_gate.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import google_crc32c
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from vlp.pipelines.local.emulator.engine_routes import google_error
from vlp.pipelines.local.emulator.hub_gate import hub_proxy

Answer = tuple[int, bytes, str, dict[str, str]]

_JSON = "application/json"
_STATE_LOCK = threading.Lock()

# Regions a quota id that was never set reports, each at the default limit.
QUOTA_REGIONS = (
    "us-central1",
    "us-east1",
    "us-east4",
    "us-east5",
    "us-south1",
    "us-west1",
    "us-west4",
    "northamerica-northeast1",
    "europe-west1",
    "europe-west2",
    "europe-west3",
    "europe-west4",
    "europe-west9",
    "asia-northeast1",
    "asia-northeast3",
    "asia-southeast1",
    "australia-southeast1",
    "me-west1",
)
DEFAULT_QUOTA_LIMIT = 8
# vCPU quotas count per core, so 8 would not hold even two g2-standard-8 replicas (a blue/green redeploy).
DEFAULT_CPU_QUOTA_LIMIT = 96

# Vertex AI online-serving quota ids and their metrics, as gcloud's Model Garden deploy checks them
# (googlecloudsdk command_lib/ai/model_garden_utils.py); KNOWN_VERTEX_QUOTAS below adds Google's other serving ids.
VERTEX_SERVING_QUOTAS = {
    "CustomModelServingCPUsPerProjectPerRegion": "custom_model_serving_cpus",
    "CustomModelServingP4GPUsPerProjectPerRegion": "custom_model_serving_nvidia_p4_gpus",
    "CustomModelServingT4GPUsPerProjectPerRegion": "custom_model_serving_nvidia_t4_gpus",
    "CustomModelServingL4GPUsPerProjectPerRegion": "custom_model_serving_nvidia_l4_gpus",
    "CustomModelServingV100GPUsPerProjectPerRegion": "custom_model_serving_nvidia_v100_gpus",
    "CustomModelServingP100GPUsPerProjectPerRegion": "custom_model_serving_nvidia_p100_gpus",
    "CustomModelServingA100GPUsPerProjectPerRegion": "custom_model_serving_nvidia_a100_gpus",
    "CustomModelServingA10080GBGPUsPerProjectPerRegion": "custom_model_serving_nvidia_a100_80gb_gpus",
    "CustomModelServingH100GPUsPerProjectPerRegion": "custom_model_serving_nvidia_h100_gpus",
    "CustomModelServingV5ETPUPerProjectPerRegion": "custom_model_serving_tpu_v5e",
}

# Google's own map of serving quota ids (vertex-ai-samples, notebooks/community/model_garden/docker_source_codes/
# notebook_util/common_util.py get_quota_id): CustomModelServing[Preemptible]{X}PerProjectPerRegion for these X. An id
# no source names (an RTX PRO 6000 one, say) answers NOT_FOUND, as a wrong id does on Google.
GOOGLE_SERVING_QUOTA_NAMES = (
    "V100GPUs", "P100GPUs", "L4GPUs", "A100GPUs", "A10080GBGPUs", "H100GPUs", "H100MEGAGPUs", "H200GPUs", "B200GPUs",
    "T4GPUs", "V6ETPU", "V5ETPU", "V3TPUs",
)  # fmt: skip
KNOWN_VERTEX_QUOTAS = (
    set(VERTEX_SERVING_QUOTAS)
    | {f"CustomModelServing{x}PerProjectPerRegion" for x in GOOGLE_SERVING_QUOTA_NAMES}
    | {f"CustomModelServingPreemptible{x}PerProjectPerRegion" for x in (*GOOGLE_SERVING_QUOTA_NAMES, "CPUs")}
)

# Cloud Run's regional quotas (service run.googleapis.com) and a new project's limits: CPU in milli-CPU and memory
# in bytes from the errors users quote (googlecodelabs/feedback#1856, #2311: allowed 20000 and 42949672960). GPU quota
# is 0 with and without zonal redundancy: "To use the GPU feature, you must request quota" (run/docs/configuring/
# services/gpu; the gpu-zonal-redundancy page gives no default either). The local runner requests what a run needs
# the way a project's owner would (runner.request_cloud_run_gpu_quota), and says so.
CLOUD_RUN_QUOTAS = {
    "CpuAllocPerProjectRegion": ("cpu_allocation", 20000),
    "MemAllocPerProjectRegion": ("mem_allocation", 42949672960),
    "NvidiaL4GpuAllocPerProjectRegion": ("nvidia_l4_gpu_allocation", 0),
    "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion": ("nvidia_l4_gpu_allocation_no_zonal_redundancy", 0),
    "NvidiaRtxPro6000GpuAllocPerProjectRegion": ("nvidia_rtx_pro_6000_gpu_allocation", 0),
    "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion": (
        "nvidia_rtx_pro_6000_gpu_allocation_no_zonal_redundancy",
        0,
    ),
}


def quota_limit(emu: Any, quota_id: str, region: str) -> int:
    """A quota's limit in a region as the emulator grants it (set with POST /_emulator/quotas)."""
    state = _read_state(_quotas_path(emu), {"quotas": {}, "default": DEFAULT_QUOTA_LIMIT})
    if "quota-exhausted" in emu.faults:
        return 0
    configured = state["quotas"].get(quota_id) or {}
    if region in configured:
        return int(configured[region])
    if quota_id in CLOUD_RUN_QUOTAS:
        return CLOUD_RUN_QUOTAS[quota_id][1]
    return int(state["default"])


PREDICTION_LOG = "aiplatform.googleapis.com%2Fprediction_container"
ENDPOINT_RESOURCE = "aiplatform.googleapis.com/Endpoint"


def handle(emu: Any, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any) -> Answer | None:
    """Answers one request for the side APIs, or None when the path belongs to the Vertex AI core."""
    if path == "/hf" or path.startswith("/hf/"):
        return hub_proxy(emu, method, path[3:] or "/", query, body, headers)
    # Hub paths stay percent-encoded for the mirror; Google API paths are matched decoded.
    path = urllib.parse.unquote(path)
    if path == "/_emulator/secrets":
        return _control_secrets(emu, method, body)
    if path == "/_emulator/quotas":
        return _control_quotas(emu, method, body)
    if path == "/v2/entries:list":
        return _guard(_list_log_entries, emu, method, body)
    match = re.fullmatch(r"/v1/projects/([^/]+)/(?:locations/[^/]+/)?secrets(/.*)?", path)
    if match:
        return _guard(_secrets, emu, method, match.group(1), match.group(2) or "", query, body)
    match = re.fullmatch(r"/v1/projects/([^/]+)/locations/([^/]+)/services/([^/]+)/quotaInfos(?:/([^/]+))?", path)
    if match:
        return _guard(_quota_infos, emu, method, *match.groups(), query)
    match = re.fullmatch(r"/v1/projects/([^/]+)/locations/([^/]+)/repositories(?:/([^/:]+))?", path)
    if match:
        from vlp.pipelines.local.emulator import artifact_registry

        return artifact_registry.handle(emu, method, *match.groups(), query, body)
    return None


class _ApiError(Exception):
    def __init__(self, code: int, status: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def _guard(fn: Any, *args: Any) -> Answer:
    try:
        return fn(*args)
    except _ApiError as exc:
        return exc.code, google_error(exc.code, exc.message, exc.status), _JSON, {}


def _ok(message: Message | dict, code: int = 200) -> Answer:
    if isinstance(message, Message):
        data = json_format.MessageToJson(message).encode()
    else:
        data = json.dumps(message).encode()
    return code, data, _JSON, {}


def _parse(body: bytes, message: Message) -> Message:
    """Parses a request body into its proto, refusing unknown fields as the real API does."""
    try:
        json_format.Parse((body or b"{}").decode(), message, ignore_unknown_fields=False)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise _ApiError(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}") from None
    return message


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _read_state(path: Path, default: dict) -> dict:
    from vlp.pipelines.local.emulator.errors import read_state_file

    if not path.exists():
        return default
    return read_state_file(path)


def _write_state(path: Path, state: dict) -> None:
    """Written whole, then renamed; readable by its owner only (0600: the secret store holds Hub tokens, and
    the file is created with that mode, so there is no moment it is readable by others)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older .partial may exist with looser bits
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(state, indent=1))
    partial.replace(path)


def _json_body(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError as exc:
        raise _ApiError(400, "INVALID_ARGUMENT", f"Request body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _ApiError(400, "INVALID_ARGUMENT", "Request body must be a JSON object.")
    return value


# ----- Secret Manager v1 -----
#
# Secrets are kept by short name, not per project: the emulator serves one project at a time, and a
# test seeding "hf-token" should not have to guess which project id the pipeline will ask with.
# Values are stored base64 in state_dir/secrets.json and never logged or echoed in errors.


def _secrets_path(emu: Any) -> Path:
    return Path(emu.state_dir) / "secrets.json"


def put_secret(emu: Any, name: str, value: str | bytes) -> int:
    """Adds a version holding `value` to secret `name` (created when missing); returns the version number."""
    data = value.encode() if isinstance(value, str) else value
    with _STATE_LOCK:
        state = _read_state(_secrets_path(emu), {})
        secret = state.setdefault(name, {"createTime": _now().ToJsonString(), "labels": {}, "versions": []})
        secret["versions"].append(
            {"data": base64.b64encode(data).decode(), "createTime": _now().ToJsonString(), "state": "ENABLED"}
        )
        _write_state(_secrets_path(emu), state)
        return len(secret["versions"])


def _control_secrets(emu: Any, method: str, body: bytes) -> Answer:
    if method != "POST":
        return 405, google_error(405, "Use POST {name, value}.", "INVALID_ARGUMENT"), _JSON, {}
    try:
        request = _json_body(body)
        name, value = request.get("name"), request.get("value")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", name) or not isinstance(value, str):
            raise _ApiError(400, "INVALID_ARGUMENT", 'Body must be {"name": SECRET_ID, "value": "..."}.')
    except _ApiError as exc:
        return exc.code, google_error(exc.code, exc.message, exc.status), _JSON, {}
    version = put_secret(emu, name, value)
    return _ok({"name": name, "version": version})


def _secrets(emu: Any, method: str, project: str, rest: str, query: dict[str, list[str]], body: bytes) -> Answer:
    from google.cloud import secretmanager_v1 as sm

    if rest == "" and method == "POST":
        secret_id = (query.get("secretId") or [""])[0]
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", secret_id):
            raise _ApiError(400, "INVALID_ARGUMENT", "secretId must be 1-255 letters, digits, '-' or '_'.")
        secret = _parse(body, sm.Secret.pb(sm.Secret()))
        with _STATE_LOCK:
            state = _read_state(_secrets_path(emu), {})
            if secret_id in state:
                raise _ApiError(
                    409, "ALREADY_EXISTS", f"Secret [projects/{project}/secrets/{secret_id}] already exists."
                )
            state[secret_id] = {"createTime": _now().ToJsonString(), "labels": dict(secret.labels), "versions": []}
            _write_state(_secrets_path(emu), state)
        return _ok(_secret_proto(project, secret_id, state[secret_id]))

    match = re.fullmatch(r"/([A-Za-z0-9_-]+)(?::addVersion|/versions/([^/:]+)(:access)?)?", rest)
    if not match:
        raise _ApiError(404, "NOT_FOUND", f"Secret Manager has no method at {rest!r}.")
    secret_id, version_id, access = match.group(1), match.group(2), match.group(3)
    name = f"projects/{project}/secrets/{secret_id}"
    state = _read_state(_secrets_path(emu), {})

    if rest.endswith(":addVersion") and method == "POST":
        request = _parse(body, sm.AddSecretVersionRequest.pb(sm.AddSecretVersionRequest()))
        if secret_id not in state:
            raise _ApiError(404, "NOT_FOUND", f"Secret [{name}] not found or has no versions.")
        payload = request.payload
        if payload.HasField("data_crc32c") and payload.data_crc32c != google_crc32c.value(payload.data):
            raise _ApiError(400, "INVALID_ARGUMENT", "Checksum of the secret payload does not match data_crc32c.")
        number = put_secret(emu, secret_id, payload.data)
        return _ok(_version_proto(name, number, _read_state(_secrets_path(emu), {})[secret_id]["versions"][-1]))

    if secret_id not in state:
        raise _ApiError(
            404,
            "NOT_FOUND",
            f"Secret [{name}] not found or has no versions: create it (gcloud secrets create {secret_id}) "
            "or, locally, POST /_emulator/secrets.",
        )
    secret = state[secret_id]
    if version_id is None:
        if method == "GET":
            return _ok(_secret_proto(project, secret_id, secret))
        if method == "DELETE":
            with _STATE_LOCK:
                fresh = _read_state(_secrets_path(emu), {})
                fresh.pop(secret_id, None)
                _write_state(_secrets_path(emu), fresh)
            return _ok({})
        raise _ApiError(405, "INVALID_ARGUMENT", f"{method} is not allowed on {name}.")

    versions = secret["versions"]
    if version_id == "latest":
        enabled = [i for i, v in enumerate(versions, 1) if v["state"] == "ENABLED"]
        number = enabled[-1] if enabled else 0
    elif version_id.isdigit():
        number = int(version_id)
    else:
        raise _ApiError(400, "INVALID_ARGUMENT", f"Version {version_id!r} is neither a number nor 'latest'.")
    if not 1 <= number <= len(versions):
        raise _ApiError(404, "NOT_FOUND", f"Secret Version [{name}/versions/{version_id}] not found.")
    version = versions[number - 1]
    if method != "GET":
        raise _ApiError(405, "INVALID_ARGUMENT", f"{method} is not allowed on {name}/versions/{version_id}.")
    if not access:
        return _ok(_version_proto(name, number, version))
    if version["state"] != "ENABLED":
        raise _ApiError(400, "FAILED_PRECONDITION", f"Secret Version [{name}/versions/{number}] is in DISABLED state.")
    data = base64.b64decode(version["data"])
    response = sm.AccessSecretVersionResponse(
        name=f"{name}/versions/{number}",
        payload=sm.SecretPayload(data=data, data_crc32c=google_crc32c.value(data)),
    )
    return _ok(sm.AccessSecretVersionResponse.pb(response))


def _secret_proto(project: str, secret_id: str, secret: dict) -> Message:
    from google.cloud import secretmanager_v1 as sm

    message = sm.Secret.pb(sm.Secret())
    message.name = f"projects/{project}/secrets/{secret_id}"
    message.create_time.FromJsonString(secret["createTime"])
    message.replication.automatic.SetInParent()
    message.labels.update(secret.get("labels") or {})
    return message


def _version_proto(secret_name: str, number: int, version: dict) -> Message:
    from google.cloud import secretmanager_v1 as sm

    message = sm.SecretVersion.pb(sm.SecretVersion())
    message.name = f"{secret_name}/versions/{number}"
    message.create_time.FromJsonString(version["createTime"])
    message.state = sm.SecretVersion.State[version["state"]].value
    return message


# ----- Cloud Quotas v1 -----


def _quotas_path(emu: Any) -> Path:
    return Path(emu.state_dir) / "quotas.json"


def _control_quotas(emu: Any, method: str, body: bytes) -> Answer:
    if method == "GET":
        return _ok(_read_state(_quotas_path(emu), {"quotas": {}, "default": DEFAULT_QUOTA_LIMIT}))
    if method != "POST":
        return 405, google_error(405, "Use POST {quotas, default}.", "INVALID_ARGUMENT"), _JSON, {}
    try:
        request = _json_body(body)
        quotas = request.get("quotas") or {}
        default = request.get("default", DEFAULT_QUOTA_LIMIT)
        valid = isinstance(quotas, dict) and all(
            isinstance(regions, dict) and all(isinstance(v, int) and v >= 0 for v in regions.values())
            for regions in quotas.values()
        )
        if not valid or not isinstance(default, int) or default < 0:
            raise _ApiError(
                400, "INVALID_ARGUMENT", 'Body must be {"quotas": {QUOTA_ID: {REGION: LIMIT}}, "default": N}.'
            )
    except _ApiError as exc:
        return exc.code, google_error(exc.code, exc.message, exc.status), _JSON, {}
    state = {"quotas": quotas, "default": default}
    with _STATE_LOCK:
        _write_state(_quotas_path(emu), state)
    return _ok(state)


def _quota_info(emu: Any, project: str, location: str, service: str, quota_id: str, state: dict) -> Message:
    from google.cloud import cloudquotas_v1 as cq

    configured = state["quotas"].get(quota_id) or {}
    regions = list(QUOTA_REGIONS) + sorted(set(configured) - set(QUOTA_REGIONS))
    exhausted = "quota-exhausted" in emu.faults
    default_limit = state["default"]
    if "CPUs" in quota_id and state["default"] == DEFAULT_QUOTA_LIMIT:
        default_limit = DEFAULT_CPU_QUOTA_LIMIT
    if quota_id in CLOUD_RUN_QUOTAS:
        default_limit = CLOUD_RUN_QUOTAS[quota_id][1]
    metric = (
        VERTEX_SERVING_QUOTAS.get(quota_id)
        or (CLOUD_RUN_QUOTAS.get(quota_id) or ("",))[0]
        or re.sub(r"(?<!^)(?=[A-Z])", "_", quota_id).lower()
    )
    info = cq.QuotaInfo(
        name=f"projects/{project}/locations/{location}/services/{service}/quotaInfos/{quota_id}",
        quota_id=quota_id,
        metric=f"{service}/{metric}",
        service=service,
        is_precise=True,
        container_type=cq.QuotaInfo.ContainerType.PROJECT,
        dimensions=["region"],
        metric_display_name=metric.replace("_", " "),
        quota_display_name=quota_id,
        metric_unit="1",
        quota_increase_eligibility=cq.QuotaIncreaseEligibility(is_eligible=True),
        is_fixed=False,
        # One entry per region, no dimensionless default entry: gcloud reads applicableLocations[0].
        dimensions_infos=[
            cq.DimensionsInfo(
                dimensions={"region": region},
                details=cq.QuotaDetails(value=0 if exhausted else int(configured.get(region, default_limit))),
                applicable_locations=[region],
            )
            for region in regions
        ],
    )
    return cq.QuotaInfo.pb(info)


def _quota_infos(
    emu: Any,
    method: str,
    project: str,
    location: str,
    service: str,
    quota_id: str | None,
    query: dict[str, list[str]],
) -> Answer:
    from google.cloud import cloudquotas_v1 as cq

    if method != "GET":
        raise _ApiError(405, "INVALID_ARGUMENT", f"{method} is not allowed on quotaInfos.")
    if location != "global":
        raise _ApiError(400, "INVALID_ARGUMENT", f"Quota infos live in locations/global, not locations/{location}.")
    state = _read_state(_quotas_path(emu), {"quotas": {}, "default": DEFAULT_QUOTA_LIMIT})
    known = {"aiplatform.googleapis.com": KNOWN_VERTEX_QUOTAS, "run.googleapis.com": set(CLOUD_RUN_QUOTAS)}
    if quota_id is not None:
        if quota_id not in known.get(service, set()) and quota_id not in state["quotas"]:
            # Message text unverified; the NOT_FOUND is what a quota id the service lacks gets.
            raise _ApiError(404, "NOT_FOUND", f"QuotaInfo {quota_id} of service {service} was not found.")
        return _ok(_quota_info(emu, project, location, service, quota_id, state))

    ids = sorted(set(state["quotas"]) | known.get(service, set()))
    page_size = int((query.get("pageSize") or ["0"])[0] or 0) or 100
    start = int((query.get("pageToken") or ["0"])[0] or 0)
    page = ids[start : start + page_size]
    response = cq.ListQuotaInfosResponse.pb(cq.ListQuotaInfosResponse())
    for qid in page:
        response.quota_infos.append(_quota_info(emu, project, location, service, qid, state))
    if start + page_size < len(ids):
        response.next_page_token = str(start + page_size)
    return _ok(response)


# ----- Cloud Logging v2: the model servers' logs as prediction_container entries -----


def _filter_value(filter_: str, field: str) -> str | None:
    match = re.search(rf'\b{re.escape(field)}\s*[=:]\s*"([^"]*)"', filter_) or re.search(
        rf"\b{re.escape(field)}\s*[=:]\s*([^\s\"()]+)", filter_
    )
    return match.group(1) if match else None


def _time_bounds(filter_: str) -> list[tuple[str, datetime]]:
    bounds = []
    for op, value in re.findall(r'timestamp\s*(>=|<=|>|<)\s*"?([0-9T:.\-+Z]+)"?', filter_):
        try:
            bounds.append((op, datetime.fromisoformat(value.replace("Z", "+00:00"))))
        except ValueError:
            raise _ApiError(400, "INVALID_ARGUMENT", f"Unparseable timestamp in filter: {value!r}.") from None
    return bounds


def _list_log_entries(emu: Any, method: str, body: bytes) -> Answer:
    from google.cloud.logging_v2.types import ListLogEntriesRequest, ListLogEntriesResponse, LogEntry

    if method != "POST":
        raise _ApiError(405, "INVALID_ARGUMENT", "entries:list takes POST.")
    request = _parse(body, ListLogEntriesRequest.pb(ListLogEntriesRequest()))
    if request.page_size < 0:
        raise _ApiError(400, "INVALID_ARGUMENT", "pageSize must not be negative.")
    project = next(
        (name.split("/", 1)[1] for name in request.resource_names if name.startswith("projects/")),
        None,
    )
    if project is None:
        raise _ApiError(400, "INVALID_ARGUMENT", 'resourceNames must name a project: ["projects/PROJECT_ID"].')
    filter_ = request.filter
    if _filter_value(filter_, "resource.type") == "cloud_run_revision":
        return _list_revision_log_entries(emu, project, request)
    log_name = f"projects/{project}/logs/{PREDICTION_LOG}"
    wanted_log = _filter_value(filter_, "logName")
    wanted_type = _filter_value(filter_, "resource.type")
    if (wanted_log and urllib.parse.unquote(wanted_log) != urllib.parse.unquote(log_name)) or (
        wanted_type and wanted_type != ENDPOINT_RESOURCE
    ):
        return _ok(ListLogEntriesResponse.pb(ListLogEntriesResponse()))
    wanted_model = _filter_value(filter_, "deployed_model_id")
    wanted_endpoint = _filter_value(filter_, "endpoint_id")
    wanted_text = _filter_value(filter_, "textPayload")
    bounds = _time_bounds(filter_)
    endpoints = _endpoint_ids(emu)

    entries: list[tuple[datetime, int, str, str, str | None]] = []
    serving = getattr(emu, "serving", None)
    for deployed_model_id in serving.logged_ids() if serving is not None else []:
        if wanted_model and deployed_model_id != wanted_model:
            continue
        if deployed_model_id in getattr(emu, "_logging_off", ()):
            continue  # deployed through v1beta1 without enable_container_logging: Vertex keeps no stdout/stderr
        endpoint_id = endpoints.get(deployed_model_id)
        if wanted_endpoint and endpoint_id != wanted_endpoint:
            continue
        path = serving.log_path(deployed_model_id)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        lines = serving.logs(deployed_model_id, limit=10_000)
        for index, line in enumerate(lines):
            # The log file has no per-line times: spread its lines a microsecond apart, ending at the
            # file's last write, so ordering by timestamp keeps the order they were written in.
            stamp = datetime.fromtimestamp(mtime - (len(lines) - 1 - index) * 1e-6, tz=UTC)
            if wanted_text and wanted_text not in line:
                continue
            if not all(_compare(stamp, op, bound) for op, bound in bounds):
                continue
            entries.append((stamp, index, deployed_model_id, line, endpoint_id))

    descending = "desc" in request.order_by.lower()
    entries.sort(key=lambda e: (e[0], e[2], e[1]), reverse=descending)
    page_size = request.page_size or 50
    start = int(request.page_token or 0)
    response = ListLogEntriesResponse.pb(ListLogEntriesResponse())
    for stamp, index, deployed_model_id, line, endpoint_id in entries[start : start + page_size]:
        labels = {"deployed_model_id": deployed_model_id}
        if endpoint_id:
            labels["endpoint_id"] = str(endpoint_id)
        entry = LogEntry.pb(LogEntry())
        entry.log_name = log_name
        entry.resource.type = ENDPOINT_RESOURCE
        entry.resource.labels.update(labels)
        entry.text_payload = line
        entry.insert_id = f"{deployed_model_id}-{index:08d}"
        entry.timestamp.FromDatetime(stamp)
        entry.receive_timestamp.FromDatetime(stamp)
        entry.severity = 500 if re.search(r"\b(ERROR|Traceback|Error:)", line) else 200
        response.entries.append(entry)
    if start + page_size < len(entries):
        response.next_page_token = str(start + page_size)
    return _ok(response)


def _list_revision_log_entries(emu: Any, project: str, request: Any) -> Answer:
    """A Cloud Run revision's container output as run.googleapis.com/stdout entries of resource type
    cloud_run_revision (labels service_name, revision_name, location, project_id), newest first when asked."""
    from google.cloud.logging_v2.types import ListLogEntriesResponse, LogEntry

    filter_ = request.filter
    wanted_service = _filter_value(filter_, "resource.labels.service_name")
    wanted_revision = _filter_value(filter_, "resource.labels.revision_name")
    serving = getattr(emu, "serving", None)
    entries: list[tuple[datetime, int, tuple[str, str, str], str]] = []
    for serving_id in serving.logged_ids() if serving is not None else []:
        where = emu.run_revision_of(serving_id) if hasattr(emu, "run_revision_of") else None
        if where is None or (wanted_service and where[1] != wanted_service):
            continue
        if wanted_revision and where[2] != wanted_revision:
            continue
        try:
            mtime = serving.log_path(serving_id).stat().st_mtime
        except FileNotFoundError:
            continue
        lines = serving.logs(serving_id, limit=10_000)
        for index, line in enumerate(lines):
            stamp = datetime.fromtimestamp(mtime - (len(lines) - 1 - index) * 1e-6, tz=UTC)
            entries.append((stamp, index, where, line))
    entries.sort(key=lambda e: (e[0], e[1]), reverse="desc" in request.order_by.lower())
    page_size = request.page_size or 50
    response = ListLogEntriesResponse.pb(ListLogEntriesResponse())
    for stamp, index, (location, service_id, revision), line in entries[:page_size]:
        entry = LogEntry.pb(LogEntry())
        entry.log_name = f"projects/{project}/logs/run.googleapis.com%2Fstdout"
        entry.resource.type = "cloud_run_revision"
        entry.resource.labels.update(
            {"service_name": service_id, "revision_name": revision, "location": location, "project_id": project}
        )
        entry.text_payload = line
        entry.insert_id = f"{revision}-{index:08d}"
        entry.timestamp.FromDatetime(stamp)
        entry.receive_timestamp.FromDatetime(stamp)
        response.entries.append(entry)
    return _ok(response)


def _endpoint_ids(emu: Any) -> dict[str, str]:
    """Deployed model id -> endpoint id, for the models deployed now (an undeployed model's logs carry none)."""
    snapshot = getattr(emu, "snapshot", None)
    if not callable(snapshot):
        return {}
    ids = {}
    for endpoint in snapshot().get("endpoints", []):
        for deployed in endpoint.get("deployedModels", []):
            ids[str(deployed.get("id"))] = str(endpoint.get("name", "")).rsplit("/", 1)[-1]
    return ids


def _compare(stamp: datetime, op: str, bound: datetime) -> bool:
    if bound.tzinfo is None:
        bound = bound.replace(tzinfo=UTC)
    return {">=": stamp >= bound, ">": stamp > bound, "<=": stamp <= bound, "<": stamp < bound}[op]




