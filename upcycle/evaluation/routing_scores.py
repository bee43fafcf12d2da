"""Routing scores per MoE layer with the gating residual on and off, and router confidence per token.

The MoE++ paper reports that the gating residual (G_j = W_j x + W_g^j G_{j-1}) lowers the variance of routing
scores without moving their mean or range. To test that on a user's own model, the same checkpoint runs twice on
the same tokens: as it is, and with every W_g^j zeroed for the forward (`gating_residual_off`), which is exactly
the model whose residual weights are zero. The first MoE layer has no residual, so it is the same both ways.

Two kinds of score, over every (token, switched-on expert) pair of a layer, pooled:
- `probabilities`: the router's own routing probabilities (`MoePPRouter.routing_probabilities`: for softmax
  routers a softmax over the switched-on experts). Their mean over experts is 1 / (switched-on experts) for every
  token by construction, so only their variance and range can move;
- `logits`: the router outputs G_j themselves, where the residual is added: mean, variance and range can all move.
Moments are accumulated in float64 (count, sum, sum of squares, min, max), so any number of batches fits.

Router confidence (`router_confidence`): a token's top-1 probability of the softmax over the FFN experts' router
logits alone. A source uses k FFN experts for every token, so its FFN experts per token cannot correlate across
layers; its confidence can, and it is computed the same way from an MoE++ model's FFN logits, so the source and the
converted model are compared on one axis (upcycle.evaluation.analyses, adjacent-layer correlation).
"""

import contextlib
from collections.abc import Iterator

import torch


class ScoreMoments:
    """Streaming mean, variance, min and max of the scores of one MoE layer."""

    def __init__(self):
        self.count = 0
        self.total = 0.0
        self.squares = 0.0
        self.low = float("inf")
        self.high = float("-inf")

    def add(self, scores: torch.Tensor) -> None:
        """scores (n,) of any shape, flattened: the (token, expert) pairs to count."""
        scores = scores.double().reshape(-1)
        if scores.numel() == 0:
            return
        self.count += scores.numel()
        self.total += scores.sum().item()
        self.squares += scores.square().sum().item()
        self.low = min(self.low, scores.min().item())
        self.high = max(self.high, scores.max().item())

    def as_dict(self) -> dict:
        mean = self.total / max(self.count, 1)
        variance = max(self.squares / max(self.count, 1) - mean * mean, 0.0)  # population variance
        return {"mean": mean, "variance": variance, "min": self.low, "max": self.high,
                "range": self.high - self.low}


def has_gating_residual(model) -> bool:
    """Whether any MoE layer's gating-residual matrix W_g is non-zero (a converted or calibrated model's is zero)."""
    return any(block.gate.residual_weight is not None and bool(block.gate.residual_weight.detach().ne(0).any())
               for block in model.moe_blocks())


@contextlib.contextmanager
def gating_residual_off(model) -> Iterator[None]:
    """Within the context every W_g^j of `model` is zero (restored afterwards, also on error)."""
    saved = []
    with torch.no_grad():
        for block in model.moe_blocks():
            weight = block.gate.residual_weight
            if weight is not None:
                saved.append((weight, weight.detach().clone()))
                weight.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


def add_layer_scores(router, logits: torch.Tensor, probabilities: ScoreMoments, raw: ScoreMoments) -> None:
    """Count one layer's scores: logits (T, N+Z) that `router` returned, restricted to its switched-on experts."""
    on = router.switched_on().to(logits.device)  # (N+Z,)
    logits = logits.float()
    probabilities.add(router.routing_probabilities(logits)[:, on])  # (T, N_on)
    raw.add(logits[:, on])  # (T, N_on)


def router_confidence(logits: torch.Tensor, n_ffn: int) -> torch.Tensor:
    """(T, E) router logits (E >= N) -> (T,) top-1 probability of the softmax over the first n_ffn (FFN) logits."""
    return torch.softmax(logits[:, :n_ffn].float(), dim=-1).max(dim=-1).values


def score_summary(moments_on: list[ScoreMoments], moments_off: list[ScoreMoments]) -> list[dict]:
    """Per MoE layer: the on and off moments and the variance ratio on / off (None where off has no spread)."""
    rows = []
    for on, off in zip(moments_on, moments_off):
        on, off = on.as_dict(), off.as_dict()
        rows.append({"on": on, "off": off,
                     "variance_ratio": on["variance"] / off["variance"] if off["variance"] > 0 else None})
    return rows
