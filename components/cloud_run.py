"""The Cloud Run target: the plan for an instance (GPUs, regions and prices are in catalog.py), the region's quotas, and
the `google.cloud.run.v2.Service` request a deployment becomes (../shared/research/cloud-run.md)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from components.catalog import (
    RUN_CPU_PER_SECOND,
    RUN_GIB_PER_SECOND,
    RUN_GPUS,
    RUN_PRICES_NOTE,
    instance_shape,
)

RUN_SERVICE = "run.googleapis.com"
CPU_QUOTA = "CpuAllocPerProjectRegion"  # milli-CPU (run.googleapis.com/cpu_allocation)
MEM_QUOTA = "MemAllocPerProjectRegion"  # bytes (run.googleapis.com/mem_allocation)
SERVING_PORT = 8080  # Cloud Run's $PORT; the TGI DLC listens on it
PROBE_PERIOD_S = 10  # per-field maximum is 240 s (vendor.proto Probe)
CANDIDATE_TAG = "candidate"
WEIGHTS_MOUNT = "/mnt/model"
# With weights: copy the DLC copies them into /tmp, which is in memory: keep a quarter of the instance for TGI
# itself (tokenizer, router, CUDA context). Unverified margin.
WEIGHTS_MEMORY_SHARE = 0.75
LABEL_REVISION = "vlp-revision"
LABEL_SPEC = "vlp-spec"


def gpu_quota_id(gpu_type: str, zonal_redundancy: bool) -> str:
    return RUN_GPUS[gpu_type].quota + ("" if zonal_redundancy else "NoZonalRedundancy") + "PerProjectRegion"


def price_per_second(spec: Any) -> float:
    """USD per second of one instance (CPU always allocated, its memory and its GPU)."""
    gpu = RUN_GPUS[spec.gpu_type]
    gpu_price = gpu.price_per_second_zonal if spec.zonal_redundancy else gpu.price_per_second
    return spec.cpu * RUN_CPU_PER_SECOND + spec.memory_gib * RUN_GIB_PER_SECOND + gpu_price


def instance_allocation(spec: Any) -> dict[str, int]:
    """What one revision reserves at max instances, by quota id (Cloud Run counts max instances against quota)."""
    n = spec.max_instances
    return {
        CPU_QUOTA: spec.cpu * 1000 * n,
        MEM_QUOTA: int(spec.memory_gib * 2**30) * n,
        gpu_quota_id(spec.gpu_type, spec.zonal_redundancy): n * RUN_GPUS[spec.gpu_type].quota_per_gpu,
    }


# ----------------------------------------------------------------------------- plan


def adapt_plan(plan: Any, cfg: Any) -> None:
    """Turn a plan for one GPU of the instance's type into the Cloud Run shape: price per instance, instances,
    the weights in instance memory (weights: copy) and the TGI batch beside the service's concurrency."""
    spec = cfg.cloud_run
    gpu = RUN_GPUS[spec.gpu_type]
    per_s = price_per_second(spec)
    for key, value in instance_shape(spec.gpu_type).items():
        setattr(plan, key, value)
    plan.replica_count = spec.min_instances
    plan.max_replica_count = spec.max_instances
    plan.price_per_hour_usd = round(per_s * 3600, 4)
    plan.prices_note = RUN_PRICES_NOTE
    plan.price_estimated = spec.gpu_type != "nvidia-l4" or spec.zonal_redundancy
    plan.alternatives = []
    plan.target = "cloud_run"
    tokens_per_s = float((plan.throughput or {}).get("output_tokens_per_s") or 0.0)
    if tokens_per_s:
        plan.cost_per_million_output_tokens_usd = round(per_s / tokens_per_s * 1e6, 4)
    plan.cloud_run = {
        "gpu_type": spec.gpu_type,
        "cpu": spec.cpu,
        "memory": spec.memory,
        "min_instances": spec.min_instances,
        "max_instances": spec.max_instances,
        "concurrency": spec.concurrency,
        "zonal_redundancy": spec.zonal_redundancy,
        "weights": spec.weights,
        "price_per_second_usd": round(per_s, 7),
        "price_per_hour_usd": round(per_s * 3600, 4),
        "max_price_per_hour_usd": round(per_s * 3600 * spec.max_instances, 4),
        "idle_price_per_hour_usd": round(per_s * 3600 * spec.min_instances, 4),
        "prices_note": RUN_PRICES_NOTE,
        "regions_offering_gpu": list(gpu.regions),
    }
    plan.reason = (
        f"Cloud Run: 1 x {gpu.accelerator} per instance, {spec.cpu} CPU / {spec.memory}, {spec.min_instances}.."
        f"{spec.max_instances} instances, {spec.concurrency} requests each; ${per_s:.7f}/s per instance "
        f"(${per_s * 3600:.2f}/h), nothing while scaled to zero"
    )
    memory_bytes = spec.memory_gib * 2**30
    if spec.weights == "copy" and plan.served_weights_bytes > WEIGHTS_MEMORY_SHARE * memory_bytes:
        plan.errors.append(
            f"with cloud_run.weights: copy the TGI DLC copies the {plan.served_weights_bytes / 1e9:.1f} GB of weights "
            f"into /tmp, which Cloud Run keeps in the instance's {spec.memory} of memory (more than "
            f"{WEIGHTS_MEMORY_SHARE:.0%} of it): raise cloud_run.memory, or set cloud_run.weights: mount"
        )
    seqs = int(plan.max_num_seqs or 0)
    if seqs and spec.concurrency > seqs:
        plan.warnings.append(
            f"cloud_run.concurrency {spec.concurrency} is above TGI's --max-concurrent-requests {seqs}: requests "
            "beyond it are refused with 429; lower cloud_run.concurrency or raise serving.max_num_seqs"
        )
    plan.regions = [r for r in plan.regions if r in gpu.regions] or plan.regions


