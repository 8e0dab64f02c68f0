"""Serving presets: the exact container spec of each seed config, labels, hashing and the REST rendering."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from google.cloud import aiplatform_v1
from google.protobuf import json_format

from vlp.components.config import DeploymentConfig, load_config
from vlp.components.deployment import Deployment
from vlp.components.serving import engines as serving
from vlp.components.serving import images
from vlp.components.vertex import serving_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WEIGHTS = "gs://vlp-bucket/models/meta-llama/Llama-3.1-8B-Instruct/0123456789abcdef0123456789abcdef01234567"
SHA = "0123456789abcdef0123456789abcdef01234567"
L4_PLAN = {"machine_type": "g2-standard-8", "accelerator_type": "NVIDIA_L4", "accelerator_count": 1}


def struct_for_tests(cfg: DeploymentConfig, plan_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The struct preflight hands the later steps; an explicit hardware shape becomes the plan, `auto` needs a plan."""
    hw = cfg.hardware
    plan: dict[str, Any] = {"node_count": 1}
    if not hw.is_auto:
        plan.update(
            machine_type=hw.machine_type,
            accelerator_type=hw.accelerator_type,
            accelerator_count=hw.accelerator_count,
            tensor_parallel_size=hw.accelerator_count or 1,
            pipeline_parallel_size=1,
        )
    plan.update(plan_overrides or {})
    return {
        "config": cfg.model_dump(mode="json"),
        "project": "test-project",
        "region": cfg.placement.regions[0],
        "bucket": "vlp-bucket",
        "service_account": "serving@test-project.iam.gserviceaccount.com",
        "run_name": "run-1",
        "labels": {"vlp-deployment": cfg.name, "vlp-run": "run-1"},
        "plan": plan,
        "revision_sha": SHA,
        "api_endpoint": "",
    }


def deployment_for_tests(cfg: DeploymentConfig, plan_overrides: dict[str, Any] | None = None) -> Deployment:
    """That struct as a step reads it at its boundary (Deployment.parse), the form every serving helper takes."""
    return Deployment.parse(struct_for_tests(cfg, plan_overrides))


