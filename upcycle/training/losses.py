"""The training losses: language-model cross-entropy, the heterogeneous balance loss, and self-distillation.

    loss = cross-entropy + beta * L_b  (+ distill_weight * KL(teacher || student))

Cross-entropy and beta * L_b come from the model itself (`output_router_logits=True` with labels; tau and beta
are the config's `balance_tau` and `balance_loss_coef`, see docs/layer-math.md). The self-distillation teacher is
the source's behaviour: the same model with every selection bias at -inf, so no zero-computation expert can be
selected or take probability mass, which is exactly how the converted model reproduces its source. It runs under
no_grad on the same weights, so no second copy of the model is kept.
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepLosses:
    loss: torch.Tensor  # scalar, what backward runs on
    lm_loss: torch.Tensor  # scalar cross-entropy (detached)
    balance_loss: torch.Tensor  # scalar L_b (detached)
    distill_kl: torch.Tensor  # scalar KL to the teacher (detached; 0 when off)
    ffn_experts_per_token: torch.Tensor  # (L,) measured on this batch (detached)
    router_logits: tuple[torch.Tensor, ...]  # one (T, N+Z) per MoE layer (detached)


@contextlib.contextmanager
def zero_computation_switched_off(selection_biases: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily set every selection bias to -inf: the model then routes exactly as its source."""
    saved = [bias.clone() for bias in selection_biases]
    try:
        with torch.no_grad():
            for bias in selection_biases:
                bias.fill_(float("-inf"))
        yield
    finally:
        with torch.no_grad():
            for bias, value in zip(selection_biases, saved):
                bias.copy_(value)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on next-token distributions: logits (B, S, V) -> scalar."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (T, V)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (T, V)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def compute_losses(model: nn.Module, input_ids: torch.Tensor, selection_biases: Sequence[torch.Tensor],
                   balance_loss_coef: float, distill_weight: float = 0.0,
                   distill_temperature: float = 1.0) -> StepLosses:
    """One forward pass (plus a no-grad teacher pass when distilling) on input_ids (B, S)."""
    output = model(input_ids=input_ids, labels=input_ids, output_router_logits=True, use_cache=False)
    balance = output.aux_loss.float()
    loss = output.loss
    lm_loss = loss.detach().float() - balance_loss_coef * balance.detach()
    distill = torch.zeros((), device=loss.device)
    if distill_weight > 0:
        with torch.no_grad(), zero_computation_switched_off(selection_biases):
            teacher_logits = model(input_ids=input_ids, use_cache=False).logits  # (B, S, V)
        distill = distillation_kl(output.logits, teacher_logits, distill_temperature)
        loss = loss + distill_weight * distill
    return StepLosses(
        loss=loss,
        lm_loss=lm_loss,
        balance_loss=balance.detach(),
        distill_kl=distill.detach(),
        ffn_experts_per_token=output.routing_statistics["ffn_experts_per_token"].detach(),
        router_logits=tuple(logits.detach() for logits in output.router_logits),
    )
