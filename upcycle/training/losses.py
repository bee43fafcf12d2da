"""The training losses: language-model cross-entropy, the heterogeneous balance loss, and self-distillation.

    loss = cross-entropy + beta * L_b  (+ distill_weight * KL(teacher || student))

Cross-entropy and beta * L_b come from the model itself (`output_router_logits=True` with labels; tau and beta
are the config's `balance_tau` and `balance_loss_coef`, see docs/layer-math.md). The self-distillation teacher is
the model the run started from, with its zero-computation experts switched off: every selection bias at -inf (no
zero-computation expert can be selected or take probability mass, which is exactly how a converted model
reproduces its source) and every trainable parameter put back to its starting value for the teacher's pass
(`StartingWeights`). The trainable set decides what that costs: a copy of the routers and constant experts (the
default set), of the LoRA adapters (whose starting value switches them off), or of the whole model (`--full`).
Without the starting weights the teacher would move with the student and anchor nothing (measured: LoRA with
such a teacher diverged).
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
def temporarily_set(tensors: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Copy `values` into `tensors` in place for the block, then copy the tensors' own values back."""
    with torch.no_grad():
        saved = [tensor.detach().clone() for tensor in tensors]
        try:
            for tensor, value in zip(tensors, values):
                tensor.copy_(value)
            yield
        finally:
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)


def zero_computation_switched_off(selection_biases: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Temporarily set every selection bias to -inf: the model then routes exactly as its source."""
    return temporarily_set(selection_biases, [torch.full_like(bias, float("-inf")) for bias in selection_biases])


@contextlib.contextmanager
def routing_rules_off(routers: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily clear every router's `routing_rule`: a trained control's teacher routes as the source does."""
    saved = [router.routing_rule for router in routers]
    try:
        for router in routers:
            router.routing_rule = None
        yield
    finally:
        for router, rule in zip(routers, saved):
            router.routing_rule = rule


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on next-token distributions: logits (B, S, V) -> scalar."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (T, V)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (T, V)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


class StartingWeights:
    """The trainable parameters' values when the run started; `restored()` puts them back for a pass.

    Values are copied in place (not swapped by reference), so the parameters stay the objects the optimizer,
    DDP and FSDP hold. Taken before a resumed run loads its checkpoint, so a resumed run has the same teacher."""

    def __init__(self, model: nn.Module):
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.starting = [parameter.detach().clone() for parameter in self.parameters]

    def restored(self) -> contextlib.AbstractContextManager:
        return temporarily_set(self.parameters, self.starting)


def compute_losses(model: nn.Module, input_ids: torch.Tensor, selection_biases: Sequence[torch.Tensor],
                   balance_loss_coef: float, distill_weight: float = 0.0,
                   distill_temperature: float = 1.0, starting_weights: StartingWeights | None = None,
                   routers: Sequence[nn.Module] = ()) -> StepLosses:
    """One forward pass (after a no-grad teacher pass when distilling) on input_ids (B, S).

    The teacher runs first, before the student's graph exists, with the starting weights restored when given,
    and without the routing rule of a trained control (`routers`), so every arm distils from the same source."""
    teacher_logits = None
    if distill_weight > 0:
        restored = starting_weights.restored() if starting_weights is not None else contextlib.nullcontext()
        with torch.no_grad(), zero_computation_switched_off(selection_biases), routing_rules_off(routers), restored:
            teacher_logits = model(input_ids=input_ids, use_cache=False).logits  # (B, S, V)
    output = model(input_ids=input_ids, labels=input_ids, output_router_logits=True, use_cache=False)
    balance = output.aux_loss.float()
    loss = output.loss
    selection = output.routing_statistics.get("selection_loss")  # the "output_change" selection signal's loss
    lm_loss = loss.detach().float() - balance_loss_coef * balance.detach()
    if selection is not None:
        lm_loss = lm_loss - selection.detach().float()
    distill = torch.zeros((), device=loss.device)
    if teacher_logits is not None:
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
