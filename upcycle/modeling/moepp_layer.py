"""The MoE++ layer, family-independent parts: router, zero-computation experts, routing statistics, balance loss.

Shapes: T tokens (batch * sequence flattened), D hidden size, N FFN experts, Z zero-computation experts,
k experts per token. Expert order: FFN 0..N-1, then zero, copy, constant.

Copied into every converted checkpoint as remote code: imports only torch and its siblings.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ExpertLayout:
    """Where each kind of expert sits in the router's N + Z outputs."""

    n_ffn: int
    n_zero: int
    n_copy: int
    n_constant: int

    @property
    def n_zero_computation(self) -> int:
        return self.n_zero + self.n_copy + self.n_constant

    @property
    def n_total(self) -> int:
        return self.n_ffn + self.n_zero_computation

    @property
    def copy_start(self) -> int:
        return self.n_ffn + self.n_zero

    @property
    def constant_start(self) -> int:
        return self.n_ffn + self.n_zero + self.n_copy

    @classmethod
    def from_config(cls, config, n_ffn: int) -> "ExpertLayout":
        return cls(n_ffn, config.n_zero_experts, config.n_copy_experts, config.n_constant_experts)


class MoePPRouter(nn.Module):
    """Router over FFN and zero-computation experts, with the gating residual and the selection bias.

    `weight` is the source router, kept under its name and bytes. The new parts are neutral at conversion:
    zero rows for zero-computation experts, a zero gating-residual matrix, and a selection bias of -inf so that
    no zero-computation expert is ever chosen until the budget knob raises it.

    This class is the softmax router (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2 greedy): probabilities are a softmax
    over the switched-on experts, selection is the top-k of logits + selection bias, and the family's top-k
    normalisation and scaling factor follow. Families with other routing subclass it and override
    `routing_probabilities`, `select_experts` or `top_k_weights`; statistics and the balance loss call the same
    methods, so every consumer reads one definition of the family's routing.

    `zero_computation_denominator` (families that do not renormalise; see `ffn_only_denominator`): "switched_on",
    one softmax over every switched-on expert, or "ffn_only", FFN weights from the softmax over FFN experts only.
    """

    def __init__(self, layout: ExpertLayout, hidden_size: int, top_k: int, has_residual: bool,
                 renormalize: bool, zero_expert_semantics: str, scaling_factor: float = 1.0,
                 logits_in_float32: bool = False, zero_computation_denominator: str = "switched_on"):
        super().__init__()
        self.layout = layout
        self.zero_computation_denominator = zero_computation_denominator
        self.top_k = top_k
        self.renormalize = renormalize  # the family renormalises its top-k weights to sum to 1
        self.zero_expert_semantics = zero_expert_semantics
        self.scaling_factor = scaling_factor  # DeepSeek's routed_scaling_factor; 1.0 elsewhere
        self.logits_in_float32 = logits_in_float32  # DeepSeek computes router logits in fp32
        # (N, D) source router; DeepSeek keeps it in fp32 whatever the model dtype (`_keep_in_fp32_modules_strict`)
        self.weight = nn.Parameter(torch.empty(layout.n_ffn, hidden_size,
                                               dtype=torch.float32 if logits_in_float32 else None))
        # (Z, D) zero rows: zero-computation logits start at 0, and the -inf selection bias keeps them unselected
        self.zero_computation_weight = nn.Parameter(torch.zeros(layout.n_zero_computation, hidden_size))
        # (N+Z, N+Z) gating residual W_g, zero: G_j = W_j x + 0 * G_{j-1} equals the source logits
        self.residual_weight = (
            nn.Parameter(torch.zeros(layout.n_total, layout.n_total)) if has_residual else None
        )
        # (Z,) selection-only bias (not trained): added to the scores for top-k selection, not to the weights
        self.register_buffer("selection_bias", torch.full((layout.n_zero_computation,), float("-inf")))
        # Selection settings from the config (`configure_selection`); these defaults are a checkpoint's before the
        # fields existed. `selection_signal` is training-only, set by the recipe (`relaxed_selection_term`).
        self.zero_computation_scores = "absolute"
        self.routing_rule: str | None = None
        self.routing_rule_knob = 0.0
        self.selection_signal: str | None = None  # training only: see `relaxed_selection_term` (None: off)
        self.selection_temperature = 1.0  # in spreads of the pairs' margins
        self.selection_loss: torch.Tensor | None = None  # the "output_change" loss of the last forward

    def configure_selection(self, config, moe_index: int = 0) -> "MoePPRouter":
        """Read the config's selection fields (`zero_computation_scores`, `routing_rule`, `routing_rule_knob`, and
        `routing_rule_layer_knobs`: one knob per MoE layer, this layer's at `moe_index`, when given)."""
        self.zero_computation_scores = getattr(config, "zero_computation_scores", "absolute")
        self.routing_rule = getattr(config, "routing_rule", None)
        layer_knobs = getattr(config, "routing_rule_layer_knobs", None)
        knob = layer_knobs[moe_index] if layer_knobs else getattr(config, "routing_rule_knob", 0.0)
        self.routing_rule_knob = float(knob)
        return self

    def compute_logits(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None) -> torch.Tensor:
        """G_j = W_j x + W_g^j G_{j-1}: hidden_states (T, D), previous_logits (T, N+Z) or None -> (T, N+Z) fp32."""
        router_weight = torch.cat([self.weight, self.zero_computation_weight.to(self.weight.dtype)])  # (N+Z, D)
        if self.logits_in_float32:
            logits = F.linear(hidden_states.float(), router_weight.float())  # (T, N+Z)
        else:
            logits = F.linear(hidden_states, router_weight.to(hidden_states.dtype)).float()  # model dtype, then fp32
        if self.residual_weight is not None and previous_logits is not None:
            logits = logits + F.linear(previous_logits.float(), self.residual_weight.float())
        return logits

    def _bias(self, selection_bias: torch.Tensor | None) -> torch.Tensor:
        """The bias to select with: the given one, else the saved one; every expert switched off under a rule."""
        if self.routing_rule is not None:  # a trained control routes as its source: no zero-computation mass
            return torch.full_like(self.selection_bias, float("-inf"))
        return self.selection_bias if selection_bias is None else selection_bias

    def switched_on(self, selection_bias: torch.Tensor | None = None) -> torch.Tensor:
        """(N+Z,) bool: the experts this router can select with that bias (default: the saved one); FFN experts
        always, no zero-computation expert under a routing rule."""
        return switched_on_mask(self._bias(selection_bias), self.layout.n_ffn)

    def routing_probabilities(self, logits: torch.Tensor, selection_bias: torch.Tensor | None = None) -> torch.Tensor:
        """(T, N+Z) -> (T, N+Z): the family's router probabilities (softmax over switched-on experts)."""
        return routing_probabilities(logits, self._bias(selection_bias).to(logits.device), self.layout.n_ffn)

    def expert_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, N+Z) -> (T, N+Z) fp32: each expert's own score, in the selection bias's units.

        Softmax routers rank logits, so a selection bias is in router-logit units. Families override this where
        selection ranks something else (DeepSeek-V3: sigmoid scores plus its correction bias) or excludes experts
        (group-limited DeepSeek: -inf outside the best groups).
        """
        return logits.float()

    def selection_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, N+Z) -> (T, N+Z) fp32: what selection ranks before the selection bias is added, in the bias's units.

        The experts' own scores (`expert_scores`); with "relative" zero-computation scores, each zero-computation
        expert competes with the FFN scores minus the token's best one (a constant of the token, no gradient path).
        Calibration and the budget controller read the bias's scale from here, so every consumer sets biases in
        the units this router adds them in.
        """
        scores = self.expert_scores(logits)
        if self.zero_computation_scores != "relative":
            return scores
        # The same ranking as adding the best FFN score to every zero-computation score, computed by subtracting it
        # from the FFN scores instead: the best FFN expert then scores exactly 0, so a zero-computation row at 0
        # ties it exactly at bias 0 for every token (adding would leave the tie to rounding, token by token).
        n_ffn = self.layout.n_ffn
        best_ffn = scores[:, :n_ffn].max(dim=-1, keepdim=True).values.detach()  # (T, 1)
        return torch.cat([scores[:, :n_ffn] - best_ffn, scores[:, n_ffn:]], dim=-1)

    def select_experts(self, logits: torch.Tensor, selection_bias: torch.Tensor | None = None) -> torch.Tensor:
        """(T, N+Z) -> (T, k): the experts a token uses, given a selection bias (default: the saved one).

        Under a routing rule (a trained control) the source's FFN selection, slots dropped by the rule: a dropped
        slot holds the first zero-computation expert, whose weight is 0 (it takes no probability mass)."""
        bias = self._bias(selection_bias).to(logits.device)  # (Z,)
        index = select_experts(self.selection_scores(logits), bias, self.layout.n_ffn, self.top_k)  # (T, k)
        if self.routing_rule is None:
            return index
        probabilities = self.routing_probabilities(logits).gather(-1, index)  # (T, k)
        order = probabilities.argsort(dim=-1, descending=True)  # best first, whatever order selection gave
        index, probabilities = index.gather(-1, order), probabilities.gather(-1, order)
        keep = rule_keep_mask(probabilities, self.routing_rule, self.routing_rule_knob)  # (T, k)
        return index.masked_fill(~keep, self.layout.n_ffn)

    def top_k_weights(self, logits: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """(T, N+Z), (T, k) -> (T, k): gathered probabilities, Zero semantics, family normalisation, scaling."""
        probabilities = self.routing_probabilities(logits)  # (T, N+Z)
        if self.zero_computation_denominator == "ffn_only" and not self.renormalize:
            probabilities = ffn_only_denominator(logits, probabilities, self.layout.n_ffn)
        weights = probabilities.gather(-1, top_k_index)  # (T, k)
        weights = normalize_top_k_weights(
            weights, top_k_index, self.layout, self.renormalize, self.zero_expert_semantics
        )
        return weights * self.scaling_factor if self.scaling_factor != 1.0 else weights

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None = None):
        """hidden_states (T, D); previous_logits (T, N+Z) or None -> logits (T, N+Z), weights (T, k), index (T, k)."""
        logits = self.compute_logits(hidden_states, previous_logits)
        top_k_index = self.select_experts(logits)
        return logits, self.top_k_weights(logits, top_k_index), top_k_index


