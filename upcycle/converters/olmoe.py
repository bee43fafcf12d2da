"""OLMoE (OLMoE-1B-7B): softmax router `mlp.gate.weight` (E, D), top-k without renormalisation
(`norm_topk_prob` false in the published checkpoint), SwiGLU experts `mlp.experts.{e}.gate_proj/up_proj/down_proj`
on the Hub (fused in transformers 5); every layer is an MoE layer; no shared expert."""

from .spec import FamilySpec, swiglu_expert_layouts

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
)
