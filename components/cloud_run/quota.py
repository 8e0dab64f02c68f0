"""Cloud Run quota: what a revision holds against the region's CPU, memory and GPU quotas, and preflight's check that
one more revision fits in a candidate region."""

from __future__ import annotations

from typing import Any

from vlp.components.cloud_run.service_spec import revisions_client, services_client
from vlp.components.planning.catalog import RUN_GPUS

RUN_SERVICE = "run.googleapis.com"
CPU_QUOTA = "CpuAllocPerProjectRegion"  # milli-CPU (run.googleapis.com/cpu_allocation)
MEM_QUOTA = "MemAllocPerProjectRegion"  # bytes (run.googleapis.com/mem_allocation)


def gpu_quota_id(gpu_type: str, zonal_redundancy: bool) -> str:
    return RUN_GPUS[gpu_type].quota + ("" if zonal_redundancy else "NoZonalRedundancy") + "PerProjectRegion"


def instance_allocation(spec: Any) -> dict[str, int]:
    """What one revision reserves at max instances, by quota id (Cloud Run counts max instances against quota)."""
    n = spec.max_instances
    return {
        CPU_QUOTA: spec.cpu * 1000 * n,
        MEM_QUOTA: int(spec.memory_gib * 2**30) * n,
        gpu_quota_id(spec.gpu_type, spec.zonal_redundancy): n * RUN_GPUS[spec.gpu_type].quota_per_gpu,
    }


def offered_regions(cfg: Any, regions: list[str]) -> tuple[list[str], list[str]]:
    """(candidate regions that offer the GPU on Cloud Run, those that do not)."""
    offered = RUN_GPUS[cfg.cloud_run.gpu_type].regions
    return [r for r in regions if r in offered], [r for r in regions if r not in offered]


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
    from vlp.components.cloud_quotas import QuotaCheck, RegionQuota, read_quota_limit

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
            from vlp.components.iam.access import disabled_api

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
            limit, note = read_quota_limit(RUN_SERVICE, project, quota_id, region, api_endpoint)
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