def rule_keep_mask(probabilities: torch.Tensor, rule: str, knob: float) -> torch.Tensor:
    """probabilities (T, k) of a token's FFN experts, best first -> which slots a routing rule keeps (T, k) bool.

    top_k: the first round(knob); dynamic_skipping: renormalised weight >= knob (the first always kept); top_p:
    the best experts until their mass reaches knob (the first always kept); top_1_confident: the first alone, and
    only when its probability is >= knob.
    """
    position = torch.arange(probabilities.shape[-1], device=probabilities.device)  # (k,)
    if rule == "top_k":
        return (position < round(knob)).expand_as(probabilities).clone()
    if rule == "top_1_confident":
        return (position == 0) & (probabilities[:, :1] >= knob)
    if rule == "dynamic_skipping":
        renormalised = probabilities / probabilities.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        keep = renormalised >= knob
    elif rule == "top_p":
        mass_before = probabilities.cumsum(dim=-1) - probabilities  # (T, k) mass of the better experts
        keep = mass_before < knob
    else:
        raise ValueError(f"unknown routing rule {rule!r}")
    return keep | (position == 0)


def switched_on_mask(selection_bias: torch.Tensor, n_ffn: int) -> torch.Tensor:
    """(Z,) -> (N+Z,) bool: FFN experts and the zero-computation experts whose selection bias is not -inf."""
    return torch.cat([torch.ones(n_ffn, dtype=torch.bool, device=selection_bias.device),
                      ~torch.isneginf(selection_bias)])


