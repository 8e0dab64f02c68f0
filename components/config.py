"""The deployment config: one typed model of everything a deploy needs, and its loading from YAML."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Engine = Literal["vllm", "tgi"]
TeardownPolicy = Literal["on_failure", "always", "never"]
RedeployTest = Literal["auto", "invoke", "canary"]
Objective = Literal["cost_per_token", "cost_per_hour", "latency"]
Target = Literal["vertex", "cloud_run"]
CloudRunGpu = Literal["nvidia-l4", "nvidia-rtx-pro-6000"]

# Vertex resource names and label values share these limits; checking them here turns a
# 400 from Google twenty minutes into a run into a message at `vlp check` time.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# huggingface_hub's validate_repo_id (utils/_validators.py): each part [\w.-], 1-96 characters, starting and ending
# with a word character, no "--" or "..". Stricter than the regex alone: `a/..` would name the parent directory in
# every local path built from the repo id (the Hub mirror's, the cache's).
_REPO_PART = r"\w(?:[\w.-]{0,94}\w)?"
_REPO_RE = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
# Git's check-ref-format rules for a branch or tag, plus the Hub's refs/pr/N; a commit is its full 40-hex sha
# (the Hub resolves no abbreviated sha: /api/models/REPO/revision/abc1234 answers 404 "Revision Not Found").
_BAD_REF = re.compile(r"(^[-/.])|([/.]$)|\.\.|//|@\{|[\x00-\x20\x7f~^:?*\[\\]|\.lock(/|$)|/\.")
_SHORT_SHA = re.compile(r"^[0-9a-f]{7,39}$")
# Resource Manager's project ID rules: 6-30 lowercase letters, digits and hyphens, starting with a letter, not
# ending with a hyphen; legacy domain-scoped ids are DOMAIN:ID.
_PROJECT_RE = re.compile(r"^(?:[a-z][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
# Cloud Storage bucket names (cloud.google.com/storage/docs/buckets#naming): 3-63 characters (222 with dots, 63 per
# dot-separated part) of lowercase letters, digits, -, _ and ., starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9_.]{1,220}[a-z0-9])$")


def check_project_id(value: str, field: str = "placement.project") -> str:
    """A Google Cloud project id, or ValueError naming `field` and the rule."""
    if value and not _PROJECT_RE.match(value):
        raise ValueError(
            f"{field} {value!r} is not a Google Cloud project id: 6-30 lowercase letters, digits and hyphens, "
            "starting with a letter (the ID, not the project's display name or number)"
        )
    return value


def check_bucket(value: str, field: str = "placement.bucket") -> str:
    """A bucket name (gs:// and trailing slashes dropped), or ValueError naming `field` and the rule."""
    name = value.strip().removeprefix("gs://").rstrip("/")
    if not name:
        return name
    parts = name.split(".")
    if (
        not _BUCKET_RE.match(name)
        or (len(name) > 63 and "." not in name)
        or any(not part or len(part) > 63 for part in parts)
        or re.match(r"^\d+\.\d+\.\d+\.\d+$", name)
        or name.startswith("goog")
        or "google" in name
    ):
        raise ValueError(
            f"{field} {value!r} is not a Cloud Storage bucket name: 3-63 lowercase letters, digits, dashes, "
            "underscores and dots, starting and ending with a letter or digit (gs://NAME or NAME, no path)"
        )
    return name


def regional_bucket(bucket: str, region: str) -> str:
    """The weights bucket for a fallback region that `bucket` is not in: BUCKET-REGION. Vertex AI serves a model's
    artifacts from a bucket in the endpoint's region, so a run that falls back to another region (no quota in the
    first) mirrors there; `vlp setup` makes one per region of placement.regions, preflight picks the run's."""
    name = f"{bucket}-{region}"
    if len(name) > 63:
        raise ValueError(
            f"placement.bucket {bucket!r} leaves no room for the bucket of fallback region {region} ({name!r} is "
            f"{len(name)} characters; a bucket name has at most 63): use a bucket name of at most "
            f"{63 - len(region) - 1} characters, or remove {region} from placement.regions"
        )
    return check_bucket(name, f"the bucket for region {region} (placement.bucket + '-{region}')")


def _resource_name(value: str) -> str:
    """Names that become Vertex display names and label values."""
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r}: use lowercase letters, digits and dashes, starting with a letter, at most 63 characters"
        )
    return value