def seed_struct(name: str, plan: dict[str, Any] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    return struct_for_tests(load_config(CONFIGS / f"{name}.yaml", overrides), plan)


def seed(name: str, plan: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Deployment:
    return Deployment.parse(seed_struct(name, plan, overrides))


def spec_dict(deployment: Deployment) -> dict[str, Any]:
    return json_format.MessageToDict(aiplatform_v1.ModelContainerSpec.pb(serving_spec.container_spec(deployment)))


def _common(spec: dict[str, Any], health_path: str) -> None:
    assert spec["ports"] == [{"containerPort": 8080}]
    # Model Garden's 16 GiB, or half the host's RAM on small hosts (g2-standard-8: 15258 MiB).
    assert spec["sharedMemorySizeMb"] in ("16384", "15258")
    assert spec["deploymentTimeout"] == "7200s"
    # Probe.period_seconds must be less than timeout_seconds (aiplatform_v1 Probe).
    assert spec["startupProbe"] == {
        "httpGet": {"path": health_path, "port": 8080},
        "periodSeconds": 15,
        "timeoutSeconds": 20,
        "failureThreshold": 480,
    }
    assert spec["healthProbe"]["periodSeconds"] < spec["healthProbe"]["timeoutSeconds"]
    assert spec["healthProbe"]["httpGet"] == {"path": health_path, "port": 8080}
    assert not {e["name"] for e in spec.get("env", [])} & {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN"}


def test_llama_8b_vllm_l4_serves_with_vllms_own_image() -> None:
    spec = spec_dict(seed("llama-3.1-8b-vllm-l4"))
    # vLLM's release image, through the project's Artifact Registry remote repository (Vertex pulls only from there).
    assert spec["imageUri"] == "us-docker.pkg.dev/test-project/vlp-docker-hub/vllm/vllm-openai:v0.34.0"
    assert spec["command"] == ["vllm", "serve"]
    # The weights stream from the GCS mirror (Run:ai Model Streamer); --served-model-name gives clients the repo id.
    assert spec["args"] == [
        "$(AIP_STORAGE_URI)",
        "--load-format=runai_streamer",
        "--host=0.0.0.0", "--port=8080",
        "--served-model-name=meta-llama/Llama-3.1-8B-Instruct",
        "--tensor-parallel-size=1",
        "--gpu-memory-utilization=0.9",
        "--max-model-len=4096",
        "--dtype=bfloat16",
        "--max-num-seqs=256",
        "--disable-log-stats",
    ]  # fmt: skip
    assert "env" not in spec  # MODEL_ID / DEPLOY_SOURCE are Model Garden's; upstream vLLM reads neither
    assert spec["predictRoute"] == "/v1/chat/completions" and spec["healthRoute"] == "/health"
    assert "invokeRoutePrefix" not in spec
    _common(spec, "/health")


def test_llama_70b_vllm_8xl4_shards_over_eight_gpus() -> None:
    spec = spec_dict(seed("llama-3.1-70b-vllm-8xl4"))
    assert spec["args"] == [
        "$(AIP_STORAGE_URI)",
        "--load-format=runai_streamer",
        '--model-loader-extra-config={"distributed": true}',
        "--host=0.0.0.0", "--port=8080",
        "--served-model-name=meta-llama/Llama-3.1-70B-Instruct",
        "--tensor-parallel-size=8",
        "--gpu-memory-utilization=0.9",
        "--max-model-len=4096",
        "--dtype=bfloat16",
        "--max-num-seqs=64",
        "--disable-log-stats",
    ]  # fmt: skip
    _common(spec, "/health")


def test_llama_32_vision_vllm_a100_has_the_docs_vision_flags() -> None:
    spec = spec_dict(seed("llama-3.2-11b-vision-vllm-a100"))
    assert spec["args"][3:] == [
        "--host=0.0.0.0", "--port=8080",
        "--model=$(AIP_STORAGE_URI)",
        "--served-model-name=meta-llama/Llama-3.2-11B-Vision-Instruct",
        "--tensor-parallel-size=1",
        "--swap-space=16",
        "--gpu-memory-utilization=0.9",
        "--max-model-len=4096",
        "--dtype=auto",
        "--max-num-seqs=12",
        "--disable-log-stats",
        "--enforce-eager",
        "--limit-mm-per-prompt=image=1",
    ]  # fmt: skip
    _common(spec, "/ping")


def test_llama_405b_fp8_tgi_a3_matches_the_hf_blog_env() -> None:
    spec = spec_dict(seed("llama-3.1-405b-fp8-tgi-a3"))
    assert spec["imageUri"] == images.by_id("tgi-2.4.0-dlc").image
    # The HF blog's NUM_SHARD=8; token lengths from the config; no MODEL_ID (the DLC sets it from AIP_STORAGE_URI)
    # and no HUGGING_FACE_HUB_TOKEN: the weights come from the GCS mirror.
    assert spec["env"] == [
        {"name": "NUM_SHARD", "value": "8"},
        {"name": "MAX_INPUT_TOKENS", "value": "8191"},
        {"name": "MAX_TOTAL_TOKENS", "value": "8192"},
        {"name": "MAX_BATCH_PREFILL_TOKENS", "value": "8192"},
    ]
    assert spec["args"] == ["--max-concurrent-requests=32"]
    # The DLC's router serves AIP_PREDICT_ROUTE itself; /generate or /health here would be registered twice.
    assert "predictRoute" not in spec and "healthRoute" not in spec
    _common(spec, "/health")


def test_llama_8b_awq_tgi_matches_the_cloud_run_seed() -> None:
    deployment = seed("llama-3.1-8b-awq-int4-tgi", L4_PLAN)
    spec = spec_dict(deployment)
    assert spec["args"] == ["--max-concurrent-requests=64", "--quantize=awq"]
    assert {e["name"]: e["value"] for e in spec["env"]} == {
        "NUM_SHARD": "1",
        "MAX_INPUT_TOKENS": "8191",
        "MAX_TOTAL_TOKENS": "8192",
        "MAX_BATCH_PREFILL_TOKENS": "8192",
    }
    _common(spec, "/health")
    machine = serving_spec.deploy_model_request(deployment, "projects/p/locations/l/models/m").deployed_model
    assert machine.dedicated_resources.machine_spec.machine_type == "g2-standard-8"


def test_auto_hardware_without_a_plan_says_to_run_preflight() -> None:
    deployment = seed("llama-3.1-8b-awq-int4-tgi")
    with pytest.raises(serving.ServingSpecError, match="run preflight"):
        serving_spec.container_spec(deployment)


def test_plan_fills_what_the_config_leaves_empty() -> None:
    deployment = seed(
        "local-demo",
        {
            "machine_type": "g2-standard-24",
            "accelerator_type": "NVIDIA_L4",
            "accelerator_count": 2,
            "tensor_parallel_size": 2,
            "max_model_len": 9999,
            "max_num_seqs": 7,
        },
        overrides=["serving.max_model_len=null", "serving.max_num_seqs=null"],
    )
    args = serving.vllm_args(deployment)
    assert "--tensor-parallel-size=2" in args and "--max-model-len=9999" in args and "--max-num-seqs=7" in args


def test_engine_options_reach_the_command_line() -> None:
    deployment = seed(
        "llama-3.1-8b-vllm-l4",
        overrides=[
            "serving.quantization=fp8", "serving.kv_cache_dtype=fp8", "serving.trust_remote_code=true",
            "serving.enable_lora=true", "serving.max_loras=4", "serving.max_lora_rank=32",
            "serving.chat_template={{ messages }}", "serving.extra_args=[--enable-prefix-caching]",
            "serving.env={VLLM_USE_V1: '0'}",
        ],
    )  # fmt: skip
    spec = spec_dict(deployment)
    for flag in (
        "--quantization=fp8",
        "--kv-cache-dtype=fp8",
        "--trust-remote-code",
        "--enable-lora",
        "--max-loras=4",
        "--max-lora-rank=32",
        "--chat-template={{ messages }}",
    ):
        assert flag in spec["args"], flag
    assert spec["args"][-1] == "--enable-prefix-caching"
    assert spec["env"][-1] == {"name": "VLLM_USE_V1", "value": "0"}
    tgi = seed("llama-3.1-8b-awq-int4-tgi", L4_PLAN, ["serving.kv_cache_dtype=fp8", "serving.enforce_eager=true"])
    assert serving.tgi_env_and_args(tgi)[1] == [
        "--max-concurrent-requests=64",
        "--quantize=awq",
        "--kv-cache-dtype=fp8_e4m3fn",
        "--cuda-graphs=0",
    ]


def test_no_hub_token_ever_reaches_the_container() -> None:
    deployment = seed("llama-3.1-8b-vllm-l4", overrides=["serving.extra_args=[--hf-token=hf_abc]"])
    with pytest.raises(serving.ServingSpecError, match="never hold a Hub token"):
        serving_spec.container_spec(deployment)
    struct = seed_struct("llama-3.1-8b-vllm-l4")
    struct["config"]["serving"]["env"] = {"HF_API_TOKEN": "x"}  # past the config's own check
    with pytest.raises(serving.ServingSpecError, match="never hold a Hub token"):
        serving_spec.container_spec(Deployment.parse(struct))


def test_upload_request_labels_alias_and_artifact_uri() -> None:
    deployment = seed("llama-3.1-8b-vllm-l4")
    request = serving_spec.upload_model_request(deployment, WEIGHTS, SHA)
    assert isinstance(request, aiplatform_v1.UploadModelRequest)
    assert request.parent == "projects/test-project/locations/us-central1"
    model = request.model
    spec_hash = serving_spec.serving_spec_hash(deployment)
    # vLLM's own image streams gs:// itself (`vllm serve gs://…`): the Model has no artifactUri to copy.
    assert model.artifact_uri == ""
    assert model.container_spec.args[0] == WEIGHTS
    # The 2024 Model Garden image reads it the same way, from --model=.
    vision = serving_spec.upload_model_request(seed("llama-3.2-11b-vision-vllm-a100"), WEIGHTS, SHA)
    assert vision.model.artifact_uri == "" and f"--model={WEIGHTS}" in vision.model.container_spec.args
    tgi = serving_spec.upload_model_request(seed("llama-3.1-8b-awq-int4-tgi", L4_PLAN), WEIGHTS + "/", SHA)
    assert tgi.model.artifact_uri == WEIGHTS  # no trailing slash: the DLC copies "$AIP_STORAGE_URI/*"
    assert dict(model.labels) == {
        "vlp-deployment": "llama-3-1-8b-vllm",
        "vlp-run": "run-1",
        "vlp-revision": SHA[:12],
        "vlp-spec": spec_hash,
    }
    assert list(model.version_aliases) == [f"rev-{SHA[:12]}-{spec_hash[:8]}"]
    assert model.display_name == "llama-3-1-8b-vllm"
    with pytest.raises(serving.ServingSpecError, match="gs://"):
        serving_spec.upload_model_request(deployment, "/local/path", SHA)


def test_spec_hash_is_stable_and_moves_with_what_serving_runs() -> None:
    a = seed("llama-3.1-8b-vllm-l4")
    b = replace(seed("llama-3.1-8b-vllm-l4"), run_name="run-2", labels={"vlp-run": "run-2"}, revision_sha="f" * 40)
    assert serving_spec.serving_spec_hash(a) == serving_spec.serving_spec_hash(b)
    assert len(serving_spec.serving_spec_hash(a)) == 12
    changed = seed("llama-3.1-8b-vllm-l4", overrides=["serving.max_num_seqs=128"])
    assert serving_spec.serving_spec_hash(changed) != serving_spec.serving_spec_hash(a)
    bigger = seed("llama-3.1-8b-vllm-l4", overrides=["hardware.max_replica_count=3"])
    assert serving_spec.serving_spec_hash(bigger) != serving_spec.serving_spec_hash(a)


def test_deploy_request_machine_replicas_spot_and_traffic() -> None:
    deployment = seed("llama-3.1-70b-vllm-8xl4", overrides=["hardware.max_replica_count=3", "hardware.spot=true"])
    request = serving_spec.deploy_model_request(
        deployment,
        "projects/p/locations/us-central1/models/m@2",
        endpoint_resource="projects/p/locations/us-central1/endpoints/9",
    )
    assert isinstance(request, aiplatform_v1.DeployModelRequest)
    got = json_format.MessageToDict(aiplatform_v1.DeployModelRequest.pb(request))
    assert got == {
        "endpoint": "projects/p/locations/us-central1/endpoints/9",
        "deployedModel": {
            "model": "projects/p/locations/us-central1/models/m@2",
            "displayName": "llama-3-1-70b-vllm-01234567",
            "serviceAccount": "serving@test-project.iam.gserviceaccount.com",
            "dedicatedResources": {
                "machineSpec": {"machineType": "g2-standard-96", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 8},
                "minReplicaCount": 1,
                "maxReplicaCount": 3,
                "spot": True,
                "autoscalingMetricSpecs": [
                    {"metricName": "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle", "target": 60}
                ],
            },
        },
        "trafficSplit": {"0": 100},
    }
    blue_green = serving_spec.deploy_model_request(deployment, "m", traffic_split={"0": 0, "123": 100})
    assert dict(blue_green.traffic_split) == {"0": 0, "123": 100}


MULTI_HOST_PRESET = "llama-3.1-405b-bf16-vllm-2xa3"
MULTI_HOST_IMAGE = (
    "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20250312_0916_RC01"
)
# What preflight hands on for the preset (test_planning: 405B BF16 on 2 x a3-highgpu-8g).
MULTI_HOST_PLAN = {
    "node_count": 2,
    "tensor_parallel_size": 8,
    "pipeline_parallel_size": 2,
    "serving_image": MULTI_HOST_IMAGE,
    "max_model_len": 8192,
    "max_num_seqs": 256,
}


@pytest.mark.parametrize("plan", [None, MULTI_HOST_PLAN], ids=["no-plan", "preflight-plan"])
def test_the_405b_bf16_preset_renders_googles_documented_multi_host_deploy(plan: dict[str, Any] | None) -> None:
    """vertex-ai/docs/predictions/use-multihost-gpu (Preview): Model Garden's vLLM image with its Ray launcher first,
    TP 8 x PP 2 over 2 x a3-highgpu-8g (8 x H100 per node), the v1beta1 DeployModel with multihostGpuNodeCount, a
    dedicated endpoint, the 2-hour deployment timeout; every flag one vLLM 0.7.3 parses."""
    from google.cloud import aiplatform_v1beta1

    deployment = seed(MULTI_HOST_PRESET, plan)
    shape = serving.resolve_shape(deployment)
    assert (shape.node_count, shape.tensor_parallel_size, shape.pipeline_parallel_size) == (2, 8, 2)
    assert (
        shape.serving_image == images.by_id("model-garden-vllm-20250312-multihost") and shape.image == MULTI_HOST_IMAGE
    )
    rendered = serving_spec.render_requests(deployment, WEIGHTS)
    assert rendered["deploy_model_api"] == "v1beta1" and serving_spec.needs_v1beta1(deployment)
    spec = rendered["upload_model"]["model"]["containerSpec"]
    args = spec["args"]
    assert args[:4] == [serving.RAY_LAUNCHER, "python", "-m", "vllm.entrypoints.api_server"] and "command" not in spec
    assert "--tensor-parallel-size=8" in args and "--pipeline-parallel-size=2" in args
    assert f"--model={WEIGHTS}" in args and "--max-model-len=8192" in args
    assert spec["deploymentTimeout"] == "7200s" and spec["imageUri"] == MULTI_HOST_IMAGE
    fixture = images.by_id("model-garden-vllm-20250312-multihost")
    assert fixture.fixture == "vllm-0.7.3.json"
    assert {a.split("=", 1)[0] for a in args if a.startswith("--")} <= fixture.flags()
    assert {e["name"] for e in spec["env"]} <= fixture.env_names()
    # The endpoint is dedicated (the page: "the Model Garden container requires a dedicated endpoint").
    assert deployment.config.endpoint.dedicated and spec["invokeRoutePrefix"] == "/*"
    machine = rendered["deploy_model"]["deployedModel"]["dedicatedResources"]["machineSpec"]
    assert machine == {
        "machineType": "a3-highgpu-8g",
        "acceleratorType": "NVIDIA_H100_80GB",
        "acceleratorCount": 8,  # per node, as the page's --accelerator=type=nvidia-h100-80gb,count=8
        "multihostGpuNodeCount": 2,
    }
    # v1beta1 parses the deploy; v1 cannot (its MachineSpec has no field 6).
    json_format.ParseDict(rendered["deploy_model"], aiplatform_v1beta1.DeployModelRequest.pb()())
    with pytest.raises(json_format.ParseError, match="multihostGpuNodeCount"):
        json_format.ParseDict(rendered["deploy_model"], aiplatform_v1.DeployModelRequest.pb()())


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            ["hardware={machine_type: a3-megagpu-8g, accelerator_type: NVIDIA_H100_MEGA_80GB, accelerator_count: 8}"],
            r"a3-megagpu-8g \(8 x NVIDIA_H100_MEGA_80GB\) is not the page's machine",
        ),
        (
            ["hardware={machine_type: a3-ultragpu-8g, accelerator_type: NVIDIA_H200_141GB, accelerator_count: 8}"],
            r"a3-ultragpu-8g \(8 x NVIDIA_H200_141GB\) is not the page's machine",
        ),
        (
            ["serving.image=docker.io/vllm/vllm-openai:v0.34.0"],
            r"vLLM 0\.34\.0 .* has no documented multi-host launcher",
        ),
        (
            [f"serving.image={images.by_id('model-garden-vllm-20241001').image}"],
            r"vLLM 0\.6\.2 .* has no documented multi-host launcher",
        ),
        (["serving.engine=tgi"], "TGI shards over the GPUs of one node only"),
        (["endpoint.dedicated=false"], "requires a dedicated endpoint': set endpoint.dedicated: true"),
        (["serving.tensor_parallel_size=4"], "tensor parallel 4 x pipeline parallel 2 over 2 node"),
    ],
    ids=["a3-mega", "a3-ultra", "vllm-0.34", "vllm-0.6.2", "tgi", "shared-endpoint", "tp4"],
)
def test_multi_host_off_the_documented_path_is_refused_with_the_reason(overrides: list[str], reason: str) -> None:
    """Every render refuses it (preflight too: it renders the requests), naming the path and what is outside it."""
    deployment = seed(MULTI_HOST_PRESET, None, overrides)
    for render in (serving_spec.container_spec, lambda d: serving_spec.deploy_model_request(d, "m")):
        with pytest.raises(serving.ServingSpecError, match="outside Google's documented multi-host path") as err:
            render(deployment)
        assert re.search(reason, str(err.value)), str(err.value)
        assert "use-multihost-gpu" in str(err.value) and "8 x H200" in str(err.value)


