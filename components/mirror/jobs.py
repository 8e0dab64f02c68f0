"""The big-model mirror's Vertex AI custom jobs after the run: one still running when its run failed or was stopped
is cancelled by the exit handler (components/cleanup.py). GCPC's launcher cancels its job when its task is stopped
(SIGTERM); a launcher that died another way (killed, evicted) leaves the job running, and paid for, until its
timeout. The jobs carry the run's labels (preflight's `labels` output, pipelines/pipeline.py)."""

from __future__ import annotations

ACTIVE_JOB_STATES = ("JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING")


def cancel_run_mirror_jobs(project: str, regions: list[str], run_label: str, api_endpoint: str = "") -> list[str]:
    """Cancel the run's custom jobs that are still queued, pending or running; returns their names."""
    from google.cloud import aiplatform_v1

    from vlp.components import clients

    cancelled = []
    for region in dict.fromkeys(regions):
        jobs = aiplatform_v1.JobServiceClient(**clients.gapic_kwargs(region, api_endpoint))
        # The documented filter form (ListCustomJobsRequest.filter: `labels.key="value"`), values quoted.
        request = aiplatform_v1.ListCustomJobsRequest(
            parent=f"projects/{project}/locations/{region}", filter=f'labels.vlp-run="{run_label}"'
        )
        for job in jobs.list_custom_jobs(request=request):
            if job.state.name in ACTIVE_JOB_STATES:
                jobs.cancel_custom_job(name=job.name)
                cancelled.append(job.name)
    return cancelled
