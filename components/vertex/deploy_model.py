"""Deploy step: create or reuse the endpoint and deploy the new model version next to what already serves."""

import concurrent.futures
import logging
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint, VertexModel
from kfp import dsl

from vlp.components.deployment import Deployment

log = logging.getLogger("vlp.deploy")

# Vertex keeps a deployment going for up to the container's deployment_timeout (2 h, the limit) after the VM and
# image are ready; waiting less would call a slow, healthy 405B deploy failed and leave its replica billing.
# The extra half hour covers VM provisioning and the image pull before the container's clock starts (unverified).
DEPLOY_WAIT_S = 7200 + 1800


@dataclass
class Deployed:
    endpoint_resource: str
    deployed_model_id: str
    created_endpoint: bool
    previous_deployed_model_ids: list[str]


def get_or_create_endpoint(deployment: Deployment) -> tuple[str, bool]:
    """(endpoint resource name, created by this run)."""
    from google.cloud import aiplatform_v1

    cfg = deployment.config.endpoint
    from vlp.components.vertex.endpoints import endpoint_client, find_endpoint

    existing = find_endpoint(deployment)
    if existing is not None:
        if not cfg.reuse:
            from vlp.components.runtime import StepError

            raise StepError(
                f"endpoint {cfg.name} already exists ({existing.name}) and endpoint.reuse is false: "
                "set endpoint.reuse: true to redeploy onto it blue/green, or choose another endpoint.name"
            )
        log.info("reusing endpoint %s", existing.name)
        return existing.name, False
    endpoint = aiplatform_v1.Endpoint(
        display_name=cfg.name,
        labels=deployment.labels,
        dedicated_endpoint_enabled=cfg.dedicated,
    )
    parent = f"projects/{deployment.project}/locations/{deployment.region}"
    created = endpoint_client(deployment).create_endpoint(parent=parent, endpoint=endpoint).result(timeout=600)
    log.info("created endpoint %s", created.name)
    return created.name, True


def redeploy_split(cfg: Any, current: dict[str, int]) -> dict[str, int]:
    """The traffic split a redeploy starts with ("0" = the model being deployed): 0% where invoke reaches the new
    model alone (dedicated endpoints), else endpoint.canary_percent taken from the serving models in their ratio,
    because a shared endpoint has no route to a model without traffic."""
    from vlp.components.rollout import split_with

    if cfg.endpoint.uses_invoke:
        return {"0": 0, **current}
    return split_with("0", cfg.endpoint.canary_percent, {k: v for k, v in current.items() if v > 0})


def deploy_model(deployment: Deployment, model_resource: str) -> Deployed:
    """Deploy the model version; on an endpoint that already serves, the new one starts at 0% traffic
    (blue/green: the smoke test reaches it directly, and promote moves traffic only after it passes)."""
    from vlp.components.deployment import serving_account
    from vlp.components.runtime import StepError
    from vlp.components.serving.logs import deploy_failure_message
    from vlp.components.vertex.endpoints import endpoint_client
    from vlp.components.vertex.serving_spec import deploy_model_request, needs_v1beta1

    endpoint_resource, created = get_or_create_endpoint(deployment)
    client = endpoint_client(deployment)
    current = client.get_endpoint(name=endpoint_resource)
    cfg = deployment.config
    if cfg.endpoint.uses_invoke and not current.dedicated_endpoint_enabled:
        raise StepError(
            f"endpoint {endpoint_resource} ({cfg.endpoint.name}) is a shared endpoint, but the model was uploaded "
            "with invokeRoutePrefix, which Vertex deploys to dedicated endpoints only: choose a new endpoint.name "
            "(a dedicated endpoint is created), or set endpoint.redeploy_test: canary (and dedicated: false)"
        )
    previous = [dm.id for dm in current.deployed_models]
    # The model server runs as the pipeline's account unless the config names one: without an account it would
    # run as a Vertex-managed identity that reads only AIP_STORAGE_URI (Vertex AI docs, "Use a custom service
    # account"), and vLLM downloads `--model=gs://...` itself.
    deployment = replace(deployment, service_account=serving_account(deployment))
    request = deploy_model_request(deployment, model_resource)
    request.endpoint = endpoint_resource
    request.traffic_split.clear()
    request.traffic_split.update(redeploy_split(cfg, dict(current.traffic_split)) if previous else {"0": 100})
    log.info(
        "deploying %s to %s on %s x %s %s (%s)",
        model_resource,
        endpoint_resource,
        request.deployed_model.dedicated_resources.machine_spec.machine_type,
        request.deployed_model.dedicated_resources.machine_spec.accelerator_count,
        request.deployed_model.dedicated_resources.machine_spec.accelerator_type.name,
        "blue/green beside " + ", ".join(previous) if previous else "first deployment",
    )
    from vlp.components import clients

    try:
        deployer = client
        if needs_v1beta1(deployment):
            # Multi-host GPU replicas (multihost_gpu_node_count) exist only in the v1beta1 API.
            from google.cloud import aiplatform_v1beta1

            deployer = aiplatform_v1beta1.EndpointServiceClient(
                **clients.gapic_kwargs(deployment.region, deployment.api_endpoint)
            )
        # v1beta1's generated default deadline for deploy_model is 5 s (v1 has none): a slow answer would fail
        # the run with a bare ReadTimeout while the deployment may already be under way.
        operation = deployer.deploy_model(request=request, timeout=clients.CALL_TIMEOUT_S)
        try:
            response = operation.result(timeout=DEPLOY_WAIT_S)
        except concurrent.futures.TimeoutError:
            # Do not leave a replica coming up after the run: ask Vertex to stop, then fail. The exit handler
            # removes by label whatever still lands.
            operation.cancel()
            raise StepError(
                f"deploying {model_resource} to {endpoint_resource} did not finish within {DEPLOY_WAIT_S} s "
                f"(the container's deployment timeout plus provisioning): cancelled operation "
                f"{operation.operation.name}. Read the model server's logs; a larger machine or fewer GPUs "
                "to wait for (another region) usually helps"
            ) from None
    except StepError:
        raise
    except Exception as exc:
        raise StepError(
            deploy_failure_message(
                deployment.project,
                deployment.region,
                endpoint_resource.rsplit("/", 1)[-1],
                "",
                getattr(exc, "message", None) or str(exc),
                deployment.api_endpoint,
            )
        ) from None
    deployed_id = response.deployed_model.id
    log.info("deployed model %s on %s", deployed_id, endpoint_resource)
    return Deployed(endpoint_resource, deployed_id, created, previous)


def deploy_model_op(
    deployment: dict,
    model: dsl.Input[VertexModel],
    endpoint: dsl.Output[VertexEndpoint],
) -> NamedTuple("DeployOutputs", [("endpoint_resource", str), ("deployed_model_id", str)]):
    """Deploy the registered model version to the deployment's endpoint."""
    from collections import namedtuple

    from vlp.components.deployment import Deployment
    from vlp.components.runtime import checkpoint, setup_logging
    from vlp.components.vertex.deploy_model import deploy_model

    setup_logging()
    d = Deployment.parse(deployment)
    deployed = deploy_model(d, model.metadata["resourceName"])
    endpoint.uri = f"https://{d.region}-aiplatform.googleapis.com/v1/{deployed.endpoint_resource}"
    endpoint.metadata["resourceName"] = deployed.endpoint_resource
    checkpoint("deploy-model")
    return namedtuple("DeployOutputs", ["endpoint_resource", "deployed_model_id"])(
        deployed.endpoint_resource, deployed.deployed_model_id
    )
