"""Model facts: what planning needs to know about a model, read from its config and safetensors headers (on the
Hub, or in a local directory) without reading a byte of weights."""

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

from vlp.components.planning.architectures import layout
from vlp.components.planning.catalog import MiB

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
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
TORCH_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
# Quantization side tensors: counted in bytes, not in parameters.
AUX_SUFFIXES = (
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
    moe_layers: int = 0
    # What one token computes with (MoE: all but the routed experts it skips) and the routed experts' parameters,
    # from the architecture's layout (architectures.py); equal to params / 0 for a dense model.
    active_params: int = 0
    expert_params: int = 0
    layer_windows: list[int] = field(default_factory=list)  # per layer: attention window in tokens, 0 = full
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
        block = qc.get("weight_block_size")
        if block:  # DeepSeek-V3/R1, Qwen3 FP8: 128x128 blocks, each with its own scale
            return "fp8", 8, f"fp8 block-wise {'x'.join(str(b) for b in block)}"
        return "fp8", 8, method
    if method == "mxfp4":  # gpt-oss: the MoE experts in OCP MX FP4 (4-bit values, a shared 8-bit scale per 32)
        return "mxfp4", 4, "mxfp4 (MoE experts)"
    if method == "modelopt":  # NVIDIA ModelOpt checkpoints: quant_algo FP8 or NVFP4
        algo = str(qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo") or "").upper()
        if "FP4" in algo:
            return "nvfp4", 4, f"modelopt {algo.lower()}"
        return "fp8", 8, f"modelopt {algo.lower() or 'fp8'}"
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
                block = " block-wise" if weights.get("strategy") == "block" else ""
                return "fp8", 8, f"compressed-tensors fp8{block}"
            if weights.get("type") == "float" and bits == 4:  # NVFP4: FP4 values, FP8 scales per 16
                return "nvfp4", 4, "compressed-tensors nvfp4"
            acts = (group or {}).get("input_activations") or {}
            form = f"W{bits}A{acts.get('num_bits', 16)}"
            return "compressed-tensors", bits, f"compressed-tensors int{bits} ({form})"
        return "compressed-tensors", None, "compressed-tensors"
    return method or None, qc.get("bits"), method


def first_int(*values: Any) -> int:
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
    heads = first_int(text.get("num_attention_heads"), text.get("n_head"))
    hidden = first_int(text.get("hidden_size"), text.get("d_model"), text.get("n_embd"))
    kv_heads = first_int(text.get("num_key_value_heads"), text.get("num_kv_heads"), heads)
    head_dim = first_int(text.get("head_dim"), hidden // heads if heads else 0)
    lay = layout(config, text)
    experts = lay.experts
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
        layers=first_int(text.get("num_hidden_layers"), text.get("n_layer"), text.get("num_layers")),
        hidden_size=hidden,
        intermediate_size=first_int(text.get("intermediate_size"), text.get("ffn_dim"), 4 * hidden),
        attention_heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=first_int(text.get("vocab_size"), config.get("vocab_size")),
        context_length=first_int(
            text.get("max_position_embeddings"),
            text.get("max_seq_len"),
            text.get("seq_length"),
            text.get("n_positions"),
            config.get("max_position_embeddings"),
        ),
        kv_lora_rank=first_int(text.get("kv_lora_rank")),
        qk_rope_head_dim=first_int(text.get("qk_rope_head_dim")),
        moe_experts=experts,
        moe_experts_per_token=lay.experts_per_token,
        moe_layers=lay.moe_layers,
        expert_params=lay.expert_params,
        layer_windows=list(lay.layer_windows) if any(lay.layer_windows) else [],
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
        facts.embedding_bytes = sum(t.nbytes for t in tensors if is_embedding(t.name))
        if any(t.name.startswith(("vision_model.", "vision_tower.", "visual.", "model.vision")) for t in tensors):
            facts.vision = True
    elif index:
        facts.weights_bytes = int((index.get("metadata") or {}).get("total_size") or 0)
        facts.weights_source = "index total_size"
        facts.params = lay.total_params() if lay.layers and lay.hidden else 0
        facts.embedding_bytes = _arithmetic_embedding_bytes(facts)
        names = list((index.get("weight_map") or {}).keys())
        if any(n.startswith(("vision_model.", "vision_tower.", "visual.", "model.vision")) for n in names):
            facts.vision = True
    facts.active_params = max(1, facts.params - lay.inactive_params()) if facts.params else 0
    return facts


def is_embedding(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight"))


def _logical_params(t: TensorInfo, quant: str | None, bits: int | None) -> int:
    if t.name.endswith(AUX_SUFFIXES):
        return 0
    if t.name.endswith(".qweight") and t.dtype == "I32":
        return t.numel * (32 // (bits or 4))  # AWQ/GPTQ pack 32/bits weights per int32
    if quant == "bitsandbytes" and bits == 4 and t.dtype == "U8":
        return t.numel * 2
    if quant == "compressed-tensors" and t.name.endswith("weight_packed"):
        return t.numel * (32 // (bits or 4))
    return t.numel


def _arithmetic_embedding_bytes(f: ModelFacts) -> int:
    per = TORCH_DTYPE_BYTES.get(f.dtype, 2)
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


def revision_not_found_message(repo: str, revision: str, endpoint: str | None = None) -> str:
    """The repo exists but not this branch, tag or commit: say which, and how to see the ones it has."""
    where = f", endpoint={endpoint!r}" if endpoint else ""
    return (
        f"{repo} has no revision {revision!r} (the repo exists; that branch, tag or commit does not): set model.revision "
        f"to one it has, or leave it out for main. List its branches and tags with: python -c \"from huggingface_hub "
        f"import list_repo_refs; print(list_repo_refs({repo!r}{where}))\" (add token=... for a gated or private repo)"
    )


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
        raise ModelAccessError(revision_not_found_message(repo, revision, host)) from exc
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
    path = Path(model).expanduser()
    if path.is_dir():
        return read_local_facts(path)
    # What only a path can be (a Hub id is ORG/NAME): say so, not huggingface_hub's repo-id complaint.
    if path.exists() or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ModelAccessError(
            f"{model} is not a model directory ({'a file' if path.exists() else 'it does not exist'}): give a "
            "checkout directory with config.json, or a Hub repo id (ORG/NAME)"
        )
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
