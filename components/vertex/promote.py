"""Promote step: move the endpoint's traffic to the deployed model that passed its smoke test, retire the old ones."""

import logging
import time

from vlp.components.deployment import Deployment
from vlp.components.rollout import split_with, step_pause

log = logging.getLogger("vlp.promote")

PROMOTED_LABEL = "vlp-promoted"  # on a model version once its deployed model holds the endpoint
# How long a request already routed to the old model may still run: Vertex's default request timeout on dedicated
# endpoints is 10 minutes (cloud.google.com/vertex-ai/docs/predictions/create-public-endpoint: "The default request
# timeout for a dedicated public endpoint is 10 minutes"; clientConnectionConfig.inferenceTimeout changes it). For
# shared endpoints no Google page states one: 60 s is an unverified choice. The local stack drains for 2 s (its
# requests take under a second; the drain is exercised, the minutes are not).
DEDICATED_DRAIN_S = 600.0
SHARED_DRAIN_S = 60.0
LOCAL_DRAIN_S = 2.0


def drain_seconds(deployment: Deployment, endpoint: object) -> float:
    """endpoint.drain_s, else the endpoint's request timeout (its inferenceTimeout when set), else the defaults
    above; LOCAL_DRAIN_S against the local stack unless the config sets one."""
    configured = deployment.config.endpoint.drain_s
    if configured is not None:
        return float(configured)
    if deployment.api_endpoint.startswith("http://"):
        return LOCAL_DRAIN_S
    timeout = endpoint.client_connection_config.inference_timeout  # type: ignore[attr-defined]
    if timeout.seconds:
        return float(timeout.seconds)
    return DEDICATED_DRAIN_S if endpoint.dedicated_endpoint_enabled else SHARED_DRAIN_S  # type: ignore[attr-defined]


def promote(
    deployment: Deployment, endpoint_resource: str, deployed_model_id: str, pause_s: float | None = None
) -> list[str]:
    """Shift traffic to `deployed_model_id` (all at once, or in the config's canary steps), then undeploy
    every other deployed model. Returns the ids undeployed."""
    from google.cloud import aiplatform_v1
    from google.protobuf import field_mask_pb2

    from vlp.components.vertex.endpoints import endpoint_client

    client = endpoint_client(deployment)
    endpoint = client.get_endpoint(name=endpoint_resource)
    others = {k: v for k, v in endpoint.traffic_split.items() if k != deployed_model_id}
    # The typed config's ints (a KFP struct carries traffic_steps as floats): a traffic split takes integers.
    steps = deployment.config.endpoint.traffic_steps or [100]
    pause = step_pause(deployment, pause_s)
    for i, percent in enumerate(steps):
        split = split_with(deployed_model_id, percent, others)
        update = aiplatform_v1.Endpoint(name=endpoint_resource, traffic_split=split)
        client.update_endpoint(endpoint=update, update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]))
        log.info("traffic on %s: %s", endpoint_resource, split)
        if i < len(steps) - 1:
            time.sleep(pause)
    # The commit point: from here on the new model is the endpoint's, and an exit handler that finds the run
    # failed finishes retiring the old ones instead of removing the new (teardown.remove_run_resources).
    mark_promoted(deployment, endpoint_resource, deployed_model_id)
    if others:
        drain = drain_seconds(deployment, endpoint)
        log.info("draining: the previous models stay deployed %.0f s so requests routed to them finish", drain)
        time.sleep(drain)
    return retire_others(client, endpoint_resource, deployed_model_id)


def mark_promoted(deployment: Deployment, endpoint_resource: str, deployed_model_id: str) -> None:
    """Label the model version behind `deployed_model_id` as promoted (PROMOTED_LABEL). Version labels, because the
    version is what the run created and what the exit handler looks at; UpdateModel on MODEL@VERSION updates the
    version's labels (UpdateModelRequest.model's documentation)."""
    from google.cloud import aiplatform_v1
    from google.protobuf import field_mask_pb2

    from vlp.components import clients
    from vlp.components.runtime import deployed_version_name
    from vlp.components.vertex.endpoints import endpoint_client

    endpoint = endpoint_client(deployment).get_endpoint(name=endpoint_resource)
    dm = next((d for d in endpoint.deployed_models if d.id == deployed_model_id), None)
    if dm is None:
        return
    models = aiplatform_v1.ModelServiceClient(**clients.gapic_kwargs(deployment.region, deployment.api_endpoint))
    version = models.get_model(name=deployed_version_name(dm))
    labels = {**version.labels, PROMOTED_LABEL: "true"}
    models.update_model(
        model=aiplatform_v1.Model(name=deployed_version_name(dm), labels=labels),
        update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
    )
    if "@" in deployed_version_name(dm) and "default" not in version.version_aliases:
        # The tested version becomes the model's default (register_model leaves it to promote); Vertex moves the
        # alias off the version that had it (MergeVersionAliasesRequest: an alias names one version).
        models.merge_version_aliases(name=deployed_version_name(dm), version_aliases=["default"])
    log.info("deployed model %s (%s) is promoted: it keeps the endpoint whatever happens next", dm.id, dm.model)


def retire_others(client, endpoint_resource: str, deployed_model_id: str) -> list[str]:  # noqa: ANN001
    """Undeploy every deployed model but `deployed_model_id`, which holds 100% by now. Returns the ids undeployed."""
    retired = []
    for dm in client.get_endpoint(name=endpoint_resource).deployed_models:
        if dm.id == deployed_model_id:
            continue
        log.info("undeploying previous deployed model %s (%s)", dm.id, dm.model)
        client.undeploy_model(
            endpoint=endpoint_resource, deployed_model_id=dm.id, traffic_split={deployed_model_id: 100}
        ).result(timeout=1800)
        retired.append(dm.id)
    return retired


def promote_op(deployment: dict, endpoint_resource: str, deployed_model_id: str) -> list:
    """Move all traffic to the new deployed model and undeploy the previous ones."""
    from vlp.components.deployment import Deployment
    from vlp.components.runtime import checkpoint, setup_logging
    from vlp.components.vertex.promote import promote

    setup_logging()
    checkpoint("promote")
    return promote(Deployment.parse(deployment), endpoint_resource, deployed_model_id)
