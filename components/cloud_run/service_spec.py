"""The `google.cloud.run.v2.Service` request a deployment becomes: the revision template, its labels and spec hash
(../shared/research/cloud-run.md), and the Cloud Run Admin API clients."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from vlp.components.deployment import Deployment, run_account
from vlp.components.planning.catalog import RUN_GPUS
from vlp.components.runtime import LABEL_REVISION, LABEL_SPEC

SERVING_PORT = 8080  # Cloud Run's $PORT; the TGI DLC listens on it
PROBE_PERIOD_S = 10  # per-field maximum is 240 s (vendor.proto Probe)
CANDIDATE_TAG = "candidate"
WEIGHTS_MOUNT = "/mnt/model"


def services_client(api_endpoint: str = "") -> Any:
    from google.cloud import run_v2

    from vlp.components import clients

    return run_v2.ServicesClient(**clients.gapic_kwargs(None, api_endpoint))


def revisions_client(api_endpoint: str = "") -> Any:
    from google.cloud import run_v2

    from vlp.components import clients

    return run_v2.RevisionsClient(**clients.gapic_kwargs(None, api_endpoint))


# ----------------------------------------------------------------------------- the Service request


def service_name(deployment: Deployment) -> str:
    return f"projects/{deployment.project}/locations/{deployment.region}/services/{deployment.config.service_id}"


def revision_id(deployment: Deployment) -> str:
    """A new revision's name: SERVICE-SHA7-RUN6; unique per run, since a name is never reused with another
    template (409) and every run labels its revision."""
    sha = (deployment.revision_sha or "local")[:7].lower()
    run = hashlib.sha256((deployment.run_name or "manual").encode()).hexdigest()[:6]
    return f"{deployment.config.service_id}-{sha}-{run}"


def revision_template(deployment: Deployment, weights_uri: str, labels: dict[str, str]) -> Any:
    """The run_v2.RevisionTemplate: the serving image on one GPU, weights from GCS with no Hub token, a startup probe
    that gives the model `cloud_run.startup_timeout_s` to load. TGI: the DLC copies the weights (or reads a volume);
    vLLM: its own image streams them from gs:// (or reads a volume)."""
    from google.cloud import run_v2

    from vlp.components.serving.engines import (
        check_engine_values,
        check_flags,
        check_no_token,
        resolve_shape,
        tgi_env_and_args,
        vllm_serve_args,
    )
    from vlp.components.serving.images import default_image

    cfg = deployment.config
    spec = cfg.cloud_run
    shape = resolve_shape(deployment)
    check_no_token(cfg.serving.env, cfg.serving.extra_args, cfg.name)
    check_engine_values(cfg, shape.serving_image)
    uri = weights_uri.rstrip("/")
    mount = spec.weights == "mount"
    # Command and health route are the image's (components/serving/images.yaml); an image outside the catalog is run as
    # its engine's default image is.
    image = shape.serving_image or default_image(cfg.serving.engine, cfg.target)
    if shape.api == "openai":
        env: dict[str, str] = {}
        args = vllm_serve_args(deployment, uri, model_path=WEIGHTS_MOUNT if mount else "")
    else:
        env, args = tgi_env_and_args(deployment)
    check_flags(args, shape, cfg.name)
    env = {**env, "HF_HUB_OFFLINE": "1", **cfg.serving.env}
    container = run_v2.Container(
        image=shape.image,
        command=list(image.command),
        args=args,
        ports=[run_v2.ContainerPort(name="http1", container_port=SERVING_PORT)],
        resources=run_v2.ResourceRequirements(
            limits={"cpu": str(spec.cpu), "memory": spec.memory, "nvidia.com/gpu": "1"},
            cpu_idle=False,  # GPU services need CPU always allocated
            startup_cpu_boost=True,
        ),
        startup_probe=run_v2.Probe(
            http_get=run_v2.HTTPGetAction(path=image.health_route, port=SERVING_PORT),
            period_seconds=PROBE_PERIOD_S,
            timeout_seconds=5,
            failure_threshold=math.ceil(spec.startup_timeout_s / PROBE_PERIOD_S),
        ),
    )
    template = run_v2.RevisionTemplate(
        labels=labels,
        scaling=run_v2.RevisionScaling(min_instance_count=spec.min_instances, max_instance_count=spec.max_instances),
        max_instance_request_concurrency=spec.concurrency,
        node_selector=run_v2.NodeSelector(accelerator=spec.gpu_type),
        gpu_zonal_redundancy_disabled=not spec.zonal_redundancy,
    )
    account = spec.service_account or run_account(deployment.service_account, cfg)
    if account:
        template.service_account = account
    if not mount:
        if shape.api != "openai":
            # The DLC's entrypoint runs `gcloud storage cp "$AIP_STORAGE_URI/*" /tmp/model` as the service's account
            # and points MODEL_ID there (Google-Cloud-Containers containers/tgi/.../entrypoint.sh).
            env["AIP_STORAGE_URI"] = uri
    else:
        bucket, _, prefix = uri.removeprefix("gs://").partition("/")
        template.volumes = [
            run_v2.Volume(
                name="weights",
                gcs=run_v2.GCSVolumeSource(bucket=bucket, read_only=True, mount_options=[f"only-dir={prefix}"]),
            )
        ]
        container.volume_mounts = [run_v2.VolumeMount(name="weights", mount_path=WEIGHTS_MOUNT)]
        if shape.api != "openai":
            env["MODEL_ID"] = WEIGHTS_MOUNT
    container.env = [run_v2.EnvVar(name=k, value=v) for k, v in env.items()]
    template.containers = [container]
    return template


