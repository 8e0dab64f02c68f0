"""How the architectures people deploy now lay out their parameters and their KV cache, read from each one's own
config.json fields: mixture-of-experts (routed and shared experts, dense first layers, interleaved MoE layers), DeepSeek's
multi-head latent attention, and sliding-window / hybrid attention layers.

Field names per family (transformers' configuration_*.py for each model type):
- Mixtral, gpt-oss: `num_local_experts`, `num_experts_per_tok` (gpt-oss: `experts_per_token` too), experts of
  `intermediate_size`; no shared expert, every layer MoE.
- Qwen2-MoE / Qwen3-MoE: `num_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `decoder_sparse_step`,
  `mlp_only_layers` (dense layers of `intermediate_size`), Qwen2-MoE's `shared_expert_intermediate_size`.
- DeepSeek V2/V3/R1: `n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `n_shared_experts`,
  `first_k_dense_replace` dense first layers of `intermediate_size`, `moe_layer_freq`; MLA: `q_lora_rank`,
  `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`.
- Llama 4: `num_local_experts`, `num_experts_per_tok`, experts and one shared expert of `intermediate_size`, dense
  layers of `intermediate_size_mlp`, MoE every `interleave_moe_layer_step` layers.
- Windows: `layer_types` ("sliding_attention" / "full_attention": Gemma 3 and gpt-oss in current transformers),
  else Gemma 3's `sliding_window_pattern` (every Nth layer full), Gemma 2's alternation (even layers sliding),
  or `sliding_window` on every layer (Mistral v0.1; Qwen2 only with `use_sliding_window`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _int(*values: Any) -> int:
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool) and v:
            return int(v)
    return 0


@dataclass(frozen=True)
class Layout:
    """Per-layer parameter shapes of a decoder, and which layers attend through a window."""

    layers: int
    hidden: int
    vocab: int
    tied_embeddings: bool
    attention_params: int  # per layer
    dense_layers: int
    dense_intermediate: int
    moe_layers: int
    experts: int
    experts_per_token: int
    expert_intermediate: int
    shared_intermediate: int  # all shared experts of one MoE layer together
    layer_windows: tuple[int, ...]  # per layer: the window in tokens, 0 = full attention

    @property
    def expert_params(self) -> int:
        """Every routed expert's MLP (gate, up, down) in every MoE layer."""
        return self.moe_layers * self.experts * 3 * self.hidden * self.expert_intermediate

    def total_params(self) -> int:
        """The decoder's parameters (vision towers and MTP layers not included)."""
        dense_mlp = self.dense_layers * 3 * self.hidden * self.dense_intermediate
        moe = self.expert_params + self.moe_layers * (3 * self.hidden * self.shared_intermediate + self.hidden * self.experts)
        norms = self.layers * 2 * self.hidden + self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.attention_params + dense_mlp + moe + norms + embeddings

    def inactive_params(self) -> int:
        """What one token does not compute with: the routed experts it is not sent to."""
        if not self.experts or not self.experts_per_token:
            return 0
        return self.moe_layers * (self.experts - self.experts_per_token) * 3 * self.hidden * self.expert_intermediate