def test_a_single_node_shape_never_renders_the_launcher() -> None:
    """The multi-host image named for one node (the DeepSeek notebook runs it so on H200) serves without Ray."""
    deployment = seed(
        MULTI_HOST_PRESET,
        None,
        [
            "serving.pipeline_parallel_size=1",
            "hardware.machine_type=a3-ultragpu-8g",
            "hardware.accelerator_type=NVIDIA_H200_141GB",
            f"serving.image={MULTI_HOST_IMAGE}",
        ],
    )
    args = list(serving_spec.container_spec(deployment).args)
    assert args[0] == "python" and serving.RAY_LAUNCHER not in args and "--pipeline-parallel-size=2" not in args
    assert not serving_spec.needs_v1beta1(deployment)


# Vertex configs only: a Cloud Run config renders a run_v2 Service (test_cloud_run_target.py).
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml") if load_config(p).target == "vertex"))
def test_render_requests_is_rest_json_the_api_parses(name: str) -> None:
    deployment = seed(name, None if not load_config(CONFIGS / f"{name}.yaml").hardware.is_auto else L4_PLAN)
    rendered = serving_spec.render_requests(deployment, WEIGHTS)
    text = json.dumps(rendered)
    assert "artifact_uri" not in text and "containerSpec" in text  # camelCase, as the REST API takes it
    spec = rendered["upload_model"]["model"]["containerSpec"]
    probes = [spec[k] for k in ("startupProbe", "healthProbe")]
    assert all(p["periodSeconds"] < p["timeoutSeconds"] for p in probes)
    assert int(spec["deploymentTimeout"].rstrip("s")) <= 7200
    assert not ("predictRoute" in spec and "invokeRoutePrefix" in spec)
    machine = rendered["deploy_model"]["deployedModel"]["dedicatedResources"]["machineSpec"]["machineType"]
    from vlp.components.planning.catalog import MACHINE_TYPES

    assert int(spec["sharedMemorySizeMb"]) * 1024**2 < MACHINE_TYPES[machine].memory_gb * 1e9
    # Every flag and env name the container gets is one its image's engine version accepts (upstream fixtures).
    image = serving.resolve_shape(deployment).serving_image
    assert image is not None and images.find(spec["imageUri"]) == image
    flags = [a.split("=", 1)[0] for a in spec.get("args", []) if a.startswith("--")]
    assert set(flags) <= image.flags(), set(flags) - image.flags()
    env = {e["name"] for e in spec.get("env", [])}
    assert env <= image.env_names(), env - image.env_names()
    upload = json_format.ParseDict(rendered["upload_model"], aiplatform_v1.UploadModelRequest.pb()())
    from google.cloud import aiplatform_v1beta1

    api = {"v1": aiplatform_v1, "v1beta1": aiplatform_v1beta1}[rendered["deploy_model_api"]]
    deploy = json_format.ParseDict(rendered["deploy_model"], api.DeployModelRequest.pb()())
    assert upload.model.labels["vlp-revision"] == "sha"
    assert deploy.deployed_model.dedicated_resources.machine_spec.machine_type


