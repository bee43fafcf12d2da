"""The fields MoE++ adds to a source family's config, shared by every family's config class.

Plain Python (no torch, no transformers), so that `upcycle convert` can write a converted config without importing
either. Copied into every converted checkpoint as remote code, beside the configuration files that import it.
"""

import dataclasses

ZERO_EXPERT_SEMANTICS = ("drop_and_renormalize", "keep_weight")
# The softmax denominator of the FFN experts' top-k weights, for families that do not renormalise them (Qwen2-MoE,
# OLMoE, DeepSeek-V2, OpenMoE as published); no effect when the family renormalises (docs/layer-math.md).
ZERO_COMPUTATION_DENOMINATORS = ("switched_on", "ffn_only")


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
    # "switched_on": every weight comes from one softmax over the FFN experts and the switched-on zero-computation
    # experts, so switching one on shrinks every FFN weight of a family that does not renormalise. "ffn_only": FFN
    # weights come from the softmax over the FFN experts alone (the source's probabilities), zero-computation
    # weights from the softmax over every switched-on expert. Conversion writes "ffn_only"; this default keeps
    # checkpoints written before the field computing what they did.
    zero_computation_denominator: str = "switched_on"
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
        if self.zero_computation_denominator not in ZERO_COMPUTATION_DENOMINATORS:
            raise ValueError(
                f"zero_computation_denominator must be one of {', '.join(ZERO_COMPUTATION_DENOMINATORS)}, "
                f"got {self.zero_computation_denominator!r}"
            )
        if not 0.0 < self.balance_tau <= 1.0:
            raise ValueError(f"balance_tau must be in (0, 1], got {self.balance_tau}")
