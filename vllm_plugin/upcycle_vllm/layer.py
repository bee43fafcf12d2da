"""The MoE++ sparse block on vLLM's FusedMoE: router over FFN + zero-computation experts, gating residual,
selection bias, Zero/Copy/Constant experts, and FFN kernels that see only the slots routed to FFN experts.

The math is upcycle's (docs/layer-math.md; reference: upcycle/modeling/moepp_layer.py). Shapes: T tokens,
D hidden size, N FFN experts, Z zero-computation experts (expert order FFN 0..N-1, zero, copy, constant), k slots.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.utils import set_weight_attrs


@dataclass(frozen=True)
class ExpertLayout:
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


def _param(*shape: int, dtype: torch.dtype, fill: float = 0.0) -> nn.Parameter:
    parameter = nn.Parameter(torch.full(shape, fill, dtype=dtype), requires_grad=False)
    return parameter


class MoePPGate(nn.Module):
    """The MoE++ router's saved tensors, under the checkpoint's names (`mlp.gate.*`).

    weight (N, D) the source router; zero_computation_weight (Z, D); residual_weight (N+Z, N+Z) W_g, absent in the
    first MoE layer; selection_bias (Z,) selection-only bias, -inf = switched off.
    """

    def __init__(self, layout: ExpertLayout, hidden_size: int, has_residual: bool, params_dtype: torch.dtype):
        super().__init__()
        self.layout = layout
        self.weight = _param(layout.n_ffn, hidden_size, dtype=params_dtype)
        self.zero_computation_weight = _param(layout.n_zero_computation, hidden_size, dtype=params_dtype)
        self.residual_weight = (
            _param(layout.n_total, layout.n_total, dtype=params_dtype) if has_residual else None
        )
        # Saved in float32 or the router's dtype; kept as float32 here (it only ranks scores).
        self.selection_bias = _param(layout.n_zero_computation, dtype=torch.float32, fill=float("-inf"))
        set_weight_attrs(self.selection_bias, {"weight_loader": _load_float32})
        self.finalize()

    @torch.no_grad()
    def finalize(self) -> None:
        """Derived tensors, once the checkpoint is loaded: the (N+Z, D) router matrix, selection scores' bias,
        the softmax mask of switched-off experts, and whether this layer routes exactly like its source."""
        layout = self.layout
        self.router_weight = torch.cat([self.weight, self.zero_computation_weight.to(self.weight.dtype)])
        bias = self.selection_bias.float()
        device = bias.device
        self.score_bias = torch.cat([torch.zeros(layout.n_ffn, device=device), bias])  # (N+Z,)
        off = torch.cat([torch.zeros(layout.n_ffn, dtype=torch.bool, device=device), torch.isneginf(bias)])
        self.probability_mask = torch.zeros(layout.n_total, device=device).masked_fill(off, float("-inf"))
        # Every zero-computation expert switched off: no slot can leave the FFN experts, and the probabilities
        # over the FFN experts are the source's softmax (the full budget, e.g. right after `upcycle convert`).
        self.all_switched_off = bool(torch.isneginf(bias).all())
        self.copy_or_constant_on = bool((~torch.isneginf(bias[layout.n_zero:])).any())
        # W_g = 0 (as convert and calibrate leave it) adds nothing: skip it
        has_residual = self.residual_weight is not None and bool(self.residual_weight.any())
        self.residual_weight_f32 = self.residual_weight.float() if has_residual else None

    def logits(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None) -> torch.Tensor:
        """G_j = W_j x + W_g^j G_{j-1}: (T, D), (T, N+Z) or None -> (T, N+Z) float32 (matmul in the model dtype)."""
        logits = F.linear(hidden_states, self.router_weight.to(hidden_states.dtype)).float()
        if self.residual_weight_f32 is not None and previous_logits is not None:
            logits = logits + F.linear(previous_logits, self.residual_weight_f32)
        return logits


def _load_float32(parameter: torch.Tensor, loaded: torch.Tensor) -> None:
    parameter.data.copy_(loaded.to(torch.float32))


class ZeroComputationExperts(nn.Module):
    """Zero (0), Copy (x) and Constant (a1 x + a2 v_j, [a1, a2] = softmax(W_c^j x)) in a few vectorised ops."""

    def __init__(self, layout: ExpertLayout, hidden_size: int, params_dtype: torch.dtype):
        super().__init__()
        self.layout = layout
        self.constant_vectors = _param(layout.n_constant, hidden_size, dtype=params_dtype)  # (C, D)
        self.constant_ratio_weight = _param(layout.n_constant, 2, hidden_size, dtype=params_dtype)  # (C, 2, D)

    def forward(self, hidden_states: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(T, D), index (T, k), weights (T, k) float32 -> (T, D): the zero-computation experts' contribution.

        Written with element-wise operations, small reductions and one addmm (no scatter, no softmax kernel): on
        vLLM's CPU backend those cost milliseconds each even for a few tokens.
        """
        layout = self.layout
        dtype = hidden_states.dtype
        is_copy = (index >= layout.copy_start) & (index < layout.constant_start)
        x_coefficient = (weights * is_copy).sum(dim=-1)  # (T,)
        if layout.n_constant == 0:
            return x_coefficient.to(dtype).unsqueeze(-1) * hidden_states
        constant_ids = torch.arange(layout.constant_start, layout.n_total, device=index.device)  # (C,)
        # (T, C): routing weight each constant expert receives, summed over slots
        constant_weights = (weights.unsqueeze(-1) * (index.unsqueeze(-1) == constant_ids)).sum(dim=1)
        ratio_logits = torch.einsum("td,cjd->tcj", hidden_states, self.constant_ratio_weight.to(dtype)).float()
        a1 = torch.sigmoid(ratio_logits[..., 0] - ratio_logits[..., 1])  # (T, C): softmax over the pair
        x_coefficient = x_coefficient + (constant_weights * a1).sum(dim=-1)
        # x_coefficient * x + (constant weights * a2) @ v, as one multiply and one addmm
        return torch.addmm(x_coefficient.to(dtype).unsqueeze(-1) * hidden_states,
                           (constant_weights * (1.0 - a1)).to(dtype), self.constant_vectors.to(dtype))