def offered_regions(cfg: Any, regions: list[str]) -> tuple[list[str], list[str]]:
    """(candidate regions that offer the GPU on Cloud Run, those that do not)."""
    offered = RUN_GPUS[cfg.cloud_run.gpu_type].regions
    return [r for r in regions if r in offered], [r for r in regions if r not in offered]


# ----------------------------------------------------------------------------- quota


def services_client(api_endpoint: str = "") -> Any:
    from google.cloud import run_v2

    from components import clients

    return run_v2.ServicesClient(**clients.gapic_kwargs(None, api_endpoint))


def revisions_client(api_endpoint: str = "") -> Any:
    from google.cloud import run_v2

    from components import clients

    return run_v2.RevisionsClient(**clients.gapic_kwargs(None, api_endpoint))


def _cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _memory(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(value or 0)


def revision_allocation(revision: Any) -> dict[str, int]:
    """What a serving revision (run_v2.Revision) holds at its max instances, by quota id; Cloud Run's default
    max instances is 100 (run/docs/configuring/max-instances)."""
    n = revision.scaling.max_instance_count or 100
    need: dict[str, int] = {}
    accelerator = revision.node_selector.accelerator
    for container in revision.containers:
        limits = dict(container.resources.limits)
        need[CPU_QUOTA] = need.get(CPU_QUOTA, 0) + int(_cpu(limits.get("cpu", "1")) * 1000) * n
        need[MEM_QUOTA] = need.get(MEM_QUOTA, 0) + _memory(limits.get("memory", "512Mi")) * n
        if limits.get("nvidia.com/gpu") and accelerator in RUN_GPUS:
            key = gpu_quota_id(accelerator, not revision.gpu_zonal_redundancy_disabled)
            need[key] = need.get(key, 0) + n * RUN_GPUS[accelerator].quota_per_gpu
    return need


def region_usage(project: str, region: str, api_endpoint: str = "") -> dict[str, int]:
    """CPU, memory and GPUs every service in the region holds: each revision with traffic or a tag, at max."""
    services, revisions = services_client(api_endpoint), revisions_client(api_endpoint)
    usage: dict[str, int] = {}
    for service in services.list_services(parent=f"projects/{project}/locations/{region}"):
        serving = {t.revision for t in service.traffic_statuses if t.percent or t.tag}
        for rev in sorted(serving):
            revision = revisions.get_revision(name=f"{service.name}/revisions/{rev}")
            for key, amount in revision_allocation(revision).items():
                usage[key] = usage.get(key, 0) + amount
    return usage


_UNITS = {CPU_QUOTA: "milli-CPU", MEM_QUOTA: "bytes"}


def check_quota(plan: Any, cfg: Any, project: str, regions: list[str], api_endpoint: str = "") -> None:
    """The first candidate region that offers the GPU and has CPU, memory and GPU quota for one more revision at
    max instances (a redeploy's candidate serves beside the old one); errors name the quota to request."""
    from components.quota import QuotaCheck, RegionQuota, read_quota_limit

    if not project:
        plan.errors.append("no project to check quota in: pass --project or set placement.project")
        return
    spec = cfg.cloud_run
    offered, not_offered = offered_regions(cfg, regions)
    need = instance_allocation(spec)
    gpu_id = gpu_quota_id(spec.gpu_type, spec.zonal_redundancy)
    results: dict[str, Any] = {}
    for region in not_offered:
        check = QuotaCheck(
            gpu_id, gpu_id, region, None, 0, need[gpu_id], False, f"Cloud Run has no {spec.gpu_type} here"
        )
        results[region] = RegionQuota(region, check)
    chosen = ""
    from google.api_core import exceptions

    for region in offered:
        try:
            usage = region_usage(project, region, api_endpoint)
        except (exceptions.PermissionDenied, exceptions.Forbidden) as exc:
            from components.access import disabled_api

            if disabled_api(exc):
                plan.errors.append(f"cannot list the Cloud Run services in {region}: {disabled_api(exc)}")
                return
            plan.errors.append(
                f"cannot list the Cloud Run services in {region} of {project} to count what they hold against quota "
                f"({str(exc).splitlines()[0][:200]}): enable the API (gcloud services enable run.googleapis.com "
                f"--project={project}) and grant the pipeline's service account roles/run.viewer"
            )
            return
        checks = []
        for quota_id in (gpu_id, CPU_QUOTA, MEM_QUOTA):
            limit, note = read_quota_limit(project, quota_id, region, api_endpoint, service=RUN_SERVICE)
            used = usage.get(quota_id, 0)
            ok = None if limit is None else limit - used >= need[quota_id]
            checks.append(QuotaCheck(quota_id, quota_id, region, limit, used, need[quota_id], ok, note))
        results[region] = RegionQuota(region, checks[0], checks[1:])
        if results[region].ok is not False:
            chosen = region
            twice = [c for c in checks if c.limit is not None and c.limit - c.usage < 2 * c.need]
            if twice and not usage:
                plan.warnings.append(
                    f"{region} has quota for this revision but not for two at once: a later redeploy (blue/green, "
                    f"both revisions at max instances) will need more {', '.join(c.quota_id for c in twice)}"
                )
            break
    plan.quota = {r: q.to_dict() for r, q in results.items()}
    plan.quota_checked = True
    if chosen:
        plan.region = chosen
        return
    lines = [
        f"no candidate region has Cloud Run quota for {spec.max_instances} instance(s) of 1 x {spec.gpu_type}, "
        f"{spec.cpu} CPU, {spec.memory} (max instances count against quota):"
    ]
    short: list[str] = []
    for region, rq in results.items():
        for c in [rq.gpu, *rq.companions]:
            state = "ok" if c.ok else ("unknown" if c.ok is None else "SHORT")
            unit = _UNITS.get(c.quota_id, "milli-GPUs" if spec.gpu_type == "nvidia-rtx-pro-6000" else "GPUs")
            lines.append(
                f"  {region}: {c.quota_id} limit {c.limit if c.limit is not None else 'unknown'}, in use {c.usage}, "
                f"need {c.need} {unit} -> {state}" + (f" ({c.note})" if c.note else "")
            )
            if c.ok is False and c.limit is not None and c.quota_id not in short:
                short.append(c.quota_id)
    first = offered[0] if offered else regions[0]
    lines.append(
        "Request more "
        + (", ".join(short) or gpu_id)
        + f" (Cloud Quotas, service {RUN_SERVICE}: gcloud beta quotas preferences create --service={RUN_SERVICE} "
        f"--project={project} --quota-id={(short or [gpu_id])[0]} --preferred-value=N --dimensions=region={first}), "
        "or lower cloud_run.max_instances / cpu / memory"
        + (", or set cloud_run.zonal_redundancy: false (a separate GPU quota)" if spec.zonal_redundancy else "")
    )
    plan.errors.append("\n".join(lines))


# ----------------------------------------------------------------------------- the Service request


def service_name(deployment: dict[str, Any]) -> str:
    cfg = _config(deployment)
    return f"projects/{deployment['project']}/locations/{deployment['region']}/services/{cfg.service_id}"


def _config(deployment: dict[str, Any]) -> Any:
    from components.config import config_from_dict

    return config_from_dict(deployment["config"], source="deployment['config']")


def revision_id(deployment: dict[str, Any]) -> str:
    """A new revision's name: SERVICE-SHA7-RUN6; unique per run, since a name is never reused with another
    template (409) and every run labels its revision."""
    cfg = _config(deployment)
    sha = str(deployment.get("revision_sha") or "local")[:7].lower()
    run = hashlib.sha256(str(deployment.get("run_name") or "manual").encode()).hexdigest()[:6]
    return f"{cfg.service_id}-{sha}-{run}"


def revision_template(deployment: dict[str, Any], weights_uri: str, labels: dict[str, str]) -> Any:
    """The run_v2.RevisionTemplate: the TGI DLC on one GPU, weights from GCS with no Hub token, a startup probe that
    gives the model `cloud_run.startup_timeout_s` to load."""
    from google.cloud import run_v2

    from components.serving import TGI_IMAGE, tgi_env_and_args

    cfg = _config(deployment)
    spec = cfg.cloud_run
    env, args = tgi_env_and_args(deployment)
    env = {**env, "HF_HUB_OFFLINE": "1", **cfg.serving.env}
    container = run_v2.Container(
        image=cfg.serving.image or TGI_IMAGE,
        args=args,
        ports=[run_v2.ContainerPort(name="http1", container_port=SERVING_PORT)],
        resources=run_v2.ResourceRequirements(
            limits={"cpu": str(spec.cpu), "memory": spec.memory, "nvidia.com/gpu": "1"},
            cpu_idle=False,  # GPU services need CPU always allocated
            startup_cpu_boost=True,
        ),
        startup_probe=run_v2.Probe(
            http_get=run_v2.HTTPGetAction(path="/health", port=SERVING_PORT),
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
    account = spec.service_account or deployment.get("service_account") or cfg.placement.service_account
    if account:
        template.service_account = account
    uri = weights_uri.rstrip("/")
    if spec.weights == "copy":
        # The DLC's entrypoint runs `gcloud storage cp "$AIP_STORAGE_URI/*" /tmp/model` as the service's account and
        # points MODEL_ID there (Google-Cloud-Containers containers/tgi/.../entrypoint.sh).
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
        env["MODEL_ID"] = WEIGHTS_MOUNT
    container.env = [run_v2.EnvVar(name=k, value=v) for k, v in env.items()]
    template.containers = [container]
    return template


def spec_hash(deployment: dict[str, Any]) -> str:
    """What serving runs (the template without names, labels or the weights' run-specific path), hashed: equal
    hashes with the same weights revision mean a redeploy would change nothing."""
    from google.protobuf import json_format

    template = revision_template(deployment, "gs://BUCKET/WEIGHTS", {})
    data = json_format.MessageToDict(type(template).pb(template))
    ingress = _config(deployment).cloud_run.ingress
    return hashlib.sha256(json.dumps({"template": data, "ingress": ingress}, sort_keys=True).encode()).hexdigest()[:12]


_INGRESS = {
    "all": "INGRESS_TRAFFIC_ALL",
    "internal": "INGRESS_TRAFFIC_INTERNAL_ONLY",
    "internal-and-cloud-load-balancing": "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER",
}


def revision_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels = {str(k): str(v).lower()[:63] for k, v in (deployment.get("labels") or {}).items()}
    labels[LABEL_REVISION] = str(deployment.get("revision_sha") or "")[:12].lower()
    labels[LABEL_SPEC] = spec_hash(deployment)
    return labels


def service_request(deployment: dict[str, Any], weights_uri: str, previous: list[Any] | None = None) -> Any:
    """The run_v2.Service for this deployment: the new revision behind the `candidate` tag, at 0% beside the
    traffic that serves now (`previous`, run_v2.TrafficTarget), or at 100% when nothing serves yet. Private: no
    IAM binding is part of it (callers get roles/run.invoker, never allUsers)."""
    from google.cloud import run_v2

    cfg = _config(deployment)
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
        description=cfg.description or f"{cfg.model.repo} served by TGI",
    )
    stage = RUN_GPUS[cfg.cloud_run.gpu_type].launch_stage
    if stage:
        from google.api import launch_stage_pb2

        service.launch_stage = getattr(launch_stage_pb2, stage)
    return service


def render_service(deployment: dict[str, Any], weights_uri: str) -> dict[str, Any]:
    """The Service request as REST JSON (camelCase, google.cloud.run.v2.Service): what `vlp render` prints."""
    from google.protobuf import json_format

    service = service_request(deployment, weights_uri)
    data = json_format.MessageToDict(type(service).pb(service))
    # REST JSON drops proto3 defaults; show the settings a reader looks for even when they are the default.
    resources = data["template"]["containers"][0]["resources"]
    resources.setdefault("cpuIdle", False)
    return {
        "service": data,
        "service_id": _config(deployment).service_id,
        "parent": f"projects/{deployment['project']}/locations/{deployment['region']}",
        "access": "private: no allUsers binding; the pipeline's account gets roles/run.invoker, callers need it too",
    }
