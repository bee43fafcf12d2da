"""The budget controller: steers the selection biases toward a target number of FFN experts per token in training.

An integral controller per MoE layer, as in loss-free balancing (DeepSeek-V3) and LongCat-Flash's budget bias:
after every optimizer step, with m_l the FFN experts per token measured on that step's tokens in layer l and t the
current target,

    error_l = m_l - t                       # > 0: too much FFN compute, raise the biases
    integral_l += error_l
    bias_l += lr * spread_l * error_l        # every zero-computation expert of layer l moves together

`spread_l` (the standard deviation over tokens of the bias at which each token first picks a zero-computation
expert, measured once at the start) makes `lr` unit-free: router scores of different models differ in scale, and
families add the bias to different scores (the router's `selection_scores`: logits for softmax routers, sigmoid
scores for DeepSeek-V3).
The target ramps linearly from the source's top-k down to the goal over the first `ramp_fraction` of the steps,
so the routers learn while tokens are moved gradually.

Start: a converted checkpoint has every selection bias at -inf (switched off). Such a layer starts with all its
biases at the level where `start_share` of the tokens (2% by default) would pick a zero-computation expert, just
below the source's k, measured on the first batch. Layers with finite biases (e.g. calibrated) keep them.
"""

from collections.abc import Callable, Sequence

import torch


def first_pick_thresholds(selection_scores: torch.Tensor, n_ffn: int, top_k: int) -> torch.Tensor:
    """Per token, the uniform selection bias above which a zero-computation expert enters its top-k.

    selection_scores (T, N+Z), the router's `selection_scores` (-inf for FFN experts a token may not pick) ->
    (T,): k-th best FFN score minus the best zero-computation score.
    """
    scores = selection_scores.float()
    kth_ffn = scores[:, :n_ffn].topk(min(top_k, n_ffn), dim=-1).values[:, -1]  # (T,)
    best_zero_computation = scores[:, n_ffn:].max(dim=-1).values  # (T,)
    return kth_ffn - best_zero_computation


class BudgetController:
    """Per-layer integral control of the selection biases toward `target` FFN experts per token."""

    def __init__(self, source_top_k: int, target: float, total_steps: int, ramp_fraction: float = 0.3,
                 learning_rate: float = 0.3, start_share: float = 0.02):
        self.source_top_k = source_top_k
        self.target = target
        self.ramp_steps = round(ramp_fraction * total_steps)
        self.learning_rate = learning_rate
        self.start_share = start_share
        self.biases: torch.Tensor | None = None  # (L, Z) selection biases, float32
        self.spread: torch.Tensor | None = None  # (L,) router-logit spread that scales the step
        self.integral: torch.Tensor | None = None  # (L,) sum of errors so far
        self.step = 0  # updates done

    @property
    def initialised(self) -> bool:
        return self.biases is not None

    def initialise(self, selection_scores: Sequence[torch.Tensor], current_biases: Sequence[torch.Tensor], n_ffn: int,
                   reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor) -> None:
        """Set the starting biases from one batch's selection scores (one (T, N+Z) tensor per MoE layer).

        `reduce_mean` averages a tensor over training processes, so that every process starts identically.
        """
        levels, spreads = [], []
        for scores in selection_scores:
            thresholds = first_pick_thresholds(scores.detach(), n_ffn, self.source_top_k)  # (T,)
            levels.append(torch.quantile(thresholds, self.start_share))
            spreads.append(thresholds.std().clamp_min(1e-3))
        levels = reduce_mean(torch.stack(levels).float())  # (L,)
        self.spread = reduce_mean(torch.stack(spreads).float()).cpu()  # (L,)
        biases = []
        for level, bias in zip(levels.cpu(), current_biases):
            bias = bias.detach().float().cpu()
            biases.append(torch.full_like(bias, level.item()) if bool(torch.isneginf(bias).all()) else bias.clone())
        self.biases = torch.stack(biases)  # (L, Z)
        self.integral = torch.zeros(len(biases))

    def target_at(self, step: int) -> float:
        """The target after `step` updates: a linear ramp from the source's top-k to the goal."""
        if self.ramp_steps <= 0:
            return self.target
        progress = min(1.0, step / self.ramp_steps)
        return self.source_top_k + (self.target - self.source_top_k) * progress

    def update(self, measured_ffn_experts_per_token: torch.Tensor) -> dict:
        """One control step from the measured FFN experts per token per layer (L,); returns what to log."""
        assert self.biases is not None, "initialise the controller first"
        self.step += 1
        target = self.target_at(self.step)
        error = measured_ffn_experts_per_token.detach().float().cpu() - target  # (L,)
        self.integral += error
        self.biases += (self.learning_rate * self.spread * error)[:, None]  # -inf entries stay switched off
        return {"target_ffn_per_token": target, "controller_error": error.tolist(),
                "controller_integral": self.integral.tolist(), "selection_bias": self.bias_levels()}

    def bias_levels(self) -> list[float]:
        """Mean finite selection bias per layer (for logs)."""
        finite = torch.where(torch.isfinite(self.biases), self.biases, torch.nan)
        return torch.nanmean(finite, dim=-1).tolist()

    @torch.no_grad()
    def apply(self, selection_biases: Sequence[torch.Tensor]) -> None:
        """Write the controlled biases into the model's selection-bias buffers (one (Z,) per MoE layer)."""
        for buffer, bias in zip(selection_biases, self.biases):
            buffer.copy_(bias.to(device=buffer.device, dtype=buffer.dtype))

    def state_dict(self) -> dict:
        return {"biases": self.biases, "spread": self.spread, "integral": self.integral, "step": self.step,
                "target": self.target, "source_top_k": self.source_top_k}

    def load_state_dict(self, state: dict) -> None:
        self.biases, self.spread, self.integral = state["biases"], state["spread"], state["integral"]
        self.step = int(state["step"])
