"""Training-free variable-k baselines on a source MoE: what MoE++ must beat at the same FFN experts per token.

- dynamic skipping: a token keeps only its first expert when the second one's renormalised weight is under a
  threshold (confident tokens use one expert);
- top-p routing ("Harder tasks need more experts"): a token keeps its highest-probability experts until their
  probability mass reaches p, at most the source's k.
Kept experts are renormalised as the source does; dropped slots go to the sentinel expert N with weight 0, which
transformers' expert implementations skip. The threshold or p is found by bisection on calibration blocks so that
the mean number of FFN experts per token hits the target.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BASELINES = ("dynamic_skipping", "top_p")


@dataclass
class RoutingCounter:
    """FFN experts used, summed over MoE layers and tokens, while a baseline is active."""

    slots: float = 0.0
    token_layers: float = 0.0

    @property
    def ffn_experts_per_token(self) -> float:
        return self.slots / max(self.token_layers, 1.0)


def keep_mask(probabilities: torch.Tensor, top_k: int, rule: str, knob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probabilities (T, N) -> top-k index (T, k) and which slots are kept (T, k), by the baseline's rule."""
    top_values, top_index = torch.topk(probabilities, top_k, dim=-1)  # (T, k), descending
    if rule == "dynamic_skipping":
        renormalised = top_values / top_values.sum(dim=-1, keepdim=True)
        keep = renormalised >= knob  # knob: threshold on the renormalised weight
    elif rule == "top_p":
        mass_before = top_values.cumsum(dim=-1) - top_values  # (T, k) mass of the better experts
        keep = mass_before < knob  # knob: p
    else:
        raise ValueError(f"unknown baseline {rule!r}; choose one of {', '.join(BASELINES)}")
    keep[:, 0] = True  # the first expert is always kept
    return top_index, keep


def _variable_k_router(router, rule: str, knob: float, counter: RoutingCounter) -> Callable:
    def forward(hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)  # (T, D)
        logits = F.linear(hidden_states, router.weight)  # (T, N)
        probabilities = torch.softmax(logits.float(), dim=-1)
        index, keep = keep_mask(probabilities, router.top_k, rule, knob)
        weights = probabilities.gather(-1, index) * keep
        weights = weights / weights.sum(dim=-1, keepdim=True)
        counter.slots += keep.sum().item()
        counter.token_layers += keep.shape[0]
        return logits, weights, index.masked_fill(~keep, router.num_experts)

    return forward


@contextlib.contextmanager
def variable_k_routing(model, rule: str, knob: float) -> Iterator[RoutingCounter]:
    """Within the context, every MoE layer of a Mixtral-family source routes by the baseline's rule."""
    counter = RoutingCounter()
    patched = []
    for layer in model.model.layers:
        router, experts = layer.mlp.gate, layer.mlp.experts
        patched.append((router, experts, experts._is_expert_parallel))
        router.forward = _variable_k_router(router, rule, knob, counter)
        experts._is_expert_parallel = True  # dropped slots carry the sentinel index N: skipped
    try:
        yield counter
    finally:
        for router, experts, flag in patched:
            del router.forward
            experts._is_expert_parallel = flag


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
