"""The Vertex AI rules the emulator enforces, one function each, with the source that states it.

docs/vertex-contract.md lists every rule with its id (the `V-…` in each docstring) and its test. A rule whose
source is a doc sentence Google may not enforce, or whose exact error text no source gives, says "unverified":
the emulator refuses anyway, so the pipeline cannot come to depend on it.
"""

from __future__ import annotations

from typing import Any

from vlp.pipelines.local.emulator.errors import ApiError

MAX_DEPLOYMENT_TIMEOUT_S = 7200
MAX_REQUEST_BYTES = 1_500_000
MAX_DEDICATED_REQUEST_BYTES = 10_000_000
INVOKE_PREFIXES = ("/*",)
DEDICATED_DNS_SUFFIX = ".prediction.vertexai.goog"
# Container paths the pinned images serve, for invoke (which forwards the path unchanged).
# vLLM: the Model Garden api_server's routes in the Vertex vLLM doc (/generate, /ping); its OpenAI routes are not
# documented for the 20241001 image (unverified, so refused). TGI 2.4.0: router/src/server.rs L2258-2320.
CONTAINER_ROUTES = {
    "vllm": ("/generate", "/ping"),
    "tgi": (
        "/",
        "/generate",
        "/generate_stream",
        "/v1/chat/completions",
        "/v1/completions",
        "/vertex",
        "/health",
        "/info",
        "/tokenize",
        "/metrics",
    ),
}


def _duration_s(value: Any) -> float:
    if isinstance(value, dict):
        return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
    text = str(value or "0s")
    return float(text.rstrip("s") or 0)


def check_container_spec(spec: dict[str, Any]) -> None:
    """V-ROUTES, V-PROBE, V-TIMEOUT: a ModelContainerSpec (camelCase JSON) that Vertex would accept."""
    # V-ROUTES: "Only one of predict_route or invoke_route_prefix can be set"; "/*" is the only supported value
    # (aiplatform_v1 ModelContainerSpec.invoke_route_prefix, field 15).
    prefix = spec.get("invokeRoutePrefix", "")
    if prefix and spec.get("predictRoute"):
        raise ApiError(
            "INVALID_ARGUMENT",
            "Only one of container_spec.predict_route or container_spec.invoke_route_prefix can be set.",
        )
    if prefix and prefix not in INVOKE_PREFIXES:
        raise ApiError(
            "INVALID_ARGUMENT", f'container_spec.invoke_route_prefix {prefix!r}: "/*" is the only supported value.'
        )
    # V-PROBE: Probe.period_seconds "Must be less than timeout_seconds"; timeout_seconds "Must be greater or equal
    # to period_seconds" (aiplatform_v1 types/model.py Probe). Enforcement by Google unverified: strict here.
    for key in ("startupProbe", "healthProbe", "livenessProbe"):
        probe = spec.get(key)
        if not probe:
            continue
        period = int(probe.get("periodSeconds") or 10)
        timeout = int(probe.get("timeoutSeconds") or 1)
        if not period < timeout:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"container_spec.{key}: period_seconds ({period}) must be less than timeout_seconds ({timeout}).",
            )
    # V-TIMEOUT: ModelContainerSpec.deployment_timeout "Limit for deployment timeout is 2 hours".
    if "deploymentTimeout" in spec and _duration_s(spec["deploymentTimeout"]) > MAX_DEPLOYMENT_TIMEOUT_S:
        raise ApiError(
            "INVALID_ARGUMENT",
            f"container_spec.deployment_timeout {spec['deploymentTimeout']} is over the 2 hour limit.",
        )


def check_deploy_target(spec: dict[str, Any], endpoint: dict[str, Any], model_name: str) -> None:
    """V-INVOKE-DEDICATED: "If this field [invoke_route_prefix] is set, the Model can only be deployed to
    dedicated endpoint" (ModelContainerSpec.invoke_route_prefix)."""
    if spec.get("invokeRoutePrefix") and not endpoint.get("dedicatedEndpointEnabled"):
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Model {model_name} sets container_spec.invoke_route_prefix and can only be deployed to a dedicated "
            f"endpoint; {endpoint['name']} is not dedicated.",
        )


def check_shared_memory(spec: dict[str, Any], machine_memory_gb: float | None, machine_type: str) -> None:
    """V-SHM: /dev/shm is carved out of the host's RAM; more than the host has cannot be reserved. Vertex
    documents no limit (unverified): refused when shared_memory_size_mb reaches the machine's memory."""
    shm = int(spec.get("sharedMemorySizeMb") or 0)
    if machine_memory_gb and shm * 1024**2 >= machine_memory_gb * 1000**3:
        raise ApiError(
            "INVALID_ARGUMENT",
            f"container_spec.shared_memory_size_mb {shm} does not fit the {machine_memory_gb:g} GB of {machine_type}.",
        )


