"""Mixtral (and Mixtral-architecture checkpoints): top-k of a softmax router, renormalised."""

from .spec import ExpertKeyLayout, FamilySpec

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
)
