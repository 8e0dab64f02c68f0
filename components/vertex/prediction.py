"""How a model deployed on a Vertex AI endpoint is reached: its endpoint, the URLs (regional host, dedicated DNS,
invoke routes) and the request each engine and route takes. The smoke test, the benchmark and the no-op probe
call Vertex models through here (the HTTP session itself is vlp.components.serving.calls)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from vlp.components.serving.calls import EndpointError

_ENDPOINT_RE = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/endpoints/(?P<endpoint>[^/]+)$")


def parse_endpoint(endpoint_resource: str) -> dict[str, str]:
    """Splits projects/P/locations/L/endpoints/E into project, region, endpoint; a clear error otherwise."""
    match = _ENDPOINT_RE.match(endpoint_resource.strip())
    if not match:
        raise EndpointError(
            f"{endpoint_resource!r} is not an endpoint resource name: pass projects/PROJECT/locations/REGION/"
            "endpoints/ENDPOINT_ID (the deploy step's endpoint.metadata['resourceName'])"
        )
    return match.groupdict()


def vertex_base_url(region: str, api_endpoint: str = "", dedicated_dns: str = "") -> str:
    """Scheme + host for prediction calls: a dedicated endpoint's own DNS, else the region's (or an override).

    Dedicated endpoints refuse the shared regional domain for prediction calls (endpoint.proto
    `dedicated_endpoint_dns`), so their DNS wins over every override; locally the session routes both to the
    emulator (see http_session)."""
    from vlp.components.clients import api_endpoint as resolve

    host = resolve(api_endpoint)
    if dedicated_dns:
        return f"https://{dedicated_dns}"
    if host.startswith("https://"):
        return host.rstrip("/")
    if host and not host.startswith("http://"):
        return f"https://{host}"
    return f"https://{region}-aiplatform.googleapis.com"


@dataclass
class EndpointInfo:
    """What the prediction path depends on: where to call and how much traffic the deployed model has."""

    resource: str
    project: str
    region: str
    endpoint_id: str
    base_url: str
    traffic: dict[str, int]
    deployed_ids: list[str]
    dedicated: bool


def describe_endpoint(endpoint_resource: str, api_endpoint: str = "") -> EndpointInfo:
    """Reads the endpoint (GAPIC, honouring api_endpoint) for its traffic split and dedicated DNS."""
    from google.api_core import exceptions as gexc
    from google.cloud import aiplatform_v1

    from vlp.components.clients import gapic_kwargs

    parts = parse_endpoint(endpoint_resource)
    client = aiplatform_v1.EndpointServiceClient(**gapic_kwargs(parts["region"], api_endpoint))
    try:
        ep = client.get_endpoint(name=endpoint_resource)
    except gexc.NotFound:
        raise EndpointError(
            f"endpoint {endpoint_resource} does not exist: was it deleted, or is the region wrong? "
            f"List them with: gcloud ai endpoints list --region={parts['region']} --project={parts['project']}"
        ) from None
    except gexc.Forbidden as exc:  # REST answers Forbidden; gRPC PermissionDenied, a subclass
        raise EndpointError(
            f"no permission to read endpoint {endpoint_resource}: grant the pipeline's service account "
            f"roles/aiplatform.user on project {parts['project']} ({exc.message})"
        ) from None
    return EndpointInfo(
        resource=endpoint_resource,
        project=parts["project"],
        region=parts["region"],
        endpoint_id=parts["endpoint"],
        base_url=vertex_base_url(parts["region"], api_endpoint, ep.dedicated_endpoint_dns),
        traffic={str(k): int(v) for k, v in ep.traffic_split.items()},
        deployed_ids=[dm.id for dm in ep.deployed_models],
        dedicated=bool(ep.dedicated_endpoint_enabled),
    )


def chat_completions_url(info: EndpointInfo) -> str:
    """Vertex's OpenAI-compatible chat route: v1beta1 only (PredictionService.ChatCompletions)."""
    return f"{info.base_url}/v1beta1/{info.resource}/chat/completions"


def invoke_url(info: EndpointInfo, path: str, deployed_model_id: str = "") -> str:
    """The invoke route (dedicated endpoints, models uploaded with invokeRoutePrefix): one deployed model when
    deployed_model_id is given, else the endpoint's traffic split. `path` is the container's own route."""
    scope = f"{info.resource}/deployedModels/{deployed_model_id}" if deployed_model_id else info.resource
    return f"{info.base_url}/v1/{scope}/invoke{path}"


def raw_predict_url(info: EndpointInfo) -> str:
    """The endpoint's :rawPredict route: the body goes to the container's predict route as it is; the answer's
    X-Vertex-AI-Deployed-Model-Id header names the deployed model (aiplatform models.py _RAW_PREDICT_*_KEY)."""
    return f"{info.base_url}/v1/{info.resource}:rawPredict"