def check_host(endpoint: dict[str, Any], host: str, regional_hosts: tuple[str, ...]) -> None:
    """V-HOST: a dedicated endpoint answers prediction calls only on its own DNS (Endpoint.dedicated_endpoint_dns;
    "the dedicated endpoint ... can't be accessed through the shared DNS"); a shared endpoint has no
    dedicated DNS. Exact error text unverified."""
    dedicated_dns = endpoint.get("dedicatedEndpointDns", "")
    if endpoint.get("dedicatedEndpointEnabled"):
        if host != dedicated_dns:
            raise ApiError(
                "FAILED_PRECONDITION",
                f"Endpoint {endpoint['name']} is a dedicated endpoint: send prediction requests to its dedicated "
                f"DNS {dedicated_dns}, not {host or 'the shared domain'}.",
            )
    elif host not in regional_hosts:
        raise ApiError("NOT_FOUND", f"Endpoint {endpoint['name']} is not served on {host}.")


def check_invoke(endpoint: dict[str, Any], spec: dict[str, Any], dm_id: str, subpath: str, engine: str) -> None:
    """V-INVOKE: invoke routes exist only for models uploaded with invoke_route_prefix, on dedicated endpoints
    (aiplatform SDK Endpoint.invoke raises "only supported on dedicated endpoints"; docs
    predictions/use-arbitrary-custom-routes); the container must serve the path (V-CONTAINER-ROUTES)."""
    if not endpoint.get("dedicatedEndpointEnabled"):
        raise ApiError(
            "FAILED_PRECONDITION", f"Invoke is only supported on dedicated endpoints; {endpoint['name']} is not."
        )
    if not spec.get("invokeRoutePrefix"):
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Deployed model {dm_id} was not uploaded with container_spec.invoke_route_prefix: invoke is not enabled.",
        )
    from vlp.pipelines.local.emulator.images import image_of

    image = image_of(spec)  # a catalog image: the routes its entry cites (components/serving/images.yaml)
    routes = image.routes if image is not None else CONTAINER_ROUTES.get(engine)
    if routes is not None and subpath not in routes:
        raise ApiError(
            "NOT_FOUND", f"The serving container of deployed model {dm_id} ({engine}) does not serve {subpath}."
        )


def check_predict_route(spec: dict[str, Any], dm_id: str, kind: str) -> None:
    """V-ROUTES: with invoke_route_prefix set, predict, rawPredict and chat completions are off for that model
    (docs predictions/use-arbitrary-custom-routes; error text unverified)."""
    if spec.get("invokeRoutePrefix"):
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Deployed model {dm_id} serves invoke routes only (invoke_route_prefix is set): {kind} is not available.",
        )


def check_request_size(body: bytes, dedicated: bool = False) -> None:
    """V-SIZE: "The request body limit is 1.5 MB" on a shared endpoint (aiplatform SDK Endpoint.raw_predict and
    invoke docstrings); a dedicated endpoint takes "Larger payload support: Up to 10 MB"
    (vertex-ai/docs/predictions/using-dedicated-endpoints). 10 MB read as 10,000,000 bytes (unverified: MB or MiB)."""
    limit = MAX_DEDICATED_REQUEST_BYTES if dedicated else MAX_REQUEST_BYTES
    if len(body) > limit:
        raise ApiError("INVALID_ARGUMENT", f"Request payload size {len(body)} exceeds the limit of {limit} bytes.")


# Google's one documented multi-host GPU deployment: "Serve a DeepSeek-V3 model using multi-host GPU deployment"
# (cloud.google.com/vertex-ai/docs/predictions/use-multihost-gpu, Preview). What it shows is all the emulator accepts
# as multi-host; whether Vertex refuses other forms, and with which text, is unverified.
MULTI_HOST_PAGE = "vertex-ai/docs/predictions/use-multihost-gpu"
MULTI_HOST_LAUNCHER = "/vllm-workspace/ray_launcher.sh"
# "you need two a3-highgpu-8g VMs with eight H100 GPUs each"; the deploy passes
# --accelerator=type=nvidia-h100-80gb,count=8 (per node) and --multihost-gpu-node-count=2.
MULTI_HOST_MACHINES = {"a3-highgpu-8g": ("NVIDIA_H100_80GB", 8)}