def routing_probabilities(logits: torch.Tensor, selection_bias: torch.Tensor, n_ffn: int) -> torch.Tensor:
    """Softmax over FFN experts and the zero-computation experts that are switched on: logits (T, N+Z) -> (T, N+Z).

    A zero-computation expert whose selection bias is -inf is switched off: it takes no probability mass. So at
    conversion the FFN probabilities are exactly the source's, also for families that do not renormalise their
    top-k weights, and setting every bias to -inf turns a trained MoE++ model back into its source's routing.
    """
    mask = torch.zeros(logits.shape[-1], device=logits.device).masked_fill(
        ~switched_on_mask(selection_bias, n_ffn), float("-inf"))  # (N+Z,)
    return torch.softmax(logits + mask, dim=-1)


def ffn_only_denominator(logits: torch.Tensor, probabilities: torch.Tensor, n_ffn: int) -> torch.Tensor:
    """The "ffn_only" denominator: FFN experts' probabilities from the softmax over the FFN logits alone.

    logits (T, N+Z), probabilities (T, N+Z) from `routing_probabilities` -> (T, N+Z): the first N columns are
    softmax(logits[:, :N]), the source family's own probabilities whatever is switched on; zero-computation
    columns keep their share of the softmax over every switched-on expert. A family that does not renormalise
    its top-k weights then gives a token that keeps all its FFN experts exactly the source's weights, instead of
    shrinking them by the mass the switched-on zero-computation experts add to the denominator.
    """
    return torch.cat([torch.softmax(logits[:, :n_ffn], dim=-1), probabilities[:, n_ffn:]], dim=-1)


