"""Checks Vertex AI serving quota per candidate region: Cloud Quotas limits minus what the project's endpoints hold."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from vlp.components import clients
from vlp.components.cloud_quotas import QuotaCheck, RegionQuota, read_quota_limit

SERVICE = "aiplatform.googleapis.com"

# Vertex AI online-serving quota ids (Cloud Quotas API) and their metrics per AcceleratorType: on-demand, then
# Spot ("Preemptible"). L4, A100 80GB, H100, T4, CPUs and the preemptible H100/A100 80GB/L4/CPU ids appear in
# Google's Model Garden notebooks and gcloud's model_garden_utils; the H100 Mega, H200 and B200 ids are in Google's
# map (Model Garden notebook_util common_util.get_quota_id). The RTX PRO 6000 id is unverified: no source names it,
# so it follows the pattern, and a NotFound reads as "limit unknown" (a warning), never as no quota.
GPU_QUOTAS: dict[str, tuple[tuple[str, str], tuple[str, str] | None]] = {
    "NVIDIA_L4": (
        ("CustomModelServingL4GPUsPerProjectPerRegion", "custom_model_serving_nvidia_l4_gpus"),
        ("CustomModelServingPreemptibleL4GPUsPerProjectPerRegion", "custom_model_serving_preemptible_nvidia_l4_gpus"),
    ),
    "NVIDIA_TESLA_T4": (
        ("CustomModelServingT4GPUsPerProjectPerRegion", "custom_model_serving_nvidia_t4_gpus"),
        ("CustomModelServingPreemptibleT4GPUsPerProjectPerRegion", "custom_model_serving_preemptible_nvidia_t4_gpus"),
    ),
    "NVIDIA_TESLA_V100": (
        ("CustomModelServingV100GPUsPerProjectPerRegion", "custom_model_serving_nvidia_v100_gpus"),
        (
            "CustomModelServingPreemptibleV100GPUsPerProjectPerRegion",
            "custom_model_serving_preemptible_nvidia_v100_gpus",
        ),
    ),
    "NVIDIA_TESLA_A100": (
        ("CustomModelServingA100GPUsPerProjectPerRegion", "custom_model_serving_nvidia_a100_gpus"),
        (
            "CustomModelServingPreemptibleA100GPUsPerProjectPerRegion",
            "custom_model_serving_preemptible_nvidia_a100_gpus",
        ),
    ),
    "NVIDIA_A100_80GB": (
        ("CustomModelServingA10080GBGPUsPerProjectPerRegion", "custom_model_serving_nvidia_a100_80gb_gpus"),
        (
            "CustomModelServingPreemptibleA10080GBGPUsPerProjectPerRegion",
            "custom_model_serving_preemptible_nvidia_a100_80gb_gpus",
        ),
    ),
    "NVIDIA_H100_80GB": (
        ("CustomModelServingH100GPUsPerProjectPerRegion", "custom_model_serving_nvidia_h100_gpus"),
        (
            "CustomModelServingPreemptibleH100GPUsPerProjectPerRegion",
            "custom_model_serving_preemptible_nvidia_h100_gpus",
        ),
    ),
    # The id Google's own check builds: vertex-ai-samples notebook_util/common_util.py get_quota_id upper-cases
    # "MEGA" (L544/L577). Whether the Cloud Quotas API matches ids case-sensitively is unverified; this is the
    # spelling Google's code sends. The metric name follows the other GPUs' pattern (unverified).
    "NVIDIA_H100_MEGA_80GB": (
        ("CustomModelServingH100MEGAGPUsPerProjectPerRegion", "custom_model_serving_nvidia_h100_mega_gpus"),
        (
            "CustomModelServingPreemptibleH100MEGAGPUsPerProjectPerRegion",
            "custom_model_serving_preemptible_nvidia_h100_mega_gpus",
        ),
    ),
    # get_quota_id can build CustomModelServingPreemptibleH200GPUsPerProjectPerRegion, but Model Garden says
    # "H200 GPUs are currently not available in Spot VM quota": unverified, so Spot H200 is refused (conservative).
    "NVIDIA_H200_141GB": (
        ("CustomModelServingH200GPUsPerProjectPerRegion", "custom_model_serving_nvidia_h200_gpus"),
        None,
    ),
    "NVIDIA_B200": (
        ("CustomModelServingB200GPUsPerProjectPerRegion", "custom_model_serving_nvidia_b200_gpus"),
        (
            "CustomModelServingPreemptibleB200GPUsPerProjectPerRegion",
            "custom_model_serving_preemptible_nvidia_b200_gpus",
        ),
    ),
    "NVIDIA_RTX_PRO_6000": (
        ("CustomModelServingRTXPRO6000GPUsPerProjectPerRegion", "custom_model_serving_nvidia_rtx_pro_6000_gpus"),
        None,
    ),
}
CPU_QUOTAS = (
    ("CustomModelServingCPUsPerProjectPerRegion", "custom_model_serving_cpus"),
    ("CustomModelServingPreemptibleCPUsPerProjectPerRegion", "custom_model_serving_preemptible_cpus"),
)


class QuotaError(RuntimeError):
    """No candidate region has the quota; the message lists each region and the quota to request."""


@dataclass
class QuotaNeed:
    """One quota a deployment consumes: id, metric, how many units."""

    quota_id: str
    metric: str
    need: int
    unit: str = "GPUs"


def gpu_quota(accelerator_type: str, spot: bool = False) -> tuple[str, str]:
    """(quota id, metric) of the serving GPU quota for an accelerator, Spot or on-demand."""
    pair = GPU_QUOTAS.get(accelerator_type)
    if pair is None:
        raise QuotaError(f"no serving quota is known for {accelerator_type}: pick one of {sorted(GPU_QUOTAS)}")
    on_demand, preemptible = pair
    if spot:
        if preemptible is None:
            raise QuotaError(f"{accelerator_type} is not offered as Spot on Vertex AI: set hardware.spot to false")
        return preemptible
    return on_demand


def quota_needs(
    accelerator_type: str, gpus_per_replica: int, vcpus_per_replica: int, replicas: int, spot: bool = False
) -> list[QuotaNeed]:
    """The GPU quota and the companion CPU quota one deployment draws on; Vertex reserves max replicas."""
    qid, metric = gpu_quota(accelerator_type, spot)
    needs = [QuotaNeed(qid, metric, gpus_per_replica * replicas, "GPUs")]
    if vcpus_per_replica:
        cpu_id, cpu_metric = CPU_QUOTAS[1] if spot else CPU_QUOTAS[0]
        needs.append(QuotaNeed(cpu_id, cpu_metric, vcpus_per_replica * replicas, "vCPUs"))
    return needs


def console_url(project: str, metric: str) -> str:
    """The Cloud console page where a person requests more of a quota."""
    query = {"metric": f"{SERVICE}/{metric}"}
    if project:
        query["project"] = project
    # The page lists the metric's limit per region; the region is picked there (no stable URL filter).
    return "https://console.cloud.google.com/iam-admin/quotas?" + urllib.parse.urlencode(query)


def serving_usage(
    project: str, region: str, machine_vcpus: Mapping[str, int], api_endpoint: str = ""
) -> dict[tuple[str, bool], int]:
    """GPUs and vCPUs the project's deployed models already hold in a region: {(kind, spot): units}.

    kind is an AcceleratorType name for GPUs or "CPU" for vCPUs (of machine types `machine_vcpus` knows).
    Vertex reserves quota for a deployment's max replicas, so those are what count.
    """
    # v1beta1: only its MachineSpec has multihost_gpu_node_count; through v1 a multi-host replica counts one node.
    from google.cloud import aiplatform_v1beta1

    client = aiplatform_v1beta1.EndpointServiceClient(**clients.gapic_kwargs(region, api_endpoint))
    usage: dict[tuple[str, bool], int] = {}
    # v1beta1's generated default deadline for list_endpoints is 5 s, without retry (v1 has none): a project with
    # many endpoints, or a slow moment, would fail preflight with a bare ReadTimeout.
    pages = client.list_endpoints(parent=f"projects/{project}/locations/{region}", timeout=clients.CALL_TIMEOUT_S)
    for endpoint in pages:
        for dm in endpoint.deployed_models:
            if "dedicated_resources" not in dm:
                continue
            dr = dm.dedicated_resources
            spec = dr.machine_spec
            nodes = max(spec.multihost_gpu_node_count, 1)
            replicas = max(dr.max_replica_count, dr.min_replica_count, 1) * nodes
            spot = bool(dr.spot)
            acc = aiplatform_v1beta1.AcceleratorType(spec.accelerator_type).name
            if spec.accelerator_count and acc != "ACCELERATOR_TYPE_UNSPECIFIED":
                usage[(acc, spot)] = usage.get((acc, spot), 0) + spec.accelerator_count * replicas
            vcpus = machine_vcpus.get(spec.machine_type or "n1-standard-2", 0)
            usage[("CPU", spot)] = usage.get(("CPU", spot), 0) + vcpus * replicas
    return usage


def check_region(
    project: str,
    region: str,
    needs: list[QuotaNeed],
    accelerator_type: str,
    *,
    spot: bool = False,
    machine_vcpus: Mapping[str, int] | None = None,
    api_endpoint: str = "",
) -> RegionQuota:
    """Limit minus usage against need, for each quota the deployment draws on, in one region."""
    usage = serving_usage(project, region, machine_vcpus or {}, api_endpoint)
    checks = []
    for n in needs:
        limit, note = read_quota_limit(SERVICE, project, n.quota_id, region, api_endpoint)
        used = usage.get((accelerator_type if n.unit == "GPUs" else "CPU", spot), 0)
        ok = None if limit is None else limit - used >= n.need
        if ok is False and n.unit == "vCPUs" and accelerator_type:
            # Unverified whether GPU machine families draw on the serving CPU quota (fresh projects show 8,
            # one a3-highgpu-8g has 208 vCPUs); Google's Model Garden check reads only the GPU quota. Reported,
            # never blocking: a false "no quota" would stop every large deploy.
            ok = None
            note = (note + "; " if note else "") + "unverified whether GPU machines count here: advisory"
        checks.append(QuotaCheck(n.quota_id, n.metric, region, limit, used, n.need, ok, note))
    return RegionQuota(region, checks[0], checks[1:])


def choose_region(
    project: str,
    regions: list[str],
    needs: list[QuotaNeed],
    accelerator_type: str,
    *,
    spot: bool = False,
    machine_vcpus: Mapping[str, int] | None = None,
    offered_in: list[str] | None = None,
    api_endpoint: str = "",
) -> tuple[str, dict[str, RegionQuota], str]:
    """The first candidate region where every quota fits: (region or "", per-region checks, failure message)."""
    results: dict[str, RegionQuota] = {}
    chosen = ""
    for region in regions:
        if offered_in is not None and region not in offered_in:
            gpu = needs[0]
            results[region] = RegionQuota(
                region,
                QuotaCheck(
                    gpu.quota_id,
                    gpu.metric,
                    region,
                    None,
                    0,
                    gpu.need,
                    False,
                    f"{accelerator_type} is not offered for Vertex AI prediction in {region}",
                ),
            )
            continue
        rq = check_region(
            project, region, needs, accelerator_type, spot=spot, machine_vcpus=machine_vcpus, api_endpoint=api_endpoint
        )
        results[region] = rq
        if rq.ok is not False and not chosen:
            chosen = region
            break  # the first region that fits wins; later candidates are not read
    if chosen:
        return chosen, results, ""
    return "", results, shortage_message(project, results, needs, accelerator_type)


def shortage_message(
    project: str, results: dict[str, RegionQuota], needs: list[QuotaNeed], accelerator_type: str
) -> str:
    """One message: each region's limit / usage / need, and the quota to request where."""
    gpu = needs[0]
    lines = [f"no candidate region has quota for {gpu.need} x {accelerator_type} ({', '.join(results)}):"]
    for region, rq in results.items():
        for c in [rq.gpu, *rq.companions]:
            limit = "unknown" if c.limit is None else str(c.limit)
            short = "" if c.ok is not False or c.limit is None else f", short by {c.need - (c.limit - c.usage)}"
            extra = f" ({c.note})" if c.note else ""
            state = "ok" if c.ok else ("unknown" if c.ok is None else "SHORT")
            lines.append(
                f"  {region}: {c.quota_id} limit {limit}, in use {c.usage}, need {c.need} -> {state}{short}{extra}"
            )
    first = next(iter(results))
    lines.append(
        f"Request more {gpu.quota_id} in one of these regions: {console_url(project, gpu.metric)} "
        f"(or: gcloud beta quotas preferences create --service={SERVICE} --project={project} "
        f"--quota-id={gpu.quota_id} --preferred-value=N --dimensions=region={first}); "
        "or undeploy models that hold these GPUs, or add a region to placement.regions"
    )
    for n in needs[1:]:
        if any(c.quota_id == n.quota_id and c.ok is False for rq in results.values() for c in rq.companions):
            lines.append(f"Also request {n.quota_id} ({n.unit}): {console_url(project, n.metric)}")
    return "\n".join(lines)
