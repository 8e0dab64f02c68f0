"""Smoke test through the emulated Vertex prediction path: SmolLM2 served by `transformers serve` from fake GCS."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import aiplatform_v1

from vlp.components.clients import gapic_kwargs, storage_client
from vlp.components.config import load_config
from vlp.components.deployment import Deployment
from vlp.components.serving.logs import deploy_failure_message, log_filter
from vlp.components.vertex import serving_spec
from vlp.components.vertex.prediction import canary_tries
from vlp.components.vertex.smoke_test import SmokeTestError, run_smoke_test
from vlp.pipelines.local.runner import setup_local
from vlp.pipelines.setup import default_pipeline_account

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REGION = "us-central1"
PROJECT = "local-project"
BUCKET = "vlp-smoke"
SHA = "5" * 40


def _deployment(api_endpoint: str, overrides: tuple[str, ...] = (), **smoke: Any) -> Deployment:
    sets = [*overrides, *(f"smoke_test.{k}={v}" for k, v in smoke.items())]
    cfg = load_config(CONFIGS / "local-demo.yaml", sets)
    return Deployment.parse(
        {
            "config": cfg.model_dump(mode="json"),
            "project": PROJECT,
            "region": REGION,
            "bucket": BUCKET,
            # The model server runs as the pipeline's account, which `vlp setup` let read the bucket.
            "service_account": default_pipeline_account(PROJECT),
            "run_name": "smoke-run",
            "labels": {"vlp-deployment": cfg.name},
            # The local stack serves on CPU: the plan the preflight gives for `hardware: auto` there.
            "plan": {"machine_type": "n1-standard-4", "accelerator_type": "", "accelerator_count": 0, "node_count": 1},
            "revision_sha": SHA,
            "api_endpoint": api_endpoint,
        }
    )


def _as_kfp_struct(value: Any) -> Any:
    """What a step receives for a dict parameter: a protobuf Struct, so every number arrives as a float."""
    if isinstance(value, dict):
        return {k: _as_kfp_struct(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_kfp_struct(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _upload_dir(model_dir: Path, prefix: str, skip: tuple[str, ...] = ()) -> str:
    bucket = storage_client(PROJECT).bucket(BUCKET)
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in skip:
            bucket.blob(f"{prefix}/{path.name}").upload_from_filename(str(path))
    return f"gs://{BUCKET}/{prefix}"


def _deploy(deployment: Deployment, weights_uri: str, endpoint: str, traffic: dict[str, int] | None = None) -> str:
    api = deployment.api_endpoint
    models = aiplatform_v1.ModelServiceClient(**gapic_kwargs(REGION, api))
    uploaded = models.upload_model(request=serving_spec.upload_model_request(deployment, weights_uri, SHA)).result(60)
    endpoints = aiplatform_v1.EndpointServiceClient(**gapic_kwargs(REGION, api))
    request = serving_spec.deploy_model_request(
        deployment, uploaded.model, endpoint_resource=endpoint, traffic_split=traffic
    )
    return endpoints.deploy_model(request=request).result(300).deployed_model.id


@pytest.fixture(scope="module")
def served(local_stack: Any, smollm2_model_dir: Path) -> Iterator[dict[str, Any]]:
    """SmolLM2 mirrored to fake GCS, registered and deployed on an emulated endpoint through our own requests."""
    saved = {
        k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "VLP_API_ENDPOINT", "GCE_METADATA_HOST", "GCE_METADATA_IP")
    }
    os.environ["STORAGE_EMULATOR_HOST"] = local_stack.storage_endpoint
    try:
        # `vlp setup` for the demo in this project (the bucket too), then call as the pipeline's account, as a step.
        # The TGI tests' uploads carry artifactUri, which Vertex copies as its service agent: its grant too.
        for sets in ([], ["serving.engine=tgi"]):
            cfg = load_config(CONFIGS / "local-demo.yaml", sets)
            _, account = setup_local(local_stack, cfg, project=PROJECT, bucket=BUCKET, region=REGION)
        os.environ.update({k: v for k, v in local_stack.env(account).items() if k.startswith("GCE_METADATA")})
        weights = _upload_dir(smollm2_model_dir, f"models/HuggingFaceTB/SmolLM2-135M-Instruct/{SHA}")
        deployment = _deployment(local_stack.api_endpoint)
        endpoints = aiplatform_v1.EndpointServiceClient(**gapic_kwargs(REGION, local_stack.api_endpoint))
        endpoint = endpoints.create_endpoint(
            parent=f"projects/{PROJECT}/locations/{REGION}", endpoint=aiplatform_v1.Endpoint(display_name="smoke")
        ).result(60)
        dm_id = _deploy(deployment, weights, endpoint.name)
        yield {
            "stack": local_stack,
            "deployment": deployment,
            "weights": weights,
            "endpoint": endpoint.name,
            "dm": dm_id,
            "api": local_stack.api_endpoint,
        }
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _set_faults(served: dict[str, Any], faults: list[str]) -> None:
    request = urllib.request.Request(
        f"{served['api']}/_emulator/faults",
        data=json.dumps({"faults": faults}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **served["stack"].plumbing_headers},
    )
    urllib.request.urlopen(request, timeout=10).close()


@pytest.mark.slow
def test_smollm2_answers_paris_through_predict(served: dict[str, Any]) -> None:
    result = run_smoke_test(served["deployment"], served["endpoint"], served["dm"], served["weights"], served["api"])
    assert result.passed, result.message
    assert "paris" in result.answer.lower()
    # vLLM's own image on a shared endpoint: :rawPredict to its /v1/chat/completions; the answer's
    # X-Vertex-AI-Deployed-Model-Id header says which model answered.
    assert result.route == f"/v1/{served['endpoint']}:rawPredict"
    # The prompt went through SmolLM2's own chat template (ChatML), read from the tokenizer files in GCS.
    assert result.prompt_sent.startswith("<|im_start|>") and "What is the capital of France?" in result.prompt_sent
    assert result.prompt_sent.endswith("<|im_start|>assistant\n")
    assert result.finish_reason in ("stop", "length")
    assert 0 < result.tokens["completion_tokens"] <= 24 and result.tokens["prompt_tokens"] > 0
    assert result.latency_s > 0


@pytest.mark.slow
def test_a_wrong_expectation_fails_with_what_was_sent_got_and_the_server_log(served: dict[str, Any]) -> None:
    deployment = _deployment(served["api"], expect="Berlin")
    result = run_smoke_test(deployment, served["endpoint"], served["dm"], served["weights"], served["api"])
    assert not result.passed
    message = result.message
    assert "does not contain 'Berlin'" in message
    assert "Sent: POST /v1/" in message and "What is the capital of France?" in message
    assert "Got (" in message and "Paris" in message
    assert "Last model server log lines" in message and "  | " in message  # lines read from Cloud Logging
    assert "POST /v1/chat/completions" in message  # the model server's own access log line
    assert (
        "gcloud logging read" in message and log_filter(served["endpoint"].rsplit("/", 1)[1], served["dm"]) in message
    )
    regex = _deployment(served["api"], expect_regex="^Berlin$")
    assert not run_smoke_test(regex, served["endpoint"], served["dm"], served["weights"], served["api"]).passed


def _calls(served: dict[str, Any]) -> list[str]:
    request = urllib.request.Request(f"{served['api']}/_emulator/calls", headers=served["stack"].plumbing_headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())["calls"]


def test_a_cold_endpoint_is_retried_with_backoff(served: dict[str, Any]) -> None:
    chat = f"POST /v1/{served['endpoint']}:rawPredict"
    # The emulator's predict-429 fault answers 429 to a deployed model's first two prediction calls.
    struct = served["deployment"].to_dict()
    struct["config"]["smoke_test"]["attempts"] = 1
    one_try = Deployment.parse(struct)
    _set_faults(served, ["predict-429"])
    try:
        with pytest.raises(SmokeTestError, match="after 1 attempts") as err:
            run_smoke_test(one_try, served["endpoint"], served["dm"], served["weights"], served["api"], backoff_s=0.05)
        assert "HTTP 429" in str(err.value) and "Last model server log lines" in str(err.value)
        before = _calls(served).count(chat)
        result = run_smoke_test(
            served["deployment"], served["endpoint"], served["dm"], served["weights"], served["api"], backoff_s=0.05
        )
    finally:
        _set_faults(served, [])
    assert result.passed, result.message
    assert _calls(served).count(chat) - before == 2  # one more 429, then the answer


def test_no_chat_template_fails_with_the_fix(served: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    weights = _upload_dir(bare, "models/no-template/rev")
    result = run_smoke_test(served["deployment"], served["endpoint"], served["dm"], weights, served["api"])
    assert not result.passed
    assert "no chat template" in result.message and "serving.chat_template" in result.message


def test_deploy_failure_message_carries_the_server_log(served: dict[str, Any]) -> None:
    endpoint_id = served["endpoint"].rsplit("/", 1)[1]
    message = deploy_failure_message(PROJECT, REGION, endpoint_id, served["dm"], "CUDA out of memory", served["api"])
    assert message.startswith(f"Deploying to deployed model {served['dm']} on endpoint")
    assert "\n  | INFO:" in message  # the model server's own lines, from the emulated Cloud Logging
    assert "Likely fix: GPU out of memory: lower serving.max_num_seqs" in message
    assert "gcloud logging read" in message and "console.cloud.google.com/logs/query" in message


def test_missing_deployed_model_is_an_infrastructure_error(served: dict[str, Any]) -> None:
    with pytest.raises(SmokeTestError, match="is not on endpoint"):
        run_smoke_test(served["deployment"], served["endpoint"], "999999", served["weights"], served["api"])


@pytest.mark.slow
def test_tgi_gets_the_templated_prompt_through_predict(served: dict[str, Any]) -> None:
    deployment = _deployment(served["api"], ("serving.engine=tgi", "serving.dtype=auto"))
    endpoints = aiplatform_v1.EndpointServiceClient(**gapic_kwargs(REGION, served["api"]))
    endpoint = endpoints.create_endpoint(
        parent=f"projects/{PROJECT}/locations/{REGION}", endpoint=aiplatform_v1.Endpoint(display_name="smoke-tgi")
    ).result(60)
    dm_id = _deploy(deployment, served["weights"], endpoint.name)
    try:
        result = run_smoke_test(deployment, endpoint.name, dm_id, served["weights"], served["api"])
    finally:
        endpoints.undeploy_model(endpoint=endpoint.name, deployed_model_id=dm_id).result(60)
        endpoints.delete_endpoint(name=endpoint.name).result(60)
    assert result.route == f"/v1/{endpoint.name}:predict"
    assert result.passed, result.message
    assert "paris" in result.answer.lower()
    assert result.prompt_sent.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_a_canary_on_a_shared_endpoint_is_tested_by_deployed_model_id(served: dict[str, Any]) -> None:
    deployment = served["deployment"]
    endpoints = aiplatform_v1.EndpointServiceClient(**gapic_kwargs(REGION, served["api"]))
    zero = _deploy(deployment, served["weights"], served["endpoint"], traffic={"0": 0, served["dm"]: 100})
    canary = _deploy(deployment, served["weights"], served["endpoint"], traffic={"0": 30, served["dm"]: 70, zero: 0})
    try:
        # A shared endpoint cannot address a model without traffic: say so, with the fix.
        with pytest.raises(SmokeTestError, match="0% traffic") as err:
            run_smoke_test(deployment, served["endpoint"], zero, served["weights"], served["api"])
        assert "canary_percent" in str(err.value)
        before = len(_calls(served))
        result = run_smoke_test(deployment, served["endpoint"], canary, served["weights"], served["api"])
        sent = [c for c in _calls(served)[before:] if c.endswith(":rawPredict")]
    finally:
        for dm in (zero, canary):
            endpoints.undeploy_model(
                endpoint=served["endpoint"], deployed_model_id=dm, traffic_split={served["dm"]: 100}
            ).result(60)
    assert result.route == f"/v1/{served['endpoint']}:rawPredict"
    assert result.passed, result.message
    assert 1 <= len(sent) <= canary_tries(30)  # answers from the serving model were sent again, not judged


def test_canary_tries_reach_a_small_share_with_high_certainty() -> None:
    assert canary_tries(100) == 1
    assert canary_tries(5) == 135 and canary_tries(1) == 688
    assert (1 - 0.05) ** canary_tries(5) < 0.001


@pytest.mark.slow
def test_a_dedicated_endpoint_tests_the_new_model_alone_through_invoke(served: dict[str, Any]) -> None:
    deployment = _deployment(served["api"], ("endpoint.dedicated=true",))
    endpoints = aiplatform_v1.EndpointServiceClient(**gapic_kwargs(REGION, served["api"]))
    endpoint = endpoints.create_endpoint(
        parent=f"projects/{PROJECT}/locations/{REGION}",
        endpoint=aiplatform_v1.Endpoint(display_name="smoke-dedicated", dedicated_endpoint_enabled=True),
    ).result(60)
    blue = _deploy(deployment, served["weights"], endpoint.name)
    green = _deploy(deployment, served["weights"], endpoint.name, traffic={"0": 0, blue: 100})
    try:
        result = run_smoke_test(deployment, endpoint.name, green, served["weights"], served["api"])
        # `vlp bench` on the whole endpoint takes the endpoint-level invoke route (chat completions are off).
        from vlp.components.vertex.load_target import chat_target

        whole = chat_target(endpoint.name, None, served["api"]).url
        assert whole.endswith(f"/v1/{endpoint.name}/invoke/v1/chat/completions"), whole
        assert whole.startswith(f"https://{endpoint.dedicated_endpoint_dns}/")
    finally:
        endpoints.undeploy_model(endpoint=endpoint.name, deployed_model_id=green, traffic_split={blue: 100}).result(60)
        endpoints.undeploy_model(endpoint=endpoint.name, deployed_model_id=blue).result(60)
        endpoints.delete_endpoint(name=endpoint.name).result(60)
    assert result.route == f"/v1/{endpoint.name}/deployedModels/{green}/invoke/v1/chat/completions"
    assert result.passed, result.message
    assert "paris" in result.answer.lower()


def test_smoke_test_op_writes_verdict_metrics_benchmark_and_report(served: dict[str, Any], tmp_path: Path) -> None:
    from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint
    from kfp import dsl

    from vlp.components.vertex.smoke_test import smoke_test_op

    deployment = _as_kfp_struct(
        _deployment(
            served["api"], benchmark="true", benchmark_concurrency="[1,2]", benchmark_requests=2, max_tokens=8
        ).to_dict()
    )
    assert deployment["config"]["smoke_test"]["benchmark_concurrency"] == [1.0, 2.0]
    endpoint = VertexEndpoint(uri="", metadata={"resourceName": served["endpoint"]})
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.HTML(uri=str(tmp_path / "report.html"))
    out = smoke_test_op(deployment, endpoint, served["dm"], served["weights"], served["api"], metrics, report)
    assert out.verdict == "passed" and "paris" in out.answer.lower() and out.latency_s > 0
    # The benchmark went through the Vertex chat route of the emulated endpoint, at both levels.
    assert [lv["concurrency"] for lv in out.benchmark] == [1, 2]
    assert [lv["errors"] for lv in out.benchmark] == [0, 0]
    assert metrics.metadata["smoke_passed"] == 1 and "bench_c2_ttft_p95_s" in metrics.metadata
    html = (tmp_path / "report.html").read_text()
    assert "Smoke test" in html and "passed" in html and "<svg" in html


# Chat templates of the kinds the seed models use, beside the fixtures' own: Llama 3.1 (bos token, system
# header, a raise_exception path), Llama 3.2 Vision (content parts with an image), and a list-form template.
_LLAMA31 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = 'Cutting Knowledge Date: December 2023' %}"
    "{%- endif %}<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>"
    "{%- for message in messages %}{%- if message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('roles must be user or assistant') }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
_VISION = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot|>\n{% endfor %}\n  {% if add_generation_prompt %}\n<|assistant|>\n{% endif %}"
    "{{ {'tools': tools, 'n': messages | length} | tojson }}"
)


@pytest.mark.parametrize("template", [None, _LLAMA31, _VISION, "list-form"], ids=["own", "llama31", "vision", "list"])
@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_the_chat_template_renders_as_transformers_renders_it(
    template: str | None, image: bool, smollm2_model_dir: Path, tmp_path: Path
) -> None:
    """The smoke step renders templates with Jinja2 alone (no transformers in its packages); it must give the
    same text as transformers' apply_chat_template for the same tokenizer files."""
    from transformers import AutoTokenizer

    from vlp.components.vertex.smoke_test import render_prompt

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2_model_dir / name).is_file():
            (tok_dir / name).write_bytes((smollm2_model_dir / name).read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True}
    if template == "list-form":
        config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": _LLAMA31}]
        template = None
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))

    ours = render_prompt(tok_dir, "What is the capital of France?", template, image)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    content: Any = "What is the capital of France?"
    if image:
        content = [{"type": "image"}, {"type": "text", "text": "What is the capital of France?"}]
    try:
        theirs = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # text-only templates: both fall back to the text form
        theirs = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    assert ours == theirs
    assert "What is the capital of France?" in ours


def test_the_request_cap_follows_the_endpoint_kind() -> None:
    """1.5 MB on a shared endpoint (the SDK's raw_predict docstring), 10 MB on a dedicated one (F13: "Larger payload
    support: Up to 10 MB"), as the emulator's V-SIZE rule enforces; the smoke test refuses a body over its endpoint's."""
    from vlp.components.vertex.prediction import EndpointInfo, request_limit

    info = EndpointInfo("projects/p/locations/r/endpoints/1", "p", "r", "1", "http://x", {}, [], dedicated=False)
    assert request_limit(info) == 1_500_000
    assert request_limit(EndpointInfo(**{**info.__dict__, "dedicated": True})) == 10_000_000
