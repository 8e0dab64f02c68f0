"""The Google APIs around Vertex AI that the emulator also serves: secrets, quotas, logs and a Hub gate."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import google_crc32c
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from pipelines.local.emulator.serving import google_error

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
# (googlecloudsdk command_lib/ai/model_garden_utils.py); any other id is served too.
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

# Cloud Run's regional quotas (service run.googleapis.com) and a new project's limits: CPU in milli-CPU and memory
# in bytes from the errors users quote (googlecodelabs/feedback#1856, #2311: allowed 20000 and 42949672960); GPU
# quota is 0 with zonal redundancy and 3 L4s without (unverified: reports of an automatic grant on first deploy).
CLOUD_RUN_QUOTAS = {
    "CpuAllocPerProjectRegion": ("cpu_allocation", 20000),
    "MemAllocPerProjectRegion": ("mem_allocation", 42949672960),
    "NvidiaL4GpuAllocPerProjectRegion": ("nvidia_l4_gpu_allocation", 0),
    "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion": ("nvidia_l4_gpu_allocation_no_zonal_redundancy", 3),
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

# Headers huggingface_hub reads from the Hub; everything else the mirror sends is dropped.
_HUB_HEADERS = (
    "content-type",
    "content-length",
    "content-range",
    "content-disposition",
    "accept-ranges",
    "etag",
    "last-modified",
)
_HUB_REQUEST_HEADERS = ("range", "if-range", "if-none-match", "accept", "content-type", "user-agent")


def handle(emu: Any, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any) -> Answer | None:
    """Answers one request for the side APIs, or None when the path belongs to the Vertex AI core."""
    if path == "/hf" or path.startswith("/hf/"):
        return _hub_proxy(emu, method, path[3:] or "/", query, body, headers)
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
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _write_state(path: Path, state: dict) -> None:
    """Written whole, then renamed; readable by its owner only (0600: the secret store holds Hub tokens, and
    the file is created with that mode, so there is no moment it is readable by others)."""
    import os

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
    if quota_id is not None:
        return _ok(_quota_info(emu, project, location, service, quota_id, state))

    known = {"aiplatform.googleapis.com": set(VERTEX_SERVING_QUOTAS), "run.googleapis.com": set(CLOUD_RUN_QUOTAS)}
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


# ----- Hugging Face Hub gate: a proxy in front of the olah mirror -----


def _header_map(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _repo_of(path: str) -> tuple[str, str] | None:
    """(repo type, ORG/NAME) that a Hub path addresses, or None for account-level paths."""
    match = re.match(r"/api/(?:resolve-cache/)?(models|datasets|spaces)/([^/]+/[^/]+)", path)
    if match:
        return match.group(1)[:-1], match.group(2)
    match = re.match(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/(?:resolve|tree|blob|raw)/", path)
    if match:
        return (match.group(1) or "models")[:-1], match.group(2)
    return None


def _gated(repo_type: str, repo_id: str, authorized: bool) -> Answer:
    # What huggingface.co answers for a gated repo: X-Error-Code makes huggingface_hub raise GatedRepoError.
    if authorized:
        message = (
            f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list. "
            f"Visit https://huggingface.co/{repo_id} to ask for access."
        )
        code = 403
    else:
        message = (
            f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated "
            "to access it. Please log in."
        )
        code = 401
    headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": message}
    return code, json.dumps({"error": message}).encode(), _JSON, headers


def _hub_proxy(emu: Any, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any) -> Answer:
    request_headers = _header_map(headers)
    repo = _repo_of(path)
    if repo and "hub-gated" in emu.faults:
        return _gated(repo[0], repo[1], "authorization" in request_headers)
    upstream = getattr(emu, "hub_upstream", None)
    if not upstream:
        message = "No Hub mirror behind the emulator: start it with hub_upstream=<olah URL>."
        return 502, json.dumps({"error": message}).encode(), _JSON, {}
    if re.fullmatch(r"/api/(models|datasets)/[^/]+/[^/]+", path):
        # The Hub answers model_info without a revision for the default branch; an offline olah mirror
        # only knows the /revision/REV form, so ask for main explicitly.
        path += "/revision/main"
    target = urllib.parse.urlsplit(upstream)
    base_path = target.path.rstrip("/")
    url = base_path + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
    forward = {name: request_headers[name] for name in _HUB_REQUEST_HEADERS if name in request_headers}
    # Identity encoding keeps Content-Length equal to the file size huggingface_hub checks against.
    forward["accept-encoding"] = "identity"
    conn_cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(target.hostname or "127.0.0.1", target.port, timeout=300)
    try:
        conn.request(method, url, body=body or None, headers=forward)
        response = conn.getresponse()
        status = response.status
        total = response.getheader("content-length")
        wanted = re.fullmatch(r"\s*bytes=(\d+)-(\d+)\s*", request_headers.get("range", "") or "")
        local_blob = _local_mirror_blob(path) if status == 200 and method == "GET" else None
        blob: Path | None = None
        if method == "HEAD":
            data = b""
        elif local_blob is not None:
            # olah reads a whole git blob before it sends a byte (~15 s for SmolLM2's 270 MB); the same
            # bytes come straight from the mirror's git repo, while olah still answers headers and metadata.
            # Extracted once to a file, so that each range is a seek (a mirror reads a file in 32 MiB ranges).
            blob = _blob_file(Path(emu.state_dir), *local_blob)
            total = str(blob.stat().st_size)
            data = b"" if "range" in request_headers else blob.read_bytes()
        elif status == 200 and wanted and total:
            # olah ignores Range and would send a 270 MB file for a 100 KB safetensors header read:
            # stop reading at the end of the range instead of buffering the whole file.
            data = response.read(int(wanted.group(2)) + 1)
        else:
            data = response.read()
            total = None
        reply: dict[str, str] = {}
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in _HUB_HEADERS or lower.startswith("x-"):
                reply[name] = value
            elif lower == "location":
                reply[name] = _rewrite_location(emu, upstream, value)
    except OSError as exc:
        message = f"The Hub mirror at {upstream} did not answer: {exc}"
        return 502, json.dumps({"error": message}).encode(), _JSON, {}
    finally:
        conn.close()
    content_type = next((v for k, v in reply.items() if k.lower() == "content-type"), "application/octet-stream")
    if status in (401, 404) and _missing_tree_path(path):
        # The Hub answers a folder a repo does not have with 404 EntryNotFound (huggingface_hub's list_repo_tree:
        # "RemoteEntryNotFoundError if the tree (folder) does not exist"); an offline olah mirror answers 401, which
        # huggingface_hub reads as a missing or private repo (transformers' tokenizer loading then fails).
        body = json.dumps({"error": "Entry not found"}).encode()
        return 404, body, _JSON, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
    if status == 200 and "/resolve/" in path:
        reply.setdefault("Accept-Ranges", "bytes")
    if status == 200 and method == "GET" and "range" in request_headers:
        # An offline olah mirror ignores Range and sends the whole file; the Hub honours it, and
        # huggingface_hub resumes interrupted downloads with it, so the gate cuts the range itself.
        read = _file_range(blob) if blob is not None else lambda start, end: data[start : end + 1]
        size = int(total) if total else len(data)
        return _apply_range(request_headers["range"], read, size, content_type, reply)
    return status, data, content_type, reply


_RESOLVE_RE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _mirrored(pattern: re.Pattern[str], path: str) -> tuple[Path, re.Match[str]] | None:
    """The local mirror's git repo that `path` (matched by `pattern`, naming `repo`) is about, when the gate's mirror
    is a local olah mirrors dir holding it."""
    mirrors = os.environ.get("VLP_HUB_MIRRORS_DIR", "")
    match = pattern.match(urllib.parse.unquote(path))
    if not mirrors or not match:
        return None
    repo = Path(mirrors) / "models" / match.group("repo")
    return (repo, match) if (repo / ".git").exists() else None


def _local_mirror_blob(path: str) -> tuple[Path, str] | None:
    """(git repo, "REV:FILE") when the gate's mirror is a local olah mirrors dir holding the repo."""
    found = _mirrored(_RESOLVE_RE, path)
    if found is None:
        return None
    repo, match = found
    return repo, f"{match.group('rev')}:{match.group('file')}"


