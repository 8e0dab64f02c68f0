"""Plans the hardware a model needs: facts from its repo, a memory model per engine, the machine catalog, the shape."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1_000_000_000
GiB = 1 << 30
MiB = 1 << 20

# ---------------------------------------------------------------------------------------------
# Machine catalog
# ---------------------------------------------------------------------------------------------

# Prices are approximate on-demand list prices for Vertex AI prediction in us-central1 (Compute
# Engine list price of the machine with its GPUs x Vertex's prediction uplift of about 1.15), recorded
# 2026-11 from cloud.google.com/vertex-ai/pricing and not re-checked since; other regions cost more.
# They rank shapes against each other; pass `prices={machine_type: usd_per_hour}` to use your own.
PRICES_AS_OF = (
    "approximate on-demand prices, us-central1, recorded 2026-11 from cloud.google.com/vertex-ai/pricing; "
    "override with prices={machine_type: usd_per_hour}"
)


@dataclass(frozen=True)
class Accelerator:
    """One GPU type as Vertex names it (AcceleratorType enum) and as the engines see it."""

    name: str
    memory_bytes: int  # what the CUDA driver reports as total: the base of gpu_memory_utilization
    compute_capability: float
    regions: tuple[str, ...]  # where Vertex prediction offers it: a reasonable subset, not exhaustive
    bf16: bool = True
    native_fp8: bool = False
    legacy: bool = False  # Turing/Volta: no bf16, no FlashAttention-2; left out of `hardware: auto`
    multihost: bool = False  # offered as multi-host (multihostGpuNodeCount) GPU serving

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB


_US_EU_ASIA = (
    "us-central1",
    "us-east1",
    "us-east4",
    "us-west1",
    "us-west4",
    "europe-west1",
    "europe-west4",
    "asia-northeast1",
    "asia-southeast1",
)

ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            "NVIDIA_L4",
            23_034 * MiB,
            8.9,
            _US_EU_ASIA
            + (
                "us-east5",
                "europe-west2",
                "europe-west3",
                "asia-east1",
                "asia-south1",
                "northamerica-northeast1",
                "me-west1",
            ),
            native_fp8=True,
        ),
        Accelerator(
            "NVIDIA_TESLA_T4", 15_360 * MiB, 7.5, _US_EU_ASIA + ("asia-east1", "asia-south1"), bf16=False, legacy=True
        ),
        Accelerator(
            "NVIDIA_TESLA_V100",
            16_160 * MiB,
            7.0,
            ("us-central1", "us-west1", "europe-west4", "asia-east1"),
            bf16=False,
            legacy=True,
        ),
        Accelerator(
            "NVIDIA_TESLA_A100",
            40_960 * MiB,
            8.0,
            (
                "us-central1",
                "us-east1",
                "us-west1",
                "us-west4",
                "europe-west4",
                "asia-northeast1",
                "asia-northeast3",
                "asia-southeast1",
                "me-west1",
            ),
        ),
        Accelerator(
            "NVIDIA_A100_80GB",
            81_920 * MiB,
            8.0,
            ("us-central1", "us-east4", "us-east5", "europe-west4", "asia-southeast1"),
        ),
        Accelerator(
            "NVIDIA_H100_80GB",
            81_559 * MiB,
            9.0,
            (
                "us-central1",
                "us-east4",
                "us-east5",
                "us-west1",
                "us-south1",
                "europe-west4",
                "asia-southeast1",
                "asia-northeast1",
            ),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_H100_MEGA_80GB",
            81_559 * MiB,
            9.0,
            ("us-central1", "us-east4", "us-east5", "europe-west4", "asia-southeast1"),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_H200_141GB",
            143_771 * MiB,
            9.0,
            ("us-central1", "us-east4", "us-east5", "us-south1", "europe-west1", "asia-south1"),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_B200",
            183_359 * MiB,
            10.0,
            ("us-central1", "us-east4", "us-west2", "europe-west4", "asia-southeast1"),
            native_fp8=True,
            multihost=True,
        ),
        Accelerator(
            "NVIDIA_RTX_PRO_6000",
            97_887 * MiB,
            12.0,
            ("us-central1", "us-east4", "europe-west4", "asia-southeast1"),
            native_fp8=True,
        ),
    )
}


@dataclass(frozen=True)
class MachineType:
    """A Vertex prediction machine type: its GPU, the GPU counts it takes, its size and price."""

    name: str
    accelerator: str
    counts: tuple[int, ...]
    vcpus: int
    memory_gb: float
    price: float  # USD/hour for the machine with its GPUs; for N1, the machine alone
    gpu_price: float = 0.0  # N1 only: USD/hour per attached GPU
    auto: bool = True  # considered by `hardware: auto`
    price_estimated: bool = False  # no list price recorded: an estimate, shapes using it are never auto-picked

    def price_for(self, count: int, prices: Mapping[str, float] | None = None) -> float:
        if prices and self.name in prices:
            return float(prices[self.name])
        return round(self.price + self.gpu_price * count, 4)


def _g2(vcpus: int, gpus: int, price: float) -> MachineType:
    return MachineType(f"g2-standard-{vcpus}", "NVIDIA_L4", (gpus,), vcpus, vcpus * 4, price)


MACHINE_TYPES: dict[str, MachineType] = {
    m.name: m
    for m in (
        _g2(4, 1, 0.8129),
        _g2(8, 1, 0.9817),
        _g2(12, 1, 1.1506),
        _g2(16, 1, 1.3193),
        _g2(24, 2, 2.3010),
        _g2(32, 1, 1.9946),
        _g2(48, 4, 4.6021),
        _g2(96, 8, 9.2041),
        MachineType("n1-standard-8", "NVIDIA_TESLA_T4", (1, 2), 8, 30, 0.4370, 0.4025),
        MachineType("n1-standard-16", "NVIDIA_TESLA_T4", (1, 2, 4), 16, 60, 0.8741, 0.4025),
        MachineType("n1-standard-32", "NVIDIA_TESLA_T4", (2, 4), 32, 120, 1.7481, 0.4025),
        MachineType("n1-highmem-8", "NVIDIA_TESLA_V100", (1,), 8, 52, 0.5442, 2.8520),
        MachineType("n1-highmem-16", "NVIDIA_TESLA_V100", (2,), 16, 104, 1.0884, 2.8520),
        MachineType("n1-highmem-32", "NVIDIA_TESLA_V100", (4,), 32, 208, 2.1768, 2.8520),
        MachineType("n1-highmem-64", "NVIDIA_TESLA_V100", (8,), 64, 416, 4.3536, 2.8520),
        MachineType("a2-highgpu-1g", "NVIDIA_TESLA_A100", (1,), 12, 85, 4.2243),
        MachineType("a2-highgpu-2g", "NVIDIA_TESLA_A100", (2,), 24, 170, 8.4486),
        MachineType("a2-highgpu-4g", "NVIDIA_TESLA_A100", (4,), 48, 340, 16.8973),
        MachineType("a2-highgpu-8g", "NVIDIA_TESLA_A100", (8,), 96, 680, 33.7946),
        MachineType("a2-megagpu-16g", "NVIDIA_TESLA_A100", (16,), 96, 1360, 64.1004),
        MachineType("a2-ultragpu-1g", "NVIDIA_A100_80GB", (1,), 12, 170, 5.8291),
        MachineType("a2-ultragpu-2g", "NVIDIA_A100_80GB", (2,), 24, 340, 11.6582),
        MachineType("a2-ultragpu-4g", "NVIDIA_A100_80GB", (4,), 48, 680, 23.3165),
        MachineType("a2-ultragpu-8g", "NVIDIA_A100_80GB", (8,), 96, 1360, 46.6330),
        MachineType("a3-highgpu-1g", "NVIDIA_H100_80GB", (1,), 26, 234, 12.7204),
        MachineType("a3-highgpu-2g", "NVIDIA_H100_80GB", (2,), 52, 468, 25.4408),
        MachineType("a3-highgpu-4g", "NVIDIA_H100_80GB", (4,), 104, 936, 50.8816),
        MachineType("a3-highgpu-8g", "NVIDIA_H100_80GB", (8,), 208, 1872, 101.4868),
        MachineType("a3-megagpu-8g", "NVIDIA_H100_MEGA_80GB", (8,), 208, 1872, 106.0, price_estimated=True),
        MachineType("a3-ultragpu-8g", "NVIDIA_H200_141GB", (8,), 224, 2952, 97.5, price_estimated=True),
        MachineType("a4-highgpu-8g", "NVIDIA_B200", (8,), 224, 3968, 130.0, auto=False, price_estimated=True),
        MachineType("g4-standard-48", "NVIDIA_RTX_PRO_6000", (1,), 48, 180, 5.2, auto=False, price_estimated=True),
        MachineType("g4-standard-96", "NVIDIA_RTX_PRO_6000", (2,), 96, 360, 10.4, auto=False, price_estimated=True),
        MachineType("g4-standard-192", "NVIDIA_RTX_PRO_6000", (4,), 192, 720, 20.8, auto=False, price_estimated=True),
        MachineType("g4-standard-384", "NVIDIA_RTX_PRO_6000", (8,), 384, 1440, 41.6, auto=False, price_estimated=True),
    )
}

# H200 and the A3 Mega have no recorded list price: their estimates rank them, flagged in the plan. They
# stay in `auto` because they are the only single-node home for BF16 405B-class models.
_AUTO_DESPITE_ESTIMATE = {"a3-megagpu-8g", "a3-ultragpu-8g"}

MAX_NODES = 4  # multi-host replicas considered by `auto` (pipeline parallel across nodes)


@dataclass(frozen=True)
class Shape:
    """One replica's hardware: machine type x GPUs per node x nodes."""

    machine_type: str
    accelerator_type: str
    accelerator_count: int
    node_count: int = 1

    @property
    def gpus(self) -> int:
        return self.accelerator_count * self.node_count

    def describe(self) -> str:
        base = f"{self.machine_type} ({self.accelerator_count} x {self.accelerator_type})"
        return base if self.node_count == 1 else f"{self.node_count} x {base}, multi-host"


