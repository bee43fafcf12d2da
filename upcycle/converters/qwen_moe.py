"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Both: softmax router `mlp.gate.weight` (E, D), top-k renormalised only when `norm_topk_prob` is true (false for
Qwen2-MoE's published checkpoints, true for Qwen3's), SwiGLU experts `mlp.experts.{e}.gate_proj/up_proj/down_proj`
on the Hub (fused in transformers 5). Qwen2-MoE adds a shared expert `mlp.shared_expert.*` gated by
sigmoid(`mlp.shared_expert_gate.weight` x). Dense layers: those in `mlp_only_layers`, or whose index + 1 is not a
multiple of `decoder_sparse_step`.
"""

from .spec import FamilySpec, TensorRule, swiglu_expert_layouts
from .tensor_rules import (
    LAYER,
    embeddings_and_head,
    head_dim_or_default,
    layer_norms,
    llama_attention,
    router,
    swiglu_mlp,
)


def qwen_moe_layers(config: dict) -> list[int]:
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer's rule for which layers get a sparse MoE block."""
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    n_experts = int(config.get("num_experts") or 0)
    return [
        layer for layer in range(int(config["num_hidden_layers"]))
        if layer not in dense and n_experts > 0 and (layer + 1) % step == 0
    ]


def derive_qwen_moe(config: dict) -> dict:
    """The attention's `getattr(config, "head_dim", hidden_size // num_attention_heads)` (no config field)."""
    return config | {"head_dim": head_dim_or_default(config)}


QWEN_DENSE_MLP = swiglu_mlp("mlp", "intermediate_size", scope="dense_layer")  # Qwen*MoeMLP of the dense layers

QWEN2_MOE_TENSORS = (
    *embeddings_and_head(), *layer_norms(), *llama_attention(qkv_bias="qkv_bias"), router("num_experts"),
    *swiglu_mlp("mlp.shared_expert", "shared_expert_intermediate_size", scope="moe_layer"),
    TensorRule(LAYER + "mlp.shared_expert_gate.weight", (1, "hidden_size"), scope="moe_layer"),
    *QWEN_DENSE_MLP,
)

QWEN3_MOE_TENSORS = (
    *embeddings_and_head(), *layer_norms(), *llama_attention("attention_bias", "attention_bias"),
    TensorRule(LAYER + "self_attn.q_norm.weight", ("head_dim",)),  # RMSNorm over one head, shared by all heads
    TensorRule(LAYER + "self_attn.k_norm.weight", ("head_dim",)),
    router("num_experts"), *QWEN_DENSE_MLP,
)

QWEN2_MOE = FamilySpec(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe",),
    source_class="Qwen2MoeForCausalLM",
    moepp_model_type="moepp_qwen2_moe",
    moepp_config_class="MoePPQwen2MoeConfig",
    moepp_model_class="MoePPQwen2MoeForCausalLM",
    moepp_model_module="modeling_moepp_qwen2_moe",
    n_experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate.weight",
    expert_layouts=swiglu_expert_layouts("num_experts", "moe_intermediate_size"),
    renormalizes_top_k=False,  # transformers' default for norm_topk_prob
    renormalize_field="norm_topk_prob",
    moepp_prefix="model.layers.{layer}.mlp.",
    moe_layers=qwen_moe_layers,
    tensors=QWEN2_MOE_TENSORS,
    config_aliases={},
    config_defaults={"vocab_size": 151936, "intermediate_size": 5632, "num_attention_heads": 16,
                     "num_key_value_heads": 16, "moe_intermediate_size": 1408,
                     "shared_expert_intermediate_size": 5632, "qkv_bias": True, "decoder_sparse_step": 1,
                     "mlp_only_layers": None, "tie_word_embeddings": False},
    derive=derive_qwen_moe,
)

QWEN3_MOE = FamilySpec(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    source_class="Qwen3MoeForCausalLM",
    moepp_model_type="moepp_qwen3_moe",
    moepp_config_class="MoePPQwen3MoeConfig",
    moepp_model_class="MoePPQwen3MoeForCausalLM",
    moepp_model_module="modeling_moepp_qwen3_moe",
    n_experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate.weight",
    expert_layouts=swiglu_expert_layouts("num_experts", "moe_intermediate_size"),
    renormalizes_top_k=False,  # transformers' default; Qwen3's published configs set norm_topk_prob true
    renormalize_field="norm_topk_prob",
    moepp_prefix="model.layers.{layer}.mlp.",
    moe_layers=qwen_moe_layers,
    tensors=QWEN3_MOE_TENSORS,
    config_aliases={"num_experts": "num_local_experts"},
    config_defaults={"vocab_size": 151936, "intermediate_size": 6144, "num_attention_heads": 32,
                     "num_key_value_heads": 4, "moe_intermediate_size": 768, "attention_bias": False,
                     "decoder_sparse_step": 1, "mlp_only_layers": None, "tie_word_embeddings": False},
    derive=derive_qwen_moe,
)
