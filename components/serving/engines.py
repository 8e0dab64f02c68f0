"""The serving engines, both targets: the images, a deployment's resolved shape, and vLLM's and TGI's flags."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlp.components.deployment import Deployment
from vlp.components.serving.images import ImageChoiceError, ServingImage, catalog, default_image, engine_name, find

# Which image serves is data: components/serving/images.yaml (components/serving/images.py chooses and checks).
SERVING_PORT = 8080
# TGI launcher --quantize values (launcher/src/main.rs `enum Quantization`, v2.4.0) and vLLM 0.6.2's LoRA ranks
# (config.py LoRAConfig: possible_max_ranks); a value outside them stops the container at start.
TGI_QUANTIZE = ("awq", "eetq", "exl2", "gptq", "marlin", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8")

# Env names that would carry a Hub token into serving; weights come from GCS, so serving never needs one.
_TOKEN_ENV = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN"}
_TOKEN_FLAGS = ("--hf-token", "--hf_token", "--huggingface-token")
_TGI_KV_DTYPES = {"fp8": "fp8_e4m3fn", "fp8_e4m3": "fp8_e4m3fn", "fp8_e4m3fn": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2"}
_TGI_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


class ServingSpecError(ValueError):
    """A deployment the serving presets cannot turn into a container; the message names the field and the fix."""


@dataclass(frozen=True)
class ServingShape:
    """The resolved serving decisions for one deployment: config values, else the plan's."""

    engine: str
    image: str  # the URI the deployment names
    serving_image: ServingImage | None  # its catalog entry; None for an image the catalog does not know
    api: str  # how the image is called: openai, model-garden or tgi (images.yaml)
    repo: str
    machine_type: str
    accelerator_type: str
    accelerator_count: int
    node_count: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_model_len: int | None
    max_num_seqs: int | None
    min_replicas: int
    max_replicas: int
    spot: bool


def _int_or_none(value: Any) -> int | None:
    return int(value) if value else None


def resolve_shape(deployment: Deployment) -> ServingShape:
    """What the container and the machine will be: explicit config values win, the plan fills the rest."""
    cfg = deployment.config
    plan = dict(deployment.plan)
    hw = cfg.hardware
    # An explicit shape is the user's decision (preflight checks it, never changes it); auto takes the plan's.
    if not hw.is_auto:
        plan.update(
            machine_type=hw.machine_type, accelerator_type=hw.accelerator_type, accelerator_count=hw.accelerator_count
        )
    if cfg.target == "cloud_run":
        # One GPU per instance, whatever the plan says (and with no plan at all, as `vlp render` offline): the TGI
        # flags then depend only on the config's values and the plan's max_model_len / max_num_seqs.
        from vlp.components.planning.catalog import instance_shape

        plan.update(instance_shape(cfg.cloud_run.gpu_type))
    machine_type = plan.get("machine_type") or ""
    if not machine_type or machine_type == "auto":
        raise ServingSpecError(
            f"deployment {cfg.name!r} has hardware: auto and no plan: run preflight (vlp plan) first, "
            "or set hardware.machine_type, accelerator_type and accelerator_count in the config"
        )
    accelerator_type = plan.get("accelerator_type") or ""
    accelerator_count = int(plan.get("accelerator_count") or 0)
    node_count = int(plan.get("node_count") or 1)
    s = cfg.serving
    if not hw.is_auto and cfg.target != "cloud_run":
        # An explicit shape spans serving.pipeline_parallel_size nodes, as the planner reads it (plan_for_facts).
        node_count = s.pipeline_parallel_size or 1
    tp = s.tensor_parallel_size or plan.get("tensor_parallel_size") or max(accelerator_count, 1)
    pp = s.pipeline_parallel_size or plan.get("pipeline_parallel_size") or node_count
    multi_host = node_count > 1 or pp > 1
    image_uri, entry = serving_image(deployment, multi_host=multi_host)
    if multi_host:
        outside = multi_host_outside(
            engine=s.engine,
            image=entry,
            image_uri=image_uri,
            target=cfg.target,
            machine_type=machine_type,
            accelerator_type=accelerator_type,
            accelerator_count=accelerator_count,
            nodes=node_count,
            tensor_parallel=int(tp),
            pipeline_parallel=int(pp),
            dedicated=cfg.endpoint.dedicated,
        )
        if outside:
            raise ServingSpecError(multi_host_refusal(f"deployment {cfg.name!r}", node_count, int(pp), outside))
    return ServingShape(
        engine=s.engine,
        image=image_uri,
        serving_image=entry,
        api=(entry or default_image(s.engine, cfg.target)).api,
        repo=cfg.model.repo,
        machine_type=machine_type,
        accelerator_type=accelerator_type,
        accelerator_count=accelerator_count,
        node_count=node_count,
        tensor_parallel_size=int(tp),
        pipeline_parallel_size=int(pp),
        # The plan arrives through a KFP struct (every number a float): back to ints before they become flags.
        max_model_len=s.max_model_len or _int_or_none(plan.get("max_model_len")),
        max_num_seqs=s.max_num_seqs or _int_or_none(plan.get("max_num_seqs")),
        min_replicas=hw.replica_count,
        max_replicas=hw.max_replica_count or hw.replica_count,
        spot=hw.spot,
    )


