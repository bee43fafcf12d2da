"""OLMoE (OLMoE-1B-7B): softmax router `mlp.gate.weight` (E, D), top-k without renormalisation
(`norm_topk_prob` false in the published checkpoint), SwiGLU experts `mlp.experts.{e}.gate_proj/up_proj/down_proj`
on the Hub (fused in transformers 5); every layer is an MoE layer; no shared expert."""

from .spec import FamilySpec, TensorRule, int_field, swiglu_expert_layouts
from .tensor_rules import (
    LAYER,
    embeddings_and_head,
    head_dim_or_default,
    kv_heads_or_all,
    layer_norms,
    llama_attention,
    router,
)


def derive_olmoe(config: dict) -> dict:
    """OlmoeConfig.__post_init__ (None key/value heads -> one per query head), the attention's head_dim, and the
    width of its k_norm: (hidden_size // num_attention_heads) * num_key_value_heads, whatever head_dim is."""
    kv_heads = kv_heads_or_all(config)
    default_head_dim = int_field(config, "hidden_size") // int_field(config, "num_attention_heads")
    return config | {"num_key_value_heads": kv_heads, "head_dim": head_dim_or_default(config),
                     "k_norm_size": default_head_dim * kv_heads}


OLMOE_TENSORS = (
    *embeddings_and_head(), *layer_norms(), *llama_attention("attention_bias", "attention_bias"),
    TensorRule(LAYER + "self_attn.q_norm.weight", ("hidden_size",)),  # unlike Qwen3, over all heads at once
    TensorRule(LAYER + "self_attn.k_norm.weight", ("k_norm_size",)),
    router("num_experts"),
)

OLMOE = FamilySpec(
    name="olmoe",
    architectures=("OlmoeForCausalLM",),
    model_types=("olmoe",),
    source_class="OlmoeForCausalLM",
    moepp_model_type="moepp_olmoe",
    moepp_config_class="MoePPOlmoeConfig",
    moepp_model_class="MoePPOlmoeForCausalLM",
    moepp_model_module="modeling_moepp_olmoe",
    n_experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate.weight",
    expert_layouts=swiglu_expert_layouts("num_experts", "intermediate_size"),
    renormalizes_top_k=False,
    renormalize_field="norm_topk_prob",
    moepp_prefix="model.layers.{layer}.mlp.",
    tensors=OLMOE_TENSORS,
    config_aliases={"num_local_experts": "num_experts"},
    config_defaults={"vocab_size": 50304, "intermediate_size": 2048, "num_attention_heads": 16,
                     "num_key_value_heads": None, "attention_bias": False, "tie_word_embeddings": False},
    derive=derive_olmoe,
)
