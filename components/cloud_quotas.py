"""The Cloud Quotas API, for both targets: a quota's limit in a region, and the checks preflight reports per region."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlp.components import clients


@dataclass
class QuotaCheck:
    """One quota in one region: limit (None when unknown), usage held by the project's endpoints, need."""

    quota_id: str
    metric: str
    region: str
    limit: int | None
    usage: int
    need: int
    ok: bool | None
    note: str = ""

    @property
    def free(self) -> int | None:
        return None if self.limit is None else self.limit - self.usage


@dataclass
class RegionQuota:
    """Everything one region needs, the GPU quota first."""

    region: str
    gpu: QuotaCheck
    companions: list[QuotaCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool | None:
        checks = [self.gpu, *self.companions]
        if any(c.ok is False for c in checks):
            return False
        return None if any(c.ok is None for c in checks) else True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.gpu)
        d["ok"] = self.ok
        d["gpu_ok"] = self.gpu.ok
        d["companions"] = [dataclasses.asdict(c) for c in self.companions]
        return d


def read_quota_limit(
    service: str, project: str, quota_id: str, region: str, api_endpoint: str = ""
) -> tuple[int | None, str]:
    """A quota's limit in a region from the Cloud Quotas API: (limit or None when unknown, a note). `service` is
    the quota's service (aiplatform.googleapis.com, run.googleapis.com)."""
    from google.api_core import exceptions as gexc

    name = f"projects/{project}/locations/global/services/{service}/quotaInfos/{quota_id}"
    try:
        info = clients.quotas_client(api_endpoint).get_quota_info(name=name)
    except gexc.NotFound:
        # A wrong quota id, not an empty quota: reading it as 0 would refuse every deploy on that GPU.
        return None, (
            f"{quota_id} is not a quota id the Cloud Quotas API knows for {service}, so the limit is unknown; check "
            "the GPU's serving quota in the console (IAM & Admin > Quotas) before the deploy"
        )
    except (gexc.PermissionDenied, gexc.Forbidden) as exc:  # REST answers Forbidden, gRPC PermissionDenied
        from vlp.components.iam.access import disabled_api

        # A disabled API answers 403 too: say which fix applies.
        return None, disabled_api(exc) or (
            "cannot read quotas: grant roles/cloudquotas.viewer to the pipeline's service account"
        )
    # A region-less DimensionsInfo applies only to the regions in its applicable_locations; anywhere else the
    # quota is 0, as Google's own check reads it (common_util.get_quota).
    for d in info.dimensions_infos:
        dims = dict(d.dimensions)
        value = int(d.details.value)
        if dims.get("region") == region or (not dims and region in list(d.applicable_locations)):
            return (value if value >= 0 else 2**31), ""
    return 0, f"{quota_id} has no limit in {region} (limit 0)"
