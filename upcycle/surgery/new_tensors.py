"""The tensors MoE++ adds to each MoE layer, each a neutral default that changes nothing at conversion."""

import torch

from .plan import ConversionPlan

BUFFER_SUFFIXES = ("gate.selection_bias", "gate.e_score_correction_bias")  # saved buffers, not parameters


def count_parameters(numels: dict[str, int]) -> int:
    """Parameters among named tensors (tensor name -> element count), leaving out saved buffers."""
    return sum(numel for name, numel in numels.items() if not name.endswith(BUFFER_SUFFIXES))


SAFETENSORS_TO_TORCH = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
}


def new_tensors(plan: ConversionPlan, gating_residual: bool,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Name -> tensor for every MoE layer's new parameters and buffers (small: no FFN-sized tensor).

    The gating residual links consecutive MoE layers (`plan.moe_layers`, dense layers skipped): the first MoE
    layer has no residual matrix. `device="meta"` gives names and shapes without memory (full-size checks)."""
    dtype = SAFETENSORS_TO_TORCH.get(plan.router_dtype, torch.float32)
    n_zc, n_constant, hidden = plan.counts.total, plan.counts.constant, plan.hidden_size
    n_total = plan.n_ffn + n_zc
    tensors: dict[str, torch.Tensor] = {}
    for position, layer in enumerate(plan.moe_layers):
        prefix = plan.spec.moepp_prefix.format(layer=layer)
        # zero router rows: zero-computation logits are 0 and the selection bias keeps them unselected
        tensors[prefix + "gate.zero_computation_weight"] = torch.zeros(n_zc, hidden, dtype=dtype, device=device)
        # -inf selection bias: no zero-computation expert can enter the top-k until calibrated or trained
        tensors[prefix + "gate.selection_bias"] = torch.full((n_zc,), float("-inf"), dtype=dtype, device=device)
        if gating_residual and position > 0:
            # zero gating residual: G_j = W_j x + 0 * G_{j-1}, the source's logits
            tensors[prefix + "gate.residual_weight"] = torch.zeros(n_total, n_total, dtype=dtype, device=device)
        # constant experts: never selected at conversion, so their start values only matter for training
        tensors[prefix + "zero_computation_experts.constant_vectors"] = torch.zeros(n_constant, hidden, dtype=dtype, device=device)
        tensors[prefix + "zero_computation_experts.constant_ratio_weight"] = torch.zeros(
            n_constant, 2, hidden, dtype=dtype, device=device
        )
    return tensors
