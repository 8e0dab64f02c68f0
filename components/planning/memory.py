"""The memory model: what vLLM or TGI allocates on one GPU for a model (weights, activations, CUDA graphs, the
vision encoder's profiling pass), and the KV cache that is left."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vlp.components.planning.catalog import Accelerator, GiB
from vlp.components.planning.model_facts import (
    AUX_SUFFIXES,
    FLOAT_DTYPES,
    TORCH_DTYPE_BYTES,
    ModelFacts,
    first_int,
    is_embedding,
)

# Minimum compute capability for each quantization's kernels (vLLM and TGI agree closely). MXFP4 and NVFP4: vLLM
# 0.34's get_min_capability (model_executor/layers/quantization/mxfp4.py:72: 80; modelopt.py:795, NVFP4: 75, run by
# Marlin W4A16 kernels below Blackwell).
QUANT_MIN_CC = {
    "fp8": 8.0,
    "awq": 7.5,
    "gptq": 6.0,
    "bitsandbytes": 7.0,
    "compressed-tensors": 7.5,
    "mxfp4": 8.0,
    "nvfp4": 7.5,
}
# GPUs with FP4 tensor cores (Blackwell: sm100 B200, sm120 RTX PRO 6000); elsewhere 4-bit float weights are
# dequantized in weight-only kernels and computed in 16 bits.
NATIVE_FP4 = ("NVIDIA_B200", "NVIDIA_RTX_PRO_6000")
ENGINE_DEFAULT_MAX_NUM_SEQS = {"vllm": 256, "tgi": 128}
# vLLM's V1 engine (default from 0.8, the only one from 0.11) raises its default for the OpenAI server to 1024
# sequences on GPUs of at least 70 GiB that are not A100s (vllm/engine/arg_utils.py get_batch_defaults at v0.34.0,
# L2977-3076): H100, H200, B200, RTX PRO 6000.
V1_LARGE_GPU_MAX_NUM_SEQS = 1024
V1_LARGE_GPU_BYTES = 70 * 2**30
DEFAULT_TARGET_MAX_MODEL_LEN = 8192  # when the config leaves max_model_len empty: plan for this, report the ceiling
MAX_NUM_SEQS_CEILING = 1024
VLLM_MAX_BATCHED_TOKENS = 8192  # vLLM's chunked-prefill budget for the OpenAI server: the profiling batch
SWAP_LIMIT_SHARE = 0.7  # vLLM refuses swap_space x GPUs above 70% of host RAM ("Too large swap space")


@dataclass
class EngineSettings:
    """The serving arguments that change memory: the config's `serving` section in plain values."""

    engine: str = "vllm"
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    swap_space: int = 16
    images_per_prompt: int = 1
    engine_version: str = ""  # of the image that serves (images.yaml); "" = unknown, planned as the 0.6 engine

    @property
    def v1_engine(self) -> bool:
        """vLLM's V1 engine: the default from 0.8.0, the only one from 0.11."""
        if self.engine != "vllm" or not self.engine_version:
            return False
        major, minor = (int(x) for x in (self.engine_version.split(".") + ["0"])[:2])
        return (major, minor) >= (0, 8)

    def default_max_num_seqs(self, memory_bytes: int, accelerator: str) -> int:
        """The engine's own max_num_seqs when the config leaves it empty."""
        large = memory_bytes >= V1_LARGE_GPU_BYTES and "A100" not in accelerator
        if self.v1_engine and large:
            return V1_LARGE_GPU_MAX_NUM_SEQS
        return ENGINE_DEFAULT_MAX_NUM_SEQS.get(self.engine, 256)

    @classmethod
    def from_serving(cls, serving: Any) -> EngineSettings:
        return cls(
            engine=serving.engine,
            gpu_memory_utilization=serving.gpu_memory_utilization,
            dtype=serving.dtype,
            quantization=serving.quantization,
            kv_cache_dtype=serving.kv_cache_dtype,
            enforce_eager=serving.enforce_eager,
            # Unset: 0, what current vLLM reserves (it removed --swap-space); the 2024 image's 16 GiB goes through
            # the host-memory check only when set.
            swap_space=serving.swap_space or 0,
            images_per_prompt=max(1, int((serving.limit_mm_per_prompt or {}).get("image", 1))),
        )