_TREE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)/(?P<path>.+)$")


def _missing_tree_path(path: str) -> bool:
    """True when `path` lists a folder of a repo (and revision) the local mirror holds, and the folder is not there."""
    import subprocess

    found = _mirrored(_TREE_RE, path)
    if found is None:
        return False
    repo, match = found
    rev, folder = match.group("rev"), match.group("path").strip("/")
    known = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", f"{rev}^{{commit}}"],
                           capture_output=True)  # fmt: skip
    if known.returncode != 0:
        return False  # an unknown revision is the Hub's RevisionNotFound, not this
    listed = subprocess.run(["git", "-C", str(repo), "ls-tree", rev, "--", folder], capture_output=True, text=True)
    return listed.returncode == 0 and not listed.stdout.strip()


def _blob_file(state_dir: Path, repo: Path, spec: str) -> Path:
    """The git blob `spec` ("REV:FILE") of `repo` as a file, extracted once per blob (named by its object id, so a
    new commit of the file is a new file) under the emulator's state dir."""
    import subprocess

    oid = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "-q", spec], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = state_dir / "hub-blobs" / oid
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{oid}.{os.getpid()}.{threading.get_ident()}.partial")
        with partial.open("wb") as out:
            subprocess.run(["git", "-C", str(repo), "cat-file", "blob", oid], stdout=out, check=True)
        partial.replace(path)  # whole or absent: two requests extracting at once each write their own partial
    return path


def _file_range(path: Path) -> Callable[[int, int], bytes]:
    def read(start: int, end: int) -> bytes:
        with path.open("rb") as f:
            f.seek(start)
            return f.read(end - start + 1)

    return read


def _apply_range(
    range_header: str, read: Callable[[int, int], bytes], size: int, content_type: str, reply: dict[str, str]
) -> Answer:
    """A 206 for `range_header` of a file of `size` bytes, whose bytes start..end (inclusive) `read` gives."""
    headers = {k: v for k, v in reply.items() if k.lower() not in ("content-length", "content-range")}
    headers["Accept-Ranges"] = "bytes"
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
    if not match or match.groups() == ("", ""):
        return 200, read(0, size - 1), content_type, headers  # multi-range or malformed: the full file, as servers may
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        headers["Content-Range"] = f"bytes */{size}"
        return 416, b"", content_type, headers
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, read(start, end), content_type, headers


def _rewrite_location(emu: Any, upstream: str, location: str) -> str:
    """Keeps redirects inside the gate: absolute mirror URLs and root-relative paths get the /hf prefix."""
    upstream = upstream.rstrip("/")
    if location.startswith(upstream):
        return f"{str(emu.url).rstrip('/')}/hf{location[len(upstream) :]}"
    if location.startswith("/"):
        return "/hf" + location
    return location
