"""`vlp run --local`'s stand-in for the image of GCPC's custom-job launcher (gcr.io/ml-pipeline/google-cloud-pipeline-
components): GCPC's own launcher code (google_cloud_pipeline_components.container.v1.custom_job.launcher), run
with its Vertex AI calls sent to the local stack.

On Vertex the big-model mirror task (pipelines/pipeline.py, create_custom_training_job_from_component) runs that
image, which creates a CustomJob, writes its gcp_resources output, polls the job every 20 s, and cancels it when the
task is stopped. kfp.local cannot run a container component; kfp_fixes.py points the task's command here instead,
and this module runs the same launcher with three differences, each only where the launcher reaches Google:
- its JobServiceClient calls the stack's API endpoint ($VLP_API_ENDPOINT) over REST, where GCPC hardcodes
  `{location}-aiplatform.googleapis.com` on gRPC; the gcp_resources URI it writes stays the one Vertex's would be;
- its cancel request (plain `requests.post` to that host) goes to the same endpoint;
- it polls every second instead of every 20 (wall time only);
- stopped by SIGTERM, it cancels the job as GCPC does, then exits as stopped, where GCPC exits 0 (exit_as_stopped).
The job itself, the mirror step's container command, runs in the emulator (emulator/custom_jobs.py) as the job's
service account. This process writes the step's record for the run summary (step_records.py), with the job's own
error where it failed: GCPC's exception says only the state's number.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

GCPC_LAUNCHER = "google_cloud_pipeline_components.container.v1.custom_job.launcher"
POLL_S = 1


def point_at_stack(api_endpoint: str) -> None:
    """Send GCPC's job calls to `api_endpoint` (module docstring)."""
    import requests
    from google.cloud import aiplatform_v1
    from google.cloud.aiplatform import gapic
    from google_cloud_pipeline_components.container.v1.gcp_launcher import job_remote_runner as runner

    def job_client(*_args: Any, client_info: Any = None, **_kwargs: Any) -> aiplatform_v1.JobServiceClient:
        return aiplatform_v1.JobServiceClient(
            transport="rest", client_options={"api_endpoint": api_endpoint}, client_info=client_info
        )

    gapic.JobServiceClient = job_client  # what JobRemoteRunner calls, as aiplatform.gapic.JobServiceClient

    class _Requests:
        """requests, with a call to a Vertex AI regional host sent to the stack."""

        def __getattr__(self, name: str) -> Any:
            return getattr(requests, name)

        @staticmethod
        def post(url: str, **kwargs: Any) -> Any:
            if url.startswith("https://") and "-aiplatform.googleapis.com/" in url:
                url = api_endpoint.rstrip("/") + "/" + url.split("-aiplatform.googleapis.com/", 1)[1]
            return requests.post(url, **kwargs)

    runner.requests = _Requests()
    runner._POLLING_INTERVAL_IN_SECONDS = POLL_S


def exit_as_stopped(on_stop: Any) -> None:
    """On SIGTERM GCPC cancels the job, then exits 0: on Vertex the task's state comes from the pipeline, which
    stopped it; kfp.local has only the exit status, and would read 0 as a success with no outputs. The same cancel,
    then the status of a process stopped by SIGTERM."""
    import signal

    from google_cloud_pipeline_components.container.utils import execution_context

    def stopped(self: Any, *_: Any) -> None:
        if self._on_cancel:
            self._on_cancel()
        on_stop()
        os._exit(128 + signal.SIGTERM)

    execution_context.ExecutionContext._exit_gracefully = stopped


def _job_error(gcp_resources: str, api_endpoint: str, exc: BaseException) -> str:
    """The failed job's own error message, read back with the same client the launcher used; where no job was
    created, the launcher's own error (its last "Underlying error", without the request it quotes)."""
    from google.cloud import aiplatform_v1

    if not Path(gcp_resources).is_file():
        text = str(exc).rsplit("Underlying error: ", 1)[-1].strip() or type(exc).__name__
        return f"no custom job was created: {text[:500]}"
    try:
        uri = json.loads(Path(gcp_resources).read_text())["resources"][0]["resourceUri"]
        name = uri.split("/v1/", 1)[1]
        client = aiplatform_v1.JobServiceClient(transport="rest", client_options={"api_endpoint": api_endpoint})
        job = client.get_custom_job(name=name)
    except Exception as exc:  # noqa: BLE001 - the launcher's own error is still reported
        return f"(the job's error could not be read: {exc})"
    return f"custom job {job.name} ended {job.state.name}: {job.error.message}"


def main(argv: list[str]) -> int:
    from google_cloud_pipeline_components.container.v1.custom_job import launcher

    from vlp.pipelines.local import step_records

    api_endpoint = os.environ["VLP_API_ENDPOINT"]
    from vlp.pipelines.packaging import STEP_OF_OP

    gcp_resources = argv[argv.index("--gcp_resources") + 1]
    op = step_records.op_of(argv) or ""  # the KFP function the job runs, from the job's command in --payload
    step = STEP_OF_OP.get(op, op or "custom-job")
    directory = os.environ.get(step_records.ENV_DIR, "")
    record: dict[str, Any] = {"name": step, "op": op, "started": time.time(), "status": "running"}
    path = step_records.record_path(directory, op) if directory and op else None
    if path:
        step_records.write(path, record)
    point_at_stack(api_endpoint)

    def write_stopped() -> None:
        record.update(status="failed", error="stopped by SIGTERM; the custom job was cancelled", ended=time.time())
        if path:
            step_records.write(path, record)

    exit_as_stopped(write_stopped)
    try:
        # `--inject kill-step:mirror-weights@1w` kills this task right after the job is created: the job runs on, and
        # the exit handler cancels it (components/mirror/jobs.py).
        from vlp.components.runtime import checkpoint

        checkpoint("mirror-weights")
        launcher.main(argv)
        record["status"] = "succeeded"
        return 0
    except BaseException as exc:  # noqa: BLE001 - GCPC ends a failed job with an exception or sys.exit
        if isinstance(exc, SystemExit) and not exc.code:
            record["status"] = "succeeded"
            return 0
        traceback.print_exc()
        error = _job_error(gcp_resources, api_endpoint, exc)
        print(f"[vlp] {error}", flush=True)
        record.update(status="failed", error=error)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return 1
    finally:
        record["ended"] = time.time()
        if path:
            step_records.write(path, record)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