def test_dedicated_endpoint_uploads_for_invoke_routes_only() -> None:
    deployment = seed("llama-3.1-8b-vllm-l4", overrides=["endpoint.dedicated=true"])
    spec = spec_dict(deployment)
    assert spec["invokeRoutePrefix"] == "/*" and "predictRoute" not in spec and spec["healthRoute"] == "/health"
    canary = spec_dict(
        seed("llama-3.1-8b-vllm-l4", overrides=["endpoint.dedicated=true", "endpoint.redeploy_test=canary"])
    )
    assert canary["predictRoute"] == "/v1/chat/completions" and "invokeRoutePrefix" not in canary
    old = spec_dict(seed("llama-3.2-11b-vision-vllm-a100", overrides=["endpoint.dedicated=true"]))
    assert old["invokeRoutePrefix"] == "/*" and old["healthRoute"] == "/ping"
    tgi = spec_dict(seed("llama-3.1-8b-awq-int4-tgi", L4_PLAN, overrides=["endpoint.dedicated=true"]))
    assert tgi["invokeRoutePrefix"] == "/*" and "predictRoute" not in tgi


def test_shared_memory_fits_the_host() -> None:
    assert serving_spec.shared_memory_mb("g2-standard-12") == 16384
    assert serving_spec.shared_memory_mb("g2-standard-4") < 16 * 1000**3 / 1024**2 / 2 + 1


