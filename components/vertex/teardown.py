"""Vertex teardown: roll back a failed deploy, and remove what a run left on the project's endpoints and registry
(the exit handler, vlp.components.cleanup, calls it for target vertex)."""

import logging
from dataclasses import dataclass, field

from vlp.components.deployment import Deployment

log = logging.getLogger("vlp.teardown")


@dataclass
class Removed:
    undeployed: list[str] = field(default_factory=list)  # ENDPOINT/deployedModels/ID
    deleted: list[str] = field(default_factory=list)  # endpoints and model versions

    def extend(self, other: "Removed") -> None:
        self.undeployed += other.undeployed
        self.deleted += other.deleted


def _clients(region: str, api_endpoint: str):  # noqa: ANN202 - a pair of GAPIC clients
    from google.cloud import aiplatform_v1

    from vlp.components import clients

    kwargs = clients.gapic_kwargs(region, api_endpoint)
    return aiplatform_v1.EndpointServiceClient(**kwargs), aiplatform_v1.ModelServiceClient(**kwargs)


def _model_labels(models, model_name: str) -> dict[str, str]:  # noqa: ANN001
    from google.api_core import exceptions

    try:
        return dict(models.get_model(name=model_name).labels)
    except exceptions.NotFound:
        return {}


def _version_labels(models, run_versions: dict[str, dict[str, str]], dm) -> dict[str, str]:  # noqa: ANN001
    """The labels of a deployed model's version: from the run's versions listed up front (none: not the run's), or
    read when the deployed model names no version (the default version answers)."""
    from vlp.components.runtime import deployed_version_name

    name = deployed_version_name(dm)
    if "@" in name:
        return run_versions.get(name, {})
    return _model_labels(models, name)


