"""The Cloud Run plan: a plan for one GPU of the instance's type turned into the instance shape, its price and its
checks (GPUs, regions and prices are in vlp.components.planning.catalog)."""

from __future__ import annotations

from typing import Any

from vlp.components.planning.catalog import (
    RUN_CPU_PER_SECOND,
    RUN_GIB_PER_SECOND,
    RUN_GPUS,
    RUN_PRICES_NOTE,
    instance_shape,
)

# With weights: copy the DLC copies them into /tmp, which is in memory: keep a quarter of the instance for TGI
# itself (tokenizer, router, CUDA context). Unverified margin.
WEIGHTS_MEMORY_SHARE = 0.75


def price_per_second(spec: Any) -> float:
    """USD per second of one instance (CPU always allocated, its memory and its GPU)."""
    gpu = RUN_GPUS[spec.gpu_type]
    gpu_price = gpu.price_per_second_zonal if spec.zonal_redundancy else gpu.price_per_second
    return spec.cpu * RUN_CPU_PER_SECOND + spec.memory_gib * RUN_GIB_PER_SECOND + gpu_price


def adapt_plan(plan: Any, cfg: Any) -> None:
    """Turn a plan for one GPU of the instance's type into the Cloud Run shape: price per instance, instances,
    the weights in instance memory (weights: copy) and the TGI batch beside the service's concurrency."""
    spec = cfg.cloud_run
    gpu = RUN_GPUS[spec.gpu_type]
    per_s = price_per_second(spec)
    for key, value in instance_shape(spec.gpu_type).items():
        setattr(plan, key, value)
    plan.replica_count = spec.min_instances
    plan.max_replica_count = spec.max_instances
    plan.price_per_hour_usd = round(per_s * 3600, 4)
    plan.prices_note = RUN_PRICES_NOTE
    plan.price_estimated = spec.gpu_type != "nvidia-l4" or spec.zonal_redundancy
    plan.alternatives = []
    plan.target = "cloud_run"
    tokens_per_s = float((plan.throughput or {}).get("output_tokens_per_s") or 0.0)
    if tokens_per_s:
        plan.cost_per_million_output_tokens_usd = round(per_s / tokens_per_s * 1e6, 4)
    plan.cloud_run = {
        "gpu_type": spec.gpu_type,
        "cpu": spec.cpu,
        "memory": spec.memory,
        "min_instances": spec.min_instances,
        "max_instances": spec.max_instances,
        "concurrency": spec.concurrency,
        "zonal_redundancy": spec.zonal_redundancy,
        "weights": spec.weights,
        "price_per_second_usd": round(per_s, 7),
        "price_per_hour_usd": round(per_s * 3600, 4),
        "max_price_per_hour_usd": round(per_s * 3600 * spec.max_instances, 4),
        "idle_price_per_hour_usd": round(per_s * 3600 * spec.min_instances, 4),
        "prices_note": RUN_PRICES_NOTE,
        "regions_offering_gpu": list(gpu.regions),
    }
    plan.reason = (
        f"Cloud Run: 1 x {gpu.accelerator} per instance, {spec.cpu} CPU / {spec.memory}, {spec.min_instances}.."
        f"{spec.max_instances} instances, {spec.concurrency} requests each; ${per_s:.7f}/s per instance "
        f"(${per_s * 3600:.2f}/h), nothing while scaled to zero"
    )
    memory_bytes = spec.memory_gib * 2**30
    tgi = cfg.serving.engine == "tgi"  # vLLM streams gs:// into GPU memory: no copy in the instance's memory
    if tgi and spec.weights == "copy" and plan.served_weights_bytes > WEIGHTS_MEMORY_SHARE * memory_bytes:
        plan.errors.append(
            f"with cloud_run.weights: copy the TGI DLC copies the {plan.served_weights_bytes / 1e9:.1f} GB of weights "
            f"into /tmp, which Cloud Run keeps in the instance's {spec.memory} of memory (more than "
            f"{WEIGHTS_MEMORY_SHARE:.0%} of it): raise cloud_run.memory, or set cloud_run.weights: mount"
        )
    seqs = int(plan.max_num_seqs or 0)
    if seqs and spec.concurrency > seqs:
        plan.warnings.append(
            f"cloud_run.concurrency {spec.concurrency} is above TGI's --max-concurrent-requests {seqs}: requests "
            "beyond it are refused with 429; lower cloud_run.concurrency or raise serving.max_num_seqs"
            if tgi
            else f"cloud_run.concurrency {spec.concurrency} is above vLLM's --max-num-seqs {seqs}: requests beyond it "
            "wait in vLLM's queue; lower cloud_run.concurrency or raise serving.max_num_seqs"
        )
    plan.regions = [r for r in plan.regions if r in gpu.regions] or plan.regions