def test_engine_values_are_checked_against_the_pinned_images() -> None:
    with pytest.raises(serving.ServingSpecError, match="--quantize=int4"):
        serving_spec.container_spec(seed("llama-3.1-8b-awq-int4-tgi", L4_PLAN, overrides=["serving.quantization=int4"]))
    with pytest.raises(serving.ServingSpecError, match="--quantization=awq4"):
        serving_spec.container_spec(seed("llama-3.1-8b-vllm-l4", overrides=["serving.quantization=awq4"]))
    with pytest.raises(serving.ServingSpecError, match="max_lora_rank"):
        serving_spec.container_spec(
            seed("llama-3.1-8b-vllm-l4", overrides=["serving.enable_lora=true", "serving.max_lora_rank=12"])
        )
    # The TGI list in serving.py is the one the launcher's enum has at the pinned version.
    assert list(serving.TGI_QUANTIZE) == images.by_id("tgi-2.4.0-dlc").contract()["quantize"]


def test_plan_numbers_from_a_kfp_struct_become_integer_flags() -> None:
    """Steps get the plan through a KFP struct, every number a float; flags must still read 4096, not 4096.0."""
    struct = seed_struct(
        "local-demo", {**L4_PLAN, "max_model_len": 4096.0, "max_num_seqs": 8.0, "accelerator_count": 1.0}
    )
    struct["config"]["serving"]["max_model_len"] = None
    struct["config"]["serving"]["max_num_seqs"] = None
    args = serving.vllm_args(Deployment.parse(struct))
    assert "--max-model-len=4096" in args and "--max-num-seqs=8" in args