def serving_image(deployment: Deployment, multi_host: bool = False) -> tuple[str, ServingImage | None]:
    """The image URI the deployment names, and its catalog entry: serving.image, else the one preflight chose for the
    model (plan["serving_image"]), else the engine's newest image for the target (`vlp render` with no plan; for a
    replica over several nodes, its newest image with a multi-host launcher). A catalog image hosted on Docker Hub is
    named through the project's Artifact Registry remote repository."""
    cfg = deployment.config
    named = cfg.serving.image or str(deployment.plan.get("serving_image") or "")
    if named:
        entry = find(named)
    else:
        try:
            entry = default_image(cfg.serving.engine, cfg.target, multi_host=multi_host)
        except ImageChoiceError:  # the engine has no multi-host image: resolve_shape says why that is refused
            entry = default_image(cfg.serving.engine, cfg.target)
    if entry is None:
        return named, None
    if named and named != entry.image:
        return named, entry  # the user's own spelling of a catalog image (e.g. their remote repository's path)
    region = deployment.region or (cfg.placement.regions or [""])[0]
    return entry.uri(deployment.project or cfg.placement.project, region), entry


def unknown_flags(args: list[str], image: ServingImage | None) -> list[str]:
    """The --flags in `args` the image's server does not accept (its fixture); none for an image the catalog does not
    know."""
    return [] if image is None else image.unknown_flags(args)


def check_flags(args: list[str], shape: ServingShape, name: str) -> None:
    """Refuse, at render, a flag the image's engine version would stop the container on at start."""
    bad = unknown_flags(args, shape.serving_image)
    if bad:
        image = shape.serving_image
        raise ServingSpecError(
            f"deployment {name!r}: {image.label if image else shape.image} does not accept {', '.join(bad)} "
            f"(its argument parser at that version: components/contract/{image.fixture if image else '?'}); the "
            "container would exit at start with 'unrecognized arguments'. Remove it from serving.extra_args (or the "
            "config field that renders it), or name an image whose engine takes it in serving.image"
        )


def served_model_name(deployment: Deployment) -> str:
    """The model name the OpenAI-compatible routes answer to: the Hub repo id, as if served from the Hub."""
    return deployment.config.model.repo


def check_no_token(env: dict[str, str], extra_args: list[str], name: str) -> None:
    for key in env:
        if key.upper() in _TOKEN_ENV:
            raise ServingSpecError(
                f"deployment {name!r}: serving.env sets {key}, but serving reads weights from GCS and must never "
                "hold a Hub token: remove it (the mirror step reads model.hf_token_secret)"
            )
    for arg in extra_args:
        if arg.split("=", 1)[0] in _TOKEN_FLAGS:
            raise ServingSpecError(
                f"deployment {name!r}: serving.extra_args passes {arg.split('=', 1)[0]}: serving reads weights from "
                "GCS and must never hold a Hub token; remove it"
            )


# Google's documented multi-host path: "Serve a DeepSeek-V3 model using multi-host GPU deployment"
# (vertex-ai/docs/predictions/use-multihost-gpu, Preview; it names Llama 3.1 405B non-quantized among the models):
# Model Garden's vLLM image with its Ray launcher first in the args, TP 8 x PP 2 over "two a3-highgpu-8g VMs with
# eight H100 GPUs each", the v1beta1 DeployModel with machineSpec.multihostGpuNodeCount, and a dedicated endpoint ("the
# Model Garden container requires a dedicated endpoint"). Only what the page shows is offered.
MULTI_HOST_PAGE = "cloud.google.com/vertex-ai/docs/predictions/use-multihost-gpu"
MULTI_HOST_MACHINE = "a3-highgpu-8g"
MULTI_HOST_ACCELERATOR = "NVIDIA_H100_80GB"
MULTI_HOST_GPUS_PER_NODE = 8
RAY_LAUNCHER = "/vllm-workspace/ray_launcher.sh"


