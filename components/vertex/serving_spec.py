"""A deployment as the Vertex AI Model upload and deploy requests: the serving container, machine and labels."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from vlp.components.deployment import Deployment, run_account
from vlp.components.runtime import LABEL_REVISION, LABEL_SPEC
from vlp.components.serving.engines import (
    SERVING_PORT,
    ServingSpecError,
    check_engine_values,
    check_flags,
    check_no_token,
    resolve_shape,
    tgi_env_and_args,
    vllm_args,
)
from vlp.components.serving.images import default_image

SHARED_MEMORY_MB = 16 * 1024  # Model Garden's value: NCCL between tensor-parallel shards lives in /dev/shm
# /dev/shm is carved out of host RAM: Model Garden pairs 16 GiB with hosts of 32 GB and more; a smaller host
# (g2-standard-4, 16 GB) gets at most half its memory, so the engine keeps the rest.
SHARED_MEMORY_HOST_SHARE = 0.5
# Vertex's limit (ModelContainerSpec.deployment_timeout: "Limit for deployment timeout is 2 hours"), which is also
# Model Garden's value: a 400 GB model copies from GCS and loads in well under 2 h.
DEPLOYMENT_TIMEOUT_S = 7200
# Probe.period_seconds "Must be less than timeout_seconds"; timeout_seconds "Must be greater or equal to
# period_seconds" (aiplatform_v1 Probe). The strict form satisfies both readings.
PROBE_PERIOD_S = 15
PROBE_TIMEOUT_S = 20
# ModelContainerSpec.invoke_route_prefix: "/*" is the only supported value.
INVOKE_ROUTE_PREFIX = "/*"
_DUTY_CYCLE_METRIC = "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle"


def _probe(path: str, failure_threshold: int) -> Any:
    from google.cloud.aiplatform_v1.types import Probe

    return Probe(
        http_get=Probe.HttpGetAction(path=path, port=SERVING_PORT),
        period_seconds=PROBE_PERIOD_S,
        timeout_seconds=PROBE_TIMEOUT_S,
        failure_threshold=failure_threshold,
    )


def shared_memory_mb(machine_type: str) -> int:
    """/dev/shm for the machine: Model Garden's 16 GiB, capped at half the host's RAM on small hosts."""
    from vlp.components.planning.catalog import MACHINE_TYPES

    machine = MACHINE_TYPES.get(machine_type)
    if machine is None:
        return SHARED_MEMORY_MB
    host_mb = int(machine.memory_gb * 1000**3 / 1024**2)
    return min(SHARED_MEMORY_MB, int(host_mb * SHARED_MEMORY_HOST_SHARE))


def uses_invoke(deployment: Deployment) -> bool:
    """True when the model is uploaded with invokeRoutePrefix and reached through invoke routes."""
    return deployment.config.endpoint.uses_invoke


def container_spec(deployment: Deployment, weights_uri: str = "") -> Any:
    """The typed `aiplatform_v1.ModelContainerSpec` for the deployment's engine (see vllm_args for weights_uri)."""
    from google.cloud.aiplatform_v1.types import EnvVar, ModelContainerSpec, Port
    from google.protobuf import duration_pb2

    cfg = deployment.config
    shape = resolve_shape(deployment)
    s = cfg.serving
    check_no_token(s.env, s.extra_args, cfg.name)
    check_engine_values(cfg, shape.serving_image)
    # The startup probe gives loading the whole deployment timeout; after that three misses mean unhealthy.
    startup_failures = math.ceil(DEPLOYMENT_TIMEOUT_S / PROBE_PERIOD_S)
    invoke = cfg.endpoint.uses_invoke
    # Command and routes are the image's (components/serving/images.yaml); an image outside the catalog is called as
    # its engine's default image is.
    image = shape.serving_image or default_image(s.engine, cfg.target)
    if shape.api == "tgi":
        env, args = tgi_env_and_args(deployment)
    else:
        # Model Garden's images: the env every Model Garden vLLM notebook sets (deploy_model_vllm in the
        # vertex-ai-samples notebooks); vLLM's own image reads neither.
        env = {"MODEL_ID": shape.repo, "DEPLOY_SOURCE": "notebook"} if shape.api == "model-garden" else {}
        args = vllm_args(deployment, weights_uri)
    spec = ModelContainerSpec(
        image_uri=shape.image,
        command=list(image.command),
        args=args,
        startup_probe=_probe(image.health_route, startup_failures),
        health_probe=_probe(image.health_route, 3),
    )
    if shape.api != "tgi":
        # TGI gets no predict/health route on purpose: the DLC's router (built with the `google` feature) adds
        # AIP_PREDICT_ROUTE / AIP_HEALTH_ROUTE next to its own /generate and /health, and registering one of those
        # twice makes axum panic at start; Vertex's defaults never clash, and the HF Vertex notebooks leave them unset.
        spec.health_route = image.health_route
    # predict_route and invoke_route_prefix are mutually exclusive; with the prefix, clients name the container's own
    # route (.../invoke/v1/chat/completions, .../invoke/generate) and Vertex forwards it unchanged. vLLM's own image on
    # a shared endpoint is reached through :rawPredict, which sends the OpenAI body to /v1/chat/completions as it is
    # (Google's "custom vLLM container" notebook deploys vllm/vllm-openai the same way, called with raw_predict).
    if invoke:
        spec.invoke_route_prefix = INVOKE_ROUTE_PREFIX
    elif image.predict_route and shape.api != "tgi":
        spec.predict_route = image.predict_route
    check_flags(list(spec.args), shape, cfg.name)
    env.update(s.env)
    spec.env = [EnvVar(name=k, value=v) for k, v in env.items()]
    spec.ports = [Port(container_port=SERVING_PORT)]
    spec.shared_memory_size_mb = shared_memory_mb(shape.machine_type)
    spec.deployment_timeout = duration_pb2.Duration(seconds=DEPLOYMENT_TIMEOUT_S)
    return spec