def select_experts(logits: torch.Tensor, selection_bias: torch.Tensor, n_ffn: int, top_k: int) -> torch.Tensor:
    """Top-k of the selection scores plus the selection bias (zero for FFN experts): (T, N+Z) -> index (T, k).

    The softmax router's scores are its logits; `MoePPRouter.select_experts` passes each family's own scores."""
    ffn_bias = selection_bias.new_zeros(n_ffn)
    scores = logits + torch.cat([ffn_bias, selection_bias.float()])  # (T, N+Z)
    return torch.topk(scores, top_k, dim=-1).indices


def limit_to_groups(ffn_scores: torch.Tensor, group_scores: torch.Tensor, top_groups: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek): keep the FFN experts of the `top_groups` best groups, -inf elsewhere.

    ffn_scores (T, N) selection scores of the FFN experts in G equal groups, group_scores (T, G) -> (T, N).
    Zero-computation experts sit outside every group: each device holds all of them, which is what the group
    limit (a bound on the devices a token reaches) is about.
    """
    n_tokens, n_groups = group_scores.shape
    chosen = torch.topk(group_scores, top_groups, dim=-1, sorted=False).indices  # (T, top_groups)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)  # (T, G)
    expert_mask = group_mask.unsqueeze(-1).expand(n_tokens, n_groups, ffn_scores.shape[-1] // n_groups)
    return ffn_scores.masked_fill(~expert_mask.reshape(n_tokens, -1), float("-inf"))


def normalize_top_k_weights(weights: torch.Tensor, index: torch.Tensor, layout: ExpertLayout,
                            renormalize: bool, zero_expert_semantics: str) -> torch.Tensor:
    """Apply the Zero-expert semantics and the family's top-k normalisation: weights (T, k) -> (T, k).

    drop_and_renormalize: a selected Zero expert's weight is set to 0 and the other selected experts share the
    mass that all k had: 1 for families that renormalise (official MoE++ 7B), sum of the k gathered weights for
    those that do not. keep_weight: the Zero expert keeps its weight (its output is 0); the family's own
    normalisation applies unchanged.
    """
    tiny = torch.finfo(weights.dtype).tiny
    if zero_expert_semantics == "drop_and_renormalize":
        is_zero = (index >= layout.n_ffn) & (index < layout.copy_start)  # (T, k)
        kept = weights.masked_fill(is_zero, 0.0)
        if renormalize:
            # Two Zero experts leave a zero sum: the layer then adds nothing (the token skips it).
            return kept / kept.sum(dim=-1, keepdim=True).clamp_min(tiny)
        # Without a Zero expert the ratio is x / x = 1 exactly: conversion stays function-preserving.
        mass = weights.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(tiny)
        return kept * mass
    if renormalize:
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return weights


class ZeroComputationExperts(nn.Module):
    """Zero, Copy and Constant experts, computed for all selected slots in a few vectorised operations.

    Zero: 0. Copy: x. Constant j: a1 x + a2 v_j with [a1, a2] = softmax(W_c^j x).
    """

    def __init__(self, layout: ExpertLayout, hidden_size: int):
        super().__init__()
        self.layout = layout
        # (C, D) constant vectors v and (C, 2, D) ratio matrices W_c; zero (never selected at conversion)
        self.constant_vectors = nn.Parameter(torch.zeros(layout.n_constant, hidden_size))
        self.constant_ratio_weight = nn.Parameter(torch.zeros(layout.n_constant, 2, hidden_size))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, D), top_k_index (T, k), top_k_weights (T, k) -> contribution (T, D)."""
        layout = self.layout
        is_copy = (top_k_index >= layout.copy_start) & (top_k_index < layout.constant_start)  # (T, k)
        x_coefficient = (top_k_weights * is_copy).sum(dim=-1)  # (T,)
        output_dtype = hidden_states.dtype
        if layout.n_constant > 0:
            ratio_logits = torch.einsum("td,cjd->tcj", hidden_states, self.constant_ratio_weight)  # (T, C, 2)
            ratios = torch.softmax(ratio_logits.float(), dim=-1)  # (T, C, 2)
            constant_slot = top_k_index - layout.constant_start  # (T, k), in [0, C) for constant slots
            is_constant = constant_slot >= 0  # (T, k)
            slot_weights = top_k_weights * is_constant  # (T, k)
            # (T, C): routing weight each constant expert receives (summed over slots)
            constant_weights = torch.zeros(
                top_k_index.shape[0], layout.n_constant, device=hidden_states.device, dtype=slot_weights.dtype
            ).scatter_add_(1, constant_slot.clamp_min(0), slot_weights)
            x_coefficient = x_coefficient + (constant_weights * ratios[..., 0]).sum(dim=-1)
            vector_coefficient = constant_weights * ratios[..., 1]  # (T, C)
            constant_part = vector_coefficient.to(output_dtype) @ self.constant_vectors.to(output_dtype)  # (T, D)
            return x_coefficient.to(output_dtype).unsqueeze(-1) * hidden_states + constant_part
        return x_coefficient.to(output_dtype).unsqueeze(-1) * hidden_states


