"""The plan search: every catalog shape checked against the model's memory, ranked by the objective (cost per
output token at the workload by default), and the plan preflight, `vlp plan` and the report show."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlp.components.planning.catalog import (
    ACCELERATORS,
    GB,
    MACHINE_TYPES,
    MAX_NODES,
    PRICES_AS_OF,
    GiB,
    Shape,
    catalog_shapes,
    offered_regions,
    shape_price,
)
from vlp.components.planning.memory import (
    DEFAULT_TARGET_MAX_MODEL_LEN,
    MAX_NUM_SEQS_CEILING,
    NATIVE_FP4,
    QUANT_MIN_CC,
    SWAP_LIMIT_SHARE,
    EngineSettings,
    MemoryBudget,
    kv_bytes_per_token,
    memory_budget,
    served_weight_bytes,
)
from vlp.components.planning.model_facts import ModelAccessError, ModelFacts, read_model_facts


def _largest(lo: int, hi: int, ok: Any) -> int:
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone (true then false); lo - 1 if none."""
    if hi < lo or not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class ShapeFit:
    """The verdict for one shape: does the model fit, at which limits, what it costs, and why not."""

    shape: Shape
    tp: int
    pp: int
    fits: bool
    price_per_hour: float
    max_model_len: int = 0  # the value the plan uses
    max_num_seqs: int = 0
    max_model_len_limit: int = 0  # the largest that fits at max_num_seqs
    max_num_seqs_limit: int = 0  # the largest that fits at max_model_len
    concurrent_sequences: int = 0  # full-length sequences the KV cache holds at once
    memory: MemoryBudget | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    throughput: Any = None  # vlp.components.planning.throughput.Estimate at the plan's workload, for shapes that fit
    throughput_model: dict[str, Any] = field(default_factory=dict)  # its inputs: re-estimate at another workload
    cost_per_million: float = math.inf  # USD per 1M output tokens at that throughput

    @property
    def holds_workload(self) -> bool:
        """The KV cache (and max_num_seqs) hold the workload's requests in flight (always, for `max`)."""
        return bool(self.throughput) and self.throughput.holds_workload

    def rank(self, objective: str) -> tuple[float, ...]:
        """Sort key for `hardware: auto` (lower is better). By tokens, a shape whose KV cache cannot hold the
        requests in flight comes after every shape that can: its queue, not its price, sets the latency."""
        itl = self.throughput.itl_s if self.throughput else math.inf
        if objective == "cost_per_hour":
            return (self.price_per_hour, self.shape.gpus)
        short = 0.0 if self.holds_workload else 1.0
        if objective == "latency":
            return (short, itl, self.cost_per_million, self.price_per_hour)
        return (short, self.cost_per_million, itl, self.price_per_hour)


def with_throughput(fit: ShapeFit, facts: ModelFacts, settings: EngineSettings, workload: Any) -> ShapeFit:
    """The fit with its throughput and cost per token at `workload` (a config Workload, or None = the defaults)."""
    if not fit.fits or fit.memory is None:
        return fit
    from vlp.components.planning import throughput

    quant = (settings.quantization or facts.quantization or "").lower()
    weights = served_weight_bytes(facts, settings)
    model = throughput.ServedModel(
        active_params=facts.active_params or facts.params,
        weight_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(facts, settings, max_model_len=fit.max_model_len),
        low_precision_compute="fp8" in quant,  # W8A8; AWQ/GPTQ INT4 are weight-only (16-bit compute)
        # The routed experts' bytes, in proportion to their parameters (their dtype is the rest's).
        expert_bytes=int(weights * facts.expert_params / facts.params) if facts.params else 0,
        experts=facts.moe_experts,
        experts_per_token=facts.moe_experts_per_token,
    )
    load = throughput.Workload()
    if workload is not None:
        concurrency = 0 if workload.concurrency == "max" else int(workload.concurrency)
        load = throughput.Workload(int(workload.input_tokens), int(workload.output_tokens), concurrency)
    fit.throughput_model = {
        **dataclasses.asdict(model),
        "accelerator": fit.shape.accelerator_type,
        "gpus": fit.shape.gpus,
        "tp": fit.tp,
        "pp": fit.pp,
        "kv_cache_tokens": fit.memory.kv_tokens,
        "max_num_seqs": fit.max_num_seqs,
        "step_floor_s": throughput.step_floor(settings.v1_engine),
    }
    fit.throughput = throughput.estimate_from(fit.throughput_model, load)
    fit.cost_per_million = throughput.cost_per_million_output_tokens(
        fit.price_per_hour, fit.throughput.output_tokens_per_s
    )
    return fit