def _dedicated_resources(deployment: Deployment, beta: bool) -> Any:
    if beta:
        from google.cloud.aiplatform_v1beta1 import types
    else:
        from google.cloud.aiplatform_v1 import types

    shape = resolve_shape(deployment)
    machine = types.MachineSpec(machine_type=shape.machine_type)
    if shape.accelerator_type:
        machine.accelerator_type = shape.accelerator_type
        machine.accelerator_count = shape.accelerator_count
    if beta:
        machine.multihost_gpu_node_count = shape.node_count
    resources = types.DedicatedResources(
        machine_spec=machine,
        min_replica_count=shape.min_replicas,
        max_replica_count=shape.max_replicas,
        spot=shape.spot,
    )
    if shape.max_replicas > shape.min_replicas and shape.accelerator_type:
        # Model Garden's autoscaling target: add a replica when GPUs are busy 60% of the time.
        resources.autoscaling_metric_specs = [types.AutoscalingMetricSpec(metric_name=_DUTY_CYCLE_METRIC, target=60)]
    return resources


def needs_v1beta1(deployment: Deployment) -> bool:
    """True when the deploy needs the v1beta1 API: multi-host GPU replicas exist only there."""
    return resolve_shape(deployment).node_count > 1


def _message_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(type(message).pb(message), preserving_proto_field_name=False)


