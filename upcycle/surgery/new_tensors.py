"""The tensors MoE++ adds to each MoE layer, each a neutral default that changes nothing at conversion.

Each is a constant (0 or -inf) of the source router's dtype, described by `NewTensor` so that `upcycle convert`
writes its bytes without torch; `new_tensors` gives the same as torch tensors (checks, meta-device tests).
"""

import math
from dataclasses import dataclass

from ..checkpoint.float_bytes import FLOAT_DTYPES, filled_bytes
from .plan import ConversionPlan


@dataclass(frozen=True)
class NewTensor:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    fill: float  # every element

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_bytes(self) -> bytes:
        return filled_bytes(self.fill, self.dtype, self.numel)


def new_tensor_specs(plan: ConversionPlan, gating_residual: bool, dtype: str | None = None) -> dict[str, NewTensor]:
    """Name -> dtype, shape and value of every MoE layer's new parameters and buffers (small: no FFN-sized one).

    The dtype is the source router's (float32 if that is not a plain float), or `dtype` when given (a `--dtype`
    cast). The gating residual links consecutive MoE layers (`plan.moe_layers`, dense layers skipped): the first
    MoE layer has no residual matrix."""
    dtype = dtype or (plan.router_dtype if plan.router_dtype in FLOAT_DTYPES else "F32")
    n_zc, n_constant, hidden = plan.counts.total, plan.counts.constant, plan.hidden_size
    n_total = plan.n_ffn + n_zc
    tensors: dict[str, NewTensor] = {}
    for position, layer in enumerate(plan.moe_layers):
        prefix = plan.spec.moepp_prefix.format(layer=layer)
        # zero router rows: zero-computation logits are 0 and the selection bias keeps them unselected
        tensors[prefix + "gate.zero_computation_weight"] = NewTensor(dtype, (n_zc, hidden), 0.0)
        # -inf selection bias: no zero-computation expert can enter the top-k until calibrated or trained
        tensors[prefix + "gate.selection_bias"] = NewTensor(dtype, (n_zc,), float("-inf"))
        if gating_residual and position > 0:
            # zero gating residual: G_j = W_j x + 0 * G_{j-1}, the source's logits
            tensors[prefix + "gate.residual_weight"] = NewTensor(dtype, (n_total, n_total), 0.0)
        # constant experts: never selected at conversion, so their start values only matter for training
        tensors[prefix + "zero_computation_experts.constant_vectors"] = NewTensor(dtype, (n_constant, hidden), 0.0)
        tensors[prefix + "zero_computation_experts.constant_ratio_weight"] = NewTensor(
            dtype, (n_constant, 2, hidden), 0.0
        )
    return tensors


def new_tensors(plan: ConversionPlan, gating_residual: bool, device="cpu") -> dict:
    """`new_tensor_specs` as torch tensors; `device="meta"` gives names and shapes without memory."""
    import torch

    from ..checkpoint.dtypes import torch_dtype

    return {
        name: torch.full(spec.shape, spec.fill, dtype=torch_dtype(spec.dtype), device=device)
        for name, spec in new_tensor_specs(plan, gating_residual).items()
    }