def _attention_params(text: Mapping[str, Any], hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    kv_rank = _int(text.get("kv_lora_rank"))
    if kv_rank:  # DeepSeek MLA (modeling_deepseek_v3.py DeepseekV3Attention)
        nope, rope = _int(text.get("qk_nope_head_dim")), _int(text.get("qk_rope_head_dim"))
        v_dim = _int(text.get("v_head_dim"), nope)
        q_rank = _int(text.get("q_lora_rank"))
        q = hidden * q_rank + q_rank * heads * (nope + rope) if q_rank else hidden * heads * (nope + rope)
        kv = hidden * (kv_rank + rope) + kv_rank * heads * (nope + v_dim)
        return q + kv + heads * v_dim * hidden
    return hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden


def _moe_layer_flags(text: Mapping[str, Any], model_type: str, layers: int, experts: int) -> list[bool]:
    if not experts:
        return [False] * layers
    if "first_k_dense_replace" in text or model_type.startswith("deepseek"):
        first = _int(text.get("first_k_dense_replace"))
        freq = _int(text.get("moe_layer_freq"), 1)
        return [i >= first and i % freq == 0 for i in range(layers)]
    if "interleave_moe_layer_step" in text:
        step = _int(text.get("interleave_moe_layer_step"), 1)
        return [(i + 1) % step == 0 for i in range(layers)]
    if "decoder_sparse_step" in text or "mlp_only_layers" in text:
        step = _int(text.get("decoder_sparse_step"), 1)
        dense = set(text.get("mlp_only_layers") or [])
        return [i not in dense and (i + 1) % step == 0 for i in range(layers)]
    return [True] * layers


def layer_windows(text: Mapping[str, Any], model_type: str, layers: int) -> tuple[int, ...]:
    """Each layer's attention window (0 = full), from the config's own description of its layers."""
    window = _int(text.get("sliding_window"))
    types = text.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return tuple(window if "sliding" in str(t) else 0 for t in types)
    if not window or text.get("use_sliding_window") is False:
        return (0,) * layers
    pattern = _int(text.get("sliding_window_pattern"))
    if pattern:  # Gemma 3: every pattern-th layer is global
        return tuple(0 if (i + 1) % pattern == 0 else window for i in range(layers))
    if model_type.startswith("gemma2"):  # Gemma 2 alternates, local first
        return tuple(window if i % 2 == 0 else 0 for i in range(layers))
    return (window,) * layers


def layout(config: Mapping[str, Any], text: Mapping[str, Any]) -> Layout:
    """The layout from config.json (`text`: the language model's section of it, for multimodal configs)."""
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    layers = _int(text.get("num_hidden_layers"), text.get("n_layer"), text.get("num_layers"))
    hidden = _int(text.get("hidden_size"), text.get("d_model"), text.get("n_embd"))
    heads = _int(text.get("num_attention_heads"), text.get("n_head"))
    kv_heads = _int(text.get("num_key_value_heads"), text.get("num_kv_heads"), heads)
    head_dim = _int(text.get("head_dim"), hidden // heads if heads else 0)
    intermediate = _int(text.get("intermediate_size"), text.get("ffn_dim"), 4 * hidden)
    experts = _int(text.get("num_local_experts"), text.get("n_routed_experts"), text.get("num_experts"))
    per_token = _int(text.get("num_experts_per_tok"), text.get("experts_per_token"), text.get("moe_topk"))
    flags = _moe_layer_flags(text, model_type, layers, experts)
    moe_layers = sum(flags)
    expert_inter = _int(text.get("moe_intermediate_size"), intermediate) if experts else 0
    dense_inter = _int(text.get("intermediate_size_mlp"), intermediate)
    shared = _int(text.get("n_shared_experts")) * expert_inter
    shared = shared or _int(text.get("shared_expert_intermediate_size"))
    if experts and model_type.startswith("llama4"):
        shared = intermediate  # one shared expert per MoE layer (modeling_llama4.py Llama4TextMoe.shared_expert)
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return Layout(
        layers=layers,
        hidden=hidden,
        vocab=_int(text.get("vocab_size"), config.get("vocab_size")),
        tied_embeddings=tied,
        attention_params=_attention_params(text, hidden, heads, kv_heads, head_dim) if heads else 0,
        dense_layers=layers - moe_layers,
        dense_intermediate=dense_inter,
        moe_layers=moe_layers,
        experts=experts,
        experts_per_token=per_token if experts else 0,
        expert_intermediate=expert_inter,
        shared_intermediate=shared,
        layer_windows=layer_windows(text, model_type, layers),
    )


def expected_experts_touched(experts: int, per_token: int, batch: int) -> float:
    """Distinct experts a decode step reads in one MoE layer when `batch` tokens each pick `per_token` of `experts`:
    E x (1 - (1 - k/E)^b), the expectation under uniform, independent routing (real routers are skewed, which
    touches fewer: an upper bound on bytes read)."""
    if experts <= 0 or per_token <= 0:
        return float(experts)
    return experts * (1.0 - (1.0 - per_token / experts) ** max(1, batch))
