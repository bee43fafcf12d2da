"""Configuration of MoE++ models made by upcycle: the source family's config plus the MoE++ fields.

This file is copied into every converted checkpoint as remote code: it imports only transformers, torch and
its sibling files (relative imports), never `upcycle`.
"""

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

ZERO_EXPERT_SEMANTICS = ("drop_and_renormalize", "keep_weight")


@dataclasses.dataclass(kw_only=True)
class MoePPFields:
    """The fields MoE++ adds to a source family's config (shared by every family variant).

    Expert order inside one MoE layer: FFN experts 0..N-1, then zero, copy and constant experts.
    """

    n_zero_experts: int = 1  # Zero experts: E(x) = 0
    n_copy_experts: int = 1  # Copy experts: E(x) = x
    n_constant_experts: int = 2  # Constant experts: E(x) = a1 x + a2 v, [a1, a2] = softmax(W_c x)
    gating_residual: bool = True  # G_j = W_j x + W_g^j G_{j-1} between consecutive MoE layers
    balance_tau: float = 0.75  # weight of zero-computation experts in the heterogeneous balance loss
    balance_loss_coef: float = 0.01  # beta: total loss = cross-entropy + beta * balance loss
    # "drop_and_renormalize": a selected Zero expert's weight is set to 0 before the top-k weights are
    # renormalised (official MoE++ 7B). "keep_weight": the Zero expert keeps its share of the normalisation,
    # so the other selected experts are scaled down by it.
    zero_expert_semantics: str = "drop_and_renormalize"
    source_model_type: str = "mixtral"  # the family the checkpoint was converted from

    @property
    def n_zero_computation_experts(self) -> int:
        return self.n_zero_experts + self.n_copy_experts + self.n_constant_experts

    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers that are MoE layers (every layer unless the family says otherwise).

        The gating residual links consecutive entries of this list; the first has no residual matrix.
        """
        return list(range(self.num_hidden_layers))

    def validate_moepp_fields(self) -> None:
        """Run by @strict on every config class (its `validate_*` methods are class validators)."""
        counts = {"zero": self.n_zero_experts, "copy": self.n_copy_experts, "constant": self.n_constant_experts}
        for name, count in counts.items():
            if count < 0:
                raise ValueError(f"the number of {name} experts must be 0 or more, got {count}")
        if self.zero_expert_semantics not in ZERO_EXPERT_SEMANTICS:
            raise ValueError(
                f"zero_expert_semantics must be one of {', '.join(ZERO_EXPERT_SEMANTICS)}, "
                f"got {self.zero_expert_semantics!r}"
            )
        if not 0.0 < self.balance_tau <= 1.0:
            raise ValueError(f"balance_tau must be in (0, 1], got {self.balance_tau}")


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
