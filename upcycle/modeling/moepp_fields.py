"""The fields MoE++ adds to a source family's config, shared by every family's config class.

Plain Python (no torch, no transformers), so that `upcycle convert` can write a converted config without importing
either. Copied into every converted checkpoint as remote code, beside the configuration files that import it.
"""

import dataclasses

ZERO_EXPERT_SEMANTICS = ("drop_and_renormalize", "keep_weight")
# The softmax denominator of the FFN experts' top-k weights, for families that do not renormalise them (Qwen2-MoE,
# OLMoE, DeepSeek-V2, OpenMoE as published); no effect when the family renormalises (docs/layer-math.md).
ZERO_COMPUTATION_DENOMINATORS = ("switched_on", "ffn_only")
# What a zero-computation expert's selection score is: "absolute", its own router output (plus its selection
# bias); "relative", that plus the token's best FFN selection score, so that with zero rows the Zero expert takes a
# token's second slot exactly when the second FFN expert's score trails the first by more than the bias: dynamic
# skipping, before any training (docs/layer-math.md).
ZERO_COMPUTATION_SCORES = ("absolute", "relative")
# Trained controls (`upcycle train --routing-rule`): the source's own routing with FFN slots dropped by a fixed rule,
# zero-computation experts never chosen by score. The knob: k (top_k), the threshold on the renormalised weight
# (dynamic_skipping), p (top_p), the threshold on the first expert's probability (top_1_confident: top-1, and no
# FFN expert when the router is less confident than the threshold).
ROUTING_RULES = ("top_k", "dynamic_skipping", "top_p", "top_1_confident")


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
    # Conversion writes "relative"; this default keeps checkpoints written before the field computing what they did.
    zero_computation_scores: str = "absolute"
    routing_rule: str | None = None  # None: MoE++ routing; else one of ROUTING_RULES (a trained control)
    routing_rule_knob: float = 0.0
    routing_rule_layer_knobs: list[float] | None = None  # one knob per MoE layer (a trained control), else None
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
        if self.zero_computation_scores not in ZERO_COMPUTATION_SCORES:
            raise ValueError(
                f"zero_computation_scores must be one of {', '.join(ZERO_COMPUTATION_SCORES)}, "
                f"got {self.zero_computation_scores!r}"
            )
        if self.routing_rule is not None and self.routing_rule not in ROUTING_RULES:
            raise ValueError(f"routing_rule must be one of {', '.join(ROUTING_RULES)} or null, got {self.routing_rule!r}")
        if not 0.0 < self.balance_tau <= 1.0:
            raise ValueError(f"balance_tau must be in (0, 1], got {self.balance_tau}")
