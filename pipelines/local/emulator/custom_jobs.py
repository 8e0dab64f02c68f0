"""The emulator's Vertex AI custom jobs (JobService CreateCustomJob, Get, List, Cancel, Delete): what GCPC's
CustomTrainingJobOp launcher sends for the pipeline's big-model mirror (pipelines/pipeline.py), run on this machine.

A job's one replica runs its container command as a local process (job_process.py), as the job's service account:
the environment points google-auth's metadata server at the stand-in for that account, and the Google clients and
huggingface_hub at this stack, as Vertex's network and metadata server would. The image is not pulled: the command
runs in this environment, which the local runner has checked holds the step's locked packages. Rules and sources:
docs/vertex-contract.md rows A34-A37.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from google.cloud import aiplatform_v1 as v1
from google.protobuf import empty_pb2

from vlp.pipelines.local.emulator.core import (
    _LOC,
    _conform,
    _filter_items,
    _now,
    _paginate,
    _parse_request,
    _Route,
    _to_dict,
)
from vlp.pipelines.local.emulator.errors import _CODES, ApiError
from vlp.pipelines.local.emulator.serving import terminate_group

ACTIVE = ("JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_CANCELLING")
# custom_job.proto Scheduling.timeout: "Optional. The maximum job running time. The default is 7 days."
_DEFAULT_TIMEOUT_S = 7 * 24 * 3600
_CANCEL_GRACE_S = 10.0


def _ended(state: str, code: str = "", message: str = "") -> dict[str, Any]:
    """A job's fields once it ends: its state, endTime, and the error (google.rpc.Status) of a job that did not
    succeed."""
    fields: dict[str, Any] = {"state": state, "endTime": _now()}
    if code:
        fields["error"] = {"code": _CODES[code][0], "message": message}
    return fields


def _seconds(duration: str) -> float:
    """A JSON Duration ("3600s", "1.5s")."""
    return float(duration.removesuffix("s")) if duration else 0.0


class CustomJobsService:
    """Mixed into Emulator (server.py), whose state and helpers its handlers use."""

    def _custom_job(self, p: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = f"projects/{p['project']}/locations/{p['location']}/customJobs/{p['job']}"
        job = self._custom_jobs.get(name)
        if job is None:
            raise ApiError("NOT_FOUND", f"CustomJob {name} is not found.")
        return name, job

    def _create_custom_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        from vlp.pipelines.local.emulator.iam import custom_code_service_agent

        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.CreateCustomJobRequest, body, body_field="custom_job", query=query)
        job = req.custom_job
        # custom_job.proto: display_name and job_spec are REQUIRED; a worker pool needs a machine and one of
        # container_spec / python_package_spec (WorkerPoolSpec.task oneof).
        if not job.display_name:
            raise ApiError("INVALID_ARGUMENT", "custom_job.display_name is required.")
        pools = list(job.job_spec.worker_pool_specs)
        if not pools or not pools[0].machine_spec.machine_type:
            raise ApiError(
                "INVALID_ARGUMENT",
                "custom_job.job_spec.worker_pool_specs[0] needs a machine_spec.machine_type (e.g. n2-standard-8).",
            )
        if pools[0].replica_count != 1:
            # The first pool is the chief: exactly one replica (Vertex AI docs, "Distributed training": "the primary
            # replica ... workerPoolSpecs[0] ... replicaCount to 1").
            raise ApiError("INVALID_ARGUMENT", "custom_job.job_spec.worker_pool_specs[0].replica_count must be 1.")
        spec = pools[0]
        if not spec.container_spec.image_uri:
            # Unverified that Vertex words it so; strict: the local stack runs container jobs only.
            raise ApiError(
                "UNIMPLEMENTED" if spec.python_package_spec.executor_image_uri else "INVALID_ARGUMENT",
                "custom_job.job_spec.worker_pool_specs[0] needs container_spec.image_uri"
                + (" (the local stack runs container jobs only)" if spec.python_package_spec.executor_image_uri else "")
                + ".",
            )
        if len(pools) > 1 and any(pool.replica_count for pool in pools[1:]):
            raise ApiError(
                "UNIMPLEMENTED", "The local stack runs one replica: a job of several worker pools is not run."
            )
        with self._lock:
            name = f"{parent}/customJobs/{self._new_id()}"
            now = _now()
            data = _to_dict(job)
            data.update({"name": name, "state": "JOB_STATE_PENDING", "createTime": now, "updateTime": now})
            # custom_job.proto CustomJobSpec.service_account: "If unspecified, the Vertex AI Custom Code Service Agent
            # for the CustomJob's project is used."
            data["_runAs"] = job.job_spec.service_account or custom_code_service_agent(p["project"])
            self._custom_jobs[name] = data
            self._audit("created", "google.cloud.aiplatform.v1.JobService.CreateCustomJob", name)
            self._save()
            out = self._public_job(data)
        self._spawn(self._run_custom_job, name)
        return self._json(out)

    @staticmethod
    def _public_job(data: dict[str, Any]) -> dict[str, Any]:
        return _conform(v1.CustomJob, {k: v for k, v in data.items() if not k.startswith("_")})

    def _set_job(self, name: str, **fields: Any) -> dict[str, Any] | None:
        with self._lock:
            job = self._custom_jobs.get(name)
            if job is None:
                return None
            job.update(fields, updateTime=_now())
            self._save()
            return job

    def _job_env(self, run_as: str, job: dict[str, Any]) -> dict[str, str]:
        """What the replica's container sees: this stack in place of Google's network and metadata server, the
        variables Vertex sets in a custom job's containers, then the job's own container_spec.env."""
        from vlp.pipelines.local import import_guard

        host = self.url.removeprefix("http://")
        project = job["name"].split("/")[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("VLP_", "GCE_METADATA", "HF_"))},
            "STORAGE_EMULATOR_HOST": self.url,
            "VLP_API_ENDPOINT": self.url,
            "GCE_METADATA_HOST": f"{host}/_md/{run_as}",
            "GCE_METADATA_IP": f"{host}/_md/{run_as}",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            # google-cloud-aiplatform training_utils/environment_variables.py reads these on Vertex.
            "CLOUD_ML_PROJECT_ID": project,
            "CLOUD_ML_JOB_ID": job["name"].rsplit("/", 1)[1],
            # The interpreter of this environment answers `python3` in the container's command.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        if self.hub_upstream:
            env["HF_ENDPOINT"] = f"{self.url}/hf"
        # Each step imports only what its launcher installs (pipelines/local/import_guard.py): a mirror step that
        # runs as a job is held to the same set.
        env.update(import_guard.guard_env(self.state_dir.parent))
        for item in job.get("jobSpec", {}).get("workerPoolSpecs", [{}])[0].get("containerSpec", {}).get("env", []):
            env[item.get("name", "")] = item.get("value", "")
        return env

    def _replica_command(self, container: dict[str, Any]) -> tuple[list[str], str]:
        """The container's command and args; a KFP step's `pip install` part is checked, not run (it would change
        this environment under the user): (command, why it cannot run) with why "" when it can."""
        from vlp.pipelines.local import step_launch

        command = [*container.get("command", []), *container.get("args", [])]
        if not command:
            return [], "the container has no command: the local stack cannot run an image's own entrypoint"
        split = step_launch.split_launch(command)
        if split is None:
            return command, ""
        pip_script, rest = split
        wrong = step_launch.pip_mismatches(pip_script)
        if wrong:
            return [], (
                "this environment does not hold the job's locked packages: "
                + ", ".join(wrong)
                + ". Make it match with `vlp local sync`"
            )
        return [command[3], command[4], command[5], *rest], ""

    def _run_custom_job(self, name: str) -> None:
        """PENDING, RUNNING, then SUCCEEDED / FAILED by the replica's exit status, CANCELLED when cancelled."""
        with self._lock:
            job = dict(self._custom_jobs.get(name) or {})
        if not job or job.get("state") not in ACTIVE:
            return
        logs = self.state_dir / "custom-jobs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{name.rsplit('/', 1)[1]}.log"
        spec = job.get("jobSpec", {})
        command, why = self._replica_command(spec.get("workerPoolSpecs", [{}])[0].get("containerSpec", {}))
        if why:
            self._set_job(
                name,
                **_ended("JOB_STATE_FAILED", "INVALID_ARGUMENT", f"The replica workerpool0-0 could not start: {why}."),
            )
            return
        run_as = job["_runAs"]
        self._set_job(name, state="JOB_STATE_RUNNING", startTime=_now())
        timeout = _seconds(spec.get("scheduling", {}).get("timeout", "")) or _DEFAULT_TIMEOUT_S
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "vlp.pipelines.local.emulator.job_process", str(os.getpid()), "--", *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._job_env(run_as, job),
                cwd=logs,
                start_new_session=True,
            )
        with self._lock:
            self._job_processes[name] = process
        deadline = time.monotonic() + timeout
        code, timed_out = None, False
        while code is None:
            if self._stopping.is_set():
                return  # the emulator stops: the replica ends with it (job_process.py); a restart runs it again
            try:
                code = process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    timed_out = True
                    terminate_group(process, _CANCEL_GRACE_S)
        with self._lock:
            self._job_processes.pop(name, None)
            state = (self._custom_jobs.get(name) or {}).get("state")
        if state == "JOB_STATE_CANCELLING":
            self._set_job(name, **_ended("JOB_STATE_CANCELLED", "CANCELLED", "CANCELED"))
        elif timed_out:
            message = f"Job ran past its scheduling.timeout ({timeout:.0f}s) and was stopped."
            self._set_job(name, **_ended("JOB_STATE_FAILED", "DEADLINE_EXCEEDED", message))
        elif code == 0:
            self._set_job(name, **_ended("JOB_STATE_SUCCEEDED"))
        else:
            tail = _tail(log_path)
            # The wording users report from Vertex for a replica that exits non-zero (unverified in a Google doc):
            # "The replica workerpool0-0 exited with a non-zero status of N." Its pointer to Cloud Logging is this
            # stack's log file.
            message = (
                f"The replica workerpool0-0 exited with a non-zero status of {code}. To find out more about why your "
                f"job exited please check the logs: {log_path}" + (f"\nLast lines:\n{tail}" if tail else "")
            )
            self._set_job(name, **_ended("JOB_STATE_FAILED", "INVALID_ARGUMENT", message))

    def _get_custom_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            return self._json(self._public_job(self._custom_job(p)[1]))

    def _list_custom_jobs(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        prefix = f"projects/{p['project']}/locations/{p['location']}/"
        req = _parse_request(v1.ListCustomJobsRequest, b"", body_field=None, query=query)
        with self._lock:
            items = [self._public_job(j) for n, j in self._custom_jobs.items() if n.startswith(prefix)]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"customJobs": page, **({"nextPageToken": token} if token else {})})

    def _cancel_custom_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        # job_service.proto CancelCustomJob: "Starts asynchronous cancellation ... the server makes a best effort ...
        # On successful cancellation, the CustomJob is not deleted; instead it becomes a job with a CustomJob.error
        # value with a google.rpc.Status.code of 1, corresponding to Code.CANCELLED, and CustomJob.state is set to
        # CANCELLED." A job already done answers FAILED_PRECONDITION (unverified; strict).
        with self._lock:
            name, job = self._custom_job(p)
            if job["state"] not in ACTIVE:
                raise ApiError(
                    "FAILED_PRECONDITION", f"CustomJob {name} is {job['state']}: only a running job cancels."
                )
            process = self._job_processes.get(name)
            if process is None:
                job.update(_ended("JOB_STATE_CANCELLED", "CANCELLED", "CANCELED"), updateTime=_now())
            else:
                job.update(state="JOB_STATE_CANCELLING", updateTime=_now())
            self._save()
        if process is not None:
            self._spawn(terminate_group, process, _CANCEL_GRACE_S)
        return self._json({})

    def _delete_custom_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            name, job = self._custom_job(p)
            if job["state"] in ACTIVE:
                raise ApiError("FAILED_PRECONDITION", f"CustomJob {name} is {job['state']}: cancel it first.")
            del self._custom_jobs[name]
            self._audit("deleted", "google.cloud.aiplatform.v1.JobService.DeleteCustomJob", name)
            self._save()
            scope = f"projects/{p['project']}/locations/{p['location']}"
            return self._done_op(scope, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _restart_custom_jobs(self) -> None:
        """At the emulator's start: a job that was running when the emulator stopped runs again (its replica ended
        with the emulator; Vertex restarts a replica whose VM went away, Scheduling.restart_job_on_worker_restart
        aside). A job left cancelling is cancelled."""
        with self._lock:
            for name, job in self._custom_jobs.items():
                if job.get("state") == "JOB_STATE_CANCELLING":
                    job.update(_ended("JOB_STATE_CANCELLED", "CANCELLED", "CANCELED"))
                elif job.get("state") in ACTIVE:
                    job["state"] = "JOB_STATE_PENDING"
                    self._spawn(self._run_custom_job, name)

    def _custom_job_routes(self) -> list[_Route]:
        job = _LOC + r"/customJobs/(?P<job>[^/:]+)"
        r = _Route
        return [
            r("POST", _LOC + r"/customJobs", self._create_custom_job),
            r("GET", _LOC + r"/customJobs", self._list_custom_jobs),
            r("GET", job, self._get_custom_job),
            r("POST", job + r":cancel", self._cancel_custom_job),
            r("DELETE", job, self._delete_custom_job),
        ]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([line for line in text if line.strip()][-lines:])
