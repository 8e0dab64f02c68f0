"""Submit the compiled pipeline as a Vertex AI PipelineJob, follow it, and summarise how it ended."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from vlp.components.config import ConfigError, DeploymentConfig
from vlp.components.deployment import run_account
from vlp.pipelines.progress import StepView, is_step
from vlp.pipelines.summary import empty_summary, print_summary

# The aiplatform SDK's _PIPELINE_COMPLETE_STATES: PAUSED ends the wait too (PipelineState in pipeline_state.proto).
_TERMINAL = {"PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED", "PIPELINE_STATE_PAUSED"}


def permission_hint(exc: Exception) -> str:
    """Name the missing permission when Google answers 403, so the fix is one IAM grant away."""
    from google.api_core import exceptions

    # gRPC raises PermissionDenied, REST raises Forbidden: both are a 403.
    if isinstance(exc, (exceptions.PermissionDenied, exceptions.Forbidden)):
        import re

        perm = re.search(r"Permission '([\w.]+)'", str(exc)) or re.search(
            r"([a-z]+\.[a-zA-Z]+\.[a-zA-Z]+) denied", str(exc)
        )
        missing = perm.group(1) if perm else "(see the message above)"
        from vlp.pipelines.iam_docs import fix_for

        fix = fix_for(missing) if perm else ""
        return f"Google refused the call (403): missing permission {missing}. " + (
            f"Fix: {fix}." if fix else "Grant the caller a role that has it (docs/iam.md lists them)."
        )
    return ""


def resolve_placement(cfg: DeploymentConfig, project: str, region: str, bucket: str) -> tuple[str, str, str]:
    project = project or cfg.placement.project
    region = region or cfg.placement.regions[0]
    bucket = bucket or cfg.placement.bucket
    missing = [n for n, v in (("project", project), ("bucket", bucket)) if not v]
    if missing:
        raise ConfigError(
            f"no {' and no '.join(missing)}: pass --project/--bucket or set placement.project/placement.bucket "
            "(there is no default on purpose: nothing deploys to a project by accident)"
        )
    return project, region, bucket


def submit_run(
    cfg: DeploymentConfig,
    *,
    project: str = "",
    region: str = "",
    bucket: str = "",
    service_account: str = "",
    api_endpoint: str = "",
    wait: bool = False,
    force: bool = False,
    image: str | None = None,
    summary_json: Path | None = None,
    template_path: str | None = None,
) -> dict[str, Any]:
    """Submit a PipelineJob for the config; with wait, follow it to the end and return its summary."""
    from google.cloud import aiplatform

    from vlp.components import clients
    from vlp.components.runtime import label_value
    from vlp.pipelines.compile import compile_to_temp, spec_path
    from vlp.pipelines.pipeline import pipeline_parameters

    project, region, bucket = resolve_placement(cfg, project, region, bucket)
    # Named on the job (and in its parameters): without one, Vertex runs every step as the Compute Engine default
    # account, which `vlp setup` grants nothing.
    service_account = run_account(service_account, cfg, project)
    clients.init_aiplatform(project, region, api_endpoint)
    template = template_path or str(compile_to_temp(image) if image or not spec_path().exists() else spec_path())
    params = pipeline_parameters(
        cfg,
        project=project,
        region=region,
        bucket=bucket,
        service_account=service_account,
        force=force,
        api_endpoint=api_endpoint,
    )
    job = aiplatform.PipelineJob(
        display_name=f"vlp-{cfg.name}",
        template_path=template,
        pipeline_root=f"gs://{bucket}/pipeline-root",
        parameter_values=params,
        enable_caching=False,
        labels={"vlp-deployment": label_value(cfg.name)},
    )
    summary = empty_summary()
    started = time.monotonic()
    try:
        if api_endpoint.startswith("http://"):
            # An emulator: create the job as it was built. The SDK's submit() first checks the pipeline
            # root bucket through Cloud Resource Manager, which no emulator serves.
            from google.cloud import aiplatform_v1

            request = job._gca_resource  # the proto submit() would send, before it exists on the server
            request.service_account = service_account
            created = aiplatform_v1.PipelineServiceClient(
                **clients.gapic_kwargs(region, api_endpoint)
            ).create_pipeline_job(parent=f"projects/{project}/locations/{region}", pipeline_job=request)
            job = aiplatform.PipelineJob.get(created.name)
        else:
            job.submit(service_account=service_account)
    except Exception as exc:
        hint = permission_hint(exc)
        raise RuntimeError(f"submitting the pipeline to {project}/{region} failed: {exc}. {hint}".strip()) from None
    summary["pipeline_job"] = job.resource_name
    print(f"submitted {job.resource_name}")
    if not wait:
        summary["status"] = "submitted"
        _write(summary, summary_json)
        return summary
    # The same step view as a local run: one line per step, redrawn on a terminal, one line per change elsewhere.
    with StepView(sys.stdout) as view:
        while True:
            job_proto = aiplatform.PipelineJob.get(job.resource_name).gca_resource
            for task in job_proto.job_detail.task_details:
                if is_step(task.task_name):  # steps (custom-job mirrors too), not the DAG's groups
                    view.update(task.task_name, task.state.name)
            if job_proto.state.name in _TERMINAL:
                break
            time.sleep(5 if not api_endpoint.startswith("http://") else 0.5)
    state = job_proto.state.name
    summary["status"] = {"PIPELINE_STATE_SUCCEEDED": "succeeded", "PIPELINE_STATE_PAUSED": "paused"}.get(
        state, "failed"
    )
    summary["error"] = job_proto.error.message or (None if summary["status"] == "succeeded" else state)
    if summary["status"] == "paused":
        summary["error"] = f"{job.resource_name} is paused: resume it from the Vertex AI console to finish the run"
    summary["steps"] = [
        {
            "name": t.task_name,
            "status": t.state.name.lower(),
            "seconds": round((t.end_time.timestamp() - t.start_time.timestamp()), 1) if t.end_time else None,
        }
        for t in job_proto.job_detail.task_details
    ]
    summary["seconds"] = round(time.monotonic() - started, 1)
    print_summary(summary)
    _write(summary, summary_json)
    return summary


def _write(summary: dict[str, Any], path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