def catalog_shapes(*, include_legacy: bool = False, auto_only: bool = True) -> list[Shape]:
    """Every single-node shape in the catalog (the candidates `hardware: auto` picks from)."""
    shapes = []
    for m in MACHINE_TYPES.values():
        acc = ACCELERATORS[m.accelerator]
        if auto_only and (not m.auto or (m.price_estimated and m.name not in _AUTO_DESPITE_ESTIMATE)):
            continue
        if acc.legacy and not include_legacy:
            continue
        shapes.extend(Shape(m.name, m.accelerator, c) for c in m.counts)
    return shapes


def shape_price(shape: Shape, prices: Mapping[str, float] | None = None) -> float:
    """USD/hour for one replica of `shape` (all its nodes)."""
    machine = MACHINE_TYPES.get(shape.machine_type)
    if machine is None:
        return float((prices or {}).get(shape.machine_type, 0.0)) * shape.node_count
    return round(machine.price_for(shape.accelerator_count, prices) * shape.node_count, 4)


# ---------------------------------------------------------------------------------------------
# Model facts
# ---------------------------------------------------------------------------------------------

DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_TORCH_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
# Quantization side tensors: counted in bytes, not in parameters.
_AUX_SUFFIXES = (
    ".qzeros",
    ".scales",
    ".g_idx",
    "weight_scale",
    "input_scale",
    "weight_scale_inv",
    "weight_zero_point",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
    ".SCB",
    "weight_format",
    "k_scale",
    "v_scale",
    "output_scale",
)
_VISION_MODEL_TYPES = {
    "mllama",
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics2",
    "idefics3",
    "paligemma",
    "gemma3",
    "pixtral",
    "mistral3",
    "llama4",
    "phi3_v",
    "internvl_chat",
    "molmo",
}


