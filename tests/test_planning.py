"""Planning against the seed models: exact weight bytes from safetensors headers, the memory model, the shape choice."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from vlp.components.config import load_config
from vlp.components.planning import model_facts
from vlp.components.planning.catalog import GB
from vlp.components.planning.model_facts import read_local_facts
from vlp.components.planning.plan import Plan, plan_for_facts, plan_model
from vlp.components.planning.report import render_markdown, render_table

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- Real config.json files of the seed models (as published on the Hub) -----------------------------------

_LLAMA31_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_8B = {
    **_LLAMA31_COMMON,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
}
LLAMA_70B = {
    **_LLAMA31_COMMON,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}
LLAMA_405B = {
    **_LLAMA31_COMMON,
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_attention_heads": 128,
    "num_hidden_layers": 126,
}
# Meta's FP8 release quantizes the MLPs of layers 1-124 row-wise (fbgemm); attention, the first and last
# layers' MLPs and lm_head stay BF16.
_405B_NOT_CONVERTED = (
    [f"model.layers.{i}.self_attn.{p}" for i in range(126) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    + [f"model.layers.{i}.mlp.{p}" for i in (0, 125) for p in ("gate_proj", "up_proj", "down_proj")]
    + ["lm_head"]
)
LLAMA_405B_FP8 = {
    **LLAMA_405B,
    "quantization_config": {
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": _405B_NOT_CONVERTED,
        "quant_method": "fbgemm_fp8",
    },
}
LLAMA_8B_AWQ = {
    **LLAMA_8B,
    "torch_dtype": "float16",
    "quantization_config": {
        "bits": 4,
        "group_size": 128,
        "modules_to_not_convert": None,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    },
}
LLAMA_32_11B_VISION = {
    "architectures": ["MllamaForConditionalGeneration"],
    "image_token_index": 128256,
    "model_type": "mllama",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "text_config": {
        "model_type": "mllama_text_model",
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": _LLAMA31_COMMON["rope_scaling"],
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "attention_heads": 16,
        "hidden_size": 1280,
        "image_size": 560,
        "intermediate_size": 5120,
        "max_num_tiles": 4,
        "num_channels": 3,
        "num_global_layers": 8,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "vision_output_dim": 7680,
        "torch_dtype": "bfloat16",
    },
}
# model.safetensors.index.json "total_size" of the real repos, bytes.
REAL_TOTALS = {
    "meta-llama/Llama-3.1-8B-Instruct": 16_060_522_496,
    "meta-llama/Llama-3.1-70B-Instruct": 141_107_412_992,
    "meta-llama/Llama-3.2-11B-Vision-Instruct": 21_340_441_670,
}
LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
)


def llama_tensors(config: dict[str, Any]) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of every tensor a Llama checkpoint with this config holds, quantization included."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    hd = h // heads
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    float_dtype = {"bfloat16": "BF16", "float16": "F16"}[config["torch_dtype"]]
    skip = set(qc.get("modules_to_not_convert") or [])
    out: list[tuple[str, str, list[int]]] = [("model.embed_tokens.weight", float_dtype, [vocab, h])]

    def linear(name: str, out_f: int, in_f: int) -> None:
        if method == "awq" and name not in skip:
            group = qc["group_size"]
            out.append((f"{name}.qweight", "I32", [in_f, out_f // 8]))
            out.append((f"{name}.qzeros", "I32", [in_f // group, out_f // 8]))
            out.append((f"{name}.scales", float_dtype, [in_f // group, out_f]))
        elif method == "fbgemm_fp8" and name not in skip:
            out.append((f"{name}.weight", "F8_E4M3", [out_f, in_f]))
            out.append((f"{name}.weight_scale", "F32", [out_f, 1]))
        else:
            out.append((f"{name}.weight", float_dtype, [out_f, in_f]))

    for i in range(layers):
        p = f"model.layers.{i}"
        linear(f"{p}.self_attn.q_proj", heads * hd, h)
        linear(f"{p}.self_attn.k_proj", kv * hd, h)
        linear(f"{p}.self_attn.v_proj", kv * hd, h)
        linear(f"{p}.self_attn.o_proj", h, heads * hd)
        linear(f"{p}.mlp.gate_proj", inter, h)
        linear(f"{p}.mlp.up_proj", inter, h)
        linear(f"{p}.mlp.down_proj", h, inter)
        out.append((f"{p}.input_layernorm.weight", float_dtype, [h]))
        out.append((f"{p}.post_attention_layernorm.weight", float_dtype, [h]))
    out.append(("model.norm.weight", float_dtype, [h]))
    out.append(("lm_head.weight", float_dtype, [vocab, h]))
    return out


def _nbytes(dtype: str, shape: list[int]) -> int:
    return int(np.prod(shape)) * int(model_facts.DTYPE_BYTES[dtype])


def write_header_only_model(
    dest: Path,
    config: dict[str, Any],
    *,
    tensors: list[tuple[str, str, list[int]]] | None = None,
    shard_bytes: int = 5 * GB,
    chat_template: bool = True,
    index_only_total: int | None = None,
) -> Path:
    """A model directory as the Hub has it, except that each shard holds only its safetensors header.

    The header declares the real dtypes, shapes and data offsets, so sizes read from it are exact while
    the directory stays a few MB. With `index_only_total`, only model.safetensors.index.json is written
    (a realistic total_size and weight_map), as for a repo whose shard headers were not read.
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tok_cfg: dict[str, Any] = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if chat_template:
        tok_cfg["chat_template"] = LLAMA3_TEMPLATE
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    tensors = tensors if tensors is not None else llama_tensors(config)
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for t in tensors:
        if size and size + _nbytes(t[1], t[2]) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t[1], t[2])
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {t[0]: name for name, shard in zip(names, shards, strict=True) for t in shard}
    total = sum(_nbytes(t[1], t[2]) for t in tensors)
    index = {"metadata": {"total_size": index_only_total or total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if index_only_total:
        return dest
    for name, shard in zip(names, shards, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tname, dtype, shape in shard:
            n = _nbytes(dtype, shape)
            header[tname] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        (dest / name).write_bytes(struct.pack("<Q", len(raw)) + raw)  # the data section is left out
    return dest


def vision_tensors() -> list[tuple[str, str, list[int]]]:
    # Enough names for the vision tower to be recognised; sizes come from the index's total_size.
    return [
        ("vision_model.patch_embedding.weight", "BF16", [1280, 3, 14, 14]),
        *llama_tensors({**LLAMA_8B, "num_hidden_layers": 1}),
    ]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeds")
    return {
        "8b": write_header_only_model(root / "llama-3.1-8b", LLAMA_8B),
        "70b": write_header_only_model(root / "llama-3.1-70b", LLAMA_70B),
        "405b-fp8": write_header_only_model(root / "llama-3.1-405b-fp8", LLAMA_405B_FP8),
        "405b": write_header_only_model(root / "llama-3.1-405b", LLAMA_405B),
        "8b-awq": write_header_only_model(root / "llama-3.1-8b-awq", LLAMA_8B_AWQ),
        "11b-vision": write_header_only_model(
            root / "llama-3.2-11b-vision",
            LLAMA_32_11B_VISION,
            tensors=vision_tensors(),
            index_only_total=REAL_TOTALS["meta-llama/Llama-3.2-11B-Vision-Instruct"],
        ),
        "8b-no-template": write_header_only_model(root / "no-template", LLAMA_8B, chat_template=False),
    }


def plan_seed(config_file: str, model_dir: Path, **overrides: Any) -> Plan:
    cfg = load_config(REPO_ROOT / "configs" / config_file, [f"{k}={v}" for k, v in overrides.items()])
    facts = read_local_facts(model_dir)
    return plan_for_facts(facts, cfg.serving, cfg.hardware, regions=cfg.placement.regions)


# --- Model facts -------------------------------------------------------------------------------------------


def test_weight_bytes_are_exact_from_real_safetensors_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    save_file(
        {"a": rng.standard_normal((7, 13)).astype(np.float32), "b": np.zeros((5,), np.float16)},
        str(tmp_path / "model-00001-of-00002.safetensors"),
    )
    save_file({"c": np.ones((3, 4, 5), np.int8)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_8B, "torch_dtype": "float32"}))
    facts = read_local_facts(tmp_path)
    assert facts.weights_bytes == 7 * 13 * 4 + 5 * 2 + 60
    assert facts.params == 7 * 13 + 5 + 60
    on_disk = 0
    for f in tmp_path.glob("*.safetensors"):
        (hlen,) = struct.unpack("<Q", f.read_bytes()[:8])
        on_disk += f.stat().st_size - 8 - hlen
    assert facts.weights_bytes == on_disk
    assert facts.weight_dtypes == {"F32": 364, "F16": 10, "I8": 60}


@pytest.mark.parametrize(
    ("key", "repo", "params"),
    [
        ("8b", "meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
        ("70b", "meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496),
    ],
)
def test_seed_weights_match_the_real_repo_totals(seeds: dict[str, Path], key: str, repo: str, params: int) -> None:
    facts = read_local_facts(seeds[key])
    assert facts.weights_source == "safetensors headers"
    assert abs(facts.weights_bytes - REAL_TOTALS[repo]) / REAL_TOTALS[repo] < 0.02
    assert facts.weights_bytes == REAL_TOTALS[repo]  # exact, in fact: 2 bytes x the parameter count
    assert facts.params == params
    assert (facts.layers, facts.kv_heads, facts.head_dim, facts.context_length) == (
        LLAMA_8B["num_hidden_layers"] if key == "8b" else 80,
        8,
        128,
        131072,
    )
    assert facts.has_chat_template and facts.dtype == "bfloat16" and facts.quantization is None


def test_quantized_facts(seeds: dict[str, Path]) -> None:
    fp8 = read_local_facts(seeds["405b-fp8"])
    assert fp8.quantization == "fp8" and fp8.quant_detail == "fbgemm_fp8"
    assert fp8.params == 405_853_388_800  # FP8 weights count one parameter per byte; scales are not parameters
    assert set(fp8.weight_dtypes) == {"BF16", "F8_E4M3", "F32"}
    assert 480 * GB < fp8.weights_bytes < 500 * GB  # BF16 attention + FP8 MLPs
    # The plan says how the weights are stored, not only the config's (compute) torch_dtype.
    from vlp.components.planning import report as plan_report

    shown = plan_report.render_table(plan_model(str(seeds["405b-fp8"]), max_model_len=8192))
    assert "dtype bfloat16 (weights stored as F8_E4M3 " in shown, shown[:600]
    awq = read_local_facts(seeds["8b-awq"])
    assert awq.quantization == "awq" and awq.quant_bits == 4
    assert awq.params == 8_030_261_248  # int4 weights unpacked from the int32 qweights
    assert 5.6 * GB < awq.weights_bytes < 5.9 * GB  # the AWQ-INT4 repo's ~5.7 GB


def test_vision_facts_read_the_nested_text_config(seeds: dict[str, Path]) -> None:
    facts = read_local_facts(seeds["11b-vision"])
    assert facts.vision and facts.model_type == "mllama"
    assert (facts.layers, facts.kv_heads, facts.head_dim, facts.cross_attention_layers) == (40, 8, 128, 8)
    assert facts.weights_bytes == REAL_TOTALS["meta-llama/Llama-3.2-11B-Vision-Instruct"]
    assert facts.weights_source == "index total_size"


# --- Memory model and the seeds ----------------------------------------------------------------------------


def test_8b_bf16_fits_one_l4_as_the_seed_says(seeds: dict[str, Path]) -> None:
    plan = plan_seed("llama-3.1-8b-vllm-l4.yaml", seeds["8b"])
    assert plan.fits, plan.errors
    assert (plan.machine_type, plan.accelerator_type, plan.accelerator_count) == ("g2-standard-12", "NVIDIA_L4", 1)
    assert plan.max_model_len == 4096 and plan.max_num_seqs == 256
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert plan.limits["concurrent_sequences"] >= 2  # "~5 GB of KV cache" in the seed
    assert plan.limits["max_model_len"] >= 16384
    hourly = {"hardware": "{machine_type: auto, objective: cost_per_hour}"}
    auto = plan_seed("llama-3.1-8b-vllm-l4.yaml", seeds["8b"], **hourly)
    assert auto.fits and auto.accelerator_type == "NVIDIA_L4" and auto.accelerator_count == 1
    # Current vLLM reserves no swap space (it removed --swap-space): the cheapest L4 host fits.
    assert auto.machine_type == "g2-standard-4" and "cheapest fitting shape per hour" in auto.reason
    # With the 2024 image's 16 GiB of swap space per GPU, vLLM refuses g2-standard-4's 16 GB of host memory.
    swap = plan_seed("llama-3.1-8b-vllm-l4.yaml", seeds["8b"], **hourly, **{"serving.swap_space": 16})
    assert swap.machine_type == "g2-standard-8"
    assert any("g2-standard-4" in r["shape"] and "Too large swap space" in r["reason"] for r in swap.rejected)


def test_kv_cache_smaller_than_max_model_len_mirrors_vllm(seeds: dict[str, Path]) -> None:
    plan = plan_seed("llama-3.1-8b-vllm-l4.yaml", seeds["8b"], **{"serving.max_model_len": 65536})
    assert not plan.fits
    msg = plan.errors[0]
    assert (
        "The model's max seq len (65536) is larger than the maximum number of tokens that can be stored in KV cache ("
        in msg
    )
    assert "lower serving.max_model_len to" in msg and "gpu_memory_utilization" in msg and "bigger shape" in msg
    low = plan_seed("llama-3.1-8b-vllm-l4.yaml", seeds["8b"], **{"serving.gpu_memory_utilization": 0.72})
    assert not low.fits and "weights need 16.06 GB per GPU" in low.errors[0]


def test_70b_bf16_on_8_l4(seeds: dict[str, Path]) -> None:
    plan = plan_seed("llama-3.1-70b-vllm-8xl4.yaml", seeds["70b"])
    assert plan.fits, plan.errors
    assert (plan.accelerator_type, plan.accelerator_count, plan.tensor_parallel_size) == ("NVIDIA_L4", 8, 8)
    assert plan.limits["concurrent_sequences"] >= 1
    auto = plan_seed(
        "llama-3.1-70b-vllm-8xl4.yaml",
        seeds["70b"],
        hardware="{machine_type: auto, objective: cost_per_hour}",
        **{"serving.tensor_parallel_size": "null"},
    )
    assert auto.fits and auto.machine_type == "g2-standard-96", auto.reason
    assert auto.alternatives and all(a["price_per_hour_usd"] >= auto.price_per_hour_usd for a in auto.alternatives)
    assert any(r["accelerator_type"] == "NVIDIA_L4" and r["accelerator_count"] == 4 for r in auto.rejected)


def test_405b_fp8_on_8_h100(seeds: dict[str, Path]) -> None:
    plan = plan_seed("llama-3.1-405b-fp8-tgi-a3.yaml", seeds["405b-fp8"])
    assert plan.fits, plan.errors
    assert (plan.machine_type, plan.accelerator_count, plan.tensor_parallel_size) == ("a3-highgpu-8g", 8, 8)
    assert plan.max_model_len == 8192 and plan.max_num_seqs == 32


MULTI_HOST_IMAGE = (
    "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20250312_0916_RC01"
)


def test_405b_bf16_does_not_fit_one_8xh100_node_and_plans_two_on_the_documented_path(seeds: dict[str, Path]) -> None:
    h100 = plan_model(
        str(seeds["405b"]),
        max_model_len=8192,
        machine_type="a3-highgpu-8g",
        accelerator_type="NVIDIA_H100_80GB",
        accelerator_count=8,
    )
    assert not h100.fits and "weights need" in h100.errors[0]
    auto = plan_model(str(seeds["405b"]), max_model_len=8192)
    assert auto.fits
    # One 8 x H200 node holds it: multi-host is planned only when no single node does.
    assert (auto.machine_type, auto.accelerator_type, auto.node_count) == ("a3-ultragpu-8g", "NVIDIA_H200_141GB", 1)
    assert all(a["node_count"] == 1 for a in auto.alternatives) and not auto.serving_image.endswith("RC01")
    # H100s alone: Google's documented multi-host path (use-multihost-gpu, Preview), 2 x a3-highgpu-8g, TP 8 x PP 2.
    only_h100 = plan_model(str(seeds["405b"]), max_model_len=8192, accelerator_type="NVIDIA_H100_80GB")
    assert only_h100.fits, only_h100.errors
    got = (only_h100.machine_type, only_h100.accelerator_count, only_h100.node_count)
    assert got == ("a3-highgpu-8g", 8, 2)
    assert (only_h100.tensor_parallel_size, only_h100.pipeline_parallel_size) == (8, 2)
    assert (only_h100.serving_image, only_h100.engine_version) == (MULTI_HOST_IMAGE, "0.7.3")
    (preview,) = [w for w in only_h100.warnings if "Preview" in w]
    assert "use-multihost-gpu" in preview and "dedicated endpoint" in preview and "v1beta1" in preview
    assert only_h100.price_per_hour_usd == pytest.approx(
        2
        * plan_model(
            str(seeds["8b"]), machine_type="a3-highgpu-8g", accelerator_type="NVIDIA_H100_80GB", accelerator_count=8
        ).price_per_hour_usd
    )
    assert only_h100.throughput["output_tokens_per_s"] > 0 and only_h100.cost_per_million_output_tokens_usd > 0
    # The other multi-host shapes on the same path are the alternatives; no other machine is.
    assert {(a["machine_type"], a["node_count"]) for a in only_h100.alternatives} <= {
        ("a3-highgpu-8g", n) for n in (3, 4)
    }


def plan_multi_host(seeds: dict[str, Path], *overrides: str) -> Plan:
    """The 405B BF16 preset planned as preflight plans it (endpoint.dedicated included)."""
    cfg = load_config(REPO_ROOT / "configs" / "llama-3.1-405b-bf16-vllm-2xa3.yaml", list(overrides))
    return plan_for_facts(
        read_local_facts(seeds["405b"]),
        cfg.serving,
        cfg.hardware,
        regions=cfg.placement.regions,
        dedicated=cfg.endpoint.dedicated,
    )


def test_the_405b_bf16_preset_plans_its_two_nodes(seeds: dict[str, Path]) -> None:
    plan = plan_multi_host(seeds)
    assert plan.fits, plan.errors
    assert (plan.machine_type, plan.node_count, plan.tensor_parallel_size, plan.pipeline_parallel_size) == (
        "a3-highgpu-8g",
        2,
        8,
        2,
    )
    assert plan.serving_image == MULTI_HOST_IMAGE and plan.max_model_len == 8192
    assert any("Preview" in w for w in plan.warnings) and not any(
        "endpoint.dedicated: true" in w for w in plan.warnings
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            ["hardware={machine_type: a3-megagpu-8g, accelerator_type: NVIDIA_H100_MEGA_80GB, accelerator_count: 8}"],
            "a3-megagpu-8g (8 x NVIDIA_H100_MEGA_80GB) is not the page's machine",
        ),
        (
            ["hardware={machine_type: a3-ultragpu-8g, accelerator_type: NVIDIA_H200_141GB, accelerator_count: 8}"],
            "a3-ultragpu-8g (8 x NVIDIA_H200_141GB) is not the page's machine",
        ),
        (["serving.image=docker.io/vllm/vllm-openai:v0.34.0"], "has no documented multi-host launcher"),
        (["endpoint.dedicated=false"], "requires a dedicated endpoint': set endpoint.dedicated: true"),
        (["serving.engine=tgi"], "TGI shards over the GPUs of one node only"),
    ],
    ids=["a3-mega", "a3-ultra", "vllm-0.34", "shared-endpoint", "tgi"],
)
def test_a_multi_host_shape_off_the_documented_path_is_refused_with_the_reason(
    seeds: dict[str, Path], overrides: list[str], reason: str
) -> None:
    plan = plan_multi_host(seeds, *overrides)
    assert not plan.fits
    (error,) = [e for e in plan.errors if "multi-host" in e]
    assert "outside Google's documented multi-host path" in error and reason in error, error


def test_auto_spreads_over_nodes_only_on_the_documented_machine(seeds: dict[str, Path]) -> None:
    """Nothing fits one node: A3 Mega would fit over two nodes, but only a3-highgpu-8g is documented; the error says
    so. A shared endpoint turns the documented plan into an error naming the fix."""
    mega = plan_model(str(seeds["405b"]), max_model_len=8192, accelerator_type="NVIDIA_H100_MEGA_80GB")
    assert not mega.fits
    assert "would fit spread over 2 x a3-megagpu-8g nodes, but that is outside" in mega.errors[0]
    assert "a3-megagpu-8g (8 x NVIDIA_H100_MEGA_80GB) is not the page's machine" in mega.errors[0]
    shared = plan_multi_host(seeds, "hardware={accelerator_type: NVIDIA_H100_80GB}", "endpoint.dedicated=false")
    assert not shared.fits
    assert "would fit spread over 2 x a3-highgpu-8g nodes" in shared.errors[0]
    assert "set endpoint.dedicated: true" in shared.errors[0]
    old = plan_model(
        str(seeds["405b"]),
        max_model_len=8192,
        accelerator_type="NVIDIA_H100_80GB",
        image="us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20241001_0916_RC00",
    )
    assert not old.fits and "vLLM 0.6.2" in old.errors[0] and "has no documented multi-host launcher" in old.errors[0]


def test_8b_awq_int4_on_one_l4_with_a_large_kv_cache(seeds: dict[str, Path]) -> None:
    plan = plan_seed("llama-3.1-8b-awq-int4-tgi.yaml", seeds["8b-awq"])
    assert plan.fits, plan.errors
    assert (plan.accelerator_type, plan.accelerator_count) == ("NVIDIA_L4", 1)
    assert plan.quantization == "awq"
    assert plan.memory["kv_cache"] > 10 * GB
    assert plan.limits["concurrent_sequences"] >= 8  # 8192-token sequences held at once


def test_vision_max_num_seqs_256_is_the_seeds_oom(seeds: dict[str, Path]) -> None:
    ok = plan_seed("llama-3.2-11b-vision-vllm-a100.yaml", seeds["11b-vision"])
    assert ok.fits and ok.max_num_seqs == 12, ok.errors
    oom = plan_seed("llama-3.2-11b-vision-vllm-a100.yaml", seeds["11b-vision"], **{"serving.max_num_seqs": 256})
    assert not oom.fits
    assert "max_num_seqs 256 does not fit" in oom.errors[0] and "vision encoder" in oom.errors[0]
    assert "set serving.max_num_seqs to" in oom.errors[0]
    small = plan_model(
        str(seeds["11b-vision"]),
        max_model_len=4096,
        machine_type="a2-highgpu-1g",
        accelerator_type="NVIDIA_TESLA_A100",
        accelerator_count=1,
    )
    assert small.fits and small.max_num_seqs < 256
    assert any("max_num_seqs 256" in w and "vision encoder" in w for w in small.warnings)


def test_explicit_shape_errors_name_the_fix(seeds: dict[str, Path]) -> None:
    wrong = plan_model(
        str(seeds["8b"]), machine_type="g2-standard-12", accelerator_type="NVIDIA_L4", accelerator_count=2
    )
    assert not wrong.fits and "takes 1 x NVIDIA_L4, not 2" in wrong.errors[0]
    # T4s are left out of `auto` but an explicit T4 shape is checked: AWQ kernels run on Turing (7.5) ...
    t4 = plan_model(
        str(seeds["8b-awq"]),
        engine="tgi",
        machine_type="n1-standard-8",
        accelerator_type="NVIDIA_TESLA_T4",
        accelerator_count=1,
        max_model_len=4096,
    )
    assert t4.fits, t4.errors
    # ... FP8 kernels do not.
    fp8 = plan_model(
        str(seeds["405b-fp8"]), machine_type="n1-standard-32", accelerator_type="NVIDIA_TESLA_T4", accelerator_count=4
    )
    assert not fp8.fits and "fp8 kernels need compute capability 8.0" in fp8.errors[0]
    # A machine whose swap space vLLM refuses:
    swap = plan_model(
        str(seeds["8b-awq"]),
        machine_type="g2-standard-4",
        accelerator_type="NVIDIA_L4",
        accelerator_count=1,
        swap_space=16,
    )
    assert not swap.fits and "Too large swap space" in swap.errors[0]


def test_missing_chat_template_is_flagged(seeds: dict[str, Path]) -> None:
    plan = plan_model(str(seeds["8b-no-template"]), max_model_len=4096)
    assert not plan.has_chat_template
    assert any("has no chat template" in w and "serving.chat_template" in w for w in plan.warnings)


def test_plan_json_and_reports(seeds: dict[str, Path]) -> None:
    plan = plan_seed("llama-3.1-8b-vllm-l4.yaml", seeds["8b"])
    data = json.loads(json.dumps(plan.to_dict()))
    for key in (
        "weights_bytes",
        "params",
        "dtype",
        "quantization",
        "fits",
        "machine_type",
        "accelerator_type",
        "accelerator_count",
        "node_count",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "max_model_len",
        "max_num_seqs",
        "price_per_hour_usd",
        "region",
        "quota",
        "alternatives",
        "warnings",
        "errors",
        "architecture",
        "layers",
        "kv_heads",
        "head_dim",
        "context_length",
        "has_chat_template",
        "gated",
        "vision",
    ):
        assert key in data, key
    table = render_table(plan)
    assert "g2-standard-12" in table and "16.06 GB" in table and "KV cache" in table
    md = render_markdown(plan)
    assert md.startswith("# ") and "| " in md and "g2-standard-12" in md


@pytest.mark.parametrize("config_file", ["llama-3.1-8b-vllm-l4.yaml", "llama-3.1-70b-vllm-8xl4.yaml"])
def test_max_model_len_beyond_the_models_context_is_named_as_such(seeds: dict[str, Path], config_file: str) -> None:
    """Not buried under a shape's own reason (an attention-head split, a memory shortfall)."""
    model = seeds["70b" if "70b" in config_file else "8b"]
    plan = plan_seed(config_file, model, **{"serving.max_model_len": 2_000_000})
    assert plan.errors == [
        f"serving.max_model_len 2000000 is longer than {plan.model}'s context length (131072): "
        "lower serving.max_model_len to 131072 or less"
    ], plan.errors