def normalize_top_k_weights(weights: torch.Tensor, index: torch.Tensor, layout: ExpertLayout, renormalize: bool,
                            zero_expert_semantics: str) -> torch.Tensor:
    """Zero-expert semantics, then the family's top-k normalisation: (T, k) -> (T, k). As upcycle computes it."""
    tiny = torch.finfo(weights.dtype).tiny
    if zero_expert_semantics == "drop_and_renormalize":
        is_zero = (index >= layout.n_ffn) & (index < layout.copy_start)
        kept = weights.masked_fill(is_zero, 0.0)
        if renormalize:
            return kept / kept.sum(dim=-1, keepdim=True).clamp_min(tiny)
        return kept * (weights.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(tiny))
    if renormalize:
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return weights


class MoePPSparseBlock(nn.Module):
    """An MoE++ layer: MoE++ router, vLLM FusedMoE for the N FFN experts, zero-computation experts beside it.

    FFN work is skipped, not masked: when some slots go to zero-computation experts, the FusedMoE kernel gets one
    row per (token, slot) routed to an FFN expert (top-1 rows), so its work is the number of FFN slots. At the
    full budget (every selection bias -inf) the layer calls FusedMoE exactly as the source model does.
    """

    def __init__(self, config, *, layout: ExpertLayout, top_k: int, intermediate_size: int, renormalize: bool,
                 zero_expert_semantics: str, zero_computation_denominator: str, has_residual: bool,
                 zero_computation_scores: str,
                 ckpt_names: tuple[str, str, str],
                 routing_weights_in_input_dtype: bool, quant_config, params_dtype: torch.dtype, prefix: str):
        super().__init__()
        hidden_size = config.hidden_size
        self.layout = layout
        self.top_k = top_k
        self.renormalize = renormalize
        self.zero_expert_semantics = zero_expert_semantics
        # "ffn_only": FFN experts' weights from the softmax over the FFN experts alone (the source's probabilities),
        # zero-computation experts' from the softmax over every switched-on expert; only where the family does
        # not renormalise (with renormalisation the common denominator cancels). "switched_on": one softmax.
        if zero_computation_denominator not in ("switched_on", "ffn_only"):
            raise ValueError(f"unknown zero_computation_denominator {zero_computation_denominator!r}")
        self.ffn_only_denominator = zero_computation_denominator == "ffn_only" and not renormalize
        # "relative": zero-computation logits compete with the FFN logits minus the token's best FFN logit
        if zero_computation_scores not in ("absolute", "relative"):
            raise ValueError(f"unknown zero_computation_scores {zero_computation_scores!r}")
        self.relative_scores = zero_computation_scores == "relative"
        self.routing_weights_in_input_dtype = routing_weights_in_input_dtype
        self.gate = MoePPGate(layout, hidden_size, has_residual, params_dtype)
        self.zero_computation_experts = ZeroComputationExperts(layout, hidden_size, params_dtype)
        self._routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (weights, ids) for the next FusedMoE call
        self.pass_logits = True  # whether the next MoE layer reads this layer's G (set after loading)
        self.experts = FusedMoEFactory(
            num_experts=layout.n_ffn,
            top_k=top_k,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            params_dtype=params_dtype,
            renormalize=renormalize,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
            custom_routing_function=self._route,
            ckpt_names=ckpt_names,
        )
        # FFN-row accounting: tokens seen and (token, slot) rows the FFN kernel processed.
        self.tokens = 0
        self.ffn_rows = 0

    def _route(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool):
        """FusedMoE's routing: the MoE++ routing computed in forward() when there is one, else the source's
        softmax top-k over the N FFN logits (float32)."""
        if self._routed is not None:
            weights, ids = self._routed
            self._routed = None
            return weights, ids
        # as vLLM's CPU router computes it: top-k of the logits, then their softmax (or exp(l - logsumexp))
        values, ids = torch.topk(gating_output.float(), topk, dim=-1)
        if renormalize:
            weights = torch.softmax(values, dim=-1)
        else:
            weights = (values - torch.logsumexp(gating_output.float(), dim=-1, keepdim=True)).exp()
        if self.routing_weights_in_input_dtype:
            weights = weights.to(hidden_states.dtype)
        return weights, ids

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None):
        """(T, D), previous MoE layer's G (T, N+Z) or None -> output (T, D), this layer's G (T, N+Z) float32."""
        n_tokens = hidden_states.shape[0]
        n_ffn = self.layout.n_ffn
        if self.gate.all_switched_off and self.gate.residual_weight_f32 is None and not self.pass_logits:
            # The source's layer exactly: its router's N logits, its top-k (no later layer reads this G)
            self.tokens += n_tokens
            self.ffn_rows += n_tokens * self.top_k
            return self.experts(hidden_states, F.linear(hidden_states, self.gate.weight)), None
        logits = self.gate.logits(hidden_states, previous_logits)  # (T, N+Z)
        if self.gate.all_switched_off:
            self.tokens += n_tokens
            self.ffn_rows += n_tokens * self.top_k
            return self.experts(hidden_states, logits[:, :n_ffn]), logits
        scores = logits + self.gate.score_bias  # (T, N+Z)
        if self.relative_scores:  # as upcycle computes it: FFN logits minus the best one (the best scores 0)
            best_ffn = logits[:, :n_ffn].amax(dim=-1, keepdim=True)  # (T, 1)
            scores = torch.cat([scores[:, :n_ffn] - best_ffn, scores[:, n_ffn:]], dim=-1)
        index = torch.topk(scores, self.top_k, dim=-1).indices  # (T, k)
        # softmax over the switched-on experts, gathered at the selection (exp / sum: no softmax kernel)
        shifted = logits + self.gate.probability_mask
        exponentials = torch.exp(shifted - shifted.amax(dim=-1, keepdim=True))  # (T, N+Z)
        denominator = exponentials.sum(dim=-1, keepdim=True)  # (T, 1)
        if self.ffn_only_denominator:
            denominator = torch.where(index < n_ffn, exponentials[:, :n_ffn].sum(dim=-1, keepdim=True), denominator)
        gathered = exponentials.gather(-1, index) / denominator  # (T, k)
        weights = normalize_top_k_weights(gathered, index, self.layout, self.renormalize,
                                          self.zero_expert_semantics)  # (T, k) float32
        # Zero slots add nothing; Copy and Constant slots are computed only when some token selected one.
        output = None
        if self.gate.copy_or_constant_on and bool((index >= self.layout.copy_start).any()):
            output = self.zero_computation_experts(hidden_states, index, weights)
        ffn_weights = weights.to(hidden_states.dtype).float() if self.routing_weights_in_input_dtype else weights
        is_ffn = (index < n_ffn).reshape(-1)  # (T*k,)
        slot_rows = is_ffn.nonzero().squeeze(1)  # (S,): the (token, slot) pairs routed to FFN experts
        n_rows = slot_rows.numel()
        self.tokens += n_tokens
        self.ffn_rows += n_rows
        if n_rows == n_tokens * self.top_k:  # every slot is an FFN slot: the source's call, MoE++ weights
            self._routed = (ffn_weights.contiguous(), index.to(torch.int32).contiguous())
            ffn_output = self.experts(hidden_states, logits[:, :n_ffn])
            return (ffn_output if output is None else output + ffn_output), logits
        if output is None:
            output = torch.zeros_like(hidden_states)
        if n_rows == 0:
            return output, logits
        token_rows = torch.div(slot_rows, self.top_k, rounding_mode="floor")
        self._routed = (ffn_weights.reshape(-1).index_select(0, slot_rows).unsqueeze(1),
                        index.reshape(-1).index_select(0, slot_rows).to(torch.int32).unsqueeze(1))
        routed = self.experts(hidden_states.index_select(0, token_rows),
                              logits[:, :n_ffn].index_select(0, token_rows))  # (S, D): one slot per row
        # Rows back to their tokens, added in place (index_put_ with accumulate: on CPU far cheaper than
        # index_add_, which costs tens of milliseconds even for a few rows).
        return output.index_put_((token_rows,), routed.to(output.dtype), accumulate=True), logits


def ffn_row_counts(model: nn.Module, reset: bool = False) -> dict[str, dict[str, int]]:
    """FFN-row accounting of a model's MoE++ blocks: {module name: {"tokens": T seen, "ffn_rows": rows the FFN
    kernels processed}}; empty for a model without MoE++ blocks. Use it through vLLM:
    `llm.apply_model(functools.partial(ffn_row_counts, reset=True))[0]`."""
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, MoePPSparseBlock):
            result[name] = {"tokens": module.tokens, "ffn_rows": module.ffn_rows}
            if reset:
                module.tokens = 0
                module.ffn_rows = 0
    return result