def evaluate_shape(
    facts: ModelFacts,
    shape: Shape,
    settings: EngineSettings,
    *,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    prices: Mapping[str, float] | None = None,
) -> ShapeFit:
    """Check one shape against the model: weights, KV cache for max_model_len, max_num_seqs, kernels, host RAM."""
    acc = ACCELERATORS.get(shape.accelerator_type)
    tp = tensor_parallel_size or shape.accelerator_count
    pp = pipeline_parallel_size or shape.node_count
    fit = ShapeFit(shape, tp, pp, fits=False, price_per_hour=shape_price(shape, prices))
    fit.max_model_len, fit.max_num_seqs = max_model_len or 0, max_num_seqs or 0  # what was asked, until planned
    where = shape.describe()
    if acc is None:
        fit.errors.append(
            f"{shape.accelerator_type} is not an accelerator this planner knows: use one of {sorted(ACCELERATORS)}"
        )
        return fit
    if tp * pp != shape.gpus:
        fit.errors.append(
            f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp} GPUs, but {where} has {shape.gpus}: "
            f"set serving.tensor_parallel_size to {shape.accelerator_count} (GPUs per node) and "
            f"serving.pipeline_parallel_size to {shape.node_count} (nodes), or leave both empty"
        )
        return fit
    if facts.attention_heads and facts.attention_heads % tp:
        fit.errors.append(
            f"{facts.attention_heads} attention heads do not split over tensor_parallel_size {tp} on {where}: "
            "pick a GPU count that divides the head count"
        )
        return fit
    if facts.kv_heads and tp > facts.kv_heads and tp % facts.kv_heads:
        fit.errors.append(f"{facts.kv_heads} KV heads do not replicate evenly over tensor_parallel_size {tp}")
        return fit
    quant = settings.quantization or facts.quantization
    if quant:
        key = "fp8" if "fp8" in quant else quant
        need = QUANT_MIN_CC.get(key, 0.0)
        if acc.compute_capability < need:
            fit.errors.append(
                f"{quant} kernels need compute capability {need} but {acc.name} has {acc.compute_capability}: "
                "pick a newer GPU (L4, A100, H100)"
            )
            return fit
        if key == "fp8" and not acc.native_fp8:
            fit.warnings.append(
                f"{acc.name} has no native FP8: the engine runs FP8 weights through weight-only (Marlin) kernels, "
                "slower than on L4/H100/H200"
            )
        if key in ("mxfp4", "nvfp4") and acc.name not in NATIVE_FP4:
            fit.warnings.append(
                f"{acc.name} has no FP4 tensor cores: the engine runs the {quant} weights through weight-only kernels "
                "(Marlin/Triton) with 16-bit compute; native FP4 is Blackwell's (B200, RTX PRO 6000)"
            )
    if not acc.bf16 and (facts.dtype == "bfloat16" or settings.dtype == "bfloat16"):
        if settings.dtype == "bfloat16":
            fit.errors.append(f"{acc.name} has no bfloat16: set serving.dtype to float16 or pick an L4/A100/H100")
            return fit
        fit.warnings.append(f"{acc.name} has no bfloat16: the engine casts the bfloat16 weights to float16")
    machine = MACHINE_TYPES.get(shape.machine_type)
    if machine is not None and settings.engine == "vllm" and settings.swap_space:
        swap = settings.swap_space * GiB * shape.accelerator_count
        host = machine.memory_gb * GB
        if swap > SWAP_LIMIT_SHARE * host:
            fit.errors.append(
                f"vLLM's swap space ({settings.swap_space} GiB x {shape.accelerator_count} GPUs) is more than 70% of "
                f"{machine.name}'s {machine.memory_gb:g} GB host memory (vLLM stops with 'Too large swap space'): "
                "lower serving.swap_space or pick a machine with more memory"
            )
            return fit

    context = facts.context_length or DEFAULT_TARGET_MAX_MODEL_LEN
    default_seqs = settings.default_max_num_seqs(acc.memory_bytes, acc.name)

    def budget(mml: int, seqs: int) -> MemoryBudget:
        return memory_budget(facts, acc, settings, tp=tp, pp=pp, max_model_len=mml, max_num_seqs=seqs)

    if max_model_len and facts.context_length and max_model_len > facts.context_length:
        fit.errors.append(
            f"max_model_len {max_model_len} is longer than the model's context length ({facts.context_length}): "
            f"lower serving.max_model_len to {facts.context_length} or less"
        )
        return fit

    probe_seqs = max_num_seqs or 1
    base = budget(max_model_len or min(context, DEFAULT_TARGET_MAX_MODEL_LEN), probe_seqs)
    headroom = base.budget - base.weights - base.non_torch - base.cuda_graphs
    if headroom <= base.activations:
        gb = base.weights / GB
        fit.memory = base
        fit.errors.append(
            f"the weights need {gb:.2f} GB per GPU on {where} but one {acc.name} gives "
            f"{base.budget / GB:.2f} GB at gpu_memory_utilization {settings.gpu_memory_utilization} "
            f"(less {(base.activations + base.non_torch + base.cuda_graphs) / GB:.2f} GB of activations and "
            "runtime overhead): pick a shape with more GPU memory, a quantized checkpoint, or raise "
            "serving.gpu_memory_utilization"
        )
        return fit

    # max_model_len first, at one sequence: what vLLM checks after profiling, independent of batch size.
    mml_limit = _largest(16, context, lambda n: budget(n, 1).kv_tokens >= n)
    target_mml = max_model_len or min(context, DEFAULT_TARGET_MAX_MODEL_LEN, max(mml_limit, 16))
    seqs_limit = _largest(1, MAX_NUM_SEQS_CEILING, lambda s: budget(target_mml, s).kv_tokens >= target_mml)
    fit.max_model_len_limit = max(0, mml_limit // 16 * 16 if mml_limit >= 16 else mml_limit)
    fit.max_num_seqs_limit = max(0, seqs_limit)

    if max_model_len and mml_limit < max_model_len:
        at = budget(max_model_len, probe_seqs)
        fit.memory = at
        fix = f"lower serving.max_model_len to {fit.max_model_len_limit}" if mml_limit >= 16 else "lower max_model_len"
        fit.errors.append(
            f"The model's max seq len ({max_model_len}) is larger than the maximum number of tokens that can be "
            f"stored in KV cache ({at.kv_tokens}) on {where}: {fix}, raise serving.gpu_memory_utilization "
            f"(now {settings.gpu_memory_utilization}), or choose a bigger shape"
        )
        return fit
    if mml_limit < 16:
        fit.memory = base
        fit.errors.append(f"no room for a KV cache on {where}: pick a shape with more GPU memory")
        return fit

    if max_num_seqs and seqs_limit < max_num_seqs:
        at = budget(target_mml, max_num_seqs)
        fit.memory = at
        vision = at.vision_encoder
        cause = (
            f"the vision encoder's profiling pass alone takes {vision / GB:.1f} GB at {max_num_seqs} sequences "
            f"({vision / max_num_seqs / GB:.2f} GB each)"
            if vision
            else f"The model's max seq len ({target_mml}) is larger than the maximum number of tokens that can be "
            f"stored in KV cache ({max(0, at.kv_tokens)}) once activations for {max_num_seqs} sequences are reserved"
        )
        fit.errors.append(
            f"max_num_seqs {max_num_seqs} does not fit on {where} (CUDA out of memory at startup): {cause}; "
            f"set serving.max_num_seqs to {max(seqs_limit, 1)} or less, or choose a bigger shape"
        )
        return fit

    seqs = max_num_seqs or min(default_seqs, seqs_limit)
    if not max_num_seqs and seqs < default_seqs:
        why = " because of the vision encoder's profiling memory" if facts.vision else ""
        fit.warnings.append(
            f"max_num_seqs {default_seqs} (the {settings.engine} default) would not fit on {where}{why}: "
            f"planned {seqs} instead"
        )
    final = budget(target_mml, seqs)
    fit.memory = final
    limit_at_seqs = _largest(16, context, lambda n: budget(n, seqs).kv_tokens >= n)
    fit.max_model_len_limit = limit_at_seqs // 16 * 16
    fit.max_model_len = target_mml
    fit.max_num_seqs = seqs
    fit.concurrent_sequences = final.kv_tokens // target_mml
    fit.fits = True
    return fit


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The preflight plan: model facts, memory, the shape, its price, quota per region, warnings and errors."""

    model: str
    revision: str = ""
    revision_sha: str = ""
    source: str = ""
    engine: str = "vllm"
    # The image that will serve (components/serving/images.yaml) and its engine's version: serving.image, else the
    # newest catalog image whose engine serves the model's architecture.
    serving_image: str = ""
    engine_version: str = ""
    weights_bytes: int = 0
    weights_gb: float = 0.0
    weights_source: str = ""
    served_weights_bytes: int = 0
    params: int = 0
    dtype: str = ""
    weight_dtypes: dict[str, int] = field(default_factory=dict)
    quantization: str | None = None
    quant_detail: str = ""
    architecture: str = ""
    model_type: str = ""
    layers: int = 0
    hidden_size: int = 0
    attention_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    context_length: int = 0
    moe_experts: int = 0
    moe_experts_per_token: int = 0
    active_params: int = 0
    layer_windows: list[int] = field(default_factory=list)
    vision: bool = False
    has_chat_template: bool = False
    gated: bool = False
    access: str = "ok"
    fits: bool = False
    hardware_mode: str = "auto"  # auto (chosen) or explicit (checked)
    machine_type: str = ""
    accelerator_type: str = ""
    accelerator_count: int = 0
    accelerator_memory_gb: float = 0.0
    node_count: int = 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    replica_count: int = 1
    max_replica_count: int = 1
    spot: bool = False
    max_model_len: int = 0
    max_num_seqs: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    kv_bytes_per_token: int = 0
    gpu_memory_utilization: float = 0.9
    price_per_hour_usd: float = 0.0
    objective: str = "cost_per_token"
    workload: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)  # the chosen shape's estimate at the workload
    throughput_model: dict[str, Any] = field(default_factory=dict)  # its inputs (vlp.components.planning.throughput.estimate_from)
    cost_per_million_output_tokens_usd: float = 0.0
    price_estimated: bool = False
    prices_note: str = PRICES_AS_OF
    reason: str = ""
    region: str = ""
    regions: list[str] = field(default_factory=list)
    quota: dict[str, dict[str, Any]] = field(default_factory=dict)
    quota_checked: bool = False
    target: str = "vertex"  # or cloud_run (vlp.components.cloud_run.service_spec.adapt_plan)
    cloud_run: dict[str, Any] = field(default_factory=dict)  # the Cloud Run instance, its prices and regions
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def shape(self) -> Shape:
        return Shape(self.machine_type, self.accelerator_type, self.accelerator_count, self.node_count)


def _alt(fit: ShapeFit) -> dict[str, Any]:
    s = fit.shape
    return {
        "machine_type": s.machine_type,
        "accelerator_type": s.accelerator_type,
        "accelerator_count": s.accelerator_count,
        "node_count": s.node_count,
        "tensor_parallel_size": fit.tp,
        "pipeline_parallel_size": fit.pp,
        "price_per_hour_usd": fit.price_per_hour,
        "max_model_len_limit": fit.max_model_len_limit,
        "max_num_seqs_limit": fit.max_num_seqs_limit,
        "kv_cache_tokens": fit.memory.kv_tokens if fit.memory else 0,
        "throughput": fit.throughput.to_dict() if fit.throughput else {},
        "cost_per_million_output_tokens_usd": fit.cost_per_million if fit.throughput else None,
        "shape": s.describe(),
    }


def _candidates(hardware: Any, include_legacy: bool) -> list[Shape]:
    shapes = catalog_shapes(include_legacy=include_legacy or bool(hardware.accelerator_type))
    if hardware.accelerator_type:
        shapes = [s for s in shapes if s.accelerator_type == hardware.accelerator_type]
        if not shapes:  # a GPU only offered in shapes left out of auto (B200, RTX PRO 6000): use them
            shapes = [
                s
                for s in catalog_shapes(include_legacy=True, auto_only=False)
                if s.accelerator_type == hardware.accelerator_type
            ]
    if hardware.accelerator_count:
        shapes = [s for s in shapes if s.accelerator_count == hardware.accelerator_count]
    return shapes


def _multihost_candidates(singles: list[Shape]) -> list[Shape]:
    out = []
    for s in singles:
        if s.accelerator_count == 8 and ACCELERATORS[s.accelerator_type].multihost:
            out.extend(Shape(s.machine_type, s.accelerator_type, 8, n) for n in range(2, MAX_NODES + 1))
    return out


def _in_regions(shape: Shape, regions: list[str] | None) -> bool:
    if not regions:
        return True
    offered = offered_regions(shape.machine_type, shape.accelerator_type)
    return offered is None or any(r in offered for r in regions)


def choose_serving_image(plan: Plan, facts: ModelFacts, serving: Any, target: str) -> bool:
    """Fill the plan's serving image and engine version; False (with the reason in plan.errors) when the chosen or
    named image's engine does not serve the model's architecture: refused before any weights are copied."""
    from vlp.components.serving.images import ImageChoiceError, choose_image, default_image, engine_name

    try:
        image = choose_image(serving.engine, target, facts.architecture, facts.model_type, serving.image)
    except ImageChoiceError as exc:
        plan.errors.append(f"{facts.repo}: {exc}")
        return False
    if image is None:
        assumed = default_image(serving.engine, target)
        plan.serving_image = serving.image
        plan.warnings.append(
            f"serving.image {serving.image} is not in the serving image catalog (components/serving/images.yaml): "
            f"its flags are rendered as for {assumed.label} and its architectures are not checked; pass what its "
            "engine needs in serving.extra_args"
        )
        return True
    plan.serving_image = image.image
    plan.engine_version = image.engine_version
    if facts.architecture and image.engine == "vllm" and image.serves(facts.architecture, facts.model_type) is None:
        plan.warnings.append(f"{facts.repo} names no architecture in config.json: not checked against {image.label}")
    slower = image.fallback_note(facts.model_type)
    if slower:
        plan.warnings.append(slower)
    if image.status == "frozen":
        plan.warnings.append(
            f"{engine_name(image.engine)} is in maintenance mode (bug fixes only since 2025-12-11, "
            "huggingface/text-generation-inference#3345): this image stays for existing configs; new configs "
            "should use serving.engine: vllm"
        )
    elif image.status == "kept":
        plan.warnings.append(
            f"{image.label} is an older image kept for models current {engine_name(image.engine)} no longer serves "
            f"({facts.architecture or facts.model_type}); it carries that engine version's flags and performance"
        )
    return True


def _multi_host_image(facts: ModelFacts, serving: Any, target: str) -> tuple[Any, str]:
    """The catalog image a replica over several nodes would serve with (serving.image, else the newest image with a
    multi-host launcher whose engine serves the architecture), and why there is none when no such image serves it.
    Whether the image, engine, machine and endpoint are on the documented path is _multi_host_outside's to say."""
    from vlp.components.serving.images import ImageChoiceError, catalog, choose_image

    if serving.engine != "vllm":
        return None, ""
    try:
        image = choose_image(
            serving.engine, target, facts.architecture, facts.model_type, serving.image, multi_host=True
        )
    except ImageChoiceError as exc:
        if serving.image:
            return None, str(exc)
        labels = [i.label for i in catalog() if i.multi_host and i.engine == serving.engine]
        return None, (
            f"no multi-host image in the catalog serves architecture {facts.architecture!r} "
            f"({', '.join(labels) or 'none'} does not)"
        )
    return image, ""


def _multi_host_outside(
    fit: ShapeFit, facts: ModelFacts, serving: Any, image: Any, why: str, target: str, dedicated: bool | None
) -> list[str]:
    """What keeps this multi-host shape off Google's documented path (serving.engines.multi_host_outside)."""
    from vlp.components.serving.engines import multi_host_outside

    s = fit.shape
    out = multi_host_outside(
        engine=serving.engine,
        image=image,
        image_uri=serving.image,
        target=target,
        machine_type=s.machine_type,
        accelerator_type=s.accelerator_type,
        accelerator_count=s.accelerator_count,
        nodes=s.node_count,
        tensor_parallel=fit.tp,
        pipeline_parallel=fit.pp,
        dedicated=dedicated is not False,
    )
    if why:  # no multi-host image serves the model: that says more than "has no launcher"
        out = [why] + [o for o in out if "multi-host launcher" not in o]
    return out


def _use_multi_host(plan: Plan, image: Any, dedicated: bool | None) -> None:
    """A plan over several nodes: the multi-host image, and what the user must know about the path."""
    from vlp.components.serving.engines import MULTI_HOST_PAGE

    previous = plan.serving_image
    plan.serving_image = image.image
    plan.engine_version = image.engine_version
    plan.warnings = [w for w in plan.warnings if not (previous and previous in w)]
    plan.warnings.append(
        f'multi-host serving is Preview ({MULTI_HOST_PAGE}: "subject to the Pre-GA Offerings Terms"): each replica '
        f"spans {plan.node_count} nodes through {image.label}'s Ray launcher, deployed with the v1beta1 API "
        "(machineSpec.multihostGpuNodeCount), and needs a dedicated endpoint"
        + ("" if dedicated else " (set endpoint.dedicated: true)")
    )


def plan_for_facts(
    facts: ModelFacts,
    serving: Any,
    hardware: Any,
    *,
    regions: list[str] | None = None,
    prices: Mapping[str, float] | None = None,
    include_legacy: bool = False,
    workload: Any = None,
    target: str = "vertex",
    dedicated: bool | None = None,
) -> Plan:
    """Choose (hardware auto) or check (explicit) a shape for the model under the config's serving settings.

    `auto` ranks the shapes that fit by hardware.objective: USD per 1M output tokens at `workload` (a config
    Workload; None = its defaults) by default, the hourly price, or the inter-token latency. When no single node
    holds the model, a replica over several nodes is planned on Google's documented multi-host path only (vLLM on
    the catalog's multi-host image, N x a3-highgpu-8g): `dedicated` is the config's endpoint.dedicated (False is an
    error there; None, `vlp plan --model`, a warning)."""
    settings = EngineSettings.from_serving(serving)
    objective = getattr(hardware, "objective", "cost_per_token")
    if workload is None:
        from vlp.components.config import Workload

        workload = Workload()

    def evaluate(shape: Shape, engine: EngineSettings | None = None, **kwargs: Any) -> ShapeFit:
        engine = engine or settings
        return with_throughput(evaluate_shape(facts, shape, engine, **kwargs), facts, engine, workload)

    def ranked(fits: Iterable[ShapeFit]) -> list[ShapeFit]:
        return sorted((f for f in fits if f.fits), key=lambda f: f.rank(objective))

    plan = Plan(
        model=facts.repo,
        revision=facts.revision,
        revision_sha=facts.revision_sha,
        source=facts.source,
        engine=settings.engine,
        weights_bytes=facts.weights_bytes,
        weights_gb=round(facts.weights_bytes / GB, 3),
        weights_source=facts.weights_source,
        served_weights_bytes=served_weight_bytes(facts, settings),
        params=facts.params,
        dtype=facts.dtype,
        weight_dtypes=dict(facts.weight_dtypes),
        quantization=serving.quantization or facts.quantization,
        quant_detail=facts.quant_detail,
        architecture=facts.architecture,
        model_type=facts.model_type,
        layers=facts.layers,
        hidden_size=facts.hidden_size,
        attention_heads=facts.attention_heads,
        kv_heads=facts.kv_heads,
        head_dim=facts.head_dim,
        context_length=facts.context_length,
        moe_experts=facts.moe_experts,
        moe_experts_per_token=facts.moe_experts_per_token,
        active_params=facts.active_params,
        layer_windows=list(facts.layer_windows),
        vision=facts.vision,
        has_chat_template=facts.has_chat_template,
        gated=facts.gated,
        access=facts.access,
        hardware_mode="auto" if hardware.is_auto else "explicit",
        replica_count=hardware.replica_count,
        max_replica_count=hardware.max_replica_count or hardware.replica_count,
        spot=hardware.spot,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        regions=list(regions or []),
        objective=objective,
        workload=workload.model_dump(),
    )
    if not choose_serving_image(plan, facts, serving, target):
        return plan
    # The engine version of the image that serves sets its defaults and per-step cost.
    settings = dataclasses.replace(settings, engine_version=plan.engine_version)
    if facts.quantization and serving.quantization and facts.quantization not in serving.quantization:
        plan.warnings.append(
            f"serving.quantization is {serving.quantization!r} but the checkpoint is {facts.quantization} "
            f"({facts.quant_detail}): the engine will refuse a mismatch; leave serving.quantization empty"
        )
    if facts.weights_source == "index total_size":
        plan.warnings.append("weight bytes come from model.safetensors.index.json (no shard headers were read)")
    if serving.max_model_len and facts.context_length and serving.max_model_len > facts.context_length:
        # The model's limit, not any shape's: said once, before per-shape checks bury it under their own reasons.
        plan.errors.append(
            f"serving.max_model_len {serving.max_model_len} is longer than {facts.repo}'s context length "
            f"({facts.context_length}): lower serving.max_model_len to {facts.context_length} or less"
        )
        return plan
    kw: dict[str, Any] = {
        "max_model_len": serving.max_model_len,
        "max_num_seqs": serving.max_num_seqs,
        "tensor_parallel_size": serving.tensor_parallel_size,
        "pipeline_parallel_size": serving.pipeline_parallel_size,
        "prices": prices,
    }

    if not hardware.is_auto:
        machine = MACHINE_TYPES.get(hardware.machine_type)
        nodes = serving.pipeline_parallel_size or 1
        shape = Shape(hardware.machine_type, hardware.accelerator_type, hardware.accelerator_count, nodes)
        if machine is None:
            plan.warnings.append(f"{hardware.machine_type} is not in the planner's catalog: only memory is checked")
        elif machine.accelerator != hardware.accelerator_type:
            plan.errors.append(
                f"{hardware.machine_type} comes with {machine.accelerator}, "
                f"not {hardware.accelerator_type or 'no GPU'}: "
                f"set hardware.accelerator_type to {machine.accelerator}"
            )
        elif hardware.accelerator_count not in machine.counts:
            plan.errors.append(
                f"{hardware.machine_type} takes {' or '.join(map(str, machine.counts))} x {machine.accelerator}, "
                f"not {hardware.accelerator_count}: fix hardware.accelerator_count"
            )
        if not hardware.accelerator_type:
            plan.errors.append(
                f"{hardware.machine_type} has no GPU: vLLM and TGI serve LLMs on GPUs; "
                "set hardware to auto or add a GPU"
            )
        multi_host = None
        if nodes > 1:
            multi_host, why = _multi_host_image(facts, serving, target)
            fit = ShapeFit(
                shape, serving.tensor_parallel_size or shape.accelerator_count, nodes, fits=False, price_per_hour=0.0
            )
            outside = _multi_host_outside(fit, facts, serving, multi_host, why, target, dedicated)
            if outside:
                from vlp.components.serving.engines import multi_host_refusal

                plan.errors.append(multi_host_refusal(facts.repo, nodes, nodes, outside))
                multi_host = None
        engine = dataclasses.replace(settings, engine_version=multi_host.engine_version) if multi_host else None
        chosen = evaluate(shape, engine, **kw)
        plan.reason = f"explicit shape from the config: {shape.describe()}"
        alts = [
            evaluate(s, **{**kw, "tensor_parallel_size": None, "pipeline_parallel_size": None})
            for s in catalog_shapes(include_legacy=include_legacy)
            if s != shape and _in_regions(s, regions)
        ]
        fitting = ranked(alts)
    else:
        singles = [s for s in _candidates(hardware, include_legacy) if _in_regions(s, regions)]
        if not singles:
            plan.errors.append(
                f"no catalog shape matches hardware {hardware.accelerator_type or ''} "
                f"x {hardware.accelerator_count or 'any'}"
                f" in regions {regions}: check hardware.accelerator_type/accelerator_count and placement.regions"
            )
            return plan
        fits = [evaluate(s, **kw) for s in singles]
        fitting = ranked(fits)
        spread = ""
        multi_host = None
        if not fitting and serving.tensor_parallel_size in (None, 8):
            # Nothing fits on one node: a replica over several nodes, on Google's documented multi-host path only
            # (serving.engines.multi_host_outside); elsewhere, say whether it would have fit and why it is refused.
            image, why = _multi_host_image(facts, serving, target)
            engine = dataclasses.replace(settings, engine_version=image.engine_version) if image else None
            fits_mh = ranked(
                [
                    evaluate(s, engine, **{**kw, "tensor_parallel_size": 8, "pipeline_parallel_size": None})
                    for s in _multihost_candidates(singles)
                ]
            )
            documented = [f for f in fits_mh if not _multi_host_outside(f, facts, serving, image, why, target, True)]
            best = documented[0] if documented else (fits_mh[0] if fits_mh else None)
            outside = _multi_host_outside(best, facts, serving, image, why, target, dedicated) if best else []
            if best and not outside:
                multi_host, fitting = image, documented
            elif best:
                spread = (
                    f"; it would fit spread over {best.shape.node_count} x {best.shape.machine_type} nodes, but that is "
                    "outside Google's documented multi-host path: " + "; ".join(outside) + ". Use one node with "
                    "more GPU memory (e.g. 8 x H200, a3-ultragpu-8g), a quantized checkpoint, or a shorter "
                    "serving.max_model_len"
                )
        if not fitting:
            # The candidate that got furthest: most GPU memory, then the longest context that fits, then the
            # cheapest, so a host-memory refusal on the smallest machine does not hide the real limit.
            best = max(
                fits,
                key=lambda f: (
                    f.shape.gpus * ACCELERATORS[f.shape.accelerator_type].memory_bytes,
                    f.max_model_len_limit,
                    -f.price_per_hour,
                ),
            )
            # The reason most single-node shapes give is the fix (e.g. max_model_len beyond the model's
            # context); the largest machine's reason is only the fallback.
            from collections import Counter

            # Reasons differ only in the shape they name; compare them with it taken out.
            def _general(f: ShapeFit, e: str) -> str:
                return e.replace(f" on {f.shape.describe()}", "")

            reasons = Counter(_general(f, e) for f in fits[: len(singles)] for e in dict.fromkeys(f.errors))
            common, count = reasons.most_common(1)[0] if reasons else ("", 0)
            where = "shape"
            if hardware.accelerator_type:
                where = f"{hardware.accelerator_type} x {hardware.accelerator_count or 'any count'} shape"
            if count > len(singles) // 2:
                plan.errors.append(f"{facts.repo} fits no {where}: {common}{spread}")
            elif len({f.shape.accelerator_type for f in fits}) == 1 and best.errors:
                plan.errors.append(
                    f"{facts.repo} fits no {best.shape.accelerator_type} shape (best candidate: "
                    f"{best.shape.describe()}): " + "; ".join(best.errors) + spread
                )
            else:
                plan.errors.append(
                    f"{facts.repo} fits no shape in the catalog (largest tried: {best.shape.describe()}): "
                    + "; ".join(best.errors)
                    + spread
                )
            _record_rejected(plan, fits)
            _fill_facts_only(plan, best)
            return plan
        chosen = fitting[0]
        fitting = fitting[1:]
        nxt = f"; next: {_figures(fitting[0])}" if fitting else ""
        if fitting and objective == "cost_per_token" and fitting[0].cost_per_million <= 1.15 * chosen.cost_per_million:
            nxt += " (within 15%, inside the estimate's accuracy: `vlp bench` both to decide)"
        what = _OBJECTIVE_WORDS[objective].format(workload=_describe_workload(workload))
        plan.reason = f"{what}: {_figures(chosen)}{nxt}"
        if multi_host:
            plan.reason = f"no single node holds the model; on Google's documented multi-host path, {plan.reason}"
        _record_rejected(plan, fits)

    _fill_from_fit(plan, chosen)
    if multi_host:
        _use_multi_host(plan, multi_host, dedicated)
    # One row per GPU layout (the cheapest machine for it): g2-standard-8/12/16 differ only in host size.
    seen = {(chosen.shape.accelerator_type, chosen.shape.accelerator_count, chosen.shape.node_count)}
    unique = []
    for f in fitting:
        key = (f.shape.accelerator_type, f.shape.accelerator_count, f.shape.node_count)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    plan.alternatives = [_alt(f) for f in unique[:8]]
    if chosen.fits and not hardware.is_auto and fitting and fitting[0].rank(objective) < chosen.rank(objective):
        plan.warnings.append(
            f"a shape that does better by {objective} also fits: {_figures(fitting[0])} (this one: {_figures(chosen)})"
        )
    if not facts.has_chat_template and not serving.chat_template:
        plan.warnings.append(
            f"{facts.repo} has no chat template: /v1/chat/completions needs one; set serving.chat_template"
        )
    return plan


_OBJECTIVE_WORDS = {
    "cost_per_token": "lowest cost per output token at the workload ({workload})",
    "cost_per_hour": "cheapest fitting shape per hour",
    "latency": "lowest inter-token latency at the workload ({workload})",
}


def _describe_workload(workload: Any) -> str:
    flight = "as many as the KV cache holds" if workload.concurrency == "max" else f"{workload.concurrency} in flight"
    return f"{workload.input_tokens} tokens in, {workload.output_tokens} out, {flight}"


def _figures(fit: ShapeFit) -> str:
    """A shape with its price and, when estimated, its throughput and cost per token."""
    text = f"{fit.shape.describe()} at ${fit.price_per_hour:.2f}/h"
    if fit.throughput:
        t = fit.throughput
        text += (
            f", ~{t.output_tokens_per_s:,.0f} output tokens/s, {t.itl_s * 1000:.0f} ms/token, "
            f"${fit.cost_per_million:.2f}/1M output tokens"
        )
    return text


def _record_rejected(plan: Plan, fits: list[ShapeFit]) -> None:
    # The largest shape of each GPU type that did not fit, with the reason: answers "why not 8 x H100?".
    biggest: dict[str, ShapeFit] = {}
    for f in fits:
        if f.fits or not f.errors:
            continue
        key = f.shape.accelerator_type
        if key not in biggest or f.shape.gpus > biggest[key].shape.gpus:
            biggest[key] = f
    plan.rejected = [
        {
            "shape": f.shape.describe(),
            "machine_type": f.shape.machine_type,
            "accelerator_type": f.shape.accelerator_type,
            "accelerator_count": f.shape.accelerator_count,
            "node_count": f.shape.node_count,
            "reason": f.errors[0],
        }
        for f in sorted(biggest.values(), key=lambda f: f.price_per_hour)
    ]


def _fill_facts_only(plan: Plan, fit: ShapeFit) -> None:
    plan.fits = False
    if fit.memory:
        plan.kv_bytes_per_token = fit.memory.kv_bytes_per_token


def _fill_from_fit(plan: Plan, fit: ShapeFit) -> None:
    s = fit.shape
    machine = MACHINE_TYPES.get(s.machine_type)
    acc = ACCELERATORS.get(s.accelerator_type)
    plan.machine_type = s.machine_type
    plan.accelerator_type = s.accelerator_type
    plan.accelerator_count = s.accelerator_count
    plan.accelerator_memory_gb = round(acc.memory_gb, 2) if acc else 0.0
    plan.node_count = s.node_count
    plan.tensor_parallel_size = fit.tp
    plan.pipeline_parallel_size = fit.pp
    plan.price_per_hour_usd = round(fit.price_per_hour * plan.replica_count, 4)
    if fit.throughput:
        plan.throughput = fit.throughput.to_dict()
        plan.throughput_model = dict(fit.throughput_model)
        plan.cost_per_million_output_tokens_usd = fit.cost_per_million
    plan.price_estimated = bool(machine and machine.price_estimated)
    if plan.price_estimated:
        plan.warnings.append(f"{s.machine_type} has no recorded list price: ${fit.price_per_hour:.2f}/h is an estimate")
    plan.max_model_len = fit.max_model_len
    plan.max_num_seqs = fit.max_num_seqs
    plan.limits = {
        "max_model_len": fit.max_model_len_limit,
        "max_num_seqs": fit.max_num_seqs_limit,
        "concurrent_sequences": fit.concurrent_sequences,
        "kv_cache_tokens": fit.memory.kv_tokens if fit.memory else 0,
    }
    if fit.memory:
        plan.memory = fit.memory.to_dict()
        plan.kv_bytes_per_token = fit.memory.kv_bytes_per_token
    plan.fits = fit.fits and not plan.errors
    plan.errors.extend(fit.errors)
    plan.warnings.extend(fit.warnings)


def plan_model(
    model: str,
    engine: str = "vllm",
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    machine_type: str | None = None,
    accelerator_type: str | None = None,
    accelerator_count: int | None = None,
    *,
    revision: str = "main",
    gpu_memory_utilization: float = 0.9,
    dtype: str = "auto",
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    enforce_eager: bool = False,
    swap_space: int | None = None,
    images_per_prompt: int = 1,
    chat_template: str | None = None,
    spot: bool = False,
    replica_count: int = 1,
    regions: list[str] | None = None,
    prices: Mapping[str, float] | None = None,
    include_legacy: bool = False,
    endpoint: str = "",
    token: str | None = None,
    input_tokens: int = 1000,
    output_tokens: int = 250,
    concurrency: int | str = 16,
    objective: str = "cost_per_token",
    image: str = "",
) -> Plan:
    """`vlp plan --model REPO_OR_DIR`: the hardware a model needs and what it costs; no quota, no project."""
    from vlp.components.config import Hardware, Serving, Workload

    serving = Serving(
        engine=engine,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        enforce_eager=enforce_eager,
        swap_space=swap_space,
        image=image,
        limit_mm_per_prompt={"image": images_per_prompt},
        chat_template=chat_template,
    )
    hardware = Hardware(
        machine_type=machine_type or "auto",
        accelerator_type=accelerator_type or "",
        accelerator_count=accelerator_count or 0,
        spot=spot,
        replica_count=replica_count,
        objective=objective,
    )
    workload = Workload(input_tokens=input_tokens, output_tokens=output_tokens, concurrency=concurrency)
    try:
        facts = read_model_facts(model, revision=revision, endpoint=endpoint, token=token)
    except ModelAccessError as exc:
        return Plan(model=model, revision=revision, engine=engine, errors=[str(exc)], access="denied")
    return plan_for_facts(
        facts, serving, hardware, regions=regions, prices=prices, include_legacy=include_legacy, workload=workload
    )
