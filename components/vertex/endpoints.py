"""The deployment's Vertex endpoint: a client for its region, and the endpoint its config names. Apart from
vlp.components.clients, which deployment.py itself imports (for the step's own account)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlp.components.clients import gapic_kwargs

if TYPE_CHECKING:
    from vlp.components.deployment import Deployment


def endpoint_client(deployment: Deployment):  # noqa: ANN201 - a GAPIC client
    from google.cloud import aiplatform_v1

    return aiplatform_v1.EndpointServiceClient(**gapic_kwargs(deployment.region, deployment.api_endpoint))


def find_endpoint(deployment: Deployment):  # noqa: ANN201 - aiplatform_v1.Endpoint | None
    """The endpoint named in the config, if it already exists in the run's region."""
    from google.cloud import aiplatform_v1

    name = deployment.config.endpoint.name
    request = aiplatform_v1.ListEndpointsRequest(
        parent=f"projects/{deployment.project}/locations/{deployment.region}",
        filter=f'display_name="{name}"',
    )
    for endpoint in endpoint_client(deployment).list_endpoints(request=request):
        return endpoint
    return None