class ModelAccessError(RuntimeError):
    """The repo cannot be read: gated without access, not found, or no such revision."""


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1


@dataclass
class ModelFacts:
    """What planning needs to know about a model, read from its repo without reading weights."""

    repo: str
    source: str  # "hub" or "local"
    revision: str = ""
    revision_sha: str = ""
    architecture: str = ""
    model_type: str = ""
    dtype: str = ""  # the checkpoint's torch_dtype
    weight_dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> bytes on disk
    weights_bytes: int = 0
    weights_source: str = ""  # "safetensors headers" or "index total_size"
    params: int = 0
    embedding_bytes: int = 0  # input embedding (and untied lm_head) bytes: they do not split across pipeline stages
    quantization: str | None = None  # fp8, awq, gptq, bitsandbytes, compressed-tensors
    quant_bits: int | None = None
    quant_detail: str = ""
    layers: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    attention_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    context_length: int = 0
    kv_lora_rank: int = 0  # MLA (DeepSeek): compressed KV per token instead of K and V heads
    qk_rope_head_dim: int = 0
    moe_experts: int = 0
    moe_experts_per_token: int = 0
    vision: bool = False
    vision_config: dict[str, Any] = field(default_factory=dict)
    cross_attention_layers: int = 0
    has_chat_template: bool = False
    gated: bool = False
    access: str = "ok"  # ok, denied, unknown
    files: list[str] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("tensors")
        d.pop("files")
        return d


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # Multimodal configs (mllama, llava, qwen2-vl in newer transformers) nest the language model.
    for key in ("text_config", "language_config", "llm_config"):
        nested = config.get(key)
        if isinstance(nested, Mapping) and nested.get("num_hidden_layers"):
            return nested
    return config


