"""The deployment preflight decides once and every later step reads: the config, where it goes, who it runs as, the
plan and the weights revision. It crosses KFP's task boundary as a struct (a dict, every number a float); each step
parses it once where it comes in (Deployment.parse in its KFP function) and hands the typed object down: no helper
reads the dict by hand or validates the config again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from vlp.components.config import DeploymentConfig, config_from_dict


@dataclass(frozen=True)
class Deployment:
    """One deployment as decided by preflight (or by `vlp render`, with placeholders where nothing was checked)."""

    config: DeploymentConfig
    project: str
    region: str
    bucket: str
    service_account: str  # who serving (the model server, a Cloud Run revision) runs as: see serving_account
    run_name: str
    labels: dict[str, str] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    revision_sha: str = ""
    api_endpoint: str = ""

    @classmethod
    def parse(cls, data: Mapping[str, Any] | Deployment) -> Deployment:
        """The typed deployment from the struct a step receives (the config validated, numbers back to ints)."""
        if isinstance(data, Deployment):
            return data
        return cls(
            # A KFP struct carries every number as a float: the config model gives back the typed values (traffic
            # steps, token counts) the helpers use.
            config=config_from_dict(data["config"], source="deployment['config']"),
            project=str(data.get("project") or ""),
            region=str(data.get("region") or ""),
            bucket=str(data.get("bucket") or ""),
            service_account=str(data.get("service_account") or ""),
            run_name=str(data.get("run_name") or ""),
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
            plan=dict(data.get("plan") or {}),
            revision_sha=str(data.get("revision_sha") or ""),
            api_endpoint=str(data.get("api_endpoint") or ""),
        )

    def to_dict(self) -> dict[str, Any]:
        """The struct handed to the next steps: the same keys as always (a change here is a change of the DAG's
        contract), the config as JSON values."""
        data = asdict(self)
        data["config"] = self.config.model_dump(mode="json")
        return data


def default_pipeline_account(project: str) -> str:
    """The pipeline's service account when the config names none: created by `vlp setup`."""
    return f"vlp-pipeline@{project}.iam.gserviceaccount.com"


def run_account(explicit: str, cfg: DeploymentConfig, project: str = "") -> str:
    """The account a run names for its steps and its serving: the run's service_account parameter, else
    placement.service_account, else (given the project: what `vlp run`, `vlp schedule create` and `vlp render`
    decide before anything runs) the pipeline's account `vlp setup` made. Never "" when a project is given: a
    PipelineJob that names none runs as the Compute Engine default account (pipeline_job.proto), which `vlp setup`
    grants nothing. Inside a step (no project given) "" means "the step's own", see serving_account."""
    return explicit or cfg.placement.service_account or (default_pipeline_account(project) if project else "")


def serving_account(deployment: Deployment) -> str:
    """Who a deployed model or a Cloud Run revision runs as: the account preflight decided, else the one the config
    names, else the step's own (a model server without one runs as a Vertex-managed identity that reads only
    AIP_STORAGE_URI, and vLLM downloads `--model=gs://...` itself). Cloud Run's own cloud_run.service_account, when
    set, wins over this (cloud_run/service_spec.py)."""
    from vlp.components.clients import own_account

    return run_account(deployment.service_account, deployment.config) or own_account(deployment.api_endpoint)


def build(
    cfg: DeploymentConfig,
    *,
    project: str,
    region: str,
    bucket: str,
    service_account: str,
    run_name: str,
    plan: dict[str, Any],
    revision_sha: str,
    api_endpoint: str,
) -> Deployment:
    """The deployment preflight hands on (its to_dict() is the struct) and `vlp render` shows: labels named from
    the deployment and the run."""
    from vlp.components.runtime import label_value

    return Deployment(
        config=cfg,
        project=project,
        region=region,
        bucket=bucket,
        service_account=service_account,
        run_name=run_name,
        labels={"vlp-deployment": label_value(cfg.name), "vlp-run": label_value(run_name or "manual")},
        plan=plan,
        revision_sha=revision_sha,
        api_endpoint=api_endpoint,
    )