def activation_bytes(facts: ModelFacts, settings: EngineSettings) -> int:
    """Bytes per activation/KV element at serve time (dtype auto: fp32 checkpoints run in 16-bit)."""
    if settings.dtype in ("float32", "float"):
        return 4
    return 2


def served_weight_bytes(facts: ModelFacts, settings: EngineSettings) -> int:
    """Weights as they sit in GPU memory: quantized tensors as stored, float tensors in the serving dtype."""
    act = activation_bytes(facts, settings)
    dynamic_fp8 = settings.quantization in ("fp8", "fbgemm_fp8") and facts.quantization is None
    if facts.tensors:
        total = 0
        for t in facts.tensors:
            if t.dtype in FLOAT_DTYPES and not t.name.endswith(AUX_SUFFIXES):
                per = 1 if dynamic_fp8 and len(t.shape) == 2 and not is_embedding(t.name) else act
                total += t.numel * per
            else:
                total += t.nbytes
        return total
    ckpt = TORCH_DTYPE_BYTES.get(facts.dtype, 2)
    if facts.quantization:
        return facts.weights_bytes
    scaled = facts.weights_bytes * act // ckpt
    if dynamic_fp8:
        emb = facts.embedding_bytes * act // ckpt
        return emb + (scaled - emb) // act
    return scaled


def kv_bytes_per_token(
    facts: ModelFacts, settings: EngineSettings, tp: int = 1, pp: int = 1, max_model_len: int = 0
) -> int:
    """KV cache bytes one token takes on one GPU: 2 x layers x kv_heads x head_dim x bytes, split by TP and PP.

    With sliding-window layers and a `max_model_len`, the average over a full-length sequence: a windowed layer keeps
    at most its window of each sequence (vLLM's hybrid KV cache manager allocates each layer group for what it
    attends to: docs/design/hybrid_kv_cache_manager.md), so a sequence of L tokens takes sum(min(L, window)) layers'
    worth, not L x layers."""
    per = 1 if settings.kv_cache_dtype.startswith("fp8") else activation_bytes(facts, settings)
    layers = math.ceil(facts.layers / pp)
    if facts.kv_lora_rank:  # MLA caches one compressed latent per token, replicated across TP ranks
        per_layer = (facts.kv_lora_rank + facts.qk_rope_head_dim) * per
    else:
        kv_heads = max(1, math.ceil(facts.kv_heads / tp))  # fewer KV heads than ranks: vLLM replicates them
        per_layer = 2 * kv_heads * facts.head_dim * per
    windows = facts.layer_windows
    if not (windows and max_model_len) or settings.engine != "vllm":
        return layers * per_layer  # TGI 2.4 sizes every layer for the full length
    kept = sum(min(max_model_len, w) if w else max_model_len for w in windows) / len(windows)
    return math.ceil(layers * per_layer * kept / max_model_len)


