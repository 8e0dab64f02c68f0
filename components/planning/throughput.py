"""The throughput model: output tokens/s, time to first token and inter-token latency of a model on a shape at a
workload, and what a million output tokens costs there.

A roofline with calibrated efficiencies (figures and measurements: ../shared/research/throughput.md):
- decode step = max(bytes read / HBM bandwidth, FLOPs / compute): every step reads the weights of one GPU's
  shard and the KV cache of the sequences in the batch; at low concurrency the bandwidth term binds, at high
  concurrency compute (or the KV cache, which caps the batch) does;
- prefill (the prompt) is compute-bound: 2 x active parameters FLOPs per prompt token;
- FP8 runs at FP8 speed only on GPUs with native FP8 (L4, H100, H200, B200); elsewhere (A100) FP8 and INT4
  checkpoints run weight-only: fewer bytes read, 16-bit compute;
- tensor parallel splits both terms over the GPUs of a node at an all-reduce cost per doubling; pipeline
  parallel across nodes adds a bubble; MoE models compute with their active parameters only.
The efficiencies are fitted to published TensorRT-LLM rows (CALIBRATION, checked by tests/test_throughput.py):
estimates land within a factor of 2 of each, and vLLM and TGI usually run below TensorRT-LLM. Later rows for
current MoE models (Qwen3-235B-A22B, Llama 4 Maverick: HELD_OUT_ROWS) are checked against the same constants,
not fitted to them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Datasheet figures per GPU, dense: HBM TB/s, BF16 TFLOP/s, FP8 TFLOP/s (0 = no FP8 compute). NVIDIA datasheets
# for L4, A100, H100, H200 and the HGX B200 table, as collected in the research note (2026-12).
GPU_SPECS: dict[str, tuple[float, float, float]] = {
    "NVIDIA_L4": (0.300, 121.0, 242.5),
    "NVIDIA_TESLA_A100": (1.555, 312.0, 0.0),
    "NVIDIA_A100_80GB": (2.039, 312.0, 0.0),
    "NVIDIA_H100_80GB": (3.35, 989.0, 1979.0),
    "NVIDIA_H100_MEGA_80GB": (3.35, 989.0, 1979.0),
    "NVIDIA_H200_141GB": (4.8, 989.0, 1979.0),
    "NVIDIA_B200": (7.7, 2250.0, 4500.0),
    # Not in the note's sources (unverified): Blackwell RTX PRO 6000 (GDDR7 1.79 TB/s), Turing T4, Volta V100.
    "NVIDIA_RTX_PRO_6000": (1.79, 250.0, 500.0),
    "NVIDIA_TESLA_T4": (0.32, 65.0, 0.0),
    "NVIDIA_TESLA_V100": (0.9, 125.0, 0.0),
    # The local stack's model server (`transformers serve` on this machine's CPU): nominal figures for a small
    # x86 host, so a local run's benchmark shows its estimate beside what it measured.
    "LOCAL_CPU": (0.02, 0.2, 0.0),
}
# The local catalog: the local model server's "GPU" and its nominal price, so local runs exercise the cost figures.
LOCAL_SERVER = "LOCAL_CPU"
LOCAL_PRICE_PER_HOUR = 0.05

# Fitted to CALIBRATION: the share of datasheet bandwidth a decode step gets (the note: measured inter-token
# latencies land at 50-65%), of compute in decode and in prefill, and the cost of tensor / pipeline parallelism.
BANDWIDTH_EFFICIENCY = 0.6
DECODE_COMPUTE_EFFICIENCY = 0.45
PREFILL_COMPUTE_EFFICIENCY = 0.6
TP_OVERHEAD_PER_DOUBLING = 0.25  # all-reduces per layer: 2 GPUs +25%, 4 GPUs +50%, 8 GPUs +75%
# A decode step costs at least the engine's per-step CPU work (scheduling, input preparation, sampling, the
# GPU->CPU copy of the sampled tokens): vLLM's maintainers measured about 4 ms of GPU idle per step, 5-13 ms in
# all (vllm-project/vllm#6854, the multi-step scheduling RFC, on the 0.5 engine the pinned 0.6.2 image runs with
# one step per schedule). Without the floor a tiny model's roofline step is a fraction of a millisecond and looks
# several times faster on a bigger GPU than any engine serves it.
DECODE_STEP_FLOOR_S = 0.004
# vLLM's V1 engine overlaps that CPU work with the GPU (async scheduling, persistent batch, piecewise CUDA graphs:
# blog 2025-01-27 "vLLM V1", "GPU execution time ... as low as ~5 ms" for Llama-8B on H100 including the model), and
# 2026 work targets decode steps of ~2 ms and less (vllm-project/vllm#46698): 2 ms here, an estimate no published
# measurement settles (unverified until `vlp bench` on the pinned image).
V1_DECODE_STEP_FLOOR_S = 0.002


def step_floor(v1_engine: bool) -> float:
    """The per-step floor of the engine version that serves."""
    return V1_DECODE_STEP_FLOOR_S if v1_engine else DECODE_STEP_FLOOR_S


PP_BUBBLE = 0.15  # per extra pipeline stage (multi-host)

# Published measurements (total output tokens/s at infinite request rate, trtllm-bench): (row, model, precision,
# GPU, tp, input, output, measured). Rows A, B, G, N (perf-overview.md@258c7540, 3000 requests) are the ones the
# efficiencies were fitted to; rows Q and M (current MoE models, a later perf-overview.md) were added after the fit
# and are checked with the constants unchanged: a held-out check (HELD_OUT_ROWS). Sources: CALIBRATION_SOURCES.
CALIBRATION: tuple[tuple[str, str, str, str, int, int, int, float], ...] = (
    ("A", "llama-3.1-8b", "fp8", "NVIDIA_H100_80GB", 1, 1000, 1000, 15245.0),
    ("A", "llama-3.1-8b", "fp8", "NVIDIA_H100_80GB", 1, 128, 2048, 21109.0),
    ("A", "llama-3.1-8b", "fp8", "NVIDIA_H100_80GB", 1, 2048, 128, 3557.0),
    ("B", "llama-3.1-8b", "bf16", "NVIDIA_A100_80GB", 1, 1000, 1000, 3787.0),
    ("B", "llama-3.1-8b", "bf16", "NVIDIA_A100_80GB", 1, 128, 2048, 5256.0),
    ("G", "llama-3.1-70b", "fp8", "NVIDIA_H100_80GB", 4, 1000, 1000, 7431.0),
    ("G", "llama-3.1-70b", "fp8", "NVIDIA_H100_80GB", 2, 1000, 1000, 4391.0),
    ("G", "llama-3.1-70b", "fp8", "NVIDIA_H100_80GB", 8, 1000, 1000, 11451.0),
    ("N", "mixtral-8x7b", "fp8", "NVIDIA_H100_80GB", 2, 1000, 1000, 15771.0),
    ("N", "mixtral-8x7b", "fp8", "NVIDIA_H100_80GB", 1, 1000, 1000, 6869.0),
    ("N", "mixtral-8x7b", "fp8", "NVIDIA_H100_80GB", 4, 1000, 1000, 27785.0),
    ("N", "mixtral-8x7b", "bf16", "NVIDIA_A100_80GB", 2, 1000, 1000, 3155.0),
    # Every H100 / H200 FP8 cell the later file publishes for these two models at the input/output pairs the rows
    # above use (1000/1000, 128/2048, 2048/128; the H100 columns leave 2048/128 empty). ModelOpt FP8 checkpoints
    # (nvidia/Qwen3-235B-A22B-FP8, nvidia/Llama-4-Maverick-17B-128E-Instruct-FP8), PyTorch backend, TP 8 with the
    # file's MoE options (expert parallel, attention data parallel), which this model does not distinguish from TP.
    ("Q", "qwen3-235b-a22b", "fp8", "NVIDIA_H100_80GB", 8, 1000, 1000, 14898.0),
    ("Q", "qwen3-235b-a22b", "fp8", "NVIDIA_H100_80GB", 8, 128, 2048, 19658.0),
    ("Q", "qwen3-235b-a22b", "fp8", "NVIDIA_H200_141GB", 8, 1000, 1000, 23789.0),
    ("Q", "qwen3-235b-a22b", "fp8", "NVIDIA_H200_141GB", 8, 128, 2048, 42821.0),
    ("Q", "qwen3-235b-a22b", "fp8", "NVIDIA_H200_141GB", 8, 2048, 128, 3331.0),
    ("M", "llama-4-maverick", "fp8", "NVIDIA_H100_80GB", 8, 1000, 1000, 9677.0),
    ("M", "llama-4-maverick", "fp8", "NVIDIA_H100_80GB", 8, 128, 2048, 10829.0),
    ("M", "llama-4-maverick", "fp8", "NVIDIA_H200_141GB", 8, 1000, 1000, 31782.0),
    ("M", "llama-4-maverick", "fp8", "NVIDIA_H200_141GB", 8, 128, 2048, 40572.0),
    ("M", "llama-4-maverick", "fp8", "NVIDIA_H200_141GB", 8, 2048, 128, 7307.0),
)
_OLD_OVERVIEW = "NVIDIA/TensorRT-LLM docs/source/performance/perf-overview.md@258c7540"
_NEW_OVERVIEW = "NVIDIA/TensorRT-LLM docs/source/performance/perf-overview.md@00f37686aa854010d68bcbd0f4ab000221541ca6"
CALIBRATION_SOURCES: dict[str, str] = {
    "A": f"{_OLD_OVERVIEW}, Llama 3.1 8B FP8, H100",
    "B": f"{_OLD_OVERVIEW}, Llama 3.1 8B FP16, A100 80GB",
    "G": f"{_OLD_OVERVIEW}, Llama 3.1 70B FP8, H100",
    "N": f"{_OLD_OVERVIEW}, Mixtral 8x7B FP8 H100, FP16 A100",
    "Q": f"{_NEW_OVERVIEW}, table 'Qwen3-235B-A22B', columns H200 TP8 (FP8) and H100 TP8 (FP8)",
    "M": f"{_NEW_OVERVIEW}, table 'Llama 4 Maverick', columns H200 TP8 (FP8) and H100 TP8 (FP8)",
}
HELD_OUT_ROWS = ("Q", "M")  # published after the fit; the constants were not refitted to them


@dataclass(frozen=True)
class ServedModel:
    """What the throughput model needs of a model as served: sizes and bytes, not names."""

    active_params: int  # parameters one token computes with (MoE: shared + the experts it is routed to)
    weight_bytes: int  # the whole model as it sits in GPU memory
    kv_bytes_per_token: int  # the whole model's KV cache per token (all layers, all KV heads)
    low_precision_compute: bool  # FP8 weights and activations (W8A8): FP8 tensor cores where the GPU has them
    # MoE: the routed experts' share of weight_bytes, and how many a token picks of how many; a decode step reads
    # only the experts its batch routes to (architectures.expected_experts_touched).
    expert_bytes: int = 0
    experts: int = 0
    experts_per_token: int = 0

    def bytes_read(self, batch: int) -> float:
        """The weight bytes one decode step of `batch` sequences reads: all but the experts, plus those touched."""
        if not (self.expert_bytes and self.experts and self.experts_per_token):
            return float(self.weight_bytes)
        from vlp.components.planning.architectures import expected_experts_touched

        touched = expected_experts_touched(self.experts, self.experts_per_token, batch) / self.experts
        return self.weight_bytes - self.expert_bytes + self.expert_bytes * touched


@dataclass(frozen=True)
class Workload:
    """Tokens per request and requests in flight; concurrency 0 = as many as the KV cache holds."""

    input_tokens: int = 1000
    output_tokens: int = 250
    concurrency: int = 0


@dataclass
class Estimate:
    """The model's figures for one shape at one workload."""

    input_tokens: int
    output_tokens: int
    concurrency: int  # sequences in flight (a `max` workload: what the KV cache holds)
    output_tokens_per_s: float  # the replica's total
    ttft_s: float
    itl_s: float
    bound: str  # what limits decode: "bandwidth", "compute", "step overhead", or "kv cache" / "max_num_seqs"
    # when one caps the batch below the requests in flight
    holds_workload: bool  # every request in flight has its KV cache (always true for a `max` workload)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def active_params(params: int, layers: int, hidden: int, intermediate: int, experts: int, per_token: int) -> int:
    """MoE: the routed experts' MLPs a token skips come off the total (3 matrices of hidden x intermediate)."""
    if experts <= 1 or not per_token:
        return params
    skipped = layers * 3 * hidden * intermediate * (experts - per_token)
    return max(1, params - skipped)