def multi_host_outside(
    *,
    engine: str,
    image: ServingImage | None,
    image_uri: str,
    target: str,
    machine_type: str,
    accelerator_type: str,
    accelerator_count: int,
    nodes: int,
    tensor_parallel: int,
    pipeline_parallel: int,
    dedicated: bool,
) -> list[str]:
    """What puts a replica over several nodes outside the documented multi-host path (empty: on it)."""
    out = []
    if engine != "vllm":
        out.append(
            f"{engine_name(engine)} shards over the GPUs of one node only; the page serves vLLM (serving.engine: vllm)"
        )
    if target != "vertex":
        out.append("a Cloud Run instance has one GPU; multi-host serving is a Vertex AI endpoint's")
    if engine == "vllm" and (image is None or not image.multi_host):
        what = image.label if image else image_uri
        mh = [i for i in catalog() if i.multi_host and i.engine == "vllm"]
        page_image = f" (the page's: {mh[0].image}; leave serving.image empty to get it)" if mh else ""
        out.append(f"{what} has no documented multi-host launcher{page_image}")
    machine = (machine_type, accelerator_type, accelerator_count)
    if machine != (MULTI_HOST_MACHINE, MULTI_HOST_ACCELERATOR, MULTI_HOST_GPUS_PER_NODE):
        out.append(
            f"{machine_type} ({accelerator_count} x {accelerator_type}) is not the page's machine: multi-host is "
            f"documented on {MULTI_HOST_MACHINE} with {MULTI_HOST_GPUS_PER_NODE} x {MULTI_HOST_ACCELERATOR} per node "
            "only (the page shows no other machine)"
        )
    if nodes < 2 or pipeline_parallel != nodes or tensor_parallel != MULTI_HOST_GPUS_PER_NODE:
        out.append(
            f"tensor parallel {tensor_parallel} x pipeline parallel {pipeline_parallel} over {nodes} node(s): the page "
            f"runs tensor parallel {MULTI_HOST_GPUS_PER_NODE} (the GPUs of a node) x pipeline parallel = nodes "
            "(set serving.pipeline_parallel_size to the node count, at least 2, and leave tensor_parallel_size empty)"
        )
    if not dedicated:
        out.append(
            "the endpoint is shared, but 'the Model Garden container requires a dedicated endpoint': set "
            "endpoint.dedicated: true"
        )
    return out


def multi_host_refusal(subject: str, nodes: int, pipeline_parallel: int, outside: list[str]) -> str:
    """Why a replica spanning nodes is refused: the documented path exists, this one is outside it, and how.
    `subject`: "deployment 'NAME'" (render) or the model (plan)."""
    return (
        f"{subject} spans {max(nodes, pipeline_parallel)} nodes (pipeline parallel {pipeline_parallel}), "
        f"outside Google's documented multi-host path ({MULTI_HOST_PAGE}, Preview: vLLM on Model Garden's "
        f"pytorch-vllm-serve image with {RAY_LAUNCHER}, N x {MULTI_HOST_MACHINE} with {MULTI_HOST_GPUS_PER_NODE} x "
        f"{MULTI_HOST_ACCELERATOR} each, tensor parallel {MULTI_HOST_GPUS_PER_NODE} x pipeline parallel N, a dedicated "
        "endpoint): " + "; ".join(outside) + ". Otherwise use one node with more GPU memory (8 x H200 on "
        "a3-ultragpu-8g holds a 405B model in BF16), a quantized checkpoint, or a shorter serving.max_model_len"
    )