def check_multihost_v1(body: bytes) -> None:
    """V-MH-API: multihost_gpu_node_count is field 6 of v1beta1's MachineSpec only (googleapis
    google/cloud/aiplatform/v1/machine_resources.proto has no field 6); the page deploys with `gcloud alpha ai
    endpoints deploy-model --multihost-gpu-node-count`, which calls v1beta1. A v1 request naming it is an unknown
    field (Google's "Invalid JSON payload received. Unknown name ..." form; exact text unverified)."""
    import json

    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return  # the request parser reports malformed JSON
    deployed = data.get("deployedModel", data.get("deployed_model")) if isinstance(data, dict) else None
    resources = (deployed or {}).get("dedicatedResources", (deployed or {}).get("dedicated_resources")) or {}
    machine = resources.get("machineSpec", resources.get("machine_spec")) or {}
    for key in ("multihostGpuNodeCount", "multihost_gpu_node_count"):
        if isinstance(machine, dict) and key in machine:
            raise ApiError(
                "INVALID_ARGUMENT",
                f'Invalid JSON payload received. Unknown name "{key}" at '
                "'deployed_model.dedicated_resources.machine_spec': Cannot find field. (Multi-host GPU deployment "
                f"is a v1beta1 API field; see {MULTI_HOST_PAGE}.)",
            )


def check_multihost_machine(machine_type: str, accelerator_type: str, accelerator_count: int, nodes: int) -> None:
    """V-MH-MACHINE: the page's only machine for multi-host is a3-highgpu-8g with 8 x H100 80GB per node (the
    accelerator count is per node) over two or more nodes (multihost_gpu_node_count: "The number of nodes per replica
    for multihost GPU deployments"). Other machines: no documented path (Google's own refusal unverified)."""
    if nodes < 0:
        raise ApiError("INVALID_ARGUMENT", f"machine_spec.multihost_gpu_node_count {nodes} must not be negative.")
    expected = MULTI_HOST_MACHINES.get(machine_type)
    if expected is None or (accelerator_type, accelerator_count) != expected:
        documented = ", ".join(f"{m} with {n} x {a} per node" for m, (a, n) in MULTI_HOST_MACHINES.items())
        raise ApiError(
            "INVALID_ARGUMENT",
            f"machine_spec {machine_type} with {accelerator_count} x {accelerator_type or 'no accelerator'} and "
            f"multihost_gpu_node_count {nodes} is outside the documented multi-host GPU deployment ({documented}; "
            f"{MULTI_HOST_PAGE}).",
        )


def check_multihost_launcher(spec: dict[str, Any], model_name: str) -> None:
    """V-MH-LAUNCHER: the page uploads the Model Garden vLLM image with `/vllm-workspace/ray_launcher.sh` as the first
    container arg ("a prebuilt vLLM container image with Ray integration ... Ray enables the distributed processing
    required to run models across multiple GPU nodes"); without it each node would start a server of its own."""
    args = [str(a) for a in spec.get("args") or []]
    if not args or args[0] != MULTI_HOST_LAUNCHER:
        first = args[0] if args else "no args"
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Model {model_name} cannot be deployed over several nodes: its container_spec.args must start with "
            f"{MULTI_HOST_LAUNCHER} (the documented multi-host GPU deployment, {MULTI_HOST_PAGE}); they start with "
            f"{first!r}.",
        )


def check_multihost_endpoint(endpoint: dict[str, Any]) -> None:
    """V-MH-DEDICATED: "the Model Garden container requires a dedicated endpoint" (the page creates it with
    dedicatedEndpointEnabled: true before the multi-host deploy)."""
    if not endpoint.get("dedicatedEndpointEnabled"):
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Endpoint {endpoint['name']} is not a dedicated endpoint: the documented multi-host GPU deployment "
            f"deploys to a dedicated endpoint ({MULTI_HOST_PAGE}).",
        )


_MULTI_REGIONS = {"US": "us-", "EU": "europe-", "ASIA": "asia-"}


def check_artifact_region(artifact_uri: str, bucket_location: str, location: str) -> None:
    """V-BUCKET-REGION: a model's artifacts must be in a bucket in the model's region (or a multi-region that
    contains it): cloud.google.com/vertex-ai/docs/model-registry/import-model. Google's enforcement unverified."""
    where = bucket_location.upper()
    prefix = _MULTI_REGIONS.get(where)
    ok = location.startswith(prefix) if prefix else where == location.upper()
    if where and not ok:
        raise ApiError(
            "INVALID_ARGUMENT",
            f"artifact_uri {artifact_uri} is in a bucket in {where}; the model is in {location}: use a bucket in the "
            "same region.",
        )