def answered_by(response: Any) -> str:
    """Which deployed model answered a :predict (PredictResponse.deployed_model_id) or :rawPredict (its header)."""
    header = str(response.headers.get("X-Vertex-AI-Deployed-Model-Id") or "")
    if header:
        return header
    try:
        data = response.json()
    except ValueError:
        return ""
    return str(data.get("deployedModelId") or "") if isinstance(data, dict) else ""


def predict_url(info: EndpointInfo) -> str:
    """The endpoint's :predict route (models uploaded with predictRoute); the answer names the deployed model."""
    return f"{info.base_url}/v1/{info.resource}:predict"


# Vertex's online prediction request limit: "The request body limit is 1.5 MB" on a shared endpoint (aiplatform SDK
# Endpoint.raw_predict / invoke docstrings), "Up to 10 MB" on a dedicated one (predictions/using-dedicated-endpoints).
MAX_REQUEST_BYTES = 1_500_000
MAX_DEDICATED_REQUEST_BYTES = 10_000_000


def request_limit(info: EndpointInfo) -> int:
    """The largest request body the endpoint takes, by its kind."""
    return MAX_DEDICATED_REQUEST_BYTES if info.dedicated else MAX_REQUEST_BYTES


# ----------------------------------------------------------------------------- requests


def smoke_route(uses_invoke: bool, info: EndpointInfo) -> str:
    """How the smoke test reaches one deployed model: "invoke" (dedicated endpoints, invokeRoutePrefix uploads)
    or "predict" (:predict, whose PredictResponse.deployed_model_id says which model answered)."""
    if uses_invoke:
        if not info.dedicated:
            raise EndpointError(
                f"endpoint {info.resource} is shared, but the model was uploaded for invoke routes, which Vertex "
                "serves only on dedicated endpoints: set endpoint.dedicated: true with a new endpoint.name, or "
                "endpoint.redeploy_test: canary"
            )
        return "invoke"
    return "predict"


def canary_tries(percent: int) -> int:
    """Requests needed to reach a model holding `percent`% of traffic with 99.9% certainty (1 at 100%)."""
    if percent >= 100:
        return 1
    return math.ceil(math.log(0.001) / math.log(1 - percent / 100))


def prediction_request(
    api: str,
    route: str,
    info: EndpointInfo,
    deployed_model_id: str,
    messages: list[dict[str, Any]],
    max_tokens: int,
    model: str,
) -> tuple[str, dict[str, Any], str]:
    """(url, body, reply kind) for the image's API (images.yaml `api`) and the route. Every form decodes greedily:
    - vLLM's own image (openai): an OpenAI chat request, to /v1/chat/completions through invoke, or through
      :rawPredict to its predict route (/v1/chat/completions);
    - vLLM (Model Garden handler): a chatCompletions instance with temperature 0, on /generate or :predict;
    - TGI on :predict (its /vertex route): a chat-shaped instance; the `inputs` form would force do_sample
      and add special tokens again (router/src/vertex.rs, v2.4.0); on invoke, its own /v1/chat/completions."""
    # `model`: the served model name (vLLM's OpenAI request requires it; TGI ignores it).
    chat = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if api == "openai":
        if route == "invoke":
            return invoke_url(info, "/v1/chat/completions", deployed_model_id), chat, "chat"
        return raw_predict_url(info), chat, "chat"
    if api == "model-garden":
        body = {"instances": [{"@requestFormat": "chatCompletions", **chat}]}
        if route == "invoke":
            return invoke_url(info, "/generate", deployed_model_id), body, "predict"
        return predict_url(info), body, "predict"
    if route == "invoke":
        return invoke_url(info, "/v1/chat/completions", deployed_model_id), chat, "chat"
    return predict_url(info), {"instances": [chat]}, "predict"


def benchmark_target(deployment: Any, info: EndpointInfo, deployed_model_id: str) -> tuple[str | None, str]:
    """What the load benchmark can time for the new model alone: (target for run_benchmark, "") or (None, why not).

    The benchmark streams OpenAI chat completions, so it needs a route that reaches the new model only and ends
    in an OpenAI server."""
    from vlp.components.serving.engines import resolve_shape

    cfg = deployment.config
    api = resolve_shape(deployment).api
    route = smoke_route(cfg.endpoint.uses_invoke, info)
    share = info.traffic.get(deployed_model_id, 0)
    if route == "invoke":
        if api in ("tgi", "openai"):
            return f"{info.resource}/deployedModels/{deployed_model_id}", ""
        return None, (
            "the pinned Model Garden vLLM image is reached through invoke at /generate; its OpenAI routes are not "
            "documented (unverified), so there is no streaming route to time"
        )
    if api == "tgi":
        return None, (
            "Vertex's chat-completions route forwards to TGI's /vertex route, which takes only `instances` and "
            "answers 422 (router/src/vertex.rs): benchmark TGI on a dedicated endpoint (redeploy_test: invoke)"
        )
    if share < 100:
        return None, (
            f"the new model holds {share}% of a shared endpoint's traffic and a streaming request cannot be pinned "
            "to it: run `vlp bench ENDPOINT` after promotion"
        )
    return info.resource, ""