def spec_hash(deployment: Deployment) -> str:
    """What serving runs (the template without names, labels or the weights' run-specific path), hashed: equal
    hashes with the same weights revision mean a redeploy would change nothing."""
    from google.protobuf import json_format

    template = revision_template(deployment, "gs://BUCKET/WEIGHTS", {})
    data = json_format.MessageToDict(type(template).pb(template))
    ingress = deployment.config.cloud_run.ingress
    return hashlib.sha256(json.dumps({"template": data, "ingress": ingress}, sort_keys=True).encode()).hexdigest()[:12]


_INGRESS = {
    "all": "INGRESS_TRAFFIC_ALL",
    "internal": "INGRESS_TRAFFIC_INTERNAL_ONLY",
    "internal-and-cloud-load-balancing": "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER",
}


def revision_labels(deployment: Deployment) -> dict[str, str]:
    labels = {str(k): str(v).lower()[:63] for k, v in deployment.labels.items()}
    labels[LABEL_REVISION] = deployment.revision_sha[:12].lower()
    labels[LABEL_SPEC] = spec_hash(deployment)
    return labels


def service_request(deployment: Deployment, weights_uri: str, previous: list[Any] | None = None) -> Any:
    """The run_v2.Service for this deployment: the new revision behind the `candidate` tag, at 0% beside the
    traffic that serves now (`previous`, run_v2.TrafficTarget), or at 100% when nothing serves yet. Private: no
    IAM binding is part of it (callers get roles/run.invoker, never allUsers)."""
    from google.cloud import run_v2

    cfg = deployment.config
    labels = revision_labels(deployment)
    template = revision_template(deployment, weights_uri, labels)
    template.revision = revision_id(deployment)
    pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    new = run_v2.TrafficTarget(type_=pin, revision=template.revision, tag=CANDIDATE_TAG, percent=0 if previous else 100)
    service = run_v2.Service(
        labels={k: v for k, v in labels.items() if k not in (LABEL_REVISION, LABEL_SPEC)},
        ingress=getattr(run_v2.IngressTraffic, _INGRESS[cfg.cloud_run.ingress]),
        template=template,
        traffic=[*(previous or []), new],
        description=cfg.description or f"{cfg.model.repo} served by {'vLLM' if cfg.serving.engine == 'vllm' else 'TGI'}",
    )
    stage = RUN_GPUS[cfg.cloud_run.gpu_type].launch_stage
    if stage:
        from google.api import launch_stage_pb2

        service.launch_stage = getattr(launch_stage_pb2, stage)
    return service


def render_service(deployment: Deployment, weights_uri: str) -> dict[str, Any]:
    """The Service request as REST JSON (camelCase, google.cloud.run.v2.Service): what `vlp render` prints."""
    from google.protobuf import json_format

    service = service_request(deployment, weights_uri)
    data = json_format.MessageToDict(type(service).pb(service))
    # REST JSON drops proto3 defaults; show the settings a reader looks for even when they are the default.
    resources = data["template"]["containers"][0]["resources"]
    resources.setdefault("cpuIdle", False)
    return {
        "service": data,
        "service_id": deployment.config.service_id,
        "parent": f"projects/{deployment.project}/locations/{deployment.region}",
        "access": "private: no allUsers binding; callers need roles/run.invoker (the pipeline's account calls through roles/run.developer)",
    }