def _quantization(config: Mapping[str, Any]) -> tuple[str | None, int | None, str]:
    qc = config.get("quantization_config") or _text_config(config).get("quantization_config")
    if not isinstance(qc, Mapping):
        return None, None, ""
    method = str(qc.get("quant_method", "")).lower()
    if method in {"fbgemm_fp8", "fp8", "fp8_e4m3"}:
        return "fp8", 8, method
    if method in {"awq", "awq_marlin"}:
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        return "awq", bits, f"awq int{bits}, group {qc.get('group_size', qc.get('q_group_size', '?'))}"
    if method in {"gptq", "gptq_marlin", "marlin"}:
        bits = int(qc.get("bits", 4))
        return "gptq", bits, f"gptq int{bits}, group {qc.get('group_size', '?')}"
    if method == "bitsandbytes":
        bits = 4 if qc.get("load_in_4bit") else 8
        kind = qc.get("bnb_4bit_quant_type", "nf4") if bits == 4 else "int8"
        return "bitsandbytes", bits, f"bitsandbytes {kind}"
    if method == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            bits = int(weights.get("num_bits", 8))
            if weights.get("type") == "float" and bits == 8:
                return "fp8", 8, "compressed-tensors fp8"
            return "compressed-tensors", bits, f"compressed-tensors int{bits}"
        return "compressed-tensors", None, "compressed-tensors"
    return method or None, qc.get("bits"), method


def _int(*values: Any) -> int:
    for v in values:
        if isinstance(v, int | float) and v:
            return int(v)
    return 0


