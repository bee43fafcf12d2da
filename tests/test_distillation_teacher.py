"""The self-distillation teacher is the model the run started from (zero-computation experts off), whatever is
trained: routers, LoRA adapters or every weight. Compared with the source model itself (transformers' Mixtral)."""

import pytest
import torch
from conftest import save_source, tiny_mixtral

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.surgery.convert import ConvertOptions, convert
from upcycle.training.losses import StartingWeights, compute_losses
from upcycle.training.options import TrainOptions
from upcycle.training.trainable import select_trainable


@pytest.mark.parametrize("trainable", ["default", "lora", "full"])
def test_teacher_is_the_source_after_the_trained_weights_moved(tmp_path, trainable):
    source = tiny_mixtral(seed=3)
    save_source(source, tmp_path / "src", "per-expert", sharded=False)
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions())
    model, _ = select_trainable(load_causal_lm(tmp_path / "out").train(), TrainOptions(trainable=trainable))
    blocks = [block.gate.selection_bias for block in model.moe_blocks()]
    starting = StartingWeights(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what training does: move every trainable weight, raise the selection biases
        for parameter in starting.parameters:
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
        for bias in blocks:
            bias.fill_(0.0)
    moved = [parameter.detach().clone() for parameter in starting.parameters]
    tokens = torch.randint(0, 128, (2, 12), generator=generator)
    with torch.no_grad():
        expected = source(tokens).logits
    losses = compute_losses(model, tokens, blocks, balance_loss_coef=0.0, distill_weight=1.0,
                            starting_weights=starting)
    assert losses.distill_kl > 1e-3  # the student has moved away from the source
    from upcycle.training.losses import zero_computation_switched_off

    with torch.no_grad(), zero_computation_switched_off(blocks), starting.restored():
        teacher = model(tokens).logits
    torch.testing.assert_close(teacher, expected, atol=2e-5, rtol=0)
    for parameter, value in zip(starting.parameters, moved):  # the trained values are back after each pass
        assert torch.equal(parameter.detach(), value)
    assert all(bool((bias == 0).all()) for bias in blocks)
