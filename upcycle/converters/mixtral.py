"""Mixtral (and Mixtral-architecture checkpoints): top-k of a softmax router, renormalised."""

from .spec import ExpertKeyLayout, FamilySpec
from .tensor_rules import (
    embeddings_and_head,
    head_dim_or_default,
    kv_heads_or_all,
    layer_norms,
    llama_attention,
    router,
)


def derive_mixtral(config: dict) -> dict:
    """MixtralConfig.__post_init__ (None key/value heads -> one per query head) and MixtralAttention's head_dim."""
    return config | {"num_key_value_heads": kv_heads_or_all(config), "head_dim": head_dim_or_default(config)}


MIXTRAL = FamilySpec(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    source_class="MixtralForCausalLM",
    moepp_model_type="moepp_mixtral",
    moepp_config_class="MoePPMixtralConfig",
    moepp_model_class="MoePPMixtralForCausalLM",
    n_experts_field="num_local_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.block_sparse_moe.", "model.layers.{layer}.mlp."),
    router_key="gate.weight",
    expert_layouts=(
        ExpertKeyLayout(
            name="per-expert",  # classic Hub layout: one w1/w2/w3 Linear per expert
            keys={
                "experts.{expert}.w1.weight": ("intermediate_size", "hidden_size"),
                "experts.{expert}.w3.weight": ("intermediate_size", "hidden_size"),
                "experts.{expert}.w2.weight": ("hidden_size", "intermediate_size"),
            },
        ),
        ExpertKeyLayout(
            name="fused",  # transformers 5 in-memory layout: 3-D gate_up_proj / down_proj
            keys={
                "experts.gate_up_proj": ("num_local_experts", "2*intermediate_size", "hidden_size"),
                "experts.down_proj": ("num_local_experts", "hidden_size", "intermediate_size"),
            },
        ),
    ),
    renormalizes_top_k=True,
    moepp_prefix="model.layers.{layer}.mlp.",
    tensors=(*embeddings_and_head(), *layer_norms(), *llama_attention(), router("num_local_experts")),
    config_aliases={"num_experts": "num_local_experts"},
    config_defaults={"vocab_size": 32000, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False},
    derive=derive_mixtral,
)