def facts_from_config(
    repo: str,
    source: str,
    config: Mapping[str, Any],
    *,
    tensors: list[TensorInfo] | None = None,
    index: Mapping[str, Any] | None = None,
    files: Iterable[str] = (),
    has_chat_template: bool = False,
    revision: str = "",
    revision_sha: str = "",
    gated: bool = False,
    access: str = "ok",
) -> ModelFacts:
    """Model facts from config.json plus safetensors headers (exact) or the shard index (its total_size)."""
    text = _text_config(config)
    arch = (config.get("architectures") or [""])[0]
    quant, bits, detail = _quantization(config)
    heads = _int(text.get("num_attention_heads"), text.get("n_head"))
    hidden = _int(text.get("hidden_size"), text.get("d_model"), text.get("n_embd"))
    kv_heads = _int(text.get("num_key_value_heads"), text.get("num_kv_heads"), heads)
    head_dim = _int(text.get("head_dim"), hidden // heads if heads else 0)
    experts = _int(text.get("num_local_experts"), text.get("n_routed_experts"), text.get("num_experts"))
    vision_cfg = config.get("vision_config") if isinstance(config.get("vision_config"), Mapping) else {}
    model_type = str(config.get("model_type", ""))
    facts = ModelFacts(
        repo=repo,
        source=source,
        revision=revision,
        revision_sha=revision_sha,
        architecture=arch,
        model_type=model_type,
        dtype=str(
            config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or text.get("dtype") or ""
        ),
        quantization=quant,
        quant_bits=bits,
        quant_detail=detail,
        layers=_int(text.get("num_hidden_layers"), text.get("n_layer"), text.get("num_layers")),
        hidden_size=hidden,
        intermediate_size=_int(text.get("intermediate_size"), text.get("ffn_dim"), 4 * hidden),
        attention_heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_int(text.get("vocab_size"), config.get("vocab_size")),
        context_length=_int(
            text.get("max_position_embeddings"),
            text.get("max_seq_len"),
            text.get("seq_length"),
            text.get("n_positions"),
            config.get("max_position_embeddings"),
        ),
        kv_lora_rank=_int(text.get("kv_lora_rank")),
        qk_rope_head_dim=_int(text.get("qk_rope_head_dim")),
        moe_experts=experts,
        moe_experts_per_token=_int(text.get("num_experts_per_tok"), text.get("moe_topk")) if experts else 0,
        vision=bool(vision_cfg) or model_type in _VISION_MODEL_TYPES,
        vision_config=dict(vision_cfg or {}),
        cross_attention_layers=len(text.get("cross_attention_layers") or []),
        has_chat_template=has_chat_template,
        gated=gated,
        access=access,
        files=sorted(files),
    )
    if tensors:
        facts.tensors = tensors
        facts.weights_bytes = sum(t.nbytes for t in tensors)
        facts.weights_source = "safetensors headers"
        for t in tensors:
            facts.weight_dtypes[t.dtype] = facts.weight_dtypes.get(t.dtype, 0) + t.nbytes
        facts.params = sum(_logical_params(t, quant, bits) for t in tensors)
        facts.embedding_bytes = sum(t.nbytes for t in tensors if _is_embedding(t.name))
        if any(t.name.startswith(("vision_model.", "vision_tower.", "visual.", "model.vision")) for t in tensors):
            facts.vision = True
    elif index:
        facts.weights_bytes = int((index.get("metadata") or {}).get("total_size") or 0)
        facts.weights_source = "index total_size"
        facts.params = _arithmetic_params(facts)
        facts.embedding_bytes = _arithmetic_embedding_bytes(facts)
        names = list((index.get("weight_map") or {}).keys())
        if any(n.startswith(("vision_model.", "vision_tower.", "visual.", "model.vision")) for n in names):
            facts.vision = True
    return facts


def _is_embedding(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight"))


def _logical_params(t: TensorInfo, quant: str | None, bits: int | None) -> int:
    if t.name.endswith(_AUX_SUFFIXES):
        return 0
    if t.name.endswith(".qweight") and t.dtype == "I32":
        return t.numel * (32 // (bits or 4))  # AWQ/GPTQ pack 32/bits weights per int32
    if quant == "bitsandbytes" and bits == 4 and t.dtype == "U8":
        return t.numel * 2
    if quant == "compressed-tensors" and t.name.endswith("weight_packed"):
        return t.numel * (32 // (bits or 4))
    return t.numel


def _arithmetic_params(f: ModelFacts) -> int:
    """Decoder-only parameter count from the config (for index-only repos); vision towers not included."""
    if not (f.layers and f.hidden_size):
        return 0
    q = f.attention_heads * f.head_dim
    kv = f.kv_heads * f.head_dim
    attn = f.hidden_size * (q + 2 * kv) + q * f.hidden_size
    mlp = 3 * f.hidden_size * f.intermediate_size * max(1, f.moe_experts)
    return f.layers * (attn + mlp + 2 * f.hidden_size) + 2 * f.vocab_size * f.hidden_size + f.hidden_size


def _arithmetic_embedding_bytes(f: ModelFacts) -> int:
    per = _TORCH_DTYPE_BYTES.get(f.dtype, 2)
    return 2 * f.vocab_size * f.hidden_size * per


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8 bytes of length, then the header; never the tensor data."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * MiB:
            raise ValueError(f"{path} declares a {length}-byte header: not a safetensors file")
        return json.loads(fh.read(length))


def tensors_from_header(header: Mapping[str, Any]) -> list[TensorInfo]:
    out = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = spec["dtype"]
        shape = tuple(int(s) for s in spec["shape"])
        start, end = spec.get("data_offsets", (0, 0))
        nbytes = int(end) - int(start)
        if nbytes <= 0 and shape:
            nbytes = int(math.prod(shape) * DTYPE_BYTES.get(dtype, 2))
        out.append(TensorInfo(name, dtype, shape, nbytes))
    return out


def _template_in(tokenizer_config: Mapping[str, Any] | None) -> bool:
    return bool(tokenizer_config and tokenizer_config.get("chat_template"))


def read_local_facts(path: str | Path) -> ModelFacts:
    """Model facts from a local directory (config.json + safetensors headers or index)."""
    root = Path(path)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ModelAccessError(f"{root} has no config.json: point --model at a model directory or a Hub repo id")
    config = json.loads(config_path.read_text())
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    shard_paths = sorted(root.glob("*.safetensors"))
    tensors: list[TensorInfo] = []
    for shard in shard_paths:
        tensors.extend(tensors_from_header(read_safetensors_header(shard)))
    index = None
    index_path = root / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        expected = set((index.get("weight_map") or {}).values())
        missing = expected - {p.name for p in shard_paths}
        if missing:
            tensors = []  # a partial set of headers would undercount: trust the index's total instead
    tok_cfg = None
    if (root / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((root / "tokenizer_config.json").read_text())
    has_template = (
        _template_in(tok_cfg) or (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file()
    )
    facts = facts_from_config(
        str(root), "local", config, tensors=tensors or None, index=index, files=files, has_chat_template=has_template
    )
    if not facts.weights_bytes:
        raise ModelAccessError(
            f"{root} has no safetensors weights (no *.safetensors headers, no model.safetensors.index.json): "
            "the engines load safetensors; convert the checkpoint first"
        )
    return facts


def hub_endpoint(endpoint: str = "") -> str | None:
    """The Hub to talk to: the explicit value, else $HF_ENDPOINT (read now, not at import), else huggingface.co."""
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def read_hub_facts(repo: str, *, revision: str = "main", endpoint: str = "", token: str | None = None) -> ModelFacts:
    """Model facts from a Hub repo: metadata and small JSON files only; safetensors headers by ranged reads."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    host = hub_endpoint(endpoint)
    api = HfApi(endpoint=host, token=token)
    # token=False stops huggingface_hub from picking up a token cached on this machine: access is
    # judged with the token the deployment will actually use.
    tok: str | bool = token or False
    try:
        info = api.model_info(repo, revision=revision, token=tok)
    except GatedRepoError as exc:
        raise ModelAccessError(_gated_message(repo, token)) from exc
    except RevisionNotFoundError as exc:
        raise ModelAccessError(
            f"{repo} has no revision {revision!r}: set model.revision to a branch, tag or commit"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelAccessError(
            f"{repo} was not found on {host or 'huggingface.co'} (or it is private and the token cannot see it): "
            "check model.repo, and set model.hf_token_secret for private repos"
        ) from exc
    sha = info.sha or revision
    gated = bool(getattr(info, "gated", False))
    files = [s.rfilename for s in (info.siblings or [])]

    def fetch(name: str) -> dict[str, Any] | None:
        if files and name not in files:
            return None
        try:
            local = hf_hub_download(repo, name, revision=sha, endpoint=host, token=tok)
        except EntryNotFoundError:
            return None
        return json.loads(Path(local).read_text())

    try:
        config = fetch("config.json")
        tok_cfg = fetch("tokenizer_config.json")
        index = fetch("model.safetensors.index.json")
    except GatedRepoError as exc:
        raise ModelAccessError(_gated_message(repo, token)) from exc
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", 0) in (401, 403):
            raise ModelAccessError(_gated_message(repo, token)) from exc
        raise
    if config is None:
        raise ModelAccessError(f"{repo}@{sha[:12]} has no config.json: it is not a transformers model repo")
    tensors: list[TensorInfo] = []
    try:
        meta = api.get_safetensors_metadata(repo, revision=sha, token=tok)
        for file_meta in meta.files_metadata.values():
            for name, t in file_meta.tensors.items():
                start, end = t.data_offsets
                tensors.append(TensorInfo(name, t.dtype, tuple(t.shape), int(end - start)))
    except GatedRepoError as exc:
        raise ModelAccessError(_gated_message(repo, token)) from exc
    except Exception:  # noqa: BLE001 - no safetensors or a mirror without ranged reads: fall back to the index
        tensors = []
    has_template = _template_in(tok_cfg) or "chat_template.jinja" in files or "chat_template.json" in files
    facts = facts_from_config(
        repo,
        "hub",
        config,
        tensors=tensors or None,
        index=index,
        files=files,
        has_chat_template=has_template,
        revision=revision,
        revision_sha=sha,
        gated=gated,
        access="ok",
    )
    if not facts.weights_bytes:
        raise ModelAccessError(
            f"{repo}@{sha[:12]} has no safetensors weights: vLLM and TGI load safetensors; pick a repo that has them"
        )
    return facts


def _gated_message(repo: str, token: str | None) -> str:
    if token:
        return (
            f"{repo} is gated and the token has no access: accept the licence on the model page "
            f"(https://huggingface.co/{repo}), then set model.hf_token_secret to a secret holding that account's token"
        )
    return (
        f"{repo} is gated and the token has no access (no token was given): accept the licence on the model page "
        f"(https://huggingface.co/{repo}), then set model.hf_token_secret"
    )


def read_model_facts(model: str, *, revision: str = "main", endpoint: str = "", token: str | None = None) -> ModelFacts:
    """Model facts from a local directory (if `model` is one) or a Hub repo id."""
    if Path(model).expanduser().is_dir():
        return read_local_facts(Path(model).expanduser())
    try:
        return read_hub_facts(model, revision=revision, endpoint=endpoint, token=token)
    except (OSError, ConnectionError) as exc:
        raise ModelAccessError(_unreachable(model, endpoint, exc)) from None
    except Exception as exc:
        # huggingface_hub wraps connection failures in its HTTP client's own types.
        if type(exc).__name__ in {"ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError"}:
            raise ModelAccessError(_unreachable(model, endpoint, exc)) from None
        raise


def _unreachable(model: str, endpoint: str, exc: Exception) -> str:
    import os

    hub = endpoint or os.environ.get("HF_ENDPOINT", "") or "https://huggingface.co"
    return (
        f"cannot reach the Hub at {hub} to read {model}'s metadata ({exc}): check the network or HF_ENDPOINT, "
        "or plan from a local copy of the model with `vlp plan --model DIR`"
    )


# ---------------------------------------------------------------------------------------------
# Memory model
# ---------------------------------------------------------------------------------------------

# Minimum compute capability for each quantization's kernels (vLLM and TGI agree closely).
QUANT_MIN_CC = {"fp8": 8.0, "awq": 7.5, "gptq": 6.0, "bitsandbytes": 7.0, "compressed-tensors": 7.5}
ENGINE_DEFAULT_MAX_NUM_SEQS = {"vllm": 256, "tgi": 128}
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

    @classmethod
    def from_serving(cls, serving: Any) -> EngineSettings:
        return cls(
            engine=serving.engine,
            gpu_memory_utilization=serving.gpu_memory_utilization,
            dtype=serving.dtype,
            quantization=serving.quantization,
            kv_cache_dtype=serving.kv_cache_dtype,
            enforce_eager=serving.enforce_eager,
            swap_space=serving.swap_space,
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
            if t.dtype in _FLOAT_DTYPES and not t.name.endswith(_AUX_SUFFIXES):
                per = 1 if dynamic_fp8 and len(t.shape) == 2 and not _is_embedding(t.name) else act
                total += t.numel * per
            else:
                total += t.nbytes
        return total
    ckpt = _TORCH_DTYPE_BYTES.get(facts.dtype, 2)
    if facts.quantization:
        return facts.weights_bytes
    scaled = facts.weights_bytes * act // ckpt
    if dynamic_fp8:
        emb = facts.embedding_bytes * act // ckpt
        return emb + (scaled - emb) // act
    return scaled


def kv_bytes_per_token(facts: ModelFacts, settings: EngineSettings, tp: int = 1, pp: int = 1) -> int:
    """KV cache bytes one token takes on one GPU: 2 x layers x kv_heads x head_dim x bytes, split by TP and PP."""
    per = 1 if settings.kv_cache_dtype.startswith("fp8") else activation_bytes(facts, settings)
    layers = math.ceil(facts.layers / pp)
    if facts.kv_lora_rank:  # MLA caches one compressed latent per token, replicated across TP ranks
        return layers * (facts.kv_lora_rank + facts.qk_rope_head_dim) * per
    kv_heads = max(1, math.ceil(facts.kv_heads / tp))  # fewer KV heads than ranks: vLLM replicates them
    return 2 * layers * kv_heads * facts.head_dim * per


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
    image_size = _int(vc.get("image_size"), 336)
    patch = _int(vc.get("patch_size"), 14)
    patches = (image_size // patch) ** 2 + 1
    tiles = _int(vc.get("max_num_tiles"), 1)
    vh = _int(vc.get("hidden_size"), vc.get("embed_dim"), 1024)
    vi = _int(vc.get("intermediate_size"), 4 * vh)
    heads = _int(vc.get("attention_heads"), vc.get("num_attention_heads"), vc.get("num_heads"), 16)
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
        emb = facts.embedding_bytes * (act / _TORCH_DTYPE_BYTES.get(facts.dtype, 2) if not facts.quantization else 1)
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
    vision = per_seq_vision * (max_num_seqs if settings.engine == "vllm" else 1)
    kv_cache = budget - weights - activations - graphs - non_torch - vision
    per_token = max(1, kv_bytes_per_token(facts, settings, tp, pp))
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
    throughput: Any = None  # components.throughput.Estimate at the plan's workload, for shapes that fit
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
    from components import throughput

    quant = (settings.quantization or facts.quantization or "").lower()
    model = throughput.ServedModel(
        active_params=throughput.active_params(
            facts.params,
            facts.layers,
            facts.hidden_size,
            facts.intermediate_size,
            facts.moe_experts,
            facts.moe_experts_per_token,
        ),
        weight_bytes=served_weight_bytes(facts, settings),
        kv_bytes_per_token=kv_bytes_per_token(facts, settings),
        low_precision_compute="fp8" in quant,  # W8A8; AWQ/GPTQ INT4 are weight-only (16-bit compute)
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
    default_seqs = ENGINE_DEFAULT_MAX_NUM_SEQS.get(settings.engine, 256)

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
    throughput_model: dict[str, Any] = field(default_factory=dict)  # its inputs (components.throughput.estimate_from)
    cost_per_million_output_tokens_usd: float = 0.0
    price_estimated: bool = False
    prices_note: str = PRICES_AS_OF
    reason: str = ""
    region: str = ""
    regions: list[str] = field(default_factory=list)
    quota: dict[str, dict[str, Any]] = field(default_factory=dict)
    quota_checked: bool = False
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


# Machine types served in fewer regions than their GPU: Model Garden lists a3-highgpu-2g/4g only here
# (model_garden_deployment_tutorial.ipynb, vertex-ai-samples@cc0d791).
MACHINE_REGIONS: dict[str, tuple[str, ...]] = {
    "a3-highgpu-2g": ("us-west1", "asia-southeast1", "europe-west4"),
    "a3-highgpu-4g": ("us-west1", "asia-southeast1", "europe-west4"),
}


def offered_regions(machine_type: str, accelerator_type: str) -> tuple[str, ...] | None:
    """Regions where Vertex prediction offers the machine with its GPU; None when the catalog does not know."""
    acc = ACCELERATORS.get(accelerator_type)
    regions = acc.regions if acc else None
    if machine_type in MACHINE_REGIONS:
        regions = tuple(r for r in (regions or MACHINE_REGIONS[machine_type]) if r in MACHINE_REGIONS[machine_type])
    return regions


def _in_regions(shape: Shape, regions: list[str] | None) -> bool:
    if not regions:
        return True
    offered = offered_regions(shape.machine_type, shape.accelerator_type)
    return offered is None or any(r in offered for r in regions)


def plan_for_facts(
    facts: ModelFacts,
    serving: Any,
    hardware: Any,
    *,
    regions: list[str] | None = None,
    prices: Mapping[str, float] | None = None,
    include_legacy: bool = False,
    workload: Any = None,
) -> Plan:
    """Choose (hardware auto) or check (explicit) a shape for the model under the config's serving settings.

    `auto` ranks the shapes that fit by hardware.objective: USD per 1M output tokens at `workload` (a config
    Workload; None = its defaults) by default, the hourly price, or the inter-token latency."""
    settings = EngineSettings.from_serving(serving)
    objective = getattr(hardware, "objective", "cost_per_token")
    if workload is None:
        from components.config import Workload

        workload = Workload()

    def evaluate(shape: Shape, **kwargs: Any) -> ShapeFit:
        return with_throughput(evaluate_shape(facts, shape, settings, **kwargs), facts, settings, workload)

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
    if facts.quantization and serving.quantization and facts.quantization not in serving.quantization:
        plan.warnings.append(
            f"serving.quantization is {serving.quantization!r} but the checkpoint is {facts.quantization} "
            f"({facts.quant_detail}): the engine will refuse a mismatch; leave serving.quantization empty"
        )
    if facts.weights_source == "index total_size":
        plan.warnings.append("weight bytes come from model.safetensors.index.json (no shard headers were read)")
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
        chosen = evaluate(shape, **kw)
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
        multihost = False
        if not fitting and serving.tensor_parallel_size in (None, 8):
            # Nothing fits on one node: spread a replica over nodes, TP inside a node, PP across them.
            fits_mh = [
                evaluate(s, **{**kw, "tensor_parallel_size": 8, "pipeline_parallel_size": None})
                for s in _multihost_candidates(singles)
            ]
            fitting = ranked(fits_mh)
            fits += fits_mh
            multihost = bool(fitting)
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
                plan.errors.append(f"{facts.repo} fits no {where}: {common}")
            elif len({f.shape.accelerator_type for f in fits}) == 1 and best.errors:
                plan.errors.append(
                    f"{facts.repo} fits no {best.shape.accelerator_type} shape (best candidate: "
                    f"{best.shape.describe()}): " + "; ".join(best.errors)
                )
            else:
                plan.errors.append(
                    f"{facts.repo} fits no shape in the catalog (largest tried: {best.shape.describe()}): "
                    + "; ".join(best.errors)
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
        plan.reason = (
            f"{what}: {_figures(chosen)}{nxt}"
            if not multihost
            else f"no single node holds the model, so a replica spans {chosen.shape.node_count} nodes "
            f"(tensor parallel {chosen.tp} within a node, pipeline parallel {chosen.pp} across nodes); "
            f"{what}: {_figures(chosen)}{nxt}"
        )
        _record_rejected(plan, fits)
        if not multihost:
            # Large models: show what spreading over nodes would cost, for comparison.
            over = [s for s in _multihost_candidates(singles) if s.node_count == 2]
            big = [f for f in fits if f.shape.accelerator_count == 8 and not f.fits]
            if big and over:
                extra = [
                    evaluate(s, **{**kw, "tensor_parallel_size": 8, "pipeline_parallel_size": None})
                    for s in over
                    if any(b.shape.machine_type == s.machine_type for b in big)
                ]
                fitting = ranked(fitting + extra)

    _fill_from_fit(plan, chosen)
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
    if chosen.shape.node_count > 1:
        plan.warnings.append(
            "multi-host serving (multihostGpuNodeCount > 1) is a preview feature set through the v1beta1 API; "
            "the replica's nodes talk over the machine family's GPU network"
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
    swap_space: int = 16,
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
) -> Plan:
    """`vlp plan --model REPO_OR_DIR`: the hardware a model needs and what it costs; no quota, no project."""
    from components.config import Hardware, Serving, Workload

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


# Where the mirror step runs: sized by the weights (components/pipelines pick the branch at preflight).
def mirror_machine_for(weights_bytes: int) -> dict[str, Any]:
    """Keyword arguments for GCPC's create_custom_training_job_from_component that size the mirror step.

    Network bandwidth is what matters: GCE egress scales with vCPUs (e2-standard-4 ~8 Gbps,
    n2-standard-8 16 Gbps, n2-standard-16 32 Gbps). Disk stays at the 100 GB default: nothing is staged.
    """
    gb = weights_bytes / 1e9
    if gb <= 20:
        machine, gbps = "e2-standard-4", 8
    elif gb <= 150:
        machine, gbps = "n2-standard-8", 16
    else:
        machine, gbps = "n2-standard-16", 32
    # Timeout: 4x the time at a quarter of line rate, at least an hour; a stuck job must not run a week.
    seconds = max(3600, int(4 * weights_bytes / (gbps / 8 * 1e9 / 4)))
    return {"machine_type": machine, "boot_disk_size_gb": 100, "timeout": f"{seconds}s"}
