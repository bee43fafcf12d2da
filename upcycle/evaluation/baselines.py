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
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import UpcycleError
from ..modeling.moepp_fields import ROUTING_RULES

# the training-free rules a converted model is compared with (top_1_confident: below one FFN expert per token)
BASELINES = ("dynamic_skipping", "top_p", "top_1_confident")


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


def _count_routing(counter: RoutingCounter, n_ffn: int, top_k: int):
    def hook(module, inputs, output):  # MoePPRouter.forward -> (logits, weights (T, k), index (T, k))
        counter.add((output[2] < n_ffn).sum(dim=-1), top_k)
    return hook


@contextlib.contextmanager
def variable_k_routing(model, rule: str, knob: float) -> Iterator[RoutingCounter]:
    """Within the context, every MoE layer of an MoE++ model (any family) routes by the rule (the router's own
    `routing_rule`, see `rule_keep_mask`), and the FFN experts each token uses are counted."""
    if rule not in ROUTING_RULES:
        raise UpcycleError(f"unknown routing rule {rule!r}; choose one of {', '.join(ROUTING_RULES)}")
    if not hasattr(model, "moe_blocks"):
        raise UpcycleError("training-free baselines run on an MoE++ checkpoint; convert the source first "
                           "(at conversion it computes exactly what the source does)")
    counter = RoutingCounter()
    routers = [block.gate for block in model.moe_blocks()]
    if routers[0].layout.n_zero_computation == 0:
        raise UpcycleError("the baselines need at least one zero-computation expert per layer to drop slots into")
    saved = [(router.routing_rule, router.routing_rule_knob) for router in routers]
    handles = [router.register_forward_hook(_count_routing(counter, router.layout.n_ffn, router.top_k))
               for router in routers]
    for router in routers:
        router.routing_rule, router.routing_rule_knob = rule, knob
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()
        for router, (saved_rule, saved_knob) in zip(routers, saved):
            router.routing_rule, router.routing_rule_knob = saved_rule, saved_knob


@torch.no_grad()
def measure(model, blocks: torch.Tensor, rule: str, knob: float, batch_size: int = 8) -> float:
    """Mean FFN experts per token of the baseline on blocks (n, L)."""
    device = next(model.parameters()).device
    with variable_k_routing(model, rule, knob) as counter:
        for batch in blocks.split(batch_size):
            model(batch.to(device), use_cache=False)
    return counter.ffn_experts_per_token


def knob_search(rule: str) -> tuple[float, float, bool]:
    """(lowest, highest, skips_more_when_higher) of a rule's continuous knob: a threshold on the renormalised
    weight in [0, 0.5] (dynamic_skipping) or on the first probability in [0, 1] (top_1_confident) skips more when
    higher; p in [0, 1] (top_p) keeps more. top_k has no knob to search (k is the target itself)."""
    low, high = (0.0, 0.5) if rule == "dynamic_skipping" else (0.0, 1.0)
    return low, high, rule != "top_p"


def fit_knob(model, blocks: torch.Tensor, rule: str, target: float, steps: int = 14) -> float:
    """Bisection on the rule's knob (`knob_search`) so that FFN experts per token on `blocks` hits the target."""
    low, high, skips_more_when_higher = knob_search(rule)
    for _ in range(steps):
        middle = (low + high) / 2
        used = measure(model, blocks, rule, middle)
        if (used > target) == skips_more_when_higher:
            low = middle
        else:
            high = middle
    return (low + high) / 2
