"""The MoE++ config classes, for transformers' AutoConfig inside vLLM's environment.

A converted checkpoint's config.json is the source family's config plus the MoE++ fields (docs/checkpoint-format.md)
and `model_type` "moepp_<family>". Its remote code needs a newer transformers than vLLM pins, so the plugin
registers plain subclasses of the family configs instead: the MoE++ fields stay attributes read from config.json.
"""

from transformers import AutoConfig, MixtralConfig, Qwen3MoeConfig

MOEPP_DEFAULTS = {
    "n_zero_experts": 1,
    "n_copy_experts": 1,
    "n_constant_experts": 2,
    "gating_residual": True,
    "zero_expert_semantics": "drop_and_renormalize",
    "zero_computation_denominator": "switched_on",  # checkpoints written before the field compute this
    "zero_computation_scores": "absolute",  # likewise
    "routing_rule": None,  # a trained control (upcycle train --routing-rule): not served
}


class MoePPMixtralConfig(MixtralConfig):
    model_type = "moepp_mixtral"


class MoePPQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "moepp_qwen3_moe"


def moepp_field(config, name: str):
    """An MoE++ field of `config`, with the MoE++ class default where config.json leaves it out."""
    return getattr(config, name, MOEPP_DEFAULTS[name])


def register_configs() -> None:
    for config_class in (MoePPMixtralConfig, MoePPQwen3MoeConfig):
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # already registered in this process
            pass
