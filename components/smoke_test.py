"""Smoke test: send a chat-templated prompt through the real Vertex prediction path and judge the answer."""

from __future__ import annotations

import base64
import json
import mimetypes
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint
from kfp import dsl

from components.prediction import (
    MAX_REQUEST_BYTES,
    EndpointError,
    EndpointInfo,
    Reply,
    canary_tries,
    describe_endpoint,
    http_session,
    parse_reply,
    prediction_request,
    smoke_route,
)
from components.server_logs import deploy_failure_message, format_logs, logs_hint, server_log_tail

# Tokenizer files, for the chat template and its special tokens; a few KB to a few MB, never the weights.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Cold endpoints answer 429 (quota / warming) and 502-504 (replica not ready yet): worth waiting for.
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
OK_FINISH_REASONS = {"stop", "length", "eos_token", "stop_sequence", "end_of_sequence_token", "eos"}
_MISSING_TEMPLATE_FIX = (
    "the tokenizer mirrored with the weights has no chat template, so there is no right way to turn the prompt into "
    "model input: deploy the -Instruct variant of the model, or set serving.chat_template in the config to the "
    "model's Jinja template (for ChatML models: {% for message in messages %}<|im_start|>{{ message['role'] }}"
    "\\n{{ message['content'] }}<|im_end|>\\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n"
    "{% endif %})"
)


class SmokeTestError(EndpointError):
    """The smoke test could not run (endpoint unreachable, permission denied, retries spent); not a verdict."""


@dataclass
class SmokeResult:
    """The verdict and everything needed to understand it."""

    passed: bool
    answer: str = ""
    latency_s: float = 0.0
    prompt_sent: str = ""
    raw_response: str = ""
    message: str = ""
    finish_reason: str = ""
    tokens: dict[str, int] = field(default_factory=dict)
    route: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for JSON and KFP outputs."""
        return asdict(self)


# ----------------------------------------------------------------------------- Vertex HTTP plumbing


def download_tokenizer(weights_uri: str, dest: Path, project: str | None = None) -> Path:
    """Copies only the tokenizer files that sit next to the weights in GCS into `dest`."""
    from components.clients import storage_client

    match = re.fullmatch(r"gs://([^/]+)/?(.*)", weights_uri.strip())
    if not match:
        raise SmokeTestError(f"weights_uri {weights_uri!r} is not gs://BUCKET/PATH: pass the mirror step's output")
    bucket, prefix = match.group(1), match.group(2).strip("/")
    prefix = prefix + "/" if prefix else ""
    client = storage_client(project)
    found = 0
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        blob = client.bucket(bucket).blob(prefix + name)
        try:
            blob.download_to_filename(str(dest / name))
            found += 1
        except Exception as exc:  # noqa: BLE001 - NotFound is expected for the files a tokenizer does not use
            (dest / name).unlink(missing_ok=True)
            if type(exc).__name__ not in ("NotFound",):
                raise SmokeTestError(f"cannot read {weights_uri}{name} from GCS: {exc}") from exc
    if not found:
        raise SmokeTestError(
            f"no tokenizer files under {weights_uri}: the mirror must copy tokenizer_config.json (or chat_template.*) "
            "with the weights (check model.allow_patterns)"
        )
    return dest


def _user_message(prompt: str, image_url: str, for_template: bool) -> dict[str, Any]:
    if not image_url:
        return {"role": "user", "content": prompt}
    if for_template:
        # Vision chat templates (Llama 3.2, Qwen-VL...) place an {"type": "image"} part as the image token.
        return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    return {
        "role": "user",
        "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": image_url}}],
    }


def render_prompt(tokenizer_dir: Path, prompt: str, chat_template: str | None, image: bool) -> str | None:
    """The prompt as the model sees it after its chat template; None when there is no template at all."""
    from components import chat_template as templates

    template = chat_template or templates.find_template(tokenizer_dir)
    if not template:
        return None
    tokens = templates.special_tokens(tokenizer_dir)
    try:
        return templates.render(template, [_user_message(prompt, "x" if image else "", for_template=True)], tokens)
    except Exception:  # noqa: BLE001 - text-only templates choke on content parts; show the text form instead
        return templates.render(template, [_user_message(prompt, "", for_template=True)], tokens)


def image_as_url(image_url: str, project: str | None = None) -> str:
    """An image the serving engine can fetch: gs:// objects become data: URLs (the engine has no GCS access)."""
    if not image_url.startswith("gs://"):
        return image_url
    from components.clients import storage_client

    bucket, _, name = image_url[5:].partition("/")
    data = storage_client(project).bucket(bucket).blob(name).download_as_bytes()
    mime = mimetypes.guess_type(name)[0] or "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ----------------------------------------------------------------------------- the call


