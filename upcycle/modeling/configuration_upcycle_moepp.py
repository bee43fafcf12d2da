"""Configuration of MoE++ models made by upcycle: the source family's config plus the MoE++ fields.

This file is copied into every converted checkpoint as remote code: it imports only transformers, torch and
its sibling files (relative imports), never `upcycle`.
"""

from huggingface_hub.dataclasses import strict
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from .moepp_fields import ZERO_EXPERT_SEMANTICS, MoePPFields


@strict
class MoePPMixtralConfig(MixtralConfig, MoePPFields):
    """A Mixtral config with MoE++ zero-computation experts and gating residuals."""

    model_type = "moepp_mixtral"


def _qwen_moe_layers(config) -> list[int]:
    """Qwen-MoE's rule (Qwen2MoeDecoderLayer): not in mlp_only_layers, and (i + 1) % decoder_sparse_step == 0."""
    return [
        layer for layer in range(config.num_hidden_layers)
        if layer not in (config.mlp_only_layers or [])
        and config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0
    ]


@strict
class MoePPQwen2MoeConfig(Qwen2MoeConfig, MoePPFields):
    """A Qwen2-MoE config (shared expert with a sigmoid gate) with MoE++ fields."""

    model_type = "moepp_qwen2_moe"
    source_model_type: str = "qwen2_moe"

    def moe_layers(self) -> list[int]:
        return _qwen_moe_layers(self)


@strict
class MoePPQwen3MoeConfig(Qwen3MoeConfig, MoePPFields):
    """A Qwen3-MoE config with MoE++ fields."""

    model_type = "moepp_qwen3_moe"
    source_model_type: str = "qwen3_moe"

    def moe_layers(self) -> list[int]:
        return _qwen_moe_layers(self)


@strict
class MoePPOlmoeConfig(OlmoeConfig, MoePPFields):
    """An OLMoE config with MoE++ fields (every layer is an MoE layer)."""

    model_type = "moepp_olmoe"
    source_model_type: str = "olmoe"


@strict
class MoePPDeepseekV2Config(DeepseekV2Config, MoePPFields):
    """A DeepSeek-V2 config with MoE++ fields; the first `first_k_dense_replace` layers stay dense."""

    model_type = "moepp_deepseek_v2"
    source_model_type: str = "deepseek_v2"

    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))


@strict
class MoePPDeepseekV3Config(DeepseekV3Config, MoePPFields):
    """A DeepSeek-V3 config with MoE++ fields; the first `first_k_dense_replace` layers stay dense."""

    model_type = "moepp_deepseek_v3"
    source_model_type: str = "deepseek_v3"

    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))


__all__ = [
    "ZERO_EXPERT_SEMANTICS",
    "MoePPDeepseekV2Config",
    "MoePPDeepseekV3Config",
    "MoePPFields",
    "MoePPMixtralConfig",
    "MoePPOlmoeConfig",
    "MoePPQwen2MoeConfig",
    "MoePPQwen3MoeConfig",
]