def ffn_slots(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_ffn: int):
    """Route zero-computation slots to the sentinel expert N (no FFN compute) with weight 0.

    index (T, k), weights (T, k) -> ffn_index (T, k), ffn_weights (T, k).
    """
    is_ffn = top_k_index < n_ffn
    return top_k_index.masked_fill(~is_ffn, n_ffn), top_k_weights.masked_fill(~is_ffn, 0.0)


def routing_statistics(router_logits: list[torch.Tensor], selection_biases: list[torch.Tensor],
                       layout: ExpertLayout, top_k: int, token_mask: torch.Tensor | None,
                       balance_tau: float, routers: list[MoePPRouter] | None = None) -> dict[str, torch.Tensor]:
    """Per-MoE-layer routing statistics and the heterogeneous balance loss, from one source of truth.

    router_logits: one (T, N+Z) tensor per MoE layer; token_mask (T,) of 1 for real tokens, or None.
    routers: the MoE layers' routers; when given, selection and probabilities are the family's own
    (`MoePPRouter.select_experts`, `routing_probabilities`), else the softmax router's.
    Returns tensors of shape (L,) per statistic (`expert_share` (L, N+Z); `ffn_experts_histogram` (L, k+1): the
    share of real tokens using 0..k FFN experts), and `balance_loss` (scalar), transformers' load-balancing loss
    (`load_balancing_loss_func` of Mixtral, Qwen-MoE, OLMoE) made heterogeneous:
    L_b = N_on * sum_i eta_i F_i P_i, eta_i = 1 for FFN experts and tau for zero-computation experts,
    F_i = share of tokens that chose expert i and P_i = mean router probability of expert i, both over the real
    tokens of all MoE layers together (as transformers pools them; F sums to k), N_on = the experts that are
    switched on (FFN experts and the zero-computation experts whose selection bias is finite in some layer).
    At conversion (every bias -inf) this is exactly the source family's aux loss.
    """
    eta = torch.cat([torch.ones(layout.n_ffn), torch.full((layout.n_zero_computation,), balance_tau)])
    kinds = {
        "ffn": (0, layout.n_ffn),
        "zero": (layout.n_ffn, layout.copy_start),
        "copy": (layout.copy_start, layout.constant_start),
        "constant": (layout.constant_start, layout.n_total),
    }
    per_layer: dict[str, list[torch.Tensor]] = {f"{kind}_share": [] for kind in kinds}
    per_layer["ffn_experts_per_token"] = []
    per_layer["expert_share"] = []
    per_layer["ffn_experts_histogram"] = []
    routers = routers if routers is not None else [None] * len(router_logits)
    slot_total = torch.zeros(layout.n_total)  # (N+Z,) routed slots per expert, real tokens of all layers
    probability_total = torch.zeros(layout.n_total)  # (N+Z,) summed router probabilities, likewise
    token_total = torch.zeros(())
    switched_on = torch.zeros(layout.n_total, dtype=torch.bool)  # (N+Z,) switched on in some layer
    for logits, bias, router in zip(router_logits, selection_biases, routers):
        logits = logits.float()
        bias = bias.to(logits.device)
        mask = torch.ones(logits.shape[0], device=logits.device) if token_mask is None else token_mask.float()
        n_tokens = mask.sum().clamp_min(1.0)
        if router is None:
            index = select_experts(logits, bias, layout.n_ffn, top_k)  # (T, k)
            probabilities = routing_probabilities(logits, bias, layout.n_ffn)  # (T, N+Z)
        else:
            index = router.select_experts(logits, bias)
            probabilities = router.routing_probabilities(logits, bias)
        slot_counts = F.one_hot(index, layout.n_total).float().sum(dim=1)  # (T, N+Z)
        layer_slots = (slot_counts * mask[:, None]).sum(dim=0)  # (N+Z,)
        expert_share = layer_slots / (n_tokens * top_k)  # (N+Z,) f_i, sums to 1
        slot_total = slot_total.to(logits.device) + layer_slots
        probability_total = probability_total.to(logits.device) + (probabilities * mask[:, None]).sum(dim=0)
        token_total = token_total.to(logits.device) + mask.sum()
        switched_on = switched_on.to(logits.device) | switched_on_mask(bias, layout.n_ffn)
        per_layer["expert_share"].append(expert_share)
        for kind, (start, end) in kinds.items():
            per_layer[f"{kind}_share"].append(expert_share[start:end].sum())
        per_layer["ffn_experts_per_token"].append(per_layer["ffn_share"][-1] * top_k)
        ffn_used = (index < layout.n_ffn).sum(dim=-1)  # (T,) FFN experts each token uses in this layer
        used_counts = (F.one_hot(ffn_used, top_k + 1).float() * mask[:, None]).sum(dim=0)  # (k+1,)
        per_layer["ffn_experts_histogram"].append(used_counts / n_tokens)  # share of tokens using 0..k
    stats = {name: torch.stack(values) for name, values in per_layer.items()}
    token_total = token_total.clamp_min(1.0)
    token_share = slot_total / token_total  # (N+Z,) F_i, sums to k
    mean_probability = probability_total / token_total  # (N+Z,) P_i
    weighted = eta.to(token_share.device) * token_share * mean_probability
    stats["balance_loss"] = switched_on.sum() * weighted.sum()
    return stats