def _post_with_retries(
    session: Any, url: str, body: dict[str, Any], attempts: int, backoff_s: float, timeout_s: float
) -> tuple[Any, float, str]:
    """POSTs until a non-retryable answer; returns (json, latency of the answering call, last error text)."""
    import requests

    last = ""
    for attempt in range(1, attempts + 1):
        start = time.perf_counter()
        try:
            resp = session.post(url, json=body, timeout=timeout_s)
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            latency = time.perf_counter() - start
            if resp.status_code == 200:
                try:
                    return resp.json(), latency, ""
                except ValueError:
                    return {"_unparsed": resp.text[:4000]}, latency, ""
            last = f"HTTP {resp.status_code}: {resp.text[:2000]}"
            if resp.status_code in (401, 403):
                raise SmokeTestError(
                    f"{url} refused the call ({last}): grant the caller roles/aiplatform.user on the project"
                )
            if resp.status_code == 404:
                raise SmokeTestError(
                    f"{url} does not exist ({last}): the endpoint or deployed model is gone, or this route is not "
                    "served (the per-model invoke route needs a dedicated endpoint and invoke_route_prefix)"
                )
            if resp.status_code not in RETRYABLE_STATUS:
                return {"_http_error": resp.status_code, "_body": resp.text[:4000]}, latency, last
        if attempt < attempts:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 60.0))
    raise SmokeTestError(f"no answer from {url} after {attempts} attempts: {last}")


def check_answer(
    reply_answer: str, finish_reason: str, tokens: dict[str, int], max_tokens: int, expect: str, expect_regex: str
) -> list[str]:
    """The reasons an answer fails the smoke test (empty list: it passes)."""
    problems = []
    if not reply_answer.strip():
        problems.append("the answer is empty")
    if finish_reason and finish_reason.lower() not in OK_FINISH_REASONS:
        problems.append(f"finish reason {finish_reason!r} is not a normal end (stop/length)")
    completion = tokens.get("completion_tokens")
    if completion is not None and not 0 < completion <= max_tokens:
        problems.append(f"completion_tokens={completion} is outside 1..{max_tokens}")
    if tokens.get("prompt_tokens") == 0:
        problems.append("prompt_tokens=0: the server saw an empty prompt")
    if expect and expect.lower() not in reply_answer.lower():
        problems.append(f"the answer does not contain {expect!r} (case-insensitive)")
    if expect_regex and not re.search(expect_regex, reply_answer):
        problems.append(f"the answer does not match the regex {expect_regex!r}")
    return problems


