"""Smoke test on Cloud Run: the new revision alone, through its `candidate` tag URL, called with an ID token as any
private service's caller would, judged like the Vertex smoke test (components/vertex/smoke_test.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl

from vlp.components.deployment import Deployment

RUN_REFUSED = (
    "the caller's account lacks run.routes.invoke on the service (the pipeline's account holds it through "
    "roles/run.developer on the project: `vlp setup`), or the request carried no ID token for the service's URL"
)
RUN_MISSING = "the service or its candidate tag is gone"


def run_service_smoke_test(
    deployment: Deployment,
    service: str,
    revision: str,
    url: str,
    service_url: str,
    weights_uri: str,
    *,
    backoff_s: float = 5.0,
    timeout_s: float = 600.0,
) -> Any:
    """The config's smoke prompt to the revision's tag URL (TGI's /v1/chat/completions); a SmokeResult."""
    from vlp.components.serving.calls import parse_reply
    from vlp.components.serving.engines import served_model_name
    from vlp.components.serving.logs import format_logs, logs_hint, revision_log_filter, server_log_tail
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

    cfg = deployment.config
    st = cfg.smoke_test
    project = deployment.project
    with tempfile.TemporaryDirectory(prefix="vlp-tokenizer-") as tmp:
        templated = render_prompt(
            download_tokenizer(weights_uri, Path(tmp), project),
            st.prompt,
            cfg.serving.chat_template,
            bool(st.image_url),
        )
    if templated is None:
        return SmokeResult(passed=False, prompt_sent=st.prompt, message=f"Smoke test not sent: {_MISSING_TEMPLATE_FIX}")
    image = image_as_url(st.image_url, project) if st.image_url else ""
    body = {
        "model": served_model_name(deployment),
        "messages": [_user_message(st.prompt, image, for_template=False)],
        "max_tokens": st.max_tokens,
        "temperature": 0,
    }
    flt = revision_log_filter(cfg.service_id, revision)
    # The token's audience is the service's own URL: Cloud Run accepts it on every URL of the service, tags too
    # (run/docs/authenticating/service-to-service; unverified for tag URLs, so the emulator checks only the account).
    from vlp.components.cloud_run.probe import id_token_session

    session = id_token_session(service_url or url)
    try:
        data, latency, error = _post_with_retries(
            session,
            f"{url}/v1/chat/completions",
            body,
            st.attempts,
            backoff_s,
            timeout_s,
            RUN_REFUSED,
            RUN_MISSING,
        )
    except SmokeTestError as exc:
        lines = server_log_tail(project, "", api_endpoint=deployment.api_endpoint, flt=flt)
        raise SmokeTestError(
            f"{exc}\nLast log lines of revision {revision}:\n{format_logs(lines)}\n{logs_hint(project, '', flt=flt)}"
        ) from None
    reply = parse_reply("tgi", "chat", data)
    problems = (
        [f"the model server refused the request ({error[:300]})"]
        if error
        else check_answer(reply.answer, reply.finish_reason, reply.tokens, st.max_tokens, st.expect, st.expect_regex)
    )
    result = SmokeResult(
        passed=not problems,
        answer=reply.answer,
        latency_s=round(latency, 4),
        prompt_sent=templated,
        raw_response=reply.raw,
        finish_reason=reply.finish_reason,
        tokens=reply.tokens,
        route=f"{url}/v1/chat/completions",
    )
    if result.passed:
        result.message = (
            f"Smoke test passed in {latency:.2f} s: {cfg.model.repo} on revision {revision} answered "
            f"{reply.answer.strip()[:200]!r}"
        )
        return result
    lines = server_log_tail(project, "", api_endpoint=deployment.api_endpoint, flt=flt)
    result.message = "\n".join(
        [
            f"Smoke test failed for {cfg.model.repo} on revision {revision} of {service}: " + "; ".join(problems) + ".",
            f"Sent: POST {url}/v1/chat/completions\n  prompt after the chat template: {templated!r}\n  "
            f"body: {json.dumps(body)[:1500]}",
            f"Got ({latency:.2f} s): {reply.raw[:1500]}",
            f"Last log lines of revision {revision}:",
            format_logs(lines),
            logs_hint(project, "", flt=flt),
        ]
    )
    return result


def smoke_test_service_op(
    deployment: dict,
    service: str,
    revision: str,
    url: str,
    service_url: str,
    weights_uri: str,
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
) -> NamedTuple(
    "SmokeOutputs", [("verdict", str), ("answer", str), ("latency_s", float), ("message", str), ("benchmark", list)]
):
    """Smoke test: the chat prompt to the new revision alone (its tag URL, with an ID token); then the optional
    benchmark, whose recommended concurrency is the value for cloud_run.concurrency."""
    from collections import namedtuple
    from logging import getLogger

    from vlp.components.cloud_run.probe import id_token_headers
    from vlp.components.cloud_run.smoke_test import run_service_smoke_test
    from vlp.components.deployment import Deployment
    from vlp.components.runtime import checkpoint
    from vlp.components.smoke.benchmark import render_html
    from vlp.components.smoke.checks import benchmark_deployment, smoke_report_html

    d = Deployment.parse(deployment)
    result = run_service_smoke_test(d, service, revision, url, service_url, weights_uri)
    checkpoint("smoke-test-service")
    metrics.log_metric("smoke_passed", 1 if result.passed else 0)
    metrics.log_metric("smoke_latency_s", result.latency_s)
    cfg = d.config
    st = cfg.smoke_test
    levels: list = []
    bench_html = ""
    if result.passed and st.benchmark:
        bench = benchmark_deployment(d, url, metrics, headers=id_token_headers(service_url or url))
        getLogger("vlp.smoke").info(
            "benchmark: recommended concurrency %s (p95 time to first token within %.1f s); cloud_run.concurrency is %s",
            bench.recommended_concurrency,
            st.ttft_p95_target_s,
            cfg.cloud_run.concurrency,
        )
        levels = bench.levels
        bench_html = render_html(bench, fragment=True)
    with open(report.path, "w") as f:
        f.write(smoke_report_html(result, bench_html))
    outputs = namedtuple("SmokeOutputs", ["verdict", "answer", "latency_s", "message", "benchmark"])
    return outputs(
        "passed" if result.passed else "failed", result.answer, float(result.latency_s), result.message, levels
    )
