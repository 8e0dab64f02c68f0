"""Spot a redeploy that would change nothing: same revision, same serving spec, healthy endpoint."""

from __future__ import annotations

import logging
import time

from vlp.components.deployment import Deployment

log = logging.getLogger("vlp.redeploy")


def _healthy(deployment: Deployment, endpoint_resource: str, deployed_model_id: str) -> bool:
    """One short request to the serving model through a route its endpoint kind really serves: the per-model
    invoke route on dedicated endpoints (invokeRoutePrefix uploads), else :predict, whose answer must name it."""
    from vlp.components.serving.calls import http_session
    from vlp.components.serving.engines import resolve_shape, served_model_name
    from vlp.components.vertex.prediction import answered_by, describe_endpoint, prediction_request, smoke_route

    api = deployment.api_endpoint
    cfg = deployment.config
    try:
        info = describe_endpoint(endpoint_resource, api)
        route = smoke_route(cfg.endpoint.uses_invoke, info)
    except Exception as exc:  # noqa: BLE001 - any failure here just means "redeploy"
        log.info("endpoint %s not usable for a health probe (%s): redeploying", endpoint_resource, exc)
        return False
    messages = [{"role": "user", "content": "ping"}]
    url, body, _ = prediction_request(
        resolve_shape(deployment).api, route, info, deployed_model_id, messages, 1, served_model_name(deployment)
    )
    session = http_session(api)
    # A serving container that is restarting answers 503 for a while (endpoint.health_wait_s).
    deadline = time.monotonic() + cfg.endpoint.health_wait_s
    while True:
        try:
            response = session.post(url, json=body, timeout=60)
            if response.status_code == 200:
                # Only this model holds traffic (the caller checked 100%), so :predict answers from it.
                answered = (answered_by(response) or deployed_model_id) if route == "predict" else ""
                return route == "invoke" or answered == deployed_model_id
            retry = response.status_code in (429, 503)
        except Exception:  # noqa: BLE001
            retry = True
        if not retry or time.monotonic() > deadline:
            return False
        time.sleep(0.5)  # a restarting server comes up within seconds; poll often


def unchanged_deployment(deployment: Deployment) -> str | None:
    """A description of the deployed model that already serves exactly this deployment, or None."""
    from vlp.components.runtime import LABEL_REVISION, LABEL_SPEC
    from vlp.components.vertex.endpoints import endpoint_client, find_endpoint
    from vlp.components.vertex.serving_spec import serving_spec_hash

    sha = deployment.revision_sha
    if not sha:
        return None  # a local directory has no pinned revision to compare
    endpoint = find_endpoint(deployment)
    if endpoint is None:
        return None
    spec_hash = serving_spec_hash(deployment)
    from google.cloud import aiplatform_v1

    from vlp.components import clients
    from vlp.components.runtime import deployed_version_name

    models = aiplatform_v1.ModelServiceClient(**clients.gapic_kwargs(deployment.region, deployment.api_endpoint))
    endpoint = endpoint_client(deployment).get_endpoint(name=endpoint.name)
    for dm in endpoint.deployed_models:
        if endpoint.traffic_split.get(dm.id, 0) != 100:
            continue
        labels = models.get_model(name=deployed_version_name(dm)).labels
        if labels.get(LABEL_REVISION) == sha[:12].lower() and labels.get(LABEL_SPEC) == spec_hash:
            if _healthy(deployment, endpoint.name, dm.id):
                return f"{endpoint.name} already serves {dm.model} (revision {sha[:12]}, spec {spec_hash}) healthily"
            log.info("deployed model %s matches but is not healthy: redeploying", dm.id)
    return None