def serving_spec_hash(deployment: Deployment) -> str:
    """A short, stable hash of what serving runs (container + machine shape); equal hashes mean nothing changed."""
    spec = {
        "container": _message_dict(container_spec(deployment)),
        "resources": _message_dict(_dedicated_resources(deployment, needs_v1beta1(deployment))),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _label_value(value: str) -> str:
    return value.lower()[:63]


def model_labels(deployment: Deployment, revision_sha: str) -> dict[str, str]:
    """The run's labels plus the weights revision and the serving spec hash (how redeploys spot no-ops)."""
    labels = {str(k): _label_value(str(v)) for k, v in deployment.labels.items()}
    labels[LABEL_REVISION] = _label_value(revision_sha[:12])
    labels[LABEL_SPEC] = serving_spec_hash(deployment)
    return labels


def version_alias(revision_sha: str, spec_hash: str) -> str:
    """The Model Registry alias of one (revision, serving spec) pair; aliases must start with a letter."""
    return f"rev-{revision_sha[:12].lower()}-{spec_hash[:8]}"


def upload_model_request(deployment: Deployment, weights_uri: str, revision_sha: str) -> Any:
    """The typed `aiplatform_v1.UploadModelRequest`: serving container, GCS weights, labels, alias.

    parent_model is left empty: the register step sets it when the model already exists in the registry.
    """
    from google.cloud.aiplatform_v1.types import Model, UploadModelRequest

    cfg = deployment.config
    if not weights_uri.startswith("gs://"):
        raise ServingSpecError(
            f"weights_uri {weights_uri!r} is not a gs:// URI: serving loads the mirrored weights from GCS only"
        )
    labels = model_labels(deployment, revision_sha)
    model = Model(
        display_name=cfg.name,
        description=cfg.description or f"{cfg.model.repo} served by {cfg.serving.engine}",
        version_description=f"{cfg.model.repo}@{revision_sha} ({cfg.serving.engine}, spec {labels[LABEL_SPEC]}) "
        f"from {weights_uri.rstrip('/')}",
        container_spec=container_spec(deployment, weights_uri),
        labels=labels,
        version_aliases=[version_alias(revision_sha, labels[LABEL_SPEC])],
    )
    if cfg.serving.engine == "tgi":
        # The TGI DLC reads AIP_STORAGE_URI (Vertex's copy of artifactUri). No trailing slash: its entrypoint runs
        # `gcloud storage cp "$AIP_STORAGE_URI/*"`, and the HF GCS notebooks pass the prefix bare.
        model.artifact_uri = weights_uri.rstrip("/")
    parent = f"projects/{deployment.project}/locations/{deployment.region}"
    return UploadModelRequest(parent=parent, model=model)


def endpoint_placeholder(deployment: Deployment) -> str:
    """The endpoint resource name shown before deploy knows the real one (by the config's endpoint name)."""
    name = deployment.config.endpoint.name
    return f"projects/{deployment.project}/locations/{deployment.region}/endpoints/{name}"


def deploy_model_request(
    deployment: Deployment,
    model_resource: str,
    *,
    endpoint_resource: str = "",
    traffic_split: dict[str, int] | None = None,
) -> Any:
    """The typed `DeployModelRequest` (v1; v1beta1 for multi-host GPU replicas, see `needs_v1beta1`).

    traffic_split keys are deployed model ids, "0" meaning the model being deployed; the default sends it all
    traffic. A blue/green redeploy passes {"0": 0, OLD_ID: 100} and shifts traffic after the smoke test.
    """
    beta = needs_v1beta1(deployment)
    if beta:
        from google.cloud.aiplatform_v1beta1 import types
    else:
        from google.cloud.aiplatform_v1 import types

    cfg = deployment.config
    sha = deployment.revision_sha
    display = f"{cfg.name}-{sha[:8]}" if sha else cfg.name
    deployed = types.DeployedModel(
        model=model_resource,
        display_name=display,
        dedicated_resources=_dedicated_resources(deployment, beta),
    )
    if beta:
        # "On the v1beta1 service endpoint, container logging is disabled by default" (online-prediction-logging):
        # without it a failed multi-host deploy has no model server logs to show.
        deployed.enable_container_logging = True
    service_account = run_account(deployment.service_account, cfg)
    if service_account:
        deployed.service_account = service_account
    return types.DeployModelRequest(
        endpoint=endpoint_resource or endpoint_placeholder(deployment),
        deployed_model=deployed,
        traffic_split=traffic_split if traffic_split is not None else {"0": 100},
    )


def render_requests(deployment: Deployment, weights_uri: str, revision_sha: str = "SHA") -> dict[str, Any]:
    """Both requests as REST JSON (camelCase, as the aiplatform API takes them): what `vlp render` prints.
    deploy_model_api names the API version the deploy goes to (v1beta1 for a multi-host replica)."""
    cfg = deployment.config
    model_resource = f"projects/{deployment.project}/locations/{deployment.region}/models/{cfg.name}"
    return {
        "upload_model": _message_dict(upload_model_request(deployment, weights_uri, revision_sha)),
        "deploy_model": _message_dict(deploy_model_request(deployment, model_resource)),
        "deploy_model_api": "v1beta1" if needs_v1beta1(deployment) else "v1",
        "redeploy": cfg.endpoint.redeploy_path(resolve_shape(deployment).api),
    }