SELECTION_SIGNALS = ("output_change", "straight_through")


def relaxed_selection_term(router: MoePPRouter, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None,
                           logits: torch.Tensor, top_k_index: torch.Tensor, expert_outputs) -> torch.Tensor | None:
    """The learning signal of zero-computation selection (training only; `router.selection_signal`).

    Selection is a top-k over FFN and zero-computation scores, so the language-model loss gives the
    zero-computation rows of the router no gradient about *which* tokens should skip FFN work. Pair a token's
    FFN candidates with the zero-computation candidates they compete with: the j-th best FFN expert is selected
    exactly when it beats the (k-j)-th best zero-computation expert (scores plus bias); the pair's margin is
    the difference, and delta (T, D) the layer's output with that FFN expert minus without it (both computed
    without gradient, with the family's own weights). Two signals from there:

    - "output_change": targets from the layer itself. A pair keeps its FFN expert in the target when its
      delta's norm is among the largest of the batch (pooled over tokens and pair positions), as many as keep
      one now (so the target asks for the same compute, and the budget controller alone moves the amount); the
      margins learn it with a logistic loss, kept in `router.selection_loss` for the model's head to add.
    - "straight_through": the gate g = sigmoid(margin / temperature) enters the output as (g - stop_gradient(g))
      * delta: exactly 0 in value, and the margin's gradient is the first-order change of the loss when the pair
      flips (centred over the batch's tokens). The recipe's choice below k - 1 FFN experts per token
      (measured better there, bench/RESULTS.md).

    Either way the signal reaches the router's parameters only: the scores are recomputed from detached inputs,
    so it flows neither into the hidden states nor into earlier routers through the gating residual.

    hidden_states (T, D) and previous_logits (T, N+Z) or None: the router's inputs; logits (T, N+Z) its output;
    top_k_index (T, k) the forward's selection; expert_outputs(index (T, m)) -> (T, m, D): each listed expert's
    output with weight 1, without gradient. Returns the term to add to the output (T, D), or None.
    """
    router.selection_loss = None
    bias = router.selection_bias
    if router.selection_signal is None or router.routing_rule is not None or not torch.isfinite(bias).any():
        return None
    n_ffn, top_k = router.layout.n_ffn, router.top_k
    previous = previous_logits.detach() if previous_logits is not None else None
    scores = router.selection_scores(router.compute_logits(hidden_states.detach(), previous))  # (T, N+Z)
    biased_zero_computation = scores[:, n_ffn:] + bias.float()  # (T, Z), -inf where switched off
    n_candidates = min(top_k, router.layout.n_zero_computation)
    ffn_values, ffn_index = scores[:, :n_ffn].detach().topk(top_k, dim=-1)  # (T, k) best first
    zc_values, zc_position = biased_zero_computation.topk(n_candidates, dim=-1)  # (T, Zk) best first
    zc_index = zc_position + n_ffn
    pairs = [j for j in range(top_k) if top_k - 1 - j < n_candidates]  # FFN candidate j vs ZC candidate k-1-j
    if not pairs:
        return None
    with torch.no_grad():
        candidates = torch.cat([ffn_index, zc_index], dim=-1)  # (T, k+Zk)
        candidate_outputs = expert_outputs(candidates)  # (T, k+Zk, D)
        detached = logits.detach()

        def layer_output(index: torch.Tensor) -> torch.Tensor:  # (T, k) -> (T, D), the family's weights
            weights = router.top_k_weights(detached, index)  # (T, k)
            position = (index[:, :, None] == candidates[:, None, :]).float().argmax(dim=-1)  # (T, k)
            chosen = candidate_outputs.gather(1, position[..., None].expand(-1, -1, candidate_outputs.shape[-1]))
            return (weights[..., None].to(chosen.dtype) * chosen).sum(dim=1)

        selected = layer_output(top_k_index)  # (T, D)
        deltas, kept = [], []
        for j in pairs:
            ffn, zc = ffn_index[:, j : j + 1], zc_index[:, top_k - 1 - j : top_k - j]  # (T, 1) each
            ffn_in = (top_k_index == ffn).any(dim=-1, keepdim=True)  # (T, 1)
            flipped = torch.where((top_k_index == ffn) & ffn_in, zc, top_k_index)
            flipped = torch.where((top_k_index == zc) & ~ffn_in, ffn, flipped)
            alternative = layer_output(flipped)
            deltas.append(torch.where(ffn_in, selected - alternative, alternative - selected))  # with - without
            kept.append(ffn_in[:, 0])
    margins = torch.stack([ffn_values[:, j] - zc_values[:, top_k - 1 - j] for j in pairs], dim=-1)  # (T, P)
    finite = torch.isfinite(margins)
    if not bool(finite.any()):
        return None
    spread = margins.detach()[finite].std() if int(finite.sum()) > 1 else margins.new_ones(())
    temperature = router.selection_temperature * spread.clamp_min(1e-3)
    safe = margins.masked_fill(~finite, 0.0) / temperature  # (T, P)
    if router.selection_signal == "output_change":
        change = torch.stack([delta.float().norm(dim=-1) for delta in deltas], dim=-1)[finite]  # (M,) pairs
        keep_now = torch.stack(kept, dim=-1)[finite]  # (M,)
        if change.numel() >= 2:
            # as many kept FFN experts as now, pooled over tokens and pair positions: a token's second expert
            # can earn compute that another token's first expert gives up
            threshold = torch.quantile(change, (1.0 - keep_now.float().mean()).clamp(0.0, 1.0))
            target = (change >= threshold).float()  # keep the FFN experts that move the output most
            router.selection_loss = F.binary_cross_entropy_with_logits(safe[finite], target)
        return None
    mean = safe.sum(dim=0) / finite.sum(dim=0).clamp_min(1)  # (P,) over the batch's tokens
    centred = torch.where(finite, safe - mean + mean.detach(), safe)  # same values, centred gradient
    gates = torch.sigmoid(centred) * finite  # (T, P)
    relaxed = gates - gates.detach()  # exactly 0, with the gates' gradient
    return sum(relaxed[:, p, None].to(delta.dtype) * delta for p, delta in enumerate(deltas))
