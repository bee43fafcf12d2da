"""Held-out evaluation at the end of training: perplexity and FFN experts per token on text never trained on.

Every process evaluates its share of the held-out blocks (the same number of batches on each, padded with
zero-weight blocks, so collective operations in the forward pass stay in step); sums are reduced over processes.
"""

import math
from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def evaluate_heldout(model: nn.Module, heldout: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1,
                     reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
                     device: torch.device | str = "cpu") -> dict:
    """heldout (M, S) token blocks -> {"perplexity", "heldout_loss", "ffn_experts_per_token", per layer, tokens}."""
    was_training = model.training
    model.eval()
    positions = list(range(rank, heldout.shape[0], world_size))
    per_process = math.ceil(heldout.shape[0] / world_size)
    positions += [-1] * (per_process - len(positions))  # padding blocks: weight 0
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    predicted_tokens = torch.zeros((), dtype=torch.float64, device=device)
    ffn_sum: torch.Tensor | None = None  # (L,) token-weighted FFN experts per token
    routed_tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, per_process, batch_size):
        real = [p for p in positions[start:start + batch_size] if p >= 0]
        # A process left with padding only still runs a forward pass (on one block, weight 0).
        weight = 1.0 if real else 0.0
        blocks = heldout[real or [0]].to(device)  # (b, S)
        output = model(input_ids=blocks, output_router_logits=True, use_cache=False)
        logits = output.logits[:, :-1].float()  # (b, S-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                                reduction="sum")
        nll_sum += weight * nll.double()
        predicted_tokens += weight * blocks[:, 1:].numel()
        tokens = weight * blocks.numel()
        layer_values = output.routing_statistics["ffn_experts_per_token"].double() * tokens  # (L,)
        ffn_sum = layer_values if ffn_sum is None else ffn_sum + layer_values
        routed_tokens += tokens
    nll_sum, predicted_tokens = reduce_sum(nll_sum), reduce_sum(predicted_tokens)
    ffn_sum, routed_tokens = reduce_sum(ffn_sum), reduce_sum(routed_tokens)
    model.train(was_training)
    heldout_loss = (nll_sum / predicted_tokens.clamp_min(1)).item()
    per_layer = (ffn_sum / routed_tokens.clamp_min(1)).tolist()
    return {
        "heldout_loss": heldout_loss,
        "perplexity": math.exp(heldout_loss) if heldout_loss < 700 else math.inf,
        "ffn_experts_per_token": sum(per_layer) / len(per_layer),
        "ffn_experts_per_token_per_layer": per_layer,
        "heldout_tokens": int(routed_tokens.item()),
    }