def _reassigned_split(endpoint, leaving: set[str]) -> dict[str, int]:  # noqa: ANN001 - aiplatform_v1.Endpoint
    """The split to undeploy `leaving` with: Vertex undeploys a model that holds traffic only when the request
    reassigns it (UndeployModelRequest.traffic_split), so the models that stay get all of it, in their ratio,
    or evenly when they had none (a crash between promote and retiring the old model). Empty when none stay."""
    staying = [dm.id for dm in endpoint.deployed_models if dm.id not in leaving]
    if not staying:
        return {}
    weights = {k: endpoint.traffic_split.get(k, 0) for k in staying}
    total = sum(weights.values())
    split = {k: (100 * v // total if total else 100 // len(staying)) for k, v in weights.items()}
    split[staying[0]] += 100 - sum(split.values())
    return split


PENDING_DEPLOY_WAIT_S = 7200 + 1800  # as long as the deploy step itself waits (deploy_model.DEPLOY_WAIT_S)


def _wait_for_pending_deploys(endpoints, endpoint_name: str, deadline_s: float) -> bool:  # noqa: ANN001
    """Wait for DeployModel operations still running on the endpoint: Vertex keeps deploying after a client gives
    up (up to the container's deployment_timeout), and a replica that lands after cleanup would bill unseen.
    True when there were any (the endpoint then has to be read again)."""
    import time

    from google.longrunning import operations_pb2

    deadline = time.monotonic() + deadline_s
    pending, token = [], ""
    while True:
        page = endpoints.list_operations(
            request=operations_pb2.ListOperationsRequest(name=endpoint_name, page_token=token)
        )
        pending += [
            op.name
            for op in page.operations
            if not op.done and op.metadata.type_url.endswith(".DeployModelOperationMetadata")
        ]
        token = page.next_page_token
        if not token:
            break
    for name in pending:
        log.info("waiting for deploy operation %s on %s before cleaning up", name, endpoint_name)
        while time.monotonic() < deadline:
            if endpoints.get_operation(request=operations_pb2.GetOperationRequest(name=name)).done:
                break
            time.sleep(2)
    return bool(pending)


def remove_run_resources(
    project: str,
    regions: list[str],
    deployment_name: str,
    run_label: str,
    api_endpoint: str = "",
    pending_wait_s: float = PENDING_DEPLOY_WAIT_S,
    keep_promoted: bool = False,
    endpoint_name: str = "",
) -> Removed:
    """Remove what the run labelled `run_label` created: its deployed models (from any endpoint), the
    endpoints it created once empty, and its model versions. Safe to call twice; never touches what
    other runs created, so the model that served before a failed redeploy keeps serving.

    `keep_promoted` (the exit handler of a failed run under `teardown: on_failure`): a model version that promote
    labelled promoted holds its endpoint's traffic and the old models may be gone already, so removing it could
    leave the endpoint serving nothing. It stays, and promote's unfinished part (retiring the others) is done."""
    from google.cloud import aiplatform_v1

    from vlp.components.runtime import deployed_version_name, label_value
    from vlp.components.vertex.promote import PROMOTED_LABEL

    removed = Removed()
    for region in dict.fromkeys(regions):
        endpoints, models = _clients(region, api_endpoint)
        parent = f"projects/{project}/locations/{region}"
        # The run's versions first, in two listings however many models are deployed: each call before the
        # undeploy is one more place for a crash to leave the run's model holding traffic (and quota).
        # Filters in the documented form, values quoted (AIP-160; ListModelVersionsRequest.filter).
        model_filter = f'labels.vlp-deployment="{deployment_name}"'
        listed = list(models.list_models(request=aiplatform_v1.ListModelsRequest(parent=parent, filter=model_filter)))
        run_versions: dict[str, dict[str, str]] = {}  # MODEL@VERSION -> its labels
        for model in listed:
            request = aiplatform_v1.ListModelVersionsRequest(name=model.name, filter=f'labels.vlp-run="{run_label}"')
            for v in models.list_model_versions(request=request):
                run_versions[f"{model.name}@{v.version_id}"] = dict(v.labels)

        for ep in endpoints.list_endpoints(request=aiplatform_v1.ListEndpointsRequest(parent=parent)):
            # Only an endpoint the run may have deployed to can have a deploy of the run's still landing: the
            # config's endpoint (by display name) or one a vlp run of this deployment created. Other teams' deploys
            # are theirs to wait for (each can run for hours).
            could_be_ours = (
                (endpoint_name and ep.display_name == endpoint_name)
                or ep.labels.get("vlp-deployment") == label_value(deployment_name)
                or ep.labels.get("vlp-run") == run_label
            )
            if could_be_ours and _wait_for_pending_deploys(endpoints, ep.name, pending_wait_s):
                ep = endpoints.get_endpoint(name=ep.name)  # what landed while we waited
            labels = {dm.id: _version_labels(models, run_versions, dm) for dm in ep.deployed_models}
            mine = [dm for dm in ep.deployed_models if labels[dm.id].get("vlp-run") == run_label]
            promoted = [dm for dm in mine if keep_promoted and labels[dm.id].get(PROMOTED_LABEL)]
            if promoted:
                removed.undeployed += _finish_promotion(endpoints, ep, promoted[0].id, run_label)
                # And the alias promote gives the version it switched to (promote.mark_promoted), if it died first.
                promoted_version = deployed_version_name(promoted[0])
                if "@" in promoted_version:
                    models.merge_version_aliases(name=promoted_version, version_aliases=["default"])
            elif mine:
                split = _reassigned_split(ep, {dm.id for dm in mine})
                for dm in mine:
                    log.info("undeploying %s from %s (created by run %s)", dm.id, ep.name, run_label)
                    endpoints.undeploy_model(endpoint=ep.name, deployed_model_id=dm.id, traffic_split=split).result(
                        timeout=1800
                    )
                    removed.undeployed.append(f"{ep.name}/deployedModels/{dm.id}")
            if ep.labels.get("vlp-run") == run_label:
                if endpoints.get_endpoint(name=ep.name).deployed_models:
                    log.warning("endpoint %s was created by this run but serves other models: kept", ep.name)
                    continue
                log.info("deleting endpoint %s (created by run %s)", ep.name, run_label)
                endpoints.delete_endpoint(name=ep.name).result(timeout=600)
                removed.deleted.append(ep.name)
        for model in listed:
            if not any(name.startswith(f"{model.name}@") for name in run_versions):
                continue
            versions = list(models.list_model_versions(name=model.name))
            ours = [
                v
                for v in versions
                if v.labels.get("vlp-run") == run_label and not (keep_promoted and v.labels.get(PROMOTED_LABEL))
            ]
            if not ours:
                continue
            if len(ours) == len(versions):
                log.info("deleting model %s (every version created by run %s)", model.name, run_label)
                models.delete_model(name=model.name).result(timeout=600)
                removed.deleted.append(model.name)
                continue
            survivors = [v for v in versions if v not in ours]
            for v in ours:
                if "default" in v.version_aliases:
                    # Vertex refuses to delete the default version; hand the alias back first.
                    newest = max(survivors, key=lambda s: int(s.version_id))
                    models.merge_version_aliases(name=f"{model.name}@{newest.version_id}", version_aliases=["default"])
                log.info("deleting model version %s@%s (created by run %s)", model.name, v.version_id, run_label)
                models.delete_model_version(name=f"{model.name}@{v.version_id}").result(timeout=600)
                removed.deleted.append(f"{model.name}@{v.version_id}")
    return removed


# A run in these states may still be creating resources; its leftovers are not leftovers yet.
ACTIVE_JOB_STATES = {
    "PIPELINE_STATE_QUEUED",
    "PIPELINE_STATE_PENDING",
    "PIPELINE_STATE_RUNNING",
    "PIPELINE_STATE_CANCELLING",
    "PIPELINE_STATE_PAUSED",
}


def pipeline_job_state(project: str, regions: list[str], run_label: str, api_endpoint: str = "") -> str:
    """The state of the pipeline job a run label names (the job id is the label), or "" when no region has it."""
    from google.api_core import exceptions
    from google.cloud import aiplatform_v1

    from vlp.components import clients

    for region in dict.fromkeys(regions):
        client = aiplatform_v1.PipelineServiceClient(**clients.gapic_kwargs(region, api_endpoint))
        try:
            job = client.get_pipeline_job(name=f"projects/{project}/locations/{region}/pipelineJobs/{run_label}")
        except (exceptions.NotFound, exceptions.InvalidArgument):
            continue
        return job.state.name
    return ""


def remove_abandoned_runs(
    project: str, regions: list[str], deployment_name: str, run_label: str, api_endpoint: str = ""
) -> Removed:
    """What earlier runs of the deployment left when they died before their own exit handler ran (the runner or the
    pipeline job killed): their model versions were never promoted and serve nowhere. Removed with their endpoints
    (once empty), as their exit handler would have; a run whose job may still be going, or succeeded (its versions
    are the deployment's history), is left alone, as `vlp gc` leaves it."""
    from google.cloud import aiplatform_v1

    from vlp.components.vertex.promote import PROMOTED_LABEL

    removed = Removed()
    for region in dict.fromkeys(regions):
        _, models = _clients(region, api_endpoint)
        parent = f"projects/{project}/locations/{region}"
        model_filter = f'labels.vlp-deployment="{deployment_name}"'
        by_run: dict[str, list] = {}
        for model in models.list_models(request=aiplatform_v1.ListModelsRequest(parent=parent, filter=model_filter)):
            for version in models.list_model_versions(name=model.name):
                other = version.labels.get("vlp-run", "")
                if other and other != run_label:
                    by_run.setdefault(other, []).append(version)
        for other, versions in by_run.items():
            if any(v.labels.get(PROMOTED_LABEL) or v.deployed_models for v in versions):
                continue
            state = pipeline_job_state(project, [region], other, api_endpoint)
            if state in ACTIVE_JOB_STATES or state == "PIPELINE_STATE_SUCCEEDED":
                continue
            log.info("removing what run %s left untested (it died before its exit handler ran)", other)
            removed.extend(
                remove_run_resources(project, [region], deployment_name, other, api_endpoint, pending_wait_s=0)
            )
    return removed


def _finish_promotion(endpoints, ep, keeper: str, run_label: str) -> list[str]:  # noqa: ANN001
    """Promote died after its commit point: the run's promoted model takes all traffic and the others go, as promote
    would have done. Each undeploy hands the leaving model's traffic to the keeper in the same request, so a crash
    here too leaves the endpoint serving. Returns ENDPOINT/deployedModels/ID of what went."""
    log.info(
        "run %s promoted deployed model %s on %s before it failed: keeping it and retiring the others",
        run_label,
        keeper,
        ep.name,
    )
    undeployed = []
    for dm in ep.deployed_models:
        if dm.id == keeper:
            continue
        log.info("undeploying previous deployed model %s (%s)", dm.id, dm.model)
        endpoints.undeploy_model(endpoint=ep.name, deployed_model_id=dm.id, traffic_split={keeper: 100}).result(
            timeout=1800
        )
        undeployed.append(f"{ep.name}/deployedModels/{dm.id}")
    return undeployed


def roll_back(deployment: Deployment, reason: str) -> Removed:
    """After a failed smoke test: the new deployed model and version go, the old one keeps 100%."""
    cfg = deployment.config
    if cfg.teardown == "never":
        log.warning("teardown: never — leaving the failed deployment in place for debugging")
        return Removed()
    return remove_run_resources(
        deployment.project,
        [deployment.region],
        cfg.name,
        deployment.labels["vlp-run"],
        deployment.api_endpoint,
        endpoint_name=cfg.endpoint.name,
    )


def roll_back_op(deployment: dict, reason: str) -> None:
    """Roll back after a failed smoke test, then fail the run with the smoke test's message."""
    from vlp.components.deployment import Deployment
    from vlp.components.runtime import StepError, checkpoint, setup_logging
    from vlp.components.vertex.teardown import roll_back

    log = setup_logging()
    checkpoint("roll-back")
    removed = roll_back(Deployment.parse(deployment), reason)
    for name in removed.undeployed + removed.deleted:
        log.info("removed %s", name)
    raise StepError(f"smoke test failed, deployment rolled back: {reason}")


