"""By-hand cleanup: find what runs left in Vertex AI by their vlp-deployment / vlp-run labels, then tear a whole
deployment down or collect the old leftovers, each run's share removed by vlp.components.vertex.teardown."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from vlp.components.config import ConfigError
from vlp.components.vertex.teardown import ACTIVE_JOB_STATES as _ACTIVE_JOB_STATES
from vlp.components.vertex.teardown import Removed, pipeline_job_state, remove_run_resources

log = logging.getLogger("vlp.gc")

_AGE_RE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """ "24h", "90m", "7d", "1d12h" -> a timedelta."""
    compact = text.strip().lower().replace(" ", "")
    parts = _AGE_RE.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ConfigError(f"--older-than {text!r}: give a number and a unit (s, m, h, d, w), e.g. 24h or 7d")
    return sum((timedelta(**{_UNITS[u]: int(n)}) for n, u in parts), timedelta())


@dataclass
class RunResources:
    """What one run (one vlp-run label) of one deployment still has in Vertex AI."""

    deployment: str
    run_label: str
    regions: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)  # endpoints the run created
    model_versions: list[str] = field(default_factory=list)  # MODEL@VERSION
    deployed_models: list[str] = field(default_factory=list)  # ENDPOINT/deployedModels/ID
    serving: list[str] = field(default_factory=list)  # deployed models (and Cloud Run revisions) with traffic > 0
    services: list[str] = field(default_factory=list)  # Cloud Run services the run created
    revisions: list[str] = field(default_factory=list)  # Cloud Run revisions the run deployed
    newest: datetime | None = None  # the most recent create time among the above

    def saw(self, region: str, created: Any) -> None:
        if region not in self.regions:
            self.regions.append(region)
        when = _as_datetime(created)
        if when and (self.newest is None or when > self.newest):
            self.newest = when

    def describe(self) -> str:
        parts = [
            f"{len(self.deployed_models)} deployed model(s)",
            f"{len(self.endpoints)} endpoint(s)",
            f"{len(self.model_versions)} model version(s)",
        ]
        if self.services or self.revisions:
            parts += [f"{len(self.services)} Cloud Run service(s)", f"{len(self.revisions)} revision(s)"]
        age = self.newest.isoformat(timespec="seconds") if self.newest else "unknown"
        return f"run {self.run_label} of {self.deployment} ({', '.join(parts)}; newest {age})"


def _as_datetime(value: Any) -> datetime | None:
    if not value:
        return None
    when = value if isinstance(value, datetime) else None
    if when is None or when.timestamp() <= 0:  # an unset proto Timestamp reads as the epoch
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _clients(region: str, api_endpoint: str) -> tuple[Any, Any]:
    from google.cloud import aiplatform_v1

    from vlp.components import clients

    kwargs = clients.gapic_kwargs(region, api_endpoint)
    return aiplatform_v1.EndpointServiceClient(**kwargs), aiplatform_v1.ModelServiceClient(**kwargs)


def _model_key(region: str, model_name: str, version_id: str) -> tuple[str, str, str]:
    # Vertex may spell the project as its number in one place and its id in another: key by model id.
    return region, model_name.rsplit("/", 1)[-1].split("@")[0], version_id


def find_runs(project: str, regions: list[str], deployment: str = "", api_endpoint: str = "") -> list[RunResources]:
    """Every labelled run with something left in the regions: its endpoints, model versions and deployed
    models (also on endpoints it did not create). `deployment` limits it to one vlp-deployment."""
    from google.cloud import aiplatform_v1

    runs: dict[tuple[str, str], RunResources] = {}

    def run_for(labels: Any) -> RunResources | None:
        dep, run = labels.get("vlp-deployment", ""), labels.get("vlp-run", "")
        if not dep or not run or (deployment and dep != deployment):
            return None
        return runs.setdefault((dep, run), RunResources(dep, run))

    label_filter = f'labels.vlp-deployment="{deployment}"' if deployment else "labels.vlp-deployment:*"
    for region in dict.fromkeys(regions):
        endpoints, models = _clients(region, api_endpoint)
        parent = f"projects/{project}/locations/{region}"
        version_runs: dict[tuple[str, str, str], RunResources] = {}
        for model in models.list_models(request=aiplatform_v1.ListModelsRequest(parent=parent, filter=label_filter)):
            for version in models.list_model_versions(name=model.name):
                run = run_for(version.labels)
                if run is None:
                    continue
                run.model_versions.append(f"{model.name}@{version.version_id}")
                run.saw(region, version.version_create_time or version.create_time)
                version_runs[_model_key(region, model.name, version.version_id)] = run
        # All endpoints, not only labelled ones: a run may have deployed onto an endpoint made by hand.
        for ep in endpoints.list_endpoints(request=aiplatform_v1.ListEndpointsRequest(parent=parent)):
            owner = run_for(ep.labels)
            if owner is not None:
                owner.endpoints.append(ep.name)
                owner.saw(region, ep.create_time)
            for dm in ep.deployed_models:
                run = version_runs.get(_model_key(region, dm.model, dm.model_version_id))
                if run is None:
                    continue
                ref = f"{ep.name}/deployedModels/{dm.id}"
                run.deployed_models.append(ref)
                run.saw(region, dm.create_time)
                if ep.traffic_split.get(dm.id, 0) > 0:
                    run.serving.append(ref)
        _find_cloud_run(project, region, run_for, api_endpoint)
    return sorted(runs.values(), key=lambda r: (r.deployment, r.newest or datetime.min.replace(tzinfo=UTC)))


def _find_cloud_run(project: str, region: str, run_for: Any, api_endpoint: str) -> None:
    """The labelled Cloud Run services (by the run that created them) and revisions (by the run that deployed them)
    in a region; skipped, with a note, where the Cloud Run API is off or not readable."""
    from google.api_core import exceptions

    from vlp.components.cloud_run.service_spec import revisions_client, services_client

    services, revisions = services_client(api_endpoint), revisions_client(api_endpoint)
    try:
        found = list(services.list_services(parent=f"projects/{project}/locations/{region}"))
    except (exceptions.PermissionDenied, exceptions.Forbidden) as exc:
        log.info("Cloud Run services in %s not read (%s): skipped", region, str(exc).splitlines()[0])
        return
    for service in found:
        if not service.labels.get("vlp-deployment"):
            continue
        owner = run_for(service.labels)
        if owner is not None:
            owner.services.append(service.name)
            owner.saw(region, service.create_time)
        traffic = {t.revision: t.percent for t in service.traffic_statuses}
        for revision in revisions.list_revisions(parent=service.name):
            run = run_for(revision.labels)
            if run is None:
                continue
            run.revisions.append(revision.name)
            run.saw(region, revision.create_time)
            if traffic.get(revision.name.rsplit("/", 1)[1], 0) > 0:
                run.serving.append(revision.name)


def remove_run(project: str, run: RunResources, deployment: str, api_endpoint: str = "") -> Removed:
    """Everything one run left: its Vertex resources and its Cloud Run services and revisions."""
    from vlp.components.cloud_run.service import remove_run_services

    removed = remove_run_resources(project, run.regions, deployment, run.run_label, api_endpoint)
    if run.services or run.revisions:
        removed.deleted += remove_run_services(project, run.regions, deployment, run.run_label, api_endpoint)
    return removed


def teardown_deployment(
    project: str, regions: list[str], deployment: str, api_endpoint: str = ""
) -> tuple[list[RunResources], Removed]:
    """Remove everything labelled vlp-deployment=DEPLOYMENT in the regions (serving or not): every run's
    deployed models, the endpoints runs created, the model versions. Returns what was found and removed."""
    runs = find_runs(project, regions, deployment, api_endpoint)
    removed = Removed()
    # Runs that created endpoints go last: an endpoint is deleted only once every run's model is off it.
    for run in sorted(runs, key=lambda r: bool(r.endpoints or r.services)):
        removed.extend(remove_run(project, run, deployment, api_endpoint))
    for run in find_runs(project, regions, deployment, api_endpoint):
        # A second pass catches an endpoint an earlier run created that a later run's model still held.
        removed.extend(remove_run(project, run, deployment, api_endpoint))
    return runs, removed


@dataclass
class GcReport:
    """What `vlp gc` removed (or, with dry_run, would remove) and what it kept, and why."""

    cutoff: datetime
    dry_run: bool
    collected: list[RunResources] = field(default_factory=list)
    kept: list[tuple[RunResources, str]] = field(default_factory=list)
    removed: Removed = field(default_factory=Removed)


def leftover_reason(run: RunResources, job_state: str, cutoff: datetime) -> str:
    """Why a run's resources are kept ("" = they are leftovers). Never collected: anything serving traffic,
    a run still going, a run that succeeded (its versions are the deployment's history), anything newer
    than the cutoff."""
    if run.serving:
        return f"serving traffic ({', '.join(run.serving)}); `vlp teardown` removes a deployment on purpose"
    if job_state in _ACTIVE_JOB_STATES:
        return f"its pipeline job is {job_state}"
    if job_state == "PIPELINE_STATE_SUCCEEDED":
        return "its pipeline job succeeded"
    if run.newest and run.newest > cutoff:
        return f"newer than the cutoff ({run.newest.isoformat(timespec='seconds')})"
    return ""


def collect_garbage(
    project: str,
    regions: list[str],
    older_than: timedelta,
    *,
    dry_run: bool = False,
    deployment: str = "",
    api_endpoint: str = "",
    now: datetime | None = None,
) -> GcReport:
    """Remove the labelled leftovers of runs older than `older_than` (see leftover_reason for what stays)."""
    if not project or not regions:
        raise ConfigError("gc needs --project and at least one --region")
    cutoff = (now or datetime.now(UTC)) - older_than
    report = GcReport(cutoff=cutoff, dry_run=dry_run)
    for run in find_runs(project, regions, deployment, api_endpoint):
        state = pipeline_job_state(project, regions, run.run_label, api_endpoint)
        reason = leftover_reason(run, state, cutoff)
        if reason:
            report.kept.append((run, reason))
            continue
        report.collected.append(run)
        if not dry_run:
            log.info("removing %s", run.describe())
            report.removed.extend(remove_run(project, run, run.deployment, api_endpoint))
    return report
