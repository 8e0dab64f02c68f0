"""The planner on the models of 2025-26 (issue 32): mixture-of-experts counted as total and active parameters, MLA,
sliding-window layers, each from the real config's fields and checked against the published figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_planning import write_header_only_model

from vlp.components.planning.architectures import expected_experts_touched
from vlp.components.planning.model_facts import facts_from_config, read_local_facts
from vlp.components.planning.plan import plan_model

# config.json fields as published on the Hub (each repo's own file; fields the planner does not read left out).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16",
}  # fmt: skip
QWEN3_32B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 64,
    "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
}  # fmt: skip
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128,
    "num_hidden_layers": 61, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
    "tie_word_embeddings": False, "max_position_embeddings": 163840, "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16",
}  # fmt: skip
GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 36,
    "num_local_experts": 128, "num_experts_per_tok": 4, "experts_per_token": 4, "vocab_size": 201088,
    "tie_word_embeddings": False, "max_position_embeddings": 131072, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "torch_dtype": "bfloat16",
}  # fmt: skip
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 32768,
    "sliding_window": None, "torch_dtype": "bfloat16",
}  # fmt: skip
LLAMA4_SCOUT = {
    "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
    "text_config": {
        "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 48,
        "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": 202048,
        "max_position_embeddings": 10485760,
    },
    "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408}, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}  # fmt: skip
GEMMA3_27B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504, "num_attention_heads": 32,
        "num_key_value_heads": 16, "head_dim": 128, "num_hidden_layers": 62, "sliding_window": 1024,
        "sliding_window_pattern": 6, "vocab_size": 262208, "max_position_embeddings": 131072,
    },
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152}, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}  # fmt: skip

# (config, published total, published active, source). Totals exclude vision towers and MTP layers, as the config's
# decoder does; where a card counts otherwise, the row says how it is compared.
PUBLISHED = {
    "qwen3-30b-a3b": (QWEN3_30B_A3B, 30.5e9, 3.3e9, "Qwen/Qwen3-30B-A3B model card: 30.5B total, 3.3B activated"),
    "deepseek-v3": (DEEPSEEK_V3, 671e9, 37e9, "DeepSeek-V3 report: 671B total (685B with the MTP module), 37B activated"),
    # OpenAI's card counts active parameters without the embedding table (a lookup, no FLOPs): 5.13B + 0.58B.
    "gpt-oss-120b": (GPT_OSS_120B, 116.83e9, 5.13e9 + 201088 * 2880, "gpt-oss model card: 116.83B total, 5.13B active"),
    "mixtral-8x7b": (MIXTRAL_8X7B, 46.7e9, 12.9e9, "Mixtral of Experts paper: 47B total, 13B active per token"),
    # Meta's 109B includes the vision encoder, which the decoder count leaves out.
    "llama-4-scout": (LLAMA4_SCOUT, 109e9, 17e9, "Llama 4 Scout model card: 17B active, 16 experts, 109B total"),
    "gemma-3-27b": (GEMMA3_27B, 27e9, 27e9, "Gemma 3 technical report: 27B"),
    "qwen3-32b": (QWEN3_32B, 32.8e9, 32.8e9, "Qwen/Qwen3-32B model card: 32.8B"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name: str) -> None:
    config, total, active, source = PUBLISHED[name]
    facts = facts_from_config(name, "local", config, index={"metadata": {"total_size": 1}})
    assert facts.params == pytest.approx(total, rel=0.05), (source, facts.params)
    assert facts.active_params == pytest.approx(active, rel=0.05), (source, facts.active_params)


def test_moe_layouts_follow_each_familys_fields() -> None:
    ds = facts_from_config("ds", "local", DEEPSEEK_V3, index={"metadata": {"total_size": 1}})
    assert (ds.moe_layers, ds.moe_experts, ds.moe_experts_per_token) == (58, 256, 8)  # 3 dense first layers
    assert ds.kv_lora_rank == 512  # MLA: one 576-wide latent per token and layer
    qwen = facts_from_config("q", "local", {**QWEN3_30B_A3B, "mlp_only_layers": [0, 1]}, index={"metadata": {}})
    assert qwen.moe_layers == 46
    oss = facts_from_config("o", "local", GPT_OSS_120B, index={"metadata": {}})
    assert oss.layer_windows == [128, 0] * 18
    gemma = facts_from_config("g", "local", GEMMA3_27B, index={"metadata": {}})
    assert gemma.layer_windows.count(0) == 10 and set(gemma.layer_windows) == {0, 1024}  # 1 global in 6
    assert expected_experts_touched(128, 8, 1) == pytest.approx(8)
    assert 8 < expected_experts_touched(128, 8, 16) < 128 and expected_experts_touched(128, 8, 1024) == pytest.approx(
        128, rel=1e-3
    )


def _checkout(tmp: Path, name: str, config: dict[str, Any], total: int) -> Path:
    return write_header_only_model(tmp / name, config, tensors=[], index_only_total=total)


def test_an_moe_decode_step_reads_the_experts_it_uses_not_all_of_them(tmp_path: Path) -> None:
    """At one sequence, Qwen3-30B-A3B reads ~3B parameters' bytes a step; dense Qwen3-32B reads all of its 33B: on the
    same H100 the MoE decodes several times faster (the plan before counted both as dense: 30 vs 31 tokens/s)."""
    h100 = {"machine_type": "a3-highgpu-1g", "accelerator_type": "NVIDIA_H100_80GB", "accelerator_count": 1}
    one = {"concurrency": 1, "max_model_len": 4096}
    moe = plan_model(str(_checkout(tmp_path, "a3b", QWEN3_30B_A3B, 61_064_000_000)), **h100, **one)
    dense = plan_model(str(_checkout(tmp_path, "32b", QWEN3_32B, 65_524_000_000)), **h100, **one)
    assert moe.fits and dense.fits, (moe.errors, dense.errors)
    moe_tps, dense_tps = moe.throughput["output_tokens_per_s"], dense.throughput["output_tokens_per_s"]
    assert moe_tps > 3 * dense_tps, (moe_tps, dense_tps)
    assert moe.active_params < 0.15 * moe.params


def test_gemma3_27b_at_32k_on_one_h100_holds_several_full_sequences(tmp_path: Path) -> None:
    """5 of every 6 layers keep a 1,024-token window: vLLM's hybrid KV cache manager sizes them for the window, so
    one H100 holds several 32K sequences where sizing every layer for 32K holds one."""
    model = _checkout(tmp_path, "gemma3", GEMMA3_27B, 54_867_000_000)
    facts = read_local_facts(model)
    assert facts.layer_windows
    h100 = {"machine_type": "a3-highgpu-1g", "accelerator_type": "NVIDIA_H100_80GB", "accelerator_count": 1}
    plan = plan_model(str(model), max_model_len=32768, **h100)
    assert plan.fits, plan.errors
    assert plan.limits["concurrent_sequences"] >= 4, plan.limits  # 5 here, as the reading of vLLM has it
    # vLLM 0.34's own defaults on an 80 GB H100: 1024 sequences (get_batch_defaults), and the vision encoder
    # profiled at its token budget, not once per sequence as the 0.6 engine does.
    assert plan.engine_version == "0.34.0" and plan.max_num_seqs == 1024
    tgi = plan_model(str(model), engine="tgi", max_model_len=32768, **h100)  # TGI 2.4 sizes every layer in full
    assert tgi.limits.get("concurrent_sequences", 0) <= 1, tgi.limits


@pytest.mark.parametrize(
    ("quantization_config", "expected"),
    [
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, ("fp8", 8, "fp8 block-wise 128x128")),
        ({"quant_method": "mxfp4"}, ("mxfp4", 4, "mxfp4 (MoE experts)")),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, ("nvfp4", 4, "modelopt nvfp4")),
        (
            {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}},
            ("nvfp4", 4, "compressed-tensors nvfp4"),
        ),
        (
            {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
            ("compressed-tensors", 4, "compressed-tensors int4 (W4A16)"),
        ),
    ],
)
def test_the_quantization_formats_people_ship_now(quantization_config: dict, expected: tuple) -> None:
    facts = facts_from_config("m", "local", {**QWEN3_32B, "quantization_config": quantization_config}, index={})
    assert (facts.quantization, facts.quant_bits, facts.quant_detail) == expected


def test_fp4_weights_run_natively_only_on_blackwell(tmp_path: Path) -> None:
    """gpt-oss-120b (MXFP4 experts, 65 GB): vLLM 0.34 runs MXFP4 from compute capability 8.0 (A100) up, natively on
    Blackwell only; the plan says which."""
    config = {**GPT_OSS_120B, "quantization_config": {"quant_method": "mxfp4"}}
    model = str(_checkout(tmp_path, "oss", config, 65_249_000_000))
    h100 = plan_model(model, machine_type="a3-highgpu-1g", accelerator_type="NVIDIA_H100_80GB", accelerator_count=1)
    assert h100.fits, h100.errors
    assert any("no FP4 tensor cores" in w for w in h100.warnings), h100.warnings
    b200 = plan_model(model, machine_type="a4-highgpu-8g", accelerator_type="NVIDIA_B200", accelerator_count=8)
    assert not any("FP4" in w for w in b200.warnings), b200.warnings


GPT_OSS_20B = {
    **GPT_OSS_120B, "num_hidden_layers": 24, "num_local_experts": 32,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "quantization_config": {"quant_method": "mxfp4"},
}  # fmt: skip
LLAMA_33_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip
# The presets for the models people deploy now, each with its model's real config and index total_size: `auto` must
# pick the shape the preset names, on the image the catalog chooses (vLLM 0.34, whose registry serves each).
CURRENT_PRESETS = {
    "qwen3-30b-a3b-vllm-a100": (QWEN3_30B_A3B, 61_064_000_000),
    "gpt-oss-20b-vllm-l4": (GPT_OSS_20B, 13_761_264_768),
    "gemma-3-27b-vllm-a100": (GEMMA3_27B, 54_867_000_000),
    "llama-3.3-70b-vllm-2xa100": (LLAMA_33_70B, 141_107_000_000),
}


@pytest.mark.parametrize("preset", sorted(CURRENT_PRESETS))
def test_each_current_models_preset_names_the_shape_auto_picks(tmp_path: Path, preset: str) -> None:
    from vlp.components.config import load_config
    from vlp.components.planning.plan import plan_for_facts

    config, total = CURRENT_PRESETS[preset]
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / f"{preset}.yaml")
    auto = load_config(root / "configs" / f"{preset}.yaml", ["hardware=auto"])
    facts = read_local_facts(_checkout(tmp_path, preset, config, total))
    plan = plan_for_facts(facts, auto.serving, auto.hardware, regions=auto.placement.regions)
    assert plan.fits, plan.errors
    hw = cfg.hardware
    assert (plan.machine_type, plan.accelerator_type, plan.accelerator_count) == (
        hw.machine_type, hw.accelerator_type, hw.accelerator_count,
    )  # fmt: skip
    assert (plan.serving_image, plan.engine_version) == ("docker.io/vllm/vllm-openai:v0.34.0", "0.34.0")