class ConfigError(ValueError):
    """A deployment config that cannot be used; the message names the field and the fix."""


class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: reject them so the user hears about
    # `max_model_length` instead of silently getting the default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(_Strict):
    """Where the weights come from."""

    repo: str = Field(description="Hugging Face Hub repo id (ORG/NAME), e.g. meta-llama/Llama-3.1-8B-Instruct.")
    revision: str = Field("main", description="Branch, tag or commit sha; the mirror pins it to a commit sha.")
    allow_patterns: list[str] = Field(
        default_factory=list,
        description="Files to mirror; empty = what vLLM/TGI load (safetensors, config, tokenizer).",
    )
    ignore_patterns: list[str] = Field(
        default_factory=list, description="Files to skip; empty = duplicates such as original/, *.pth, *.bin."
    )
    hf_token_secret: str = Field(
        "",
        description="Secret Manager secret holding a Hub token (NAME, or projects/P/secrets/NAME[/versions/V]); "
        "needed for gated repos. Only the mirror step reads it.",
    )
    mirror_job_above_gb: float = Field(
        20.0,
        ge=0,
        description="Weights larger than this many GB are mirrored by a Vertex AI custom job on a machine with more "
        "network (n2-standard-8, n2-standard-16 above 150 GB) instead of on the pipeline's own step (e2-standard-4, "
        "~8 Gbps); 0 = always a custom job.",
    )

    @field_validator("repo")
    @classmethod
    def _repo_shape(cls, v: str) -> str:
        if not _REPO_RE.match(v):
            raise ValueError(
                f"{v!r} is not a Hub repo id: write it as ORG/NAME, e.g. meta-llama/Llama-3.1-8B-Instruct (letters, "
                "digits, '-', '_' and '.', each part starting and ending with a letter or digit, no '..' or '--')"
            )
        if "--" in v or ".." in v:
            raise ValueError(f"{v!r} is not a Hub repo id: '--' and '..' are not allowed in repo ids")
        return v

    @field_validator("revision")
    @classmethod
    def _revision_shape(cls, v: str) -> str:
        if _SHORT_SHA.match(v):
            raise ValueError(
                f"{v!r} looks like an abbreviated commit sha, which the Hub does not resolve: give all 40 characters "
                "(the Hub's 'Files and versions' tab, or `git rev-parse` in a clone), or a branch or tag"
            )
        if not v or _BAD_REF.search(v) or len(v) > 255:
            raise ValueError(
                f"{v!r} is not a branch, tag or commit: use a branch (main), a tag (v1.0), refs/pr/N or a 40-character "
                "commit sha (no spaces, '..', '~', '^', ':', '?', '*', '[', '\\' or leading '-')"
            )
        return v

    @field_validator("hf_token_secret")
    @classmethod
    def _not_a_token(cls, v: str) -> str:
        # A pasted token would end up in the compiled spec and the run's parameters.
        if v.startswith("hf_"):
            raise ValueError(
                "this looks like a Hub token itself; store it in Secret Manager "
                "(gcloud secrets create hf-token --data-file=-) and put the secret's name here"
            )
        return v


