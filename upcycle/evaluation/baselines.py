"""Training-free variable-k baselines: what MoE++ must beat at the same FFN experts per token.

- dynamic skipping: a token keeps only its first expert when the second one's renormalised weight is under a
  threshold (confident tokens use one expert);
- top-p routing ("Harder tasks need more experts"): a token keeps its highest-probability experts until their
  probability mass reaches p, at most the source's k.
They run on a converted MoE++ model (at conversion it computes its source exactly), so every family gets them
through one definition of routing: its router's own selection (`select_experts`), probabilities
(`routing_probabilities`) and top-k weights (`top_k_weights`: DeepSeek's sigmoid scores and groups, Qwen's and
OLMoE's missing renormalisation, scaling factors). Kept experts keep the family's weights, renormalised to the
same total when the family renormalises (as its router does at a smaller top-k); dropped slots become
zero-computation slots of weight 0, which reach no FFN expert. The threshold or p is found by bisection on
calibration blocks so that the mean number of FFN experts per token hits the target.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import UpcycleError

BASELINES = ("dynamic_skipping", "top_p")


@dataclass
class RoutingCounter:
    """FFN experts used, summed over MoE layers and tokens, while a baseline is active."""

    used_counts: torch.Tensor | None = None  # (k+1,) (token, layer) pairs that used 0..k FFN experts

    @property
    def ffn_experts_per_token(self) -> float:
        if self.used_counts is None:
            return 0.0
        used = torch.arange(len(self.used_counts), dtype=self.used_counts.dtype)  # (k+1,) 0..k
        return (used * self.used_counts).sum().item() / self.used_counts.sum().item()

    @property
    def ffn_experts_histogram(self) -> dict[str, float]:
        """"0".."k" -> share of (token, layer) pairs that used that many FFN experts."""
        if self.used_counts is None:
            return {}
        shares = self.used_counts / self.used_counts.sum()
        return {str(count): share for count, share in enumerate(shares.tolist())}

    def add(self, ffn_used: torch.Tensor, top_k: int) -> None:
        """ffn_used (T,): FFN experts each token kept in one layer."""
        counts = torch.bincount(ffn_used.cpu(), minlength=top_k + 1).double()  # (k+1,)
        self.used_counts = counts if self.used_counts is None else self.used_counts + counts


def keep_mask(probabilities: torch.Tensor, rule: str, knob: float) -> torch.Tensor:
    """probabilities (T, k) of a token's selected experts, best first -> which slots are kept (T, k)."""
    if rule == "dynamic_skipping":
        renormalised = probabilities / probabilities.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        keep = renormalised >= knob  # knob: threshold on the renormalised weight
    elif rule == "top_p":
        mass_before = probabilities.cumsum(dim=-1) - probabilities  # (T, k) mass of the better experts
        keep = mass_before < knob  # knob: p
    else:
        raise UpcycleError(f"unknown baseline {rule!r}; choose one of {', '.join(BASELINES)}")
    keep[:, 0] = True  # the first expert is always kept
    return keep


def _variable_k_forward(router, rule: str, knob: float, counter: RoutingCounter) -> Callable:
    """A router forward that routes as `router` does, then drops FFN slots by the baseline's rule."""
    n_ffn = router.layout.n_ffn

    def forward(hidden_states: torch.Tensor, previous_logits: torch.Tensor | None = None):
        logits = router.compute_logits(hidden_states, previous_logits)  # (T, N+Z)
        index = router.select_experts(logits)  # (T, k), the family's selection
        probabilities = router.routing_probabilities(logits).gather(-1, index)  # (T, k)
        order = probabilities.argsort(dim=-1, descending=True)  # best first, whatever order selection gave
        index, probabilities = index.gather(-1, order), probabilities.gather(-1, order)
        weights = router.top_k_weights(logits, index)  # (T, k), the family's weights
        is_ffn = index < n_ffn
        keep = keep_mask(probabilities.masked_fill(~is_ffn, 0.0), rule, knob) | ~is_ffn  # rule on FFN slots
        kept = weights * keep
        if router.renormalize:  # the family's router renormalises its top-k: the kept slots share the same total
            kept = kept * (weights.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(1e-30))
        counter.add((keep & is_ffn).sum(dim=-1), router.top_k)
        return logits, kept, index.masked_fill(~keep, n_ffn)  # dropped: a zero-computation slot of weight 0

    return forward


@contextlib.contextmanager
def variable_k_routing(model, rule: str, knob: float) -> Iterator[RoutingCounter]:
    """Within the context, every MoE layer of an MoE++ model (any family) routes by the baseline's rule."""
    if not hasattr(model, "moe_blocks"):
        raise UpcycleError("training-free baselines run on an MoE++ checkpoint; convert the source first "
                           "(at conversion it computes exactly what the source does)")
    counter = RoutingCounter()
    routers = [block.gate for block in model.moe_blocks()]
    if routers[0].layout.n_zero_computation == 0:
        raise UpcycleError("the baselines need at least one zero-computation expert per layer to drop slots into")
    for router in routers:
        router.forward = _variable_k_forward(router, rule, knob, counter)
    try:
        yield counter
    finally:
        for router in routers:
            del router.forward


@torch.no_grad()
def measure(model, blocks: torch.Tensor, rule: str, knob: float, batch_size: int = 8) -> float:
    """Mean FFN experts per token of the baseline on blocks (n, L)."""
    with variable_k_routing(model, rule, knob) as counter:
        for batch in blocks.split(batch_size):
            model(batch, use_cache=False)
    return counter.ffn_experts_per_token


def fit_knob(model, blocks: torch.Tensor, rule: str, target: float, steps: int = 14) -> float:
    """Bisection on the threshold (dynamic skipping) or p (top-p) so FFN experts per token hits the target.

    Both knobs are monotone: a higher threshold skips more, a higher p keeps more.
    """
    low, high = (0.0, 0.5) if rule == "dynamic_skipping" else (0.0, 1.0)
    for _ in range(steps):
        middle = (low + high) / 2
        used = measure(model, blocks, rule, middle)
        skips_more_when_higher = rule == "dynamic_skipping"
        if (used > target) == skips_more_when_higher:
            low = middle
        else:
            high = middle
    return (low + high) / 2
