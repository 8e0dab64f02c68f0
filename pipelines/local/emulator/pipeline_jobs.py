"""The emulator's Vertex AI Pipelines service: pipeline jobs and schedules."""

from __future__ import annotations

import re
from typing import Any

from google.cloud import aiplatform_v1 as v1
from google.protobuf import empty_pb2

from vlp.pipelines.local.emulator.core import (
    _LOC,
    _apply_mask,
    _check_mask,
    _conform,
    _filter_items,
    _now,
    _paginate,
    _parse_request,
    _Route,
    _to_dict,
)
from vlp.pipelines.local.emulator.errors import _CODES, ApiError


class PipelineJobsService:
    """Mixed into Emulator (server.py), whose state and helpers its handlers use."""

    # ------------------------------------------------------------------ pipeline jobs

    def _job(self, p: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = f"projects/{p['project']}/locations/{p['location']}/pipelineJobs/{p['job']}"
        job = self._pipeline_jobs.get(name)
        if job is None:
            raise ApiError("NOT_FOUND", f"PipelineJob {name} is not found.")
        return name, job

    def _create_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.CreatePipelineJobRequest, body, body_field="pipeline_job", query=query)
        if not req.pipeline_job.HasField("pipeline_spec") and not req.pipeline_job.template_uri:
            raise ApiError("INVALID_ARGUMENT", "pipeline_job needs pipeline_spec or template_uri.")
        with self._lock:
            job_id = req.pipeline_job_id or self._new_id()
            if not re.match(r"^[a-z0-9][a-z0-9-]{0,127}$", job_id):
                raise ApiError("INVALID_ARGUMENT", f"pipeline_job_id {job_id!r} is invalid: use [a-z0-9-], up to 128.")
            name = f"{parent}/pipelineJobs/{job_id}"
            if name in self._pipeline_jobs:
                raise ApiError("ALREADY_EXISTS", f"PipelineJob {name} already exists.")
            now = _now()
            job = _to_dict(req.pipeline_job)
            job.update({"name": name, "state": "PIPELINE_STATE_PENDING", "createTime": now, "updateTime": now})
            self._pipeline_jobs[name] = job
            self._save()
            out = _conform(v1.PipelineJob, job)
        self._spawn(self._run_pipeline_job, name)
        return self._json(out)

    def _run_pipeline_job(self, name: str) -> None:
        """Walk the job through the states Vertex reports; the emulator stores jobs, it does not run them."""
        steps = [(0.2, "PIPELINE_STATE_RUNNING"), (0.8, None)]
        for delay, state in steps:
            if self._stopping.wait(delay):
                return
            with self._lock:
                job = self._pipeline_jobs.get(name)
                if job is None or job["state"] not in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"):
                    return
                now = _now()
                if state is None:
                    if "pipeline-fail" in self.faults:
                        job["state"] = "PIPELINE_STATE_FAILED"
                        job["error"] = {
                            "code": _CODES["INTERNAL"][0],
                            "message": "The DAG failed because some tasks failed (injected fault pipeline-fail).",
                        }
                    else:
                        job["state"] = "PIPELINE_STATE_SUCCEEDED"
                    job["endTime"] = now
                else:
                    job["state"] = state
                    job["startTime"] = now
                job["updateTime"] = now
                self._save()

    def _get_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            return self._proto(v1.PipelineJob, self._job(p)[1])

    def _list_pipeline_jobs(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        req = _parse_request(v1.ListPipelineJobsRequest, b"", body_field=None, query=query)
        with self._lock:
            items = [_conform(v1.PipelineJob, j) for n, j in self._pipeline_jobs.items() if n.startswith(parent)]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"pipelineJobs": page, **({"nextPageToken": token} if token else {})})

    def _cancel_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            _, job = self._job(p)
            if job["state"] in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"):
                job["state"] = "PIPELINE_STATE_CANCELLED"
                job["endTime"] = job["updateTime"] = _now()
                self._save()
            return self._json({})

    def _delete_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            name, job = self._job(p)
            if job["state"] in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"):
                raise ApiError("FAILED_PRECONDITION", f"PipelineJob {name} is still running: cancel it first.")
            del self._pipeline_jobs[name]
            scope = f"projects/{p['project']}/locations/{p['location']}"
            return self._done_op(scope, v1.DeleteOperationMetadata, empty_pb2.Empty())

    # ------------------------------------------------------------------ schedules

    def _schedule(self, p: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = f"projects/{p['project']}/locations/{p['location']}/schedules/{p['schedule']}"
        sched = self._schedules.get(name)
        if sched is None:
            raise ApiError("NOT_FOUND", f"Schedule {name} is not found.")
        return name, sched

    def _create_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.CreateScheduleRequest, body, body_field="schedule", query=query)
        s = req.schedule
        if not s.display_name:
            raise ApiError("INVALID_ARGUMENT", "schedule.display_name is required.")
        if not s.cron:
            raise ApiError("INVALID_ARGUMENT", "schedule.cron is required (e.g. 'TZ=UTC 0 3 * * 1').")
        if not s.HasField("create_pipeline_job_request"):
            raise ApiError("INVALID_ARGUMENT", "schedule.create_pipeline_job_request is required.")
        if s.max_concurrent_run_count <= 0:
            raise ApiError("INVALID_ARGUMENT", "schedule.max_concurrent_run_count must be positive.")
        fields = s.cron.split()
        if fields and fields[0].startswith(("TZ=", "CRON_TZ=")):
            fields = fields[1:]
        if len(fields) != 5:
            raise ApiError("INVALID_ARGUMENT", f"schedule.cron {s.cron!r} must have 5 fields after an optional TZ=.")
        with self._lock:
            name = f"{parent}/schedules/{self._new_id()}"
            now = _now()
            sched = _to_dict(s)
            sched.update({"name": name, "state": "ACTIVE", "createTime": now, "updateTime": now})
            sched.setdefault("nextRunTime", sched.get("startTime", now))
            self._schedules[name] = sched
            self._save()
            return self._proto(v1.Schedule, sched)

    def _get_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            return self._proto(v1.Schedule, self._schedule(p)[1])

    def _list_schedules(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        req = _parse_request(v1.ListSchedulesRequest, b"", body_field=None, query=query)
        with self._lock:
            items = [_conform(v1.Schedule, s) for n, s in self._schedules.items() if n.startswith(parent)]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"schedules": page, **({"nextPageToken": token} if token else {})})

    def _update_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.UpdateScheduleRequest, body, body_field="schedule", query=query)
        paths = _check_mask(req.update_mask, v1.Schedule.pb().DESCRIPTOR)
        with self._lock:
            _, sched = self._schedule(p)
            _apply_mask(sched, _to_dict(req.schedule), paths)
            sched["updateTime"] = _now()
            self._save()
            return self._proto(v1.Schedule, sched)

    def _set_schedule_state(self, p: dict[str, str], want_from: str, to: str) -> Any:
        with self._lock:
            name, sched = self._schedule(p)
            if sched["state"] != want_from:
                raise ApiError("FAILED_PRECONDITION", f"Schedule {name} is {sched['state']}, not {want_from}.")
            sched["state"] = to
            sched["updateTime"] = _now()
            self._save()
            return self._json({})

    def _pause_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._set_schedule_state(p, "ACTIVE", "PAUSED")

    def _resume_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._set_schedule_state(p, "PAUSED", "ACTIVE")

    def _delete_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            name, _ = self._schedule(p)
            del self._schedules[name]
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _pipeline_routes(self) -> list[_Route]:
        job = _LOC + r"/pipelineJobs/(?P<job>[^/:]+)"
        sched = _LOC + r"/schedules/(?P<schedule>[^/:]+)"
        r = _Route
        return [
            r("POST", _LOC + r"/pipelineJobs", self._create_pipeline_job),
            r("GET", _LOC + r"/pipelineJobs", self._list_pipeline_jobs),
            r("GET", job, self._get_pipeline_job),
            r("POST", job + r":cancel", self._cancel_pipeline_job),
            r("DELETE", job, self._delete_pipeline_job),
            r("POST", _LOC + r"/schedules", self._create_schedule),
            r("GET", _LOC + r"/schedules", self._list_schedules),
            r("GET", sched, self._get_schedule),
            r("PATCH", sched, self._update_schedule),
            r("POST", sched + r":pause", self._pause_schedule),
            r("POST", sched + r":resume", self._resume_schedule),
            r("DELETE", sched, self._delete_schedule),
        ]
