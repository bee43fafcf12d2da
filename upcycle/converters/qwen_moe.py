"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Both: softmax router `mlp.gate.weight` (E, D), top-k renormalised only when `norm_topk_prob` is true (false for
Qwen2-MoE's published checkpoints, true for Qwen3's), SwiGLU experts `mlp.experts.{e}.gate_proj/up_proj/down_proj`
on the Hub (fused in transformers 5). Qwen2-MoE adds a shared expert `mlp.shared_expert.*` gated by
sigmoid(`mlp.shared_expert_gate.weight` x). Dense layers: those in `mlp_only_layers`, or whose index + 1 is not a
multiple of `decoder_sparse_step`.
"""

from .spec import FamilySpec, swiglu_expert_layouts


def qwen_moe_layers(config: dict) -> list[int]:
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer's rule for which layers get a sparse MoE block."""
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    n_experts = int(config.get("num_experts") or 0)
    return [
        layer for layer in range(int(config["num_hidden_layers"]))
        if layer not in dense and n_experts > 0 and (layer + 1) % step == 0
    ]


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
)
