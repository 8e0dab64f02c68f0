"""Smoke test: send a chat-templated prompt through the real Vertex prediction path and judge the answer."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint
from kfp import dsl

from vlp.components.deployment import Deployment
from vlp.components.serving.calls import Reply, http_session, parse_reply
from vlp.components.serving.logs import deploy_failure_message, format_logs, logs_hint, server_log_tail
from vlp.components.smoke.checks import (
    _MISSING_TEMPLATE_FIX,
    SmokeResult,
    SmokeTestError,
    _post_with_retries,
    _user_message,
    check_answer,
    download_tokenizer,
    image_as_url,
    render_prompt,
)
from vlp.components.vertex.prediction import (
    answered_by,
    canary_tries,
    describe_endpoint,
    prediction_request,
    request_limit,
    smoke_route,
)

__all__ = ["SmokeResult", "SmokeTestError", "check_answer", "render_prompt", "run_smoke_test", "smoke_test_op"]


CANARY_PAUSE_S = 1.0  # after a failed canary request: long enough not to hammer a restarting server


def _canary_post(
    session: Any,
    url: str,
    body: dict[str, Any],
    deployed_model_id: str,
    share: int,
    attempts: int,
    backoff_s: float,
    timeout_s: float,
) -> tuple[Any, float, str]:
    """:predict on a canary split until the new model answers. Vertex routes each request by the split, and only a
    successful PredictResponse says which deployed model answered (deployed_model_id); a failed one cannot be
    told apart, and most of them come from the models already serving. So failures do not use up `attempts`: the
    bound is on requests (canary_tries(share), the requests that reach a `share`% model with 99.9% certainty,
    per attempt) and on time (what `attempts` tries with their backoff and timeout could take). A non-retryable
    answer ends the test, as it does without a split."""
    import requests

    from vlp.components.smoke.checks import RETRYABLE_STATUS

    budget = canary_tries(share) * attempts
    deadline = time.monotonic() + sum(min(backoff_s * 2**i, 60.0) for i in range(attempts)) + attempts * timeout_s
    started = time.monotonic()
    others: dict[str, int] = {}
    failed, last = 0, ""
    for _ in range(budget):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            resp = session.post(url, json=body, timeout=timeout_s)
        except requests.RequestException as exc:
            failed, last = failed + 1, f"{type(exc).__name__}: {exc}"
            time.sleep(CANARY_PAUSE_S)
            continue
        latency = time.perf_counter() - start
        if resp.status_code != 200:
            if resp.status_code in RETRYABLE_STATUS:
                failed, last = failed + 1, f"HTTP {resp.status_code}: {resp.text[:300]}"
                time.sleep(CANARY_PAUSE_S)
                continue
            if resp.status_code in (401, 403, 404):  # about the caller or the endpoint, not a model: explained there
                return _post_with_retries(session, url, body, 1, backoff_s, timeout_s)
            # A model's refusal of a request every model takes alike: the smoke test judges it.
            last = f"HTTP {resp.status_code}: {resp.text[:2000]}"
            return {"_http_error": resp.status_code, "_body": resp.text[:4000]}, latency, last
        try:
            data = resp.json()
        except ValueError:
            return {"_unparsed": resp.text[:4000]}, latency, ""
        by = answered_by(resp)
        if by in ("", deployed_model_id):
            return data, latency, ""
        others[by] = others.get(by, 0) + 1
    sent = sum(others.values()) + failed
    raise SmokeTestError(
        f"{sent} requests to {url} in {time.monotonic() - started:.0f} s never reached deployed model "
        f"{deployed_model_id} at {share}% traffic: {sum(others.values())} were answered by the models already "
        f"serving ({others or 'none'}), {failed} failed ({last or 'none'}; a failed :predict does not say which "
        "model it reached). If the new model is healthy, raise endpoint.canary_percent, or use a dedicated endpoint "
        "(endpoint.dedicated: true), whose invoke route reaches it alone"
    )


def run_smoke_test(
    deployment: Deployment,
    endpoint_resource: str,
    deployed_model_id: str,
    weights_uri: str,
    api_endpoint: str = "",
    *,
    backoff_s: float = 5.0,
    timeout_s: float = 600.0,
) -> SmokeResult:
    """Sends the config's smoke prompt to the deployed model and judges the answer.

    Returns a failed SmokeResult for a wrong answer (the pipeline branches on the verdict); raises SmokeTestError
    when the endpoint cannot be reached after `smoke_test.attempts` tries with exponential backoff.
    """
    cfg = deployment.config
    st = cfg.smoke_test
    api_endpoint = api_endpoint or deployment.api_endpoint
    info = describe_endpoint(endpoint_resource, api_endpoint)
    project = deployment.project or info.project

    with tempfile.TemporaryDirectory(prefix="vlp-tokenizer-") as tmp:
        tok_dir = download_tokenizer(weights_uri, Path(tmp), project)
        templated = render_prompt(tok_dir, st.prompt, cfg.serving.chat_template, bool(st.image_url))
    if templated is None:
        return SmokeResult(
            passed=False,
            prompt_sent=st.prompt,
            message=f"Smoke test of {cfg.model.repo} not sent: {_MISSING_TEMPLATE_FIX}",
        )

    if deployed_model_id not in info.deployed_ids:
        raise SmokeTestError(
            f"deployed model {deployed_model_id} is not on endpoint {endpoint_resource} "
            f"(deployed: {', '.join(info.deployed_ids) or 'none'}): pass the id the deploy step returned"
        )
    image = image_as_url(st.image_url, project) if st.image_url else ""
    messages = [_user_message(st.prompt, image, for_template=False)]
    route_kind = smoke_route(cfg.endpoint.uses_invoke, info)
    share = info.traffic.get(deployed_model_id, 0)
    if route_kind == "predict" and share == 0:
        raise SmokeTestError(
            f"deployed model {deployed_model_id} on shared endpoint {endpoint_resource} has 0% traffic, and Vertex "
            "has no way to address one deployed model on a shared endpoint: a redeploy gives the new model "
            "endpoint.canary_percent of traffic while it is tested, or use a dedicated endpoint "
            "(endpoint.dedicated: true, redeploy_test: invoke)"
        )
    from vlp.components.serving.engines import resolve_shape, served_model_name

    url, body, kind = prediction_request(
        resolve_shape(deployment).api, route_kind, info, deployed_model_id, messages, st.max_tokens, served_model_name(deployment)
    )
    size, limit = len(json.dumps(body).encode()), request_limit(info)
    if size > limit:
        kind = "dedicated" if info.dedicated else "shared"
        raise SmokeTestError(
            f"the smoke request is {size / 1e6:.1f} MB, over the {limit / 1e6:g} MB request limit of a {kind} endpoint "
            "(the image is inlined): use a smaller smoke_test.image_url, or an https:// URL the server fetches itself"
            + ("" if info.dedicated else ", or a dedicated endpoint (endpoint.dedicated: true), which takes 10 MB")
        )
    session = http_session(api_endpoint)
    try:
        if route_kind == "predict" and share < 100:
            data, latency, error = _canary_post(
                session, url, body, deployed_model_id, share, st.attempts, backoff_s, timeout_s
            )
        else:
            data, latency, error = _post_with_retries(session, url, body, st.attempts, backoff_s, timeout_s)
    except SmokeTestError as exc:
        raise SmokeTestError(
            deploy_failure_message(project, info.region, info.endpoint_id, deployed_model_id, str(exc), api_endpoint)
        ) from None

    route = url.removeprefix(info.base_url)
    if error:
        reply = Reply("", "", {}, json.dumps(data)[:4000])
        problems = [f"the model server refused the request ({error[:300]})"]
    else:
        reply = parse_reply(cfg.serving.engine, kind, data)
        problems = check_answer(
            reply.answer, reply.finish_reason, reply.tokens, st.max_tokens, st.expect, st.expect_regex
        )
    result = SmokeResult(
        passed=not problems,
        answer=reply.answer,
        latency_s=round(latency, 4),
        prompt_sent=templated,
        raw_response=reply.raw,
        finish_reason=reply.finish_reason,
        tokens=reply.tokens,
        route=route,
    )
    if result.passed:
        result.message = (
            f"Smoke test passed in {latency:.2f} s: {cfg.model.repo} on deployed model {deployed_model_id} answered "
            f"{reply.answer.strip()[:200]!r}"
        )
        return result
    lines = server_log_tail(project, info.endpoint_id, deployed_model_id, api_endpoint)
    shown_body = json.dumps(body)[:1500]
    result.message = "\n".join(
        [
            f"Smoke test failed for {cfg.model.repo} on deployed model {deployed_model_id} of {endpoint_resource}: "
            + "; ".join(problems)
            + ".",
            f"Sent: POST {route}\n  prompt after the chat template: {templated!r}\n  body: {shown_body}",
            f"Got ({latency:.2f} s): {reply.raw[:1500]}",
            f"Last model server log lines (deployed model {deployed_model_id}):",
            format_logs(lines),
            logs_hint(project, info.endpoint_id, deployed_model_id),
        ]
    )
    return result


# ----------------------------------------------------------------------------- KFP shell


def smoke_test_op(
    deployment: dict,
    endpoint: dsl.Input[VertexEndpoint],
    deployed_model_id: str,
    weights_uri: str,
    api_endpoint: str,
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
) -> NamedTuple(
    "SmokeOutputs",
    [
        ("verdict", str),
        ("answer", str),
        ("latency_s", float),
        ("message", str),
        ("benchmark", list),
        ("benchmark_skipped", str),
    ],
):
    """Smoke test: chat prompt through the Vertex prediction path; optional load benchmark when it passes."""
    from collections import namedtuple
    from logging import getLogger

    from vlp.components.deployment import Deployment
    from vlp.components.smoke.benchmark import render_html
    from vlp.components.smoke.checks import benchmark_deployment, smoke_report_html
    from vlp.components.vertex.load_target import chat_target
    from vlp.components.vertex.prediction import benchmark_target, describe_endpoint
    from vlp.components.vertex.smoke_test import run_smoke_test

    # KFP hands the deployment over as a struct (every number a float): read once, through the typed model.
    d = Deployment.parse(deployment)
    resource = endpoint.metadata["resourceName"]
    result = run_smoke_test(d, resource, deployed_model_id, weights_uri, api_endpoint)
    from vlp.components.runtime import checkpoint

    checkpoint("smoke-test")
    metrics.log_metric("smoke_passed", 1 if result.passed else 0)
    metrics.log_metric("smoke_latency_s", result.latency_s)
    if "completion_tokens" in result.tokens:
        metrics.log_metric("smoke_completion_tokens", result.tokens["completion_tokens"])
    levels: list = []
    bench_html = ""
    skipped = ""
    cfg = d.config
    st = cfg.smoke_test
    if result.passed and st.benchmark:
        target, reason = benchmark_target(d, describe_endpoint(resource, api_endpoint), deployed_model_id)
        if target is None:
            getLogger("vlp.smoke").warning("benchmark skipped: %s", reason)
            skipped = reason
        else:
            bench = benchmark_deployment(d, target, metrics, api_endpoint=api_endpoint, resolve=chat_target)
            levels = bench.levels
            bench_html = render_html(bench, fragment=True)
    with open(report.path, "w") as f:
        f.write(smoke_report_html(result, bench_html))
    if st.benchmark and not result.passed:
        skipped = "the smoke test failed: a failing model is not benchmarked"
    outputs = namedtuple(
        "SmokeOutputs", ["verdict", "answer", "latency_s", "message", "benchmark", "benchmark_skipped"]
    )
    return outputs(
        "passed" if result.passed else "failed",
        result.answer,
        float(result.latency_s),
        result.message,
        levels,
        skipped,
    )