def vision_tokens_per_seq(facts: ModelFacts, settings: EngineSettings) -> int:
    """The vision encoder's tokens for one prompt's images: images x tiles x patches."""
    if not facts.vision:
        return 0
    vc = facts.vision_config
    patches = (first_int(vc.get("image_size"), 336) // first_int(vc.get("patch_size"), 14)) ** 2 + 1
    return settings.images_per_prompt * first_int(vc.get("max_num_tiles"), 1) * patches


def vision_profile_bytes_per_seq(facts: ModelFacts, settings: EngineSettings) -> int:
    """Activation memory the vision encoder takes per sequence while the engine profiles a full batch.

    vLLM profiles with max_num_seqs dummy requests, each carrying the most images a prompt may hold,
    and runs the vision tower on all of them at once: this is what OOMs Llama 3.2 Vision at the default
    max_num_seqs 256. Per image: tiles x patches tokens through the encoder (residual, q/k/v and MLP
    widths), the tiles' eager attention scores, the projection to the text width and, for cross-attention
    models (mllama), the K/V every cross-attention layer keeps for those tokens.
    """
    if not facts.vision:
        return 0
    vc = facts.vision_config
    act = activation_bytes(facts, settings)
    image_size = first_int(vc.get("image_size"), 336)
    patch = first_int(vc.get("patch_size"), 14)
    patches = (image_size // patch) ** 2 + 1
    tiles = first_int(vc.get("max_num_tiles"), 1)
    vh = first_int(vc.get("hidden_size"), vc.get("embed_dim"), 1024)
    vi = first_int(vc.get("intermediate_size"), 4 * vh)
    heads = first_int(vc.get("attention_heads"), vc.get("num_attention_heads"), vc.get("num_heads"), 16)
    images = settings.images_per_prompt
    tokens = images * tiles * patches
    encoder = tokens * (4 * vh + vi) * act
    scores = images * tiles * heads * patches * patches * act
    projected = tokens * facts.hidden_size * act
    cross_kv = tokens * 2 * facts.cross_attention_layers * facts.kv_heads * facts.head_dim * act
    return int(encoder + scores + projected + cross_kv)


@dataclass
class MemoryBudget:
    """One GPU's memory at a shape and a (max_model_len, max_num_seqs) point; bytes."""

    gpu_memory: int
    utilization: float
    budget: int
    weights: int
    activations: int
    cuda_graphs: int
    non_torch: int
    vision_encoder: int
    kv_cache: int
    kv_bytes_per_token: int
    kv_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def memory_budget(
    facts: ModelFacts,
    acc: Accelerator,
    settings: EngineSettings,
    *,
    tp: int,
    pp: int,
    max_model_len: int,
    max_num_seqs: int,
) -> MemoryBudget:
    """What vLLM/TGI would allocate on one GPU: the rest of the budget after weights and overheads is KV cache."""
    act = activation_bytes(facts, settings)
    budget = int(acc.memory_bytes * settings.gpu_memory_utilization)
    weights_total = served_weight_bytes(facts, settings)
    if pp > 1:
        emb = facts.embedding_bytes * (act / TORCH_DTYPE_BYTES.get(facts.dtype, 2) if not facts.quantization else 1)
        weights = int(
            (weights_total - emb) / (tp * pp) + emb / 2 / tp
        )  # embedding on the first stage, head on the last
    else:
        weights = math.ceil(weights_total / tp)
    if settings.engine == "tgi":
        tokens = max_model_len  # TGI warms up with max_batch_prefill_tokens = one full prompt
        graphs = 0 if settings.enforce_eager else GiB // 2
        non_torch = int(0.3 * GiB)
    else:
        tokens = min(VLLM_MAX_BATCHED_TOKENS, max_model_len * max_num_seqs)
        tokens = max(tokens, min(max_model_len, 2048))
        graphs = 0 if settings.enforce_eager else int(0.75 * GiB)
        non_torch = int(0.1 * GiB) if tp * pp == 1 else int(0.6 * GiB)  # NCCL/custom all-reduce buffers
    widths = 4 * facts.hidden_size + 3 * facts.intermediate_size // tp
    widths += (facts.attention_heads + 2 * facts.kv_heads) * facts.head_dim // tp
    logits = 2 * max_num_seqs * facts.vocab_size * 4  # fp32 logits and probabilities of the sampled positions
    activations = tokens * widths * act + logits
    per_seq_vision = vision_profile_bytes_per_seq(facts, settings)
    if settings.v1_engine and per_seq_vision:
        # V1 profiles the encoder with its compute budget, max_num_encoder_input_tokens (= max_num_batched_tokens)
        # or one item if larger (vllm/v1/core/encoder_cache_manager.py compute_mm_encoder_budget at v0.34.0), not
        # with max_num_seqs prompts of images as the 0.6 engine does.
        per_seq_tokens = max(1, vision_tokens_per_seq(facts, settings))
        vision = per_seq_vision * min(max_num_seqs, max(1, VLLM_MAX_BATCHED_TOKENS // per_seq_tokens))
    else:
        vision = per_seq_vision * (max_num_seqs if settings.engine == "vllm" else 1)
    kv_cache = budget - weights - activations - graphs - non_torch - vision
    per_token = max(1, kv_bytes_per_token(facts, settings, tp, pp, max_model_len))
    kv_tokens = max(0, kv_cache) // per_token // 16 * 16  # whole 16-token blocks
    return MemoryBudget(
        gpu_memory=acc.memory_bytes,
        utilization=settings.gpu_memory_utilization,
        budget=budget,
        weights=weights,
        activations=activations,
        cuda_graphs=graphs,
        non_torch=non_torch,
        vision_encoder=vision,
        kv_cache=kv_cache,
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
    )