class Serving(_Strict):
    """The serving container and the engine's arguments (the seed notebooks' full set)."""

    engine: Engine = Field(
        "vllm",
        description="Serving engine: vllm (vLLM's own image; Model Garden's 2024 build for models newer vLLM dropped) "
        "or tgi (the Hugging Face TGI 2.4 DLC, frozen: TGI is in maintenance mode).",
    )
    image: str = Field(
        "",
        description="Serving container image; empty = the newest image in the catalog (components/serving/images.yaml) "
        "whose engine serves the model's architecture.",
    )
    # Upper bounds catch a typo (1e23) at load instead of in the container: no machine Vertex or Cloud Run offers has
    # more than 8 GPUs (components/planning/catalog.py), and Google documents multi-host for 2 nodes (use-multihost-gpu).
    tensor_parallel_size: int | None = Field(
        None, ge=1, le=8, description="GPUs a replica shards over (at most the 8 of one node); empty = GPUs per node."
    )
    pipeline_parallel_size: int | None = Field(
        None,
        ge=1,
        le=8,
        description="Pipeline-parallel stages, one per node: more than 1 spans that many nodes per replica (multi-host, "
        "Preview), offered only as Google documents it: vLLM, N x a3-highgpu-8g (8 x H100 each), a dedicated endpoint; "
        "empty = one node, or the plan's.",
    )
    # The upper bound is the longest context a public checkpoint declares (Llama 4 Scout's max_position_embeddings,
    # 10,485,760); preflight then holds it to the model's own context length.
    max_model_len: int | None = Field(
        None, ge=16, le=10_485_760, description="Longest sequence (prompt + answer) in tokens; empty = plan."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of GPU memory the engine may use.")
    # 65,536: 64 times vLLM V1's largest default (1024, get_batch_defaults at v0.34.0); a value above it is a typo.
    max_num_seqs: int | None = Field(None, ge=1, le=65_536, description="Sequences batched at once; empty = plan.")
    dtype: str = Field("auto", description="Weights/activations dtype: auto, bfloat16, float16, float32.")
    quantization: str | None = Field(
        None, description="Engine quantization override (fp8, awq, gptq...); empty = from the model."
    )
    kv_cache_dtype: str = Field("auto", description="KV cache dtype: auto or fp8.")
    swap_space: int | None = Field(
        None,
        ge=0,
        le=1024,  # GiB per GPU: more than any machine's host memory (vLLM refuses above 70% of it)
        description="CPU swap space per GPU in GiB (vLLM); empty = 16 on Model Garden's 2024 image (its notebooks' "
        "value), not passed to newer vLLM, which removed the flag.",
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (saves memory, slower).")
    enable_lora: bool = Field(False, description="Serve LoRA adapters.")
    max_loras: int = Field(1, ge=1, le=1024, description="LoRA adapters held at once.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest LoRA rank (vLLM 0.34 takes up to 512).")
    trust_remote_code: bool = Field(False, description="Run code shipped in the model repo (needed by some models).")
    chat_template: str | None = Field(None, description="Jinja chat template for models whose tokenizer has none.")
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=dict, description="Multimodal limits, e.g. {image: 1}.")
    extra_args: list[str] = Field(default_factory=list, description="More engine flags, passed as they are.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra container environment (never secrets).")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        allowed = {"auto", "bfloat16", "float16", "float32", "half", "float"}
        if v not in allowed:
            raise ValueError(f"{v!r} is not a dtype the engines take; use one of {sorted(allowed)}")
        return v

    @field_validator("env")
    @classmethod
    def _no_secrets_in_env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key.upper() in {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN"}:
                raise ValueError(
                    f"{key} must not be set in the serving env: weights are served from GCS, so serving "
                    "needs no Hub token; set model.hf_token_secret for the mirror step instead"
                )
        return v


class Hardware(_Strict):
    """The machine shape; `auto` lets preflight pick, among the shapes that fit, the best by `objective`."""

    machine_type: str = Field("auto", description="Vertex machine type (g2-standard-12...) or auto.")
    accelerator_type: str = Field("", description="Vertex AcceleratorType name (NVIDIA_L4, NVIDIA_H100_80GB...).")
    accelerator_count: int = Field(0, ge=0, description="GPUs per node; 0 with machine_type auto.")
    replica_count: int = Field(1, ge=1, description="Replicas kept serving (min replicas).")
    max_replica_count: int | None = Field(None, ge=1, description="Autoscaling ceiling; empty = replica_count.")
    spot: bool = Field(False, description="Use Spot VMs (cheaper, can be preempted).")
    objective: Objective = Field(
        "cost_per_token",
        description="How `auto` ranks the shapes that fit: cost_per_token (USD per 1M output tokens at the "
        "workload; ties: lower latency), cost_per_hour (the cheapest machine), latency (lowest inter-token latency).",
    )

    @model_validator(mode="after")
    def _shape(self) -> Hardware:
        if self.machine_type == "auto":
            if self.accelerator_count and not self.accelerator_type:
                raise ValueError("accelerator_count is set but accelerator_type is empty: name the GPU type too")
        elif bool(self.accelerator_type) != bool(self.accelerator_count):
            raise ValueError(
                "an explicit machine_type needs accelerator_type and accelerator_count together "
                "(e.g. g2-standard-12 + NVIDIA_L4 x 1), or neither for a CPU-only machine"
            )
        if self.max_replica_count is not None and self.max_replica_count < self.replica_count:
            raise ValueError("max_replica_count is below replica_count: raise it or leave it empty")
        return self

    @property
    def is_auto(self) -> bool:
        return self.machine_type == "auto"


class Workload(_Strict):
    """The traffic a deployment is planned for: what a request looks like and how many are in flight."""

    input_tokens: int = Field(1000, ge=1, description="Prompt tokens per request.")
    output_tokens: int = Field(250, ge=1, description="Generated tokens per request.")
    concurrency: int | Literal["max"] = Field(
        16,
        description="Requests in flight at once; max = as many sequences as the KV cache holds (saturated).",
    )

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if v != "max" and int(v) < 1:
            raise ValueError("give a positive number of requests in flight, or max")
        return v


class Placement(_Strict):
    """Where the run and its resources live; project and bucket have no defaults on purpose."""

    project: str = Field("", description="Google Cloud project id (a run-time parameter; no default).")
    regions: list[str] = Field(
        default_factory=lambda: ["us-central1"],
        description="Candidate regions in order of preference; preflight takes the first with quota.",
    )
    bucket: str = Field("", description="GCS bucket (name or gs://name) for weights and pipeline root.")
    service_account: str = Field("", description="Service account the pipeline and the endpoint run as.")

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one region, e.g. [us-central1]")
        for r in v:
            if not re.match(r"^[a-z]+-[a-z]+\d+$", r):
                raise ValueError(f"{r!r} is not a Google Cloud region name (like us-central1)")
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        return check_bucket(v)

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        return check_project_id(v)


class EndpointSpec(_Strict):
    """The Vertex AI endpoint the model serves from."""

    name: str = Field(description="Endpoint display name; a redeploy with the same name goes blue/green onto it.")
    dedicated: bool = Field(False, description="Use a dedicated endpoint (own DNS, no shared quota, long requests).")
    reuse: bool = Field(True, description="Deploy onto an existing endpoint with this name instead of a new one.")
    traffic_steps: list[int] = Field(
        default_factory=list,
        description="Canary: traffic percentages for the new model, in order (e.g. [10, 50, 100]); empty = all at once.",
    )
    drain_s: int | None = Field(
        None,
        ge=0,
        le=3600,
        description="Seconds the old model stays deployed after the new one takes all traffic, so requests already "
        "routed to it finish; empty = the endpoint's request timeout (10 min on dedicated endpoints, 60 s on shared).",
    )
    health_wait_s: int = Field(
        90,
        ge=0,
        le=3600,
        description="How long preflight's health probe of an unchanged deployment retries a model that answers "
        "429 or 503 (a serving container restarting) before it redeploys instead of skipping the run.",
    )
    redeploy_test: RedeployTest = Field(
        "auto",
        description="How a redeploy's smoke test reaches the new model alone: invoke (dedicated endpoints: the "
        "per-model invoke route; the model is uploaded with invokeRoutePrefix, so clients call .../invoke/...), "
        "canary (shared endpoints: the new model takes canary_percent of live traffic while it is tested), "
        "auto = invoke on dedicated, canary on shared.",
    )
    canary_percent: int = Field(
        5, ge=1, le=50, description="Live traffic the new model takes during a canary smoke test (redeploys only)."
    )

    _name = field_validator("name")(classmethod(lambda cls, v: _resource_name(v)))

    @model_validator(mode="after")
    def _route(self) -> EndpointSpec:
        if self.redeploy_test == "invoke" and not self.dedicated:
            raise ValueError(
                "redeploy_test: invoke needs a dedicated endpoint: Vertex serves deployedModels/ID/invoke only on "
                "dedicated endpoints; set dedicated: true, or redeploy_test: canary on a shared endpoint"
            )
        return self

    def redeploy_path(self, api: str) -> dict[str, Any]:
        """How a redeploy reaches the new model, and how clients call the endpoint: what plan and render show.
        `api`: how the serving image is called (components/serving/images.yaml: openai, model-garden or tgi)."""
        if self.uses_invoke:
            route = "/invoke/generate" if api == "model-garden" else "/invoke/v1/chat/completions"
            return {
                "smoke_test": "invoke: the new model alone at 0% traffic, on the endpoint's dedicated DNS "
                "(…/deployedModels/ID/invoke/…); live traffic never sees it before promotion",
                "new_model_traffic": 0,
                "clients_call": f"https://DEDICATED_DNS/v1/ENDPOINT{route} (models are uploaded with "
                "invokeRoutePrefix, so :predict and chat completions are off)",
            }
        call = ":rawPredict" if api == "openai" else ":predict"
        answer = "its X-Vertex-AI-Deployed-Model-Id header" if api == "openai" else "PredictResponse.deployed_model_id"
        clients = {
            "openai": ":rawPredict with an OpenAI chat body (the container's /v1/chat/completions)",
            "model-garden": ":predict or /v1beta1/ENDPOINT/chat/completions",
        }.get(api, ":predict")
        return {
            "smoke_test": f"canary: the new model takes {self.canary_percent}% of live traffic on the shared endpoint "
            f"and {call} is retried until {answer} is the new model; users see it during the test",
            "new_model_traffic": self.canary_percent,
            "clients_call": f"https://REGION-aiplatform.googleapis.com/v1/ENDPOINT{clients}",
        }

    @property
    def uses_invoke(self) -> bool:
        """Models are uploaded with invokeRoutePrefix and reached through invoke routes (dedicated endpoints)."""
        return self.redeploy_test == "invoke" or (self.redeploy_test == "auto" and self.dedicated)

    @field_validator("traffic_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if v and (any(not 0 < s <= 100 for s in v) or v != sorted(v) or v[-1] != 100):
            raise ValueError("traffic_steps must rise and end at 100, e.g. [10, 50, 100]")
        return v


# Per instance, the GPU's minimums (run/docs/configuring/services/gpu: "a minimum of 4 CPU and 16 GiB" for L4, "20 CPU
# and 80 GiB" for RTX PRO 6000) and, for L4, Cloud Run's general maximums (8 CPU, 32 GiB: run/docs/configuring/
# services/cpu and memory-limits). The RTX PRO 6000's maximums are not documented for services (unverified): none.
CLOUD_RUN_GPU_LIMITS: dict[str, tuple[int, int, int | None, int | None]] = {
    "nvidia-l4": (4, 16, 8, 32),
    "nvidia-rtx-pro-6000": (20, 80, None, None),
}
_MEMORY_RE = re.compile(r"^(\d+)(Gi|Mi)$")
MAX_SERVICE_ID = 46 - len("candidate")  # see CloudRunSpec._service


class CloudRunSpec(_Strict):
    """The Cloud Run service a `target: cloud_run` deployment serves from: one GPU per instance, scale to zero."""

    service: str = Field("", description="Service id; empty = the deployment name.")
    gpu_type: CloudRunGpu = Field("nvidia-l4", description="GPU per instance: nvidia-l4 or nvidia-rtx-pro-6000.")
    cpu: int = Field(8, ge=1, description="vCPUs per instance (always allocated: GPU services bill per instance).")
    memory: str = Field("32Gi", description="Memory per instance, e.g. 32Gi (holds the weights with weights: copy).")
    max_instances: int = Field(3, ge=1, le=1000, description="Instances at most; quota is reserved for all of them.")
    min_instances: int = Field(0, ge=0, description="Instances kept warm (billed while idle); 0 = scale to zero.")
    concurrency: int = Field(64, ge=1, le=1000, description="Requests one instance takes at once.")
    zonal_redundancy: bool = Field(
        True, description="Reserve failover capacity in other zones (gcloud's default; costs more, other quota)."
    )
    service_account: str = Field(
        "", description="Account the service runs as (reads the weights bucket); empty = placement.service_account."
    )
    ingress: Literal["all", "internal", "internal-and-cloud-load-balancing"] = Field(
        "all", description="Who may reach the URL at the network level; IAM (roles/run.invoker) still applies."
    )
    weights: Literal["copy", "mount"] = Field(
        "copy",
        description="copy: the TGI DLC copies gs://…/SHA into its in-memory /tmp at start (parallel, fastest cold "
        "start; the weights use instance memory), and vLLM streams it from gs:// into GPU memory (Run:ai Model "
        "Streamer); mount: a read-only Cloud Storage volume (no copy, reads on demand).",
    )
    startup_timeout_s: int = Field(
        1800,
        ge=60,
        # The startup probe's window (failure_threshold x period): Cloud Run's health-check pages cap it at 1800 s
        # for GPU instances (run/docs/configuring/jobs/healthchecks; the services page is not explicit: unverified).
        le=1800, description="How long an instance may take to load the model before it counts failed."
    )

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if not _MEMORY_RE.match(v):
            raise ValueError(f"{v!r}: write memory as a number of Gi or Mi, e.g. 32Gi")
        return v

    @field_validator("service")
    @classmethod
    def _service(cls, v: str) -> str:
        # service.proto service_id: lowercase, starts with a letter, under 50 characters. Cloud Run also refuses a
        # traffic tag whose length plus the service id's exceeds 46 (they form the tag URL's DNS label), and every
        # redeploy tags its revision `candidate`: 37 at most.
        if v and not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", v):
            raise ValueError(f"{v!r}: use lowercase letters, digits and dashes, starting with a letter")
        if len(v) > MAX_SERVICE_ID:
            raise ValueError(
                f"{v!r} is {len(v)} characters: Cloud Run refuses a traffic tag whose length plus the service id's "
                f"exceeds 46, and redeploys tag the new revision `candidate`; use at most {MAX_SERVICE_ID} characters"
            )
        return v

    @field_validator("ingress")
    @classmethod
    def _ingress(cls, v: str) -> str:
        # run/docs/securing/ingress: internal ingress admits only requests from VPC networks (and, for the second,
        # Google Cloud load balancers); the smoke test calls the URL from a Vertex AI Pipelines worker, which is
        # neither, so Cloud Run would refuse it with 404 and every deploy would roll back. (vlp writes ingress on
        # every deploy, so it cannot be narrowed afterwards either.)
        if v != "all":
            raise ValueError(
                f"ingress {v!r}: the smoke test calls the service from a Vertex AI Pipelines worker, which internal "
                "ingress refuses (404); use ingress: all: the service stays private, only accounts with "
                "roles/run.invoker may call it"
            )
        return v

    @property
    def memory_gib(self) -> float:
        number, unit = _MEMORY_RE.match(self.memory).groups()  # type: ignore[union-attr]
        return int(number) / (1024 if unit == "Mi" else 1)

    @model_validator(mode="after")
    def _limits(self) -> CloudRunSpec:
        cpu_min, mem_min, cpu_max, mem_max = CLOUD_RUN_GPU_LIMITS[self.gpu_type]
        if self.cpu < cpu_min or self.memory_gib < mem_min:
            raise ValueError(
                f"{self.gpu_type} needs at least {cpu_min} CPU and {mem_min}Gi of memory per instance "
                f"(cpu is {self.cpu}, memory {self.memory}): raise cloud_run.cpu / cloud_run.memory"
            )
        if (cpu_max and self.cpu > cpu_max) or (mem_max and self.memory_gib > mem_max):
            raise ValueError(
                f"Cloud Run instances with {self.gpu_type} take at most {cpu_max} CPU and {mem_max}Gi "
                f"(cpu is {self.cpu}, memory {self.memory}): lower them"
            )
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances is above max_instances: lower min_instances or raise max_instances")
        return self


class SmokeTest(_Strict):
    """What the deployed model must answer before traffic moves to it."""

    prompt: str = Field("What is the capital of France?", description="User message sent through the chat template.")
    expect: str = Field(
        "", description="Substring the answer must contain (case-insensitive); empty = any non-empty answer."
    )
    expect_regex: str = Field("", description="Regex the answer must match; empty = no regex check.")
    image_url: str = Field("", description="Image for vision models (gs:// or https://), sent with the prompt.")
    max_tokens: int = Field(64, ge=1, le=4096, description="Tokens the smoke answer may use.")
    # Bounded: each try may wait minutes on a cold or dead server, and a run must end.
    attempts: int = Field(5, ge=1, le=30, description="Tries for a cold endpoint before the smoke test fails (1-30).")
    benchmark: bool = Field(False, description="Run a short load benchmark after the smoke test.")
    benchmark_concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], description="Concurrency levels.")
    benchmark_requests: int = Field(16, ge=1, description="Requests per concurrency level.")
    ttft_p95_target_s: float = Field(
        2.0, gt=0, description="p95 time-to-first-token the recommended concurrency keeps."
    )

    @field_validator("expect_regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v


class DeploymentConfig(_Strict):
    """Everything one deploy needs. YAML files in configs/ are instances of this."""

    name: str = Field(description="Deployment name: labels every resource the run creates.")
    description: str = Field("", description="What this deployment is, for people.")
    model: ModelSource
    serving: Serving = Field(default_factory=Serving)
    hardware: Hardware = Field(default_factory=Hardware)
    workload: Workload = Field(default_factory=Workload)
    placement: Placement = Field(default_factory=Placement)
    endpoint: EndpointSpec
    smoke_test: SmokeTest = Field(default_factory=SmokeTest)
    teardown: TeardownPolicy = Field(
        "on_failure",
        description="on_failure: remove what a failed run created; always: also after success (CI); never.",
    )
    target: Target = Field(
        "vertex",
        description="Where the model serves: vertex (a Vertex AI endpoint) or cloud_run (a Cloud Run service).",
    )
    cloud_run: CloudRunSpec = Field(default_factory=CloudRunSpec, description="The service, for target: cloud_run.")

    _name = field_validator("name")(classmethod(lambda cls, v: _resource_name(v)))

    @model_validator(mode="before")
    @classmethod
    def _endpoint_for_cloud_run(cls, data: Any) -> Any:
        # A Cloud Run deployment has no Vertex endpoint: the section is optional there (named after the deployment).
        if isinstance(data, dict) and data.get("target") == "cloud_run":
            endpoint = data.get("endpoint") or {}
            if isinstance(endpoint, dict) and not endpoint.get("name"):
                data = {**data, "endpoint": {**endpoint, "name": data.get("name", "")}}
        return data

    @model_validator(mode="after")
    def _cloud_run_fits(self) -> DeploymentConfig:
        if self.target != "cloud_run":
            return self
        if not self.hardware.is_auto:
            raise ValueError(
                "hardware is for Vertex machines; on target cloud_run the GPU and size are cloud_run.gpu_type, "
                "cloud_run.cpu and cloud_run.memory: set hardware: auto"
            )
        return self

    @property
    def service_id(self) -> str:
        """The Cloud Run service id (target cloud_run)."""
        return self.cloud_run.service or self.name[:MAX_SERVICE_ID].rstrip("-")

    @field_validator("hardware", mode="before")
    @classmethod
    def _auto(cls, v: Any) -> Any:
        # `hardware: auto` is the short form users write.
        return {"machine_type": "auto"} if v == "auto" else v


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is not a valid deployment config:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field: check the spelling against the config reference in docs/configuration.md"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  - {field}: {msg}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in node or node[part] is None:
            node[part] = {}
        if part == "hardware" and node[part] == "auto":
            node[part] = {"machine_type": "auto"}  # the short form, opened up so its fields can be set
        if not isinstance(node[part], dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section, so it has no field {parts[-1]}")
        node = node[part]
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Turn `--set a.b=value` strings into (key, value) with YAML typing (numbers, booleans, lists)."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as dotted.key=value, e.g. --set serving.max_model_len=4096")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> DeploymentConfig:
    """Validate a config dict (after `--set` overrides), with errors that name the field and the fix."""
    if hasattr(data, "items"):
        data = dict(data)  # KFP hands struct parameters over as plain dict-likes
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source} must be a mapping of fields (name, model, serving, ...), not {type(data).__name__}"
        )
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    try:
        return DeploymentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word (`name:` twice: the second wins); YAML says a mapping's
    keys are unique (YAML 1.2, 3.2.1.1), so a config that repeats one is refused, naming both lines."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` merges; keys written after it override the merged ones, as YAML intends
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float | bool):
            continue  # a list or mapping as a key: construct_mapping refuses it with its own message
        line = key_node.start_mark.line + 1
        if key in seen:
            message = f"the key {key!r} appears twice, on line {seen[key]} and line {line}: keep one"
            raise yaml.constructor.ConstructorError(None, None, message, key_node.start_mark)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: str | Path, overrides: list[str] | None = None) -> DeploymentConfig:
    """Read a YAML deployment config; a missing file or bad YAML gets a message, not a traceback."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: pass a config file in it, such as {path / 'local-demo.yaml'}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a path such as configs/local-demo.yaml")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream: errors name the file
            data = yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python tags
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as UTF-8 (YAML files are UTF-8)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return config_from_dict(data or {}, overrides, source=str(path))