def vllm_args(deployment: Deployment, weights_uri: str = "") -> list[str]:
    """The Model Garden vLLM container args (the full command line, as the Vertex vLLM doc passes it).

    weights_uri empty gives `$(AIP_STORAGE_URI)`, the form used for the serving spec hash."""
    cfg = deployment.config
    shape = resolve_shape(deployment)
    if shape.api == "openai":
        return vllm_serve_args(deployment, weights_uri)
    s = cfg.serving
    args = []
    if shape.node_count > 1:
        # The page's args start with the image's Ray launcher (resolve_shape allowed only a multi-host image here);
        # no command: the image's ENTRYPOINT runs the args.
        args.append(RAY_LAUNCHER)
    args += [
        "python",
        "-m",
        "vllm.entrypoints.api_server",
        "--host=0.0.0.0",
        f"--port={SERVING_PORT}",
        # Model Garden's recipe: the image downloads gs:// itself (as the endpoint's service account), so the
        # Model carries no artifactUri and Vertex makes no second copy of a 400 GB checkpoint. No Hub token.
        f"--model={weights_uri.rstrip('/') if weights_uri else '$(AIP_STORAGE_URI)'}",
        # Not in the doc's list: without it the OpenAI routes answer to the gs:// path; clients use the repo id.
        f"--served-model-name={shape.repo}",
        f"--tensor-parallel-size={shape.tensor_parallel_size}",
    ]
    # The 2024 image's notebooks pass 16 GiB of swap space when the config names none.
    args += _vllm_engine_flags(shape, s, swap_space=16 if s.swap_space is None else s.swap_space, mm_json=False)
    return args + list(s.extra_args)


def _vllm_engine_flags(shape: ServingShape, s: Any, *, swap_space: int | None, mm_json: bool) -> list[str]:
    """The engine flags both vLLM forms share, in the order every preset has rendered them (the spec hash)."""
    args = []
    if shape.pipeline_parallel_size > 1:
        args.append(f"--pipeline-parallel-size={shape.pipeline_parallel_size}")
    if swap_space is not None:
        args.append(f"--swap-space={swap_space}")
    args.append(f"--gpu-memory-utilization={s.gpu_memory_utilization}")
    if shape.max_model_len:
        args.append(f"--max-model-len={shape.max_model_len}")
    args.append(f"--dtype={s.dtype}")
    if s.enable_lora:
        # Model Garden's notebooks pass --max-loras always; it only sizes LoRA slots, so only with LoRA on.
        args += ["--enable-lora", f"--max-loras={s.max_loras}", f"--max-lora-rank={s.max_lora_rank}"]
    if shape.max_num_seqs:
        args.append(f"--max-num-seqs={shape.max_num_seqs}")
    args.append("--disable-log-stats")
    if s.trust_remote_code:
        args.append("--trust-remote-code")
    if s.enforce_eager:
        args.append("--enforce-eager")
    if s.quantization:
        args.append(f"--quantization={s.quantization}")
    if s.kv_cache_dtype != "auto":
        args.append(f"--kv-cache-dtype={s.kv_cache_dtype}")
    if s.limit_mm_per_prompt:
        limits = dict(sorted(s.limit_mm_per_prompt.items()))
        # JSON: the form current vLLM parses; key=value: what the 2024 image's vLLM 0.6.2 parses.
        value = json.dumps(limits) if mm_json else ",".join(f"{k}={v}" for k, v in limits.items())
        args.append(f"--limit-mm-per-prompt={value}")
    if s.chat_template:
        # vLLM takes a file path or the template itself; one argv element keeps newlines intact.
        args.append(f"--chat-template={s.chat_template}")
    return args


def vllm_serve_args(deployment: Deployment, weights_uri: str = "", model_path: str = "") -> list[str]:
    """`vllm serve` args for vLLM's own image (the command is the image's `vllm serve`): the weights streamed from
    gs:// by the Run:ai Model Streamer (vLLM >= 0.11.1 reads GCS as the serving account: no artifactUri, no second
    copy), or read from `model_path` (a Cloud Run volume mount). weights_uri empty gives `$(AIP_STORAGE_URI)`, the
    form used for the serving spec hash."""
    cfg = deployment.config
    shape = resolve_shape(deployment)
    s = cfg.serving
    if model_path:
        args = [model_path]
    else:
        args = [weights_uri.rstrip("/") if weights_uri else "$(AIP_STORAGE_URI)", "--load-format=runai_streamer"]
        if shape.tensor_parallel_size > 1:
            # Each rank streams its share and the ranks exchange the rest (vLLM docs, Run:ai Model Streamer:
            # "distributed" for tensor-parallel loads).
            args.append('--model-loader-extra-config={"distributed": true}')
    args += [
        "--host=0.0.0.0",
        f"--port={SERVING_PORT}",
        # Without it the OpenAI routes answer to the gs:// path; clients use the repo id.
        f"--served-model-name={shape.repo}",
        f"--tensor-parallel-size={shape.tensor_parallel_size}",
    ]
    # --swap-space only when the config names it: check_flags refuses it where the version removed it.
    args += _vllm_engine_flags(shape, s, swap_space=s.swap_space, mm_json=True)
    return args + list(s.extra_args)


