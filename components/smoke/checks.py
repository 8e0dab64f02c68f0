"""What every smoke test shares, on Vertex and on Cloud Run: the tokenizer and chat template, the call with its
retries, the verdict, the benchmark's pricing and the report. No Vertex types here, so the Cloud Run step installs
neither aiplatform nor the pipeline components."""

from __future__ import annotations

import base64
import logging
import mimetypes
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlp.components.deployment import Deployment
from vlp.components.serving.calls import EndpointError

log = logging.getLogger("vlp.smoke_test")

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


# ----------------------------------------------------------------------------- tokenizer and prompt


def download_tokenizer(weights_uri: str, dest: Path, project: str | None = None) -> Path:
    """Copies only the tokenizer files that sit next to the weights in GCS into `dest`."""
    from vlp.components.clients import storage_client

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
    from vlp.components.smoke import chat_template as templates

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
    from vlp.components.clients import storage_client

    bucket, _, name = image_url[5:].partition("/")
    data = storage_client(project).bucket(bucket).blob(name).download_as_bytes()
    mime = mimetypes.guess_type(name)[0] or "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ----------------------------------------------------------------------------- the call


VERTEX_REFUSED = "grant the caller roles/aiplatform.user on the project"
VERTEX_MISSING = (
    "the endpoint or deployed model is gone, or this route is not served (the per-model invoke route needs a "
    "dedicated endpoint and invoke_route_prefix)"
)


def _post_with_retries(
    session: Any,
    url: str,
    body: dict[str, Any],
    attempts: int,
    backoff_s: float,
    timeout_s: float,
    refused_fix: str = VERTEX_REFUSED,
    missing_fix: str = VERTEX_MISSING,
) -> tuple[Any, float, str]:
    """POSTs until a non-retryable answer; returns (json, latency of the answering call, last error text)."""
    import requests

    last = ""
    attempt = 0
    while attempt < attempts:
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
                raise SmokeTestError(f"{url} refused the call ({last}): {refused_fix}")
            if resp.status_code == 404:
                raise SmokeTestError(f"{url} does not exist ({last}): {missing_fix}")
            if resp.status_code not in RETRYABLE_STATUS:
                return {"_http_error": resp.status_code, "_body": resp.text[:4000]}, latency, last
        attempt += 1
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


def benchmark_pricing(deployment: Deployment, api_endpoint: str) -> tuple[float, str, dict[str, Any]]:
    """(USD/hour of one replica, where the price comes from, the throughput model to estimate with) for the
    benchmark's cost figures: the plan's shape on Vertex; on the local stack, the local catalog's CPU server."""
    from vlp.components.planning import throughput
    from vlp.components.serving.calls import is_local

    plan = deployment.plan
    model = dict(plan.get("throughput_model") or {})
    if is_local(api_endpoint or deployment.api_endpoint):
        if model:
            model.update(accelerator=throughput.LOCAL_SERVER, gpus=1, tp=1, pp=1)
        return throughput.LOCAL_PRICE_PER_HOUR, "the local catalog's nominal price for the CPU model server", model
    replicas = max(1, int(plan.get("replica_count") or 1))
    price = float(plan.get("price_per_hour_usd") or 0.0) / replicas
    shape = f"{plan.get('machine_type')} with {plan.get('accelerator_count')} x {plan.get('accelerator_type')}"
    return price, f"one replica of {shape}, {plan.get('prices_note', 'catalog price')}", model


def benchmark_deployment(
    deployment: Deployment,
    target: str,
    metrics: Any,
    *,
    api_endpoint: str = "",
    headers: dict[str, str] | None = None,
    resolve: Any = None,
) -> Any:
    """The config's load benchmark against `target` (an OpenAI base URL, or what `resolve` makes of it: a Vertex
    endpoint or deployed model, see run_benchmark), with cost figures and the KFP metrics logged; returns the
    BenchmarkResult."""
    from vlp.components.serving.engines import served_model_name
    from vlp.components.smoke.benchmark import add_costs, log_benchmark_metrics, run_benchmark

    st = deployment.config.smoke_test
    model = served_model_name(deployment)
    bench = run_benchmark(
        target,
        concurrency=list(st.benchmark_concurrency),
        requests_per_level=st.benchmark_requests,
        max_tokens=st.max_tokens,
        prompt=st.prompt,
        model=model,
        api_endpoint=api_endpoint,
        ttft_target_s=st.ttft_p95_target_s,
        headers=headers,
        resolve=resolve,
    )
    price, source, model = benchmark_pricing(deployment, api_endpoint or deployment.api_endpoint)
    if price > 0:
        add_costs(bench, price, price_source=source, throughput_model=model)
    log_benchmark_metrics(bench, metrics)
    return bench


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
