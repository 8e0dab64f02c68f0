"""The model server's own log lines (Cloud Logging) and the failure messages built from them, for a failed
deploy and a failed smoke test alike."""

from __future__ import annotations

import json
import re
import urllib.parse

ENDPOINT_RESOURCE_TYPE = "aiplatform.googleapis.com/Endpoint"  # a Vertex deployed model's container logs
LOG_LINES = 30


def log_filter(endpoint_id: str, deployed_model_id: str = "") -> str:
    """The Cloud Logging filter for a deployed model's serving container logs."""
    parts = [f'resource.type="{ENDPOINT_RESOURCE_TYPE}"', f'resource.labels.endpoint_id="{endpoint_id}"']
    if deployed_model_id:
        parts.append(f'labels.deployed_model_id="{deployed_model_id}"')
    return " AND ".join(parts)


def revision_log_filter(service_id: str, revision: str = "") -> str:
    """The Cloud Logging filter for a Cloud Run revision's container logs (resource type cloud_run_revision)."""
    parts = [f'resource.type="{RUN_RESOURCE_TYPE}"', f'resource.labels.service_name="{service_id}"']
    if revision:
        parts.append(f'resource.labels.revision_name="{revision}"')
    return " AND ".join(parts)


RUN_RESOURCE_TYPE = "cloud_run_revision"


def logs_hint(project: str, endpoint_id: str, deployed_model_id: str = "", flt: str = "") -> str:
    """The gcloud command and console link that show more of the model server's log."""
    flt = flt or log_filter(endpoint_id, deployed_model_id)
    console = (
        "https://console.cloud.google.com/logs/query;query="
        + urllib.parse.quote(flt, safe="")
        + (f"?project={project}")
    )
    return f"more: gcloud logging read '{flt}' --project={project} --limit=200 --freshness=1d\n      {console}"


def server_log_tail(
    project: str,
    endpoint_id: str,
    deployed_model_id: str = "",
    api_endpoint: str = "",
    lines: int = LOG_LINES,
    flt: str = "",
) -> list[str]:
    """The last lines the model server wrote (oldest first), read from Cloud Logging (`flt`: another filter, e.g.
    a Cloud Run revision's); never raises."""
    from vlp.components.clients import logging_client

    try:
        from google.cloud import logging as cloud_logging

        client = logging_client(project, api_endpoint)
        entries = client.list_entries(
            resource_names=[f"projects/{project}"],
            filter_=flt or log_filter(endpoint_id, deployed_model_id),
            order_by=cloud_logging.DESCENDING,
            max_results=lines,
        )
        out = []
        for entry in entries:
            payload = entry.payload
            if isinstance(payload, dict):
                payload = payload.get("message") or json.dumps(payload)
            out.append(str(payload).rstrip())
        return list(reversed(out))
    except Exception as exc:  # noqa: BLE001 - a log read must never hide the failure it explains
        return [f"(could not read the logs: {type(exc).__name__}: {str(exc)[:200]})"]


def format_logs(lines: list[str]) -> str:
    if not lines:
        return "  (no log lines: the container may not have started; check the image, quota and machine type)"
    return "\n".join(f"  | {line}" for line in lines)


_DEPLOY_HINTS = [
    (
        r"CUDA out of memory|OutOfMemoryError|torch\.OutOfMemory",
        "GPU out of memory: lower serving.max_num_seqs, "
        "serving.max_model_len or serving.gpu_memory_utilization, or plan a bigger machine",
    ),
    (
        r"max_model_len|larger than the maximum number of tokens that can be stored in KV cache",
        "the KV cache cannot hold max_model_len tokens: lower serving.max_model_len or use more GPUs",
    ),
    (
        r"403|Permission denied|storage\.objects\.(get|list)",
        "the serving account (the endpoint's, or the Cloud Run service's) cannot read the weights "
        "bucket: grant it roles/storage.objectViewer on the bucket",
    ),
    (r"No space left on device", "the replica's disk is too small for the weights: use a machine with more disk"),
    (r"(?i)quota", "not enough serving quota in this region: request more or add a region to placement.regions"),
    (
        r"(?i)stockout|resources? (are|is) not available|ZONE_RESOURCE_POOL_EXHAUSTED",
        "no GPUs of this type free in the region right now: retry later, use Spot or another region",
    ),
    (r"(?i)chat template", "the model has no chat template: set serving.chat_template or use an -Instruct model"),
    (r"trust_remote_code|trust-remote-code", "the model ships custom code: set serving.trust_remote_code: true"),
]


def _failure_message(
    head: str, logs_title: str, lines: list[str], error: str, hint: str, *extra: tuple[str, str]
) -> str:
    """The error, the server's last log lines, the likely fixes their text points to, and where to read more."""
    text = "\n".join([error, *lines])
    fixes = [fix for pattern, fix in (*_DEPLOY_HINTS, *extra) if re.search(pattern, text)]
    parts = [f"{head} failed: {error}", logs_title, format_logs(lines)]
    if fixes:
        parts.append("Likely fix: " + "; ".join(dict.fromkeys(fixes)))
    parts.append(hint)
    return "\n".join(parts)


def deploy_failure_message(
    project: str, region: str, endpoint_id: str, deployed_model_id: str, error: str, api_endpoint: str = ""
) -> str:
    """What a failed deploy says: the error, the model server's last log lines, a likely fix, where to read more."""
    who = f"deployed model {deployed_model_id} on " if deployed_model_id else ""
    return _failure_message(
        f"Deploying to {who}endpoint projects/{project}/locations/{region}/endpoints/{endpoint_id}",
        f"Last model server log lines ({ENDPOINT_RESOURCE_TYPE}, endpoint {endpoint_id}):",
        server_log_tail(project, endpoint_id, deployed_model_id, api_endpoint),
        error,
        logs_hint(project, endpoint_id, deployed_model_id),
    )


def revision_failure_message(project: str, service_id: str, revision: str, error: str, api_endpoint: str = "") -> str:
    """What a failed Cloud Run deploy says: the error, the revision's last log lines, a likely fix, where to read
    more."""
    flt = revision_log_filter(service_id, revision)
    return _failure_message(
        f"Deploying revision {revision} of Cloud Run service {service_id}",
        f"Last log lines of revision {revision} ({RUN_RESOURCE_TYPE}):",
        server_log_tail(project, "", api_endpoint=api_endpoint, flt=flt),
        error,
        logs_hint(project, "", flt=flt),
        (r"(?i)startup probe|timed out|not ready", "the model did not load in time: raise cloud_run.startup_timeout_s"),
    )
