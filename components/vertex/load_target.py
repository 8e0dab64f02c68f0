"""The load benchmark's target on Vertex: an endpoint, or one deployed model on it, mapped to the chat route that
reaches it (the load generator itself, components/smoke/benchmark.py, takes URLs only)."""

from __future__ import annotations

import re

from vlp.components.smoke.benchmark import ChatTarget, url_target
from vlp.components.vertex.prediction import chat_completions_url, describe_endpoint, invoke_url

_VERTEX_TARGET_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/endpoints/[^/]+(/deployedModels/(?P<dm>[^/]+))?$")


def _serves_invoke(endpoint_resource: str, api_endpoint: str) -> bool:
    """True when a model with traffic on the endpoint was uploaded with invokeRoutePrefix."""
    from google.cloud import aiplatform_v1

    from vlp.components.clients import gapic_kwargs
    from vlp.components.runtime import deployed_version_name, region_of

    kwargs = gapic_kwargs(region_of(endpoint_resource), api_endpoint)
    endpoint = aiplatform_v1.EndpointServiceClient(**kwargs).get_endpoint(name=endpoint_resource)
    models = aiplatform_v1.ModelServiceClient(**kwargs)
    return any(
        models.get_model(name=deployed_version_name(dm)).container_spec.invoke_route_prefix
        for dm in endpoint.deployed_models
        if endpoint.traffic_split.get(dm.id, 0) > 0
    )


def chat_target(
    target: str, model: str | None, api_endpoint: str = "", headers: dict[str, str] | None = None
) -> ChatTarget:
    """The load benchmark's target for a Vertex endpoint (optionally /deployedModels/ID), mapped to its chat route;
    any other target as an OpenAI base URL."""
    from vlp.components.serving.calls import http_session
    match = _VERTEX_TARGET_RE.match(target.strip())
    if not match:
        return url_target(target, model, api_endpoint, headers)
    endpoint = target.split("/deployedModels/")[0]
    info = describe_endpoint(endpoint, api_endpoint)
    # One deployed model: its invoke route to the container's own OpenAI route (dedicated endpoints);
    # the whole endpoint: Vertex's v1beta1 chat completions.
    dm = match.group("dm") or ""
    if dm or (info.dedicated and _serves_invoke(endpoint, api_endpoint)):
        # Models uploaded with invokeRoutePrefix answer invoke only (chat completions are off for them).
        url = invoke_url(info, "/v1/chat/completions", dm)
    else:
        url = chat_completions_url(info)
    return ChatTarget(url, http_session(api_endpoint), model or "")