def run_smoke_test(
    deployment: dict[str, Any],
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
    from components.config import config_from_dict

    cfg = config_from_dict(deployment["config"], source="deployment['config']")
    st = cfg.smoke_test
    api_endpoint = api_endpoint or str(deployment.get("api_endpoint") or "")
    info = describe_endpoint(endpoint_resource, api_endpoint)
    project = deployment.get("project") or info.project

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
    from components.serving import served_model_name

    url, body, kind = prediction_request(
        cfg.serving.engine, route_kind, info, deployed_model_id, messages, st.max_tokens, served_model_name(deployment)
    )
    size = len(json.dumps(body).encode())
    if size > MAX_REQUEST_BYTES:
        raise SmokeTestError(
            f"the smoke request is {size / 1e6:.1f} MB, over Vertex's 1.5 MB request limit (the image is inlined): "
            "use a smaller smoke_test.image_url, or an https:// URL the server fetches itself"
        )
    session = http_session(api_endpoint)
    tries = canary_tries(share) if route_kind == "predict" else 1
    others: dict[str, int] = {}
    try:
        for _ in range(tries):
            data, latency, error = _post_with_retries(session, url, body, st.attempts, backoff_s, timeout_s)
            # PredictResponse.deployed_model_id: on a canary split, answers from the serving model do not count.
            answered_by = str(data.get("deployedModelId") or "") if route_kind == "predict" else deployed_model_id
            if error or answered_by in ("", deployed_model_id):
                break
            others[answered_by] = others.get(answered_by, 0) + 1
        else:
            raise SmokeTestError(
                f"{tries} requests to {url} were all answered by other deployed models ({others}), never by "
                f"{deployed_model_id} at {share}% traffic: raise endpoint.canary_percent"
            )
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


def benchmark_target(cfg: Any, info: EndpointInfo, deployed_model_id: str) -> tuple[str | None, str]:
    """What the load benchmark can time for the new model alone: (target for run_benchmark, "") or (None, why not).

    The benchmark streams OpenAI chat completions, so it needs a route that reaches the new model only and ends
    in an OpenAI server."""
    route = smoke_route(cfg.endpoint.uses_invoke, info)
    share = info.traffic.get(deployed_model_id, 0)
    if route == "invoke":
        if cfg.serving.engine == "tgi":
            return f"{info.resource}/deployedModels/{deployed_model_id}", ""
        return None, (
            "the pinned Model Garden vLLM image is reached through invoke at /generate; its OpenAI routes are not "
            "documented (unverified), so there is no streaming route to time"
        )
    if cfg.serving.engine == "tgi":
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


def benchmark_pricing(deployment: dict, api_endpoint: str) -> tuple[float, str, dict[str, Any]]:
    """(USD/hour of one replica, where the price comes from, the throughput model to estimate with) for the
    benchmark's cost figures: the plan's shape on Vertex; on the local stack, the local catalog's CPU server."""
    from components import throughput
    from components.prediction import is_local

    plan = deployment.get("plan") or {}
    model = dict(plan.get("throughput_model") or {})
    if is_local(api_endpoint or str(deployment.get("api_endpoint") or "")):
        if model:
            model.update(accelerator=throughput.LOCAL_SERVER, gpus=1, tp=1, pp=1)
        return throughput.LOCAL_PRICE_PER_HOUR, "the local catalog's nominal price for the CPU model server", model
    replicas = max(1, int(plan.get("replica_count") or 1))
    price = float(plan.get("price_per_hour_usd") or 0.0) / replicas
    shape = f"{plan.get('machine_type')} with {plan.get('accelerator_count')} x {plan.get('accelerator_type')}"
    return price, f"one replica of {shape}, {plan.get('prices_note', 'catalog price')}", model


def smoke_report_html(result: SmokeResult, benchmark_html: str = "") -> str:
    """A small HTML page for the KFP report artifact."""
    import html

    verdict = "passed" if result.passed else "failed"
    colour = "#1e8e3e" if result.passed else "#d93025"
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th><td><pre style='white-space:pre-wrap;margin:0'>"
        f"{html.escape(str(v))}</pre></td></tr>"
        for k, v in (
            ("answer", result.answer),
            ("latency_s", result.latency_s),
            ("finish_reason", result.finish_reason),
            ("tokens", result.tokens),
            ("route", result.route),
            ("prompt_sent", result.prompt_sent),
            ("message", result.message),
        )
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Smoke test</title></head>"
        "<body style='font-family:sans-serif'>"
        f"<h2>Smoke test <span style='color:{colour}'>{verdict}</span></h2><table>{rows}</table>"
        f"{benchmark_html}</body></html>"
    )


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
    "SmokeOutputs", [("verdict", str), ("answer", str), ("latency_s", float), ("message", str), ("benchmark", list)]
):
    """Smoke test: chat prompt through the Vertex prediction path; optional load benchmark when it passes."""
    from collections import namedtuple
    from logging import getLogger

    from components.benchmark import add_costs, log_benchmark_metrics, render_html, run_benchmark
    from components.prediction import describe_endpoint
    from components.serving import served_model_name
    from components.smoke_test import benchmark_pricing, benchmark_target, run_smoke_test, smoke_report_html

    resource = endpoint.metadata["resourceName"]
    result = run_smoke_test(deployment, resource, deployed_model_id, weights_uri, api_endpoint)
    from components.runtime import checkpoint

    checkpoint("smoke-test")
    metrics.log_metric("smoke_passed", 1 if result.passed else 0)
    metrics.log_metric("smoke_latency_s", result.latency_s)
    if "completion_tokens" in result.tokens:
        metrics.log_metric("smoke_completion_tokens", result.tokens["completion_tokens"])
    levels: list = []
    bench_html = ""
    # KFP hands the config over as a struct (every number a float): read it through the typed model.
    from components.config import config_from_dict

    cfg = config_from_dict(deployment["config"], source="deployment['config']")
    st = cfg.smoke_test
    if result.passed and st.benchmark:
        target, reason = benchmark_target(cfg, describe_endpoint(resource, api_endpoint), deployed_model_id)
        if target is None:
            getLogger("vlp.smoke").warning("benchmark skipped: %s", reason)
        else:
            bench = run_benchmark(
                target,
                concurrency=list(st.benchmark_concurrency),
                requests_per_level=st.benchmark_requests,
                max_tokens=st.max_tokens,
                prompt=st.prompt,
                model=served_model_name(deployment),
                api_endpoint=api_endpoint,
                ttft_target_s=st.ttft_p95_target_s,
            )
            price, source, model = benchmark_pricing(deployment, api_endpoint)
            if price > 0:
                add_costs(bench, price, price_source=source, throughput_model=model)
            levels = bench.levels
            log_benchmark_metrics(bench, metrics)
            bench_html = render_html(bench, fragment=True)
    with open(report.path, "w") as f:
        f.write(smoke_report_html(result, bench_html))
    outputs = namedtuple("SmokeOutputs", ["verdict", "answer", "latency_s", "message", "benchmark"])
    return outputs(
        "passed" if result.passed else "failed", result.answer, float(result.latency_s), result.message, levels
    )