def estimate(
    model: ServedModel,
    accelerator: str,
    *,
    gpus: int,
    tp: int,
    pp: int = 1,
    kv_cache_tokens: int,
    max_num_seqs: int,
    workload: Workload,
    step_floor_s: float = DECODE_STEP_FLOOR_S,
) -> Estimate:
    """Throughput and latency for one replica. `kv_cache_tokens` is what one GPU's KV cache holds (every GPU
    holds its share of every sequence), `max_num_seqs` the engine's batch limit."""
    bandwidth_tb, bf16, fp8 = GPU_SPECS.get(accelerator, (1.0, 100.0, 0.0))
    flops = (fp8 if model.low_precision_compute and fp8 else bf16) * 1e12
    bandwidth = bandwidth_tb * 1e12 * BANDWIDTH_EFFICIENCY
    overhead = (1 + TP_OVERHEAD_PER_DOUBLING * math.log2(max(1, tp))) * (1 + PP_BUBBLE * (pp - 1))

    seq_tokens = workload.input_tokens + workload.output_tokens
    holds = max(1, kv_cache_tokens // max(1, seq_tokens))
    cap = min(holds, max(1, max_num_seqs))
    batch = min(workload.concurrency, cap) if workload.concurrency else cap
    # What caps the batch below what is asked for (or, for `max`, below the engine's own limit): the KV cache when
    # it holds fewer sequences than max_num_seqs lets in, else max_num_seqs itself.
    if workload.concurrency:
        capped_by = ("kv cache" if holds < max_num_seqs else "max_num_seqs") if workload.concurrency > cap else ""
    else:
        capped_by = "kv cache" if holds <= max_num_seqs else ""

    def step_time(b: int) -> tuple[float, str]:
        context = workload.input_tokens + workload.output_tokens / 2  # the average sequence length while decoding
        read = (model.bytes_read(b) + b * context * model.kv_bytes_per_token) / gpus
        memory_s = read / bandwidth
        compute_s = b * 2 * model.active_params / (gpus * flops * DECODE_COMPUTE_EFFICIENCY)
        roofline = max(memory_s, compute_s) * overhead
        if roofline < step_floor_s:
            return step_floor_s, "step overhead"
        return roofline, "bandwidth" if memory_s >= compute_s else "compute"

    step, bound = step_time(batch)
    prefill_s = workload.input_tokens * 2 * model.active_params / (gpus * flops * PREFILL_COMPUTE_EFFICIENCY)
    prefill_s = prefill_s * overhead + model.weight_bytes / gpus / bandwidth  # one pass reads the weights too
    # Continuous batching: over one request's life the batch spends `output_tokens` decode steps and, spread
    # over the same time, the prefill of `batch` new prompts.
    cycle = workload.output_tokens * step + batch * prefill_s
    tokens_per_s = batch * workload.output_tokens / cycle
    # A new request waits for its prompt's pass, slowed by the decode steps it is interleaved with.
    ttft = prefill_s + (step if batch > 1 else 0.0)
    itl = step * (1 + batch * prefill_s / max(cycle, 1e-9))
    return Estimate(
        input_tokens=workload.input_tokens,
        output_tokens=workload.output_tokens,
        concurrency=batch,
        output_tokens_per_s=round(tokens_per_s, 1),
        ttft_s=round(ttft, 4),
        itl_s=round(itl, 5),
        bound=capped_by or bound,
        holds_workload=not (workload.concurrency and workload.concurrency > cap),
    )


def estimate_from(inputs: dict[str, Any], workload: Workload) -> Estimate:
    """estimate() from the plan's `throughput_model` dict (what the planner used), at another workload: how the
    benchmark puts the estimate beside what it measured at each concurrency."""
    fields = ("active_params", "weight_bytes", "kv_bytes_per_token", "low_precision_compute")
    moe = ("expert_bytes", "experts", "experts_per_token")  # absent from plans made before MoE was modelled
    model = ServedModel(**{k: inputs[k] for k in fields}, **{k: int(inputs.get(k) or 0) for k in moe})
    return estimate(
        model,
        str(inputs["accelerator"]),
        gpus=int(inputs["gpus"]),
        tp=int(inputs["tp"]),
        pp=int(inputs.get("pp", 1)),
        kv_cache_tokens=int(inputs["kv_cache_tokens"]),
        max_num_seqs=int(inputs["max_num_seqs"]),
        workload=workload,
        step_floor_s=float(inputs.get("step_floor_s") or DECODE_STEP_FLOOR_S),
    )


def cost_per_million_output_tokens(price_per_hour: float, output_tokens_per_s: float) -> float:
    """USD per 1M output tokens at a sustained rate: the replica's hourly price over what it serves in an hour."""
    if output_tokens_per_s <= 0:
        return math.inf
    return round(price_per_hour / (output_tokens_per_s * 3600) * 1e6, 4)


# The calibration rows' models: (params, layers, hidden, intermediate, KV heads, head dim, vocab, experts, top-k).
_CALIBRATION_MODELS = {
    "llama-3.1-8b": (8_030_261_248, 32, 4096, 14336, 8, 128, 128256, 0, 0),
    "llama-3.1-70b": (70_553_706_496, 80, 8192, 28672, 8, 128, 128256, 0, 0),
    "mixtral-8x7b": (46_702_792_704, 32, 4096, 14336, 8, 128, 32000, 8, 2),
}
# Current MoE models by their config.json fields (those architectures.layout reads), so routed experts, shared
# experts and dense layers count as the real config lays them out.
_CALIBRATION_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-235B-A22B config.json (model card: 235B total, 22B activated; 94 layers, 64 Q / 4 KV heads, 128
    # experts, 8 activated); the same shapes in zyzshishui/slime scripts/models/qwen3-235B-A22B.sh. Every layer MoE,
    # no shared expert.
    "qwen3-235b-a22b": {
        "model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 94,
        "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "tie_word_embeddings": False,
    },
    # meta-llama/Llama-4-Maverick-17B-128E-Instruct config.json, text_config (model card: 17B active, 128 experts,
    # 400B total); the same fields, cut to 2 of 48 layers, in NVIDIA/TensorRT-LLM
    # tests/unittest/_torch/modeling/test_modeling_llama_min_latency.py. MoE every 2nd layer (128 routed experts +
    # 1 shared of 8192, top-1), dense layers of 16384. Its chunked attention (8192 tokens) does not bind at these
    # lengths; the vision tower is left out.
    "llama-4-maverick": {
        "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 48,
        "num_local_experts": 128, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "vocab_size": 202048,
        "tie_word_embeddings": False,
    },
}  # fmt: skip
_GPU_MEMORY = {"NVIDIA_H100_80GB": 80e9, "NVIDIA_A100_80GB": 80e9, "NVIDIA_H200_141GB": 141e9}


def calibration_model(name: str, precision: str) -> ServedModel:
    """A calibration row's model as TensorRT-LLM ran it: FP8 rows with FP8 weights, activations and KV cache,
    embeddings and lm_head 16-bit."""
    width = 1 if precision == "fp8" else 2
    if name in _CALIBRATION_CONFIGS:
        from vlp.components.planning.architectures import layout

        config = _CALIBRATION_CONFIGS[name]
        lay = layout(config, config)
        params = lay.total_params()
        embeddings = lay.vocab * lay.hidden * (1 if lay.tied_embeddings else 2)
        return ServedModel(
            active_params=params - lay.inactive_params(),
            weight_bytes=(params - embeddings) * width + embeddings * 2,
            kv_bytes_per_token=2 * lay.layers * config["num_key_value_heads"] * config["head_dim"] * width,
            low_precision_compute=precision == "fp8",
            expert_bytes=lay.expert_params * width,
            experts=lay.experts,
            experts_per_token=lay.experts_per_token,
        )
    params, layers, hidden, inter, kv_heads, head_dim, vocab, experts, top_k = _CALIBRATION_MODELS[name]
    embeddings = 2 * vocab * hidden
    return ServedModel(
        active_params=active_params(params, layers, hidden, inter, experts, top_k),
        weight_bytes=(params - embeddings) * width + embeddings * 2,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * width,
        low_precision_compute=precision == "fp8",
    )


def calibration() -> list[dict[str, Any]]:
    """Each published row beside the model's estimate for it, as TensorRT-LLM ran it (calibration_model); KV cache
    in 95% of the memory the weights leave (trtllm-bench's default)."""
    rows = []
    for row, name, precision, gpu, tp, inp, out, measured in CALIBRATION:
        model = calibration_model(name, precision)
        weights, kv_per_token = model.weight_bytes, model.kv_bytes_per_token
        free = 0.95 * (_GPU_MEMORY[gpu] - weights / tp) - 2e9  # activations and runtime
        kv_tokens = int(free / (kv_per_token / tp))
        got = estimate(
            model,
            gpu,
            gpus=tp,
            tp=tp,
            kv_cache_tokens=kv_tokens,
            max_num_seqs=2048,
            workload=Workload(inp, out, 0),
        )
        rows.append(
            {
                "row": row,
                "model": name,
                "precision": precision,
                "gpus": f"{tp} x {gpu}",
                "input_tokens": inp,
                "output_tokens": out,
                "measured_output_tokens_per_s": measured,
                "estimated_output_tokens_per_s": got.output_tokens_per_s,
                "estimate_over_measured": round(got.output_tokens_per_s / measured, 2),
                "source": CALIBRATION_SOURCES[row],
            }
        )
    return rows
