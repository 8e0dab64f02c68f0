"""Vertex AI pipeline schedules: redeploy a config on a cron, and list, pause, resume or delete those schedules."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vlp.components.config import ConfigError, DeploymentConfig
from vlp.components.deployment import run_account

T = TypeVar("T")

# One scheduled run at a time: two overlapping deploys of the same endpoint would race on its traffic split.
MAX_CONCURRENT_RUNS = 1
DISPLAY_PREFIX = "vlp-"
_RESOURCE_RE = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/schedules/(?P<id>[^/]+)$")


class ScheduleError(RuntimeError):
    """A schedule call Google refused or a schedule that is not there; the message says which and the fix."""


@dataclass
class ScheduleInfo:
    """What `vlp schedule list` shows about one schedule."""

    name: str
    display_name: str
    state: str
    cron: str
    next_run_time: str
    started_run_count: int
    max_run_count: int

    @classmethod
    def from_proto(cls, s: Any) -> ScheduleInfo:
        nxt = s.next_run_time.isoformat() if s.next_run_time else ""
        return cls(s.name, s.display_name, s.state.name, s.cron, nxt, int(s.started_run_count), int(s.max_run_count))


def schedule_display_name(cfg: DeploymentConfig) -> str:
    """The display name a config's schedule gets: how `vlp schedule pause NAME` finds it again."""
    return f"{DISPLAY_PREFIX}{cfg.name}"


def build_cron(cron: str, time_zone: str = "UTC") -> str:
    """Vertex's cron string, "TZ=America/New_York 0 3 * * 1": five fields, the time zone checked here
    (a typo would otherwise surface as a 400 from Google, or worse, a schedule in UTC)."""
    cron = cron.strip()
    if cron.startswith(("TZ=", "CRON_TZ=")):
        tz, _, rest = cron.partition(" ")
        if time_zone not in ("", "UTC") and tz.split("=", 1)[1] != time_zone:
            raise ConfigError(f"--cron {cron!r} names its own time zone; drop it or --time-zone {time_zone}")
        time_zone, cron = tz.split("=", 1)[1], rest.strip()
    fields = cron.split()
    if len(fields) != 5:
        raise ConfigError(
            f"--cron {cron!r} has {len(fields)} fields; give five: minute hour day-of-month month day-of-week, "
            "e.g. --cron '0 3 * * 1' for Mondays 03:00"
        )
    zone = time_zone or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--time-zone {zone!r} is not an IANA time zone: use e.g. UTC, America/New_York") from None
    return f"TZ={zone} {' '.join(fields)}"


