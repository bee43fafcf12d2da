"""The converted checkpoint's config.json: the source config, verbatim, plus the MoE++ fields and auto_map."""

from ..modeling.moepp_fields import MoePPFields
from .plan import ConversionPlan


def moepp_config(source_config: dict, plan: ConversionPlan, gating_residual: bool,
                 zero_expert_semantics: str | None = None, zero_computation_denominator: str = "ffn_only",
                 zero_computation_scores: str = "relative") -> dict:
    """None semantics: the family's default (drop_and_renormalize if it renormalises, keep_weight otherwise).
    The denominator: ffn_only (FFN weights keep the source's softmax whatever is switched on; measured better on a
    non-renormalising family, docs/layer-math.md) or switched_on (one softmax over every switched-on expert).
    The zero-computation scores: relative (raised by the token's best FFN score: calibrated, the Zero expert skips
    a token's weakest experts as dynamic skipping does) or absolute (the router rows alone)."""
    spec = plan.spec
    if zero_expert_semantics is None:
        zero_expert_semantics = spec.default_zero_expert_semantics(source_config)
    config = {key: value for key, value in source_config.items() if key not in ("auto_map", "_name_or_path")}
    config.update(
        model_type=spec.moepp_model_type,
        architectures=[spec.moepp_model_class],
        auto_map={
            "AutoConfig": f"{spec.moepp_config_module}.{spec.moepp_config_class}",
            "AutoModelForCausalLM": f"{spec.moepp_model_module}.{spec.moepp_model_class}",
        },
        n_zero_experts=plan.counts.zero,
        n_copy_experts=plan.counts.copy,
        n_constant_experts=plan.counts.constant,
        gating_residual=gating_residual,
        balance_tau=MoePPFields.balance_tau,
        balance_loss_coef=MoePPFields.balance_loss_coef,
        zero_expert_semantics=zero_expert_semantics,
        zero_computation_denominator=zero_computation_denominator,
        zero_computation_scores=zero_computation_scores,
        source_model_type=source_config.get("model_type", spec.name),
    )
    return config
