"""DeepSeek-V2 (V2, V2-Lite) and DeepSeek-V3.

Both: router `mlp.gate.weight` (E, D) in fp32 arithmetic, routed SwiGLU experts
`mlp.experts.{e}.gate_proj/up_proj/down_proj` on the Hub (fused in transformers 5), shared experts
`mlp.shared_experts.*`, the first `first_k_dense_replace` layers dense, weights scaled by `routed_scaling_factor`.
V2: softmax, greedy or group-limited greedy top-k, never renormalised. V3: sigmoid scores, selection on score +
`mlp.gate.e_score_correction_bias` within the best groups, renormalised when `norm_topk_prob` (true for V3).
"""

from .spec import FamilySpec, swiglu_expert_layouts


def deepseek_moe_layers(config: dict) -> list[int]:
    """DeepseekV2/V3DecoderLayer's rule: layer i is an MoE layer iff i >= first_k_dense_replace."""
    first_moe = int(config.get("first_k_dense_replace") or 0)
    return list(range(first_moe, int(config["num_hidden_layers"])))


DEEPSEEK_V2 = FamilySpec(
    name="deepseek_v2",
    architectures=("DeepseekV2ForCausalLM",),
    model_types=("deepseek_v2",),
    source_class="DeepseekV2ForCausalLM",
    moepp_model_type="moepp_deepseek_v2",
    moepp_config_class="MoePPDeepseekV2Config",
    moepp_model_class="MoePPDeepseekV2ForCausalLM",
    moepp_model_module="modeling_moepp_deepseek_v2",
    n_experts_field="n_routed_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate.weight",
    expert_layouts=swiglu_expert_layouts("n_routed_experts", "moe_intermediate_size"),
    renormalizes_top_k=False,  # transformers' DeepseekV2TopkRouter ignores norm_topk_prob
    moepp_prefix="model.layers.{layer}.mlp.",
    moe_layers=deepseek_moe_layers,
)

DEEPSEEK_V3 = FamilySpec(
    name="deepseek_v3",
    architectures=("DeepseekV3ForCausalLM",),
    model_types=("deepseek_v3",),
    source_class="DeepseekV3ForCausalLM",
    moepp_model_type="moepp_deepseek_v3",
    moepp_config_class="MoePPDeepseekV3Config",
    moepp_model_class="MoePPDeepseekV3ForCausalLM",
    moepp_model_module="modeling_moepp_deepseek_v3",
    n_experts_field="n_routed_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate.weight",
    expert_layouts=swiglu_expert_layouts("n_routed_experts", "moe_intermediate_size"),
    renormalizes_top_k=True,  # DeepseekV3Config's default for norm_topk_prob
    renormalize_field="norm_topk_prob",
    moepp_prefix="model.layers.{layer}.mlp.",
    moe_layers=deepseek_moe_layers,
)