def parse_time(text: str, time_zone: str = "UTC") -> datetime:
    """An ISO 8601 time ("2026-12-01", "2026-12-01T03:00", with or without offset); a naive time is read
    in `time_zone`, the same zone the cron runs in."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not an ISO 8601 time: use e.g. 2026-12-01 or 2026-12-01T03:00+01:00") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=ZoneInfo(time_zone or "UTC"))
    return value


def _load_spec(template_path: Path) -> dict[str, Any]:
    from vlp.pipelines.compile import read_spec

    if not template_path.is_file():
        raise ConfigError(f"compiled pipeline {template_path} not found: run `vlp compile` first")
    return read_spec(template_path.read_text())


def schedule_request(
    cfg: DeploymentConfig,
    *,
    project: str,
    region: str,
    bucket: str,
    cron: str,
    service_account: str = "",
    time_zone: str = "UTC",
    start: datetime | None = None,
    end: datetime | None = None,
    max_run_count: int = 0,
    template_path: Path | None = None,
    template_uri: str = "",
    api_endpoint: str = "",
    display_name: str = "",
) -> Any:
    """The aiplatform_v1.Schedule a create sends: the cron, one run at a time, and a CreatePipelineJobRequest
    with the compiled spec (or a published template's URI) and the config's parameter values."""
    from google.cloud import aiplatform_v1

    from vlp.components.runtime import label_value
    from vlp.pipelines.pipeline import pipeline_parameters

    if end and start and end <= start:
        raise ConfigError(f"--end {end.isoformat()} is not after --start {start.isoformat()}")
    if max_run_count < 0:
        raise ConfigError("--max-runs must be 0 (no limit) or more")
    parent = f"projects/{project}/locations/{region}"
    # Each run the schedule starts runs as this account; unnamed, as the Compute Engine default (see submit.py).
    service_account = run_account(service_account, cfg, project)
    params = pipeline_parameters(
        cfg,
        project=project,
        region=region,
        bucket=bucket,
        service_account=service_account,
        api_endpoint=api_endpoint,
    )
    job = aiplatform_v1.PipelineJob(
        display_name=display_name or schedule_display_name(cfg),
        labels={"vlp-deployment": label_value(cfg.name), "vlp-scheduled": "true"},
        runtime_config=aiplatform_v1.PipelineJob.RuntimeConfig(
            gcs_output_directory=f"gs://{bucket.removeprefix('gs://')}/pipeline-root", parameter_values=params
        ),
    )
    if template_uri:
        # Vertex fetches the spec from Artifact Registry at each run, so `vlp publish` updates what runs next.
        job.template_uri = template_uri
    else:
        from vlp.pipelines.compile import compile_to_temp, spec_path

        # As `vlp run` does: the committed spec, else a fresh compile (the spec is copied into the schedule).
        job.pipeline_spec = _load_spec(template_path or (spec_path() if spec_path().is_file() else compile_to_temp()))
    job.service_account = service_account
    schedule = aiplatform_v1.Schedule(
        display_name=display_name or schedule_display_name(cfg),
        cron=build_cron(cron, time_zone),
        max_concurrent_run_count=MAX_CONCURRENT_RUNS,
        create_pipeline_job_request=aiplatform_v1.CreatePipelineJobRequest(parent=parent, pipeline_job=job),
    )
    if start:
        schedule.start_time = start
    if end:
        schedule.end_time = end
    if max_run_count:
        schedule.max_run_count = max_run_count
    return schedule


def schedule_client(region: str, api_endpoint: str = "") -> Any:
    """A ScheduleServiceClient for the region (or the emulator)."""
    from google.cloud import aiplatform_v1

    from vlp.components import clients

    return aiplatform_v1.ScheduleServiceClient(**clients.gapic_kwargs(region, api_endpoint))


def _google_call(what: str, fn: Callable[[], T]) -> T:
    """Run one Google call; a refusal becomes a ScheduleError naming the call, with the IAM fix on a 403."""
    from google.api_core import exceptions

    from vlp.pipelines.submit import permission_hint

    try:
        return fn()
    except exceptions.GoogleAPICallError as exc:
        # Over REST a 403 arrives as Forbidden (mapped from the HTTP status), over gRPC as PermissionDenied.
        refused = exceptions.PermissionDenied(exc.message) if isinstance(exc, exceptions.Forbidden) else exc
        hint = permission_hint(refused)
        raise ScheduleError(f"{what} failed: {exc}. {hint}".strip()) from None


def create_schedule(
    cfg: DeploymentConfig,
    *,
    cron: str,
    project: str = "",
    region: str = "",
    bucket: str = "",
    service_account: str = "",
    time_zone: str = "UTC",
    start: datetime | None = None,
    end: datetime | None = None,
    max_run_count: int = 0,
    template_path: Path | None = None,
    template_uri: str = "",
    api_endpoint: str = "",
) -> ScheduleInfo:
    """Create the config's schedule; refuses a second one with the same display name (two schedules of one
    deployment would redeploy it twice)."""
    from vlp.pipelines.submit import resolve_placement

    project, region, bucket = resolve_placement(cfg, project, region, bucket)
    schedule = schedule_request(
        cfg,
        project=project,
        region=region,
        bucket=bucket,
        cron=cron,
        service_account=service_account,
        time_zone=time_zone,
        start=start,
        end=end,
        max_run_count=max_run_count,
        template_path=template_path,
        template_uri=template_uri,
        api_endpoint=api_endpoint,
    )
    existing = [s for s in list_schedules(project, region, api_endpoint) if s.display_name == schedule.display_name]
    if existing:
        raise ScheduleError(
            f"{project}/{region} already has schedule {schedule.display_name} "
            f"({existing[0].name}, {existing[0].state}): delete it first with "
            f"`vlp schedule delete {existing[0].name}`"
        )
    client = schedule_client(region, api_endpoint)
    parent = f"projects/{project}/locations/{region}"
    created = _google_call(
        f"creating schedule {schedule.display_name} in {project}/{region}",
        lambda: client.create_schedule(parent=parent, schedule=schedule),
    )
    return ScheduleInfo.from_proto(created)


def list_schedules(project: str, region: str, api_endpoint: str = "", only_vlp: bool = True) -> list[ScheduleInfo]:
    """The schedules in a region; by default only those `vlp schedule create` made (display name vlp-*)."""
    client = schedule_client(region, api_endpoint)
    parent = f"projects/{project}/locations/{region}"
    found = _google_call(f"listing schedules in {project}/{region}", lambda: list(client.list_schedules(parent=parent)))
    infos = [ScheduleInfo.from_proto(s) for s in found]
    return [s for s in infos if s.display_name.startswith(DISPLAY_PREFIX)] if only_vlp else infos


def resolve_schedule(ref: str, project: str = "", region: str = "", api_endpoint: str = "") -> str:
    """A schedule's resource name from what a person types: the full resource, its numeric id, or its
    display name (vlp-NAME, or just NAME)."""
    m = _RESOURCE_RE.match(ref)
    if m:
        return ref
    if not project or not region:
        raise ConfigError(
            f"schedule {ref!r} is not a resource name (projects/P/locations/R/schedules/ID): "
            "pass --project and --region"
        )
    if ref.isdigit():
        return f"projects/{project}/locations/{region}/schedules/{ref}"
    wanted = {ref, f"{DISPLAY_PREFIX}{ref}"}
    matches = [s for s in list_schedules(project, region, api_endpoint, only_vlp=False) if s.display_name in wanted]
    if not matches:
        raise ScheduleError(
            f"no schedule named {ref!r} in {project}/{region}: "
            f"`vlp schedule list --project {project} --region {region}` shows the names"
        )
    if len(matches) > 1:
        names = ", ".join(s.name for s in matches)
        raise ScheduleError(f"{len(matches)} schedules are named {ref!r} ({names}): give the resource name instead")
    return matches[0].name


def _region_of(name: str) -> str:
    return _RESOURCE_RE.match(name)["region"]  # type: ignore[index]


def get_schedule(ref: str, project: str = "", region: str = "", api_endpoint: str = "") -> ScheduleInfo:
    """One schedule as it stands now."""
    name = resolve_schedule(ref, project, region, api_endpoint)
    client = schedule_client(_region_of(name), api_endpoint)
    return ScheduleInfo.from_proto(_google_call(f"reading schedule {name}", lambda: client.get_schedule(name=name)))


def pause_schedule(ref: str, project: str = "", region: str = "", api_endpoint: str = "") -> ScheduleInfo:
    """Pause: no new runs start until resumed; a run already going keeps going."""
    return _set_state(ref, project, region, api_endpoint, "pause")


def resume_schedule(ref: str, project: str = "", region: str = "", api_endpoint: str = "") -> ScheduleInfo:
    """Resume a paused schedule; runs missed while paused are skipped (catch_up stays off)."""
    return _set_state(ref, project, region, api_endpoint, "resume")


def _set_state(ref: str, project: str, region: str, api_endpoint: str, action: str) -> ScheduleInfo:
    name = resolve_schedule(ref, project, region, api_endpoint)
    client = schedule_client(_region_of(name), api_endpoint)
    current = get_schedule(name, api_endpoint=api_endpoint)
    # Google refuses to pause a paused schedule (FAILED_PRECONDITION); the person's intent is already met.
    if current.state == ("PAUSED" if action == "pause" else "ACTIVE"):
        return current
    call = client.pause_schedule if action == "pause" else client.resume_schedule
    _google_call(f"{action} schedule {name}", lambda: call(name=name))
    return get_schedule(name, api_endpoint=api_endpoint)


def delete_schedule(ref: str, project: str = "", region: str = "", api_endpoint: str = "") -> str:
    """Delete the schedule (runs it started are kept); returns its resource name."""
    name = resolve_schedule(ref, project, region, api_endpoint)
    client = schedule_client(_region_of(name), api_endpoint)
    _google_call(f"deleting schedule {name}", lambda: client.delete_schedule(name=name).result(timeout=300))
    return name
