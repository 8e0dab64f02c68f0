"""The load benchmark's target on Vertex: an endpoint, or one deployed model on it, mapped to the chat route that
reaches it (the load generator itself, components/smoke/benchmark.py, takes URLs only)."""

from __future__ import annotations

import re

from vlp.components.smoke.benchmark import ChatTarget, url_target
from vlp.components.vertex.prediction import chat_completions_url, describe_endpoint, invoke_url

_VERTEX_TARGET_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/endpoints/[^/]+(/deployedModels/(?P<dm>[^/]+))?$")


def _serving_routes(endpoint_resource: str, api_endpoint: str) -> tuple[bool, bool]:
    """(invoke, openai image) for the models with traffic on the endpoint: uploaded with invokeRoutePrefix; served by
    vLLM's own image, whose predict route is its OpenAI chat route (components/serving/images.yaml)."""
    from google.cloud import aiplatform_v1

    from vlp.components.clients import gapic_kwargs
    from vlp.components.runtime import deployed_version_name, region_of
    from vlp.components.serving.images import find

    kwargs = gapic_kwargs(region_of(endpoint_resource), api_endpoint)
    endpoint = aiplatform_v1.EndpointServiceClient(**kwargs).get_endpoint(name=endpoint_resource)
    models = aiplatform_v1.ModelServiceClient(**kwargs)
    specs = [
        models.get_model(name=deployed_version_name(dm)).container_spec
        for dm in endpoint.deployed_models
        if endpoint.traffic_split.get(dm.id, 0) > 0
    ]
    openai = bool(specs) and all((find(s.image_uri) or _NONE).api == "openai" for s in specs)
    return any(s.invoke_route_prefix for s in specs), openai


class _NONE:
    api = ""


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
    invoke, openai = (False, False) if dm else _serving_routes(endpoint, api_endpoint)
    if dm or (info.dedicated and invoke):
        # Models uploaded with invokeRoutePrefix answer invoke only (chat completions are off for them).
        url = invoke_url(info, "/v1/chat/completions", dm)
    elif openai:
        # vLLM's own image: its predict route is /v1/chat/completions, and :streamRawPredict streams what it answers
        # (aiplatform SDK Endpoint.stream_raw_predict: POST …:streamRawPredict, the body as is, lines as they come).
        url = f"{info.base_url}/v1/{info.resource}:streamRawPredict"
    else:
        url = chat_completions_url(info)
    return ChatTarget(url, http_session(api_endpoint), model or "")