def tgi_env_and_args(deployment: Deployment) -> tuple[dict[str, str], list[str]]:
    """The Hugging Face TGI DLC's env (shape, as the HF Vertex blog sets it) and launcher args (engine options)."""
    cfg = deployment.config
    shape = resolve_shape(deployment)
    s = cfg.serving
    env: dict[str, str] = {"NUM_SHARD": str(shape.tensor_parallel_size)}
    if shape.max_model_len:
        # TGI checks input + max_new_tokens <= MAX_TOTAL_TOKENS per request; a prompt may use all but one token.
        env["MAX_INPUT_TOKENS"] = str(shape.max_model_len - 1)
        env["MAX_TOTAL_TOKENS"] = str(shape.max_model_len)
        # Must be >= MAX_INPUT_TOKENS or the launcher refuses to start; one full prompt per prefill batch.
        env["MAX_BATCH_PREFILL_TOKENS"] = str(shape.max_model_len)
    args: list[str] = []
    if shape.max_num_seqs:
        args.append(f"--max-concurrent-requests={shape.max_num_seqs}")
    if s.quantization:
        args.append(f"--quantize={s.quantization}")
    elif s.dtype in _TGI_DTYPES:
        args.append(f"--dtype={_TGI_DTYPES[s.dtype]}")  # TGI refuses --dtype together with --quantize
    elif s.dtype not in ("auto",):
        raise ServingSpecError(
            f"deployment {cfg.name!r}: TGI serves float16 or bfloat16 only, not serving.dtype={s.dtype}: "
            "set serving.dtype to auto, bfloat16 or float16"
        )
    if s.kv_cache_dtype != "auto":
        if s.kv_cache_dtype not in _TGI_KV_DTYPES:
            raise ServingSpecError(
                f"deployment {cfg.name!r}: TGI takes kv_cache_dtype fp8_e4m3fn or fp8_e5m2, not {s.kv_cache_dtype!r}"
            )
        args.append(f"--kv-cache-dtype={_TGI_KV_DTYPES[s.kv_cache_dtype]}")
    if s.trust_remote_code:
        args.append("--trust-remote-code")
    if s.enforce_eager:
        args.append("--cuda-graphs=0")  # TGI's equivalent of vLLM's --enforce-eager
    if s.enable_lora:
        raise ServingSpecError(
            f"deployment {cfg.name!r}: TGI loads LoRA adapters named at start (--lora-adapters=ID,...), not "
            "dynamically: pass them in serving.extra_args and set enable_lora: false, or use engine: vllm"
        )
    return env, args + list(s.extra_args)


def check_engine_values(cfg: Any, image: ServingImage | None = None) -> None:
    """Values the image's engine version would refuse at start (its fixture); `image` None: the engine's default."""
    s = cfg.serving
    image = image or default_image(s.engine, cfg.target)
    if s.engine == "tgi" and s.quantization and s.quantization not in TGI_QUANTIZE:
        raise ServingSpecError(
            f"deployment {cfg.name!r}: TGI has no --quantize={s.quantization}: use one of {', '.join(TGI_QUANTIZE)}, "
            "or leave serving.quantization empty to take it from the model's config"
        )
    if image.engine != "vllm":
        return
    if s.quantization:
        methods = list(image.contract()["quantization_methods"])
        if s.quantization not in methods:
            raise ServingSpecError(
                f"deployment {cfg.name!r}: {image.label} has no --quantization={s.quantization}: use one of "
                f"{', '.join(methods)}, or leave serving.quantization empty to take it from the model's config"
            )
    ranks = image.contract().get("lora_ranks")
    if s.enable_lora and ranks and s.max_lora_rank not in ranks:
        raise ServingSpecError(
            f"deployment {cfg.name!r}: {image.label} takes serving.max_lora_rank in {list(ranks)}, not "
            f"{s.max_lora_rank}: pick the smallest of them at or above your adapters' rank"
        )
