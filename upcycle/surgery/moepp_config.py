"""The converted checkpoint's config.json: the source config, verbatim, plus the MoE++ fields and auto_map."""

from ..modeling.configuration_upcycle_moepp import MoePPFields
from .plan import ConversionPlan


def moepp_config(source_config: dict, plan: ConversionPlan, gating_residual: bool,
                 zero_expert_semantics: str) -> dict:
    spec = plan.spec
    config = {key: value for key, value in source_config.items() if key not in ("auto_map", "_name_or_path")}
    config.update(
        model_type=spec.moepp_model_type,
        architectures=[spec.moepp_model_class],
        auto_map={
            "AutoConfig": f"configuration_upcycle_moepp.{spec.moepp_config_class}",
            "AutoModelForCausalLM": f"modeling_upcycle_moepp.{spec.moepp_model_class}",
        },
        n_zero_experts=plan.counts.zero,
        n_copy_experts=plan.counts.copy,
        n_constant_experts=plan.counts.constant,
        gating_residual=gating_residual,
        balance_tau=MoePPFields.balance_tau,
        balance_loss_coef=MoePPFields.balance_loss_coef,
        zero_expert_semantics=zero_expert_semantics,
        source_model_type=source_config.get("model_type", spec.name),
    )
    return config
