"""Deploy step: create or reuse the endpoint and deploy the new model version next to what already serves."""

import logging
from dataclasses import dataclass
from typing import NamedTuple

from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint, VertexModel
from kfp import dsl

log = logging.getLogger("vlp.deploy")

DEPLOY_TIMEOUT_S = 3600  # 405B FP8 spends ~10 min just loading weights; leave room for image pulls


@dataclass
class Deployed:
    endpoint_resource: str
    deployed_model_id: str
    created_endpoint: bool
    previous_deployed_model_ids: list[str]


def endpoint_client(deployment: dict):  # noqa: ANN201 - a GAPIC client
    from google.cloud import aiplatform_v1

    from components import clients

    return aiplatform_v1.EndpointServiceClient(
        **clients.gapic_kwargs(deployment["region"], deployment.get("api_endpoint", ""))
    )


def find_endpoint(deployment: dict):  # noqa: ANN201 - aiplatform_v1.Endpoint | None
    """The endpoint named in the config, if it already exists in the run's region."""
    from google.cloud import aiplatform_v1

    name = deployment["config"]["endpoint"]["name"]
    request = aiplatform_v1.ListEndpointsRequest(
        parent=f"projects/{deployment['project']}/locations/{deployment['region']}",
        filter=f'display_name="{name}"',
    )
    for endpoint in endpoint_client(deployment).list_endpoints(request=request):
        return endpoint
    return None


def get_or_create_endpoint(deployment: dict) -> tuple[str, bool]:
    """(endpoint resource name, created by this run)."""
    from google.cloud import aiplatform_v1

    cfg = deployment["config"]["endpoint"]
    existing = find_endpoint(deployment)
    if existing is not None:
        if not cfg["reuse"]:
            from components.runtime import StepError

            raise StepError(
                f"endpoint {cfg['name']} already exists ({existing.name}) and endpoint.reuse is false: "
                "set endpoint.reuse: true to redeploy onto it blue/green, or choose another endpoint.name"
            )
        log.info("reusing endpoint %s", existing.name)
        return existing.name, False
    endpoint = aiplatform_v1.Endpoint(
        display_name=cfg["name"],
        labels=deployment["labels"],
        dedicated_endpoint_enabled=bool(cfg.get("dedicated")),
    )
    parent = f"projects/{deployment['project']}/locations/{deployment['region']}"
    created = endpoint_client(deployment).create_endpoint(parent=parent, endpoint=endpoint).result(timeout=600)
    log.info("created endpoint %s", created.name)
    return created.name, True


def deploy_model(deployment: dict, model_resource: str) -> Deployed:
    """Deploy the model version; on an endpoint that already serves, the new one starts at 0% traffic
    (blue/green: the smoke test reaches it directly, and promote moves traffic only after it passes)."""
    from components.runtime import StepError
    from components.serving import deploy_model_request, needs_v1beta1
    from components.smoke_test import deploy_failure_message

    endpoint_resource, created = get_or_create_endpoint(deployment)
    client = endpoint_client(deployment)
    current = client.get_endpoint(name=endpoint_resource)
    previous = [dm.id for dm in current.deployed_models]
    request = deploy_model_request(deployment, model_resource)
    request.endpoint = endpoint_resource
    # Key "0" is the model being deployed: all traffic on a fresh endpoint, none beside a serving one.
    split = {"0": 100} if not previous else {"0": 0, **{k: v for k, v in current.traffic_split.items()}}
    request.traffic_split.clear()
    request.traffic_split.update(split)
    log.info(
        "deploying %s to %s on %s x %s %s (%s)",
        model_resource,
        endpoint_resource,
        request.deployed_model.dedicated_resources.machine_spec.machine_type,
        request.deployed_model.dedicated_resources.machine_spec.accelerator_count,
        request.deployed_model.dedicated_resources.machine_spec.accelerator_type.name,
        "blue/green beside " + ", ".join(previous) if previous else "first deployment",
    )
    try:
        deployer = client
        if needs_v1beta1(deployment):
            # Multi-host GPU replicas (multihost_gpu_node_count) exist only in the v1beta1 API.
            from google.cloud import aiplatform_v1beta1

            from components import clients

            deployer = aiplatform_v1beta1.EndpointServiceClient(
                **clients.gapic_kwargs(deployment["region"], deployment.get("api_endpoint", ""))
            )
        response = deployer.deploy_model(request=request).result(timeout=DEPLOY_TIMEOUT_S)
    except Exception as exc:
        raise StepError(
            deploy_failure_message(
                deployment["project"],
                deployment["region"],
                endpoint_resource.rsplit("/", 1)[-1],
                "",
                getattr(exc, "message", None) or str(exc),
                deployment.get("api_endpoint", ""),
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

    from components.deploy_model import deploy_model
    from components.runtime import checkpoint, setup_logging

    setup_logging()
    deployed = deploy_model(deployment, model.metadata["resourceName"])
    endpoint.uri = f"https://{deployment['region']}-aiplatform.googleapis.com/v1/{deployed.endpoint_resource}"
    endpoint.metadata["resourceName"] = deployed.endpoint_resource
    checkpoint("deploy-model")
    return namedtuple("DeployOutputs", ["endpoint_resource", "deployed_model_id"])(
        deployed.endpoint_resource, deployed.deployed_model_id
    )
