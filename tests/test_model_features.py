"""The MoE++ model as a transformers model: caching, gradient checkpointing, dtypes, statistics and the loss."""

import pytest
import torch

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.modeling.moepp_layer import routing_statistics


def activate_moepp(model, seed=0):
    """Give the new tensors non-neutral values, as after training: zero-computation experts get selected."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.moe_blocks():
            gate = block.gate
            gate.zero_computation_weight.copy_(torch.randn(gate.zero_computation_weight.shape, generator=generator))
            if gate.residual_weight is not None:
                gate.residual_weight.copy_(0.3 * torch.randn(gate.residual_weight.shape, generator=generator))
            # relative scores already add the token's best FFN score: a bias below 0 keeps FFN experts in use
            gate.selection_bias.fill_(-1.0 if gate.zero_computation_scores == "relative" else 0.5)
            zc = block.zero_computation_experts
            zc.constant_vectors.copy_(torch.randn(zc.constant_vectors.shape, generator=generator))
            zc.constant_ratio_weight.copy_(torch.randn(zc.constant_ratio_weight.shape, generator=generator))
    return model


@pytest.fixture()
def active_model(converted):
    return activate_moepp(load_causal_lm(converted))


def test_generation_with_cache_equals_without_when_zero_computation_experts_fire(active_model):
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    stats = active_model(prompt, output_router_logits=True).routing_statistics
    assert 0.2 < stats["ffn_experts_per_token"].mean().item() < 1.9  # zero-computation experts are in use
    with_cache = active_model.generate(prompt, max_new_tokens=15, do_sample=False, use_cache=True)
    without_cache = active_model.generate(prompt, max_new_tokens=15, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_gating_residual_changes_routing_of_later_layers(active_model):
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = active_model(tokens, output_router_logits=True).router_logits
        for block in active_model.moe_blocks()[1:]:
            block.gate.residual_weight.zero_()
        after = active_model(tokens, output_router_logits=True).router_logits
    torch.testing.assert_close(before[0], after[0])  # the first MoE layer has no residual
    assert not torch.allclose(before[1], after[1])


def test_gradient_checkpointing_gives_the_same_gradients(converted):
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    gradients = []
    for checkpointing in (False, True):
        model = activate_moepp(load_causal_lm(converted)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(tokens, labels=tokens, output_router_logits=True, use_cache=False).loss
        loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    assert "model.layers.1.mlp.gate.residual_weight" in gradients[0]
    assert "model.layers.0.mlp.zero_computation_experts.constant_vectors" in gradients[0]
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5)


def test_bfloat16_runs_and_stays_close_to_float32(converted):
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    model = load_causal_lm(converted)
    with torch.no_grad():
        reference = model(tokens).logits
        low = model.to(torch.bfloat16)(tokens).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max().item() < 0.1 * reference.abs().max().item()


def test_routing_statistics_and_balance_loss(active_model):
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    out = active_model(tokens, attention_mask=mask, labels=tokens, output_router_logits=True)
    stats = out.routing_statistics
    n_layers = active_model.config.num_hidden_layers
    for name in ("ffn_experts_per_token", "zero_share", "copy_share", "constant_share", "ffn_share"):
        assert stats[name].shape == (n_layers,)
    total_share = stats["ffn_share"] + stats["zero_share"] + stats["copy_share"] + stats["constant_share"]
    torch.testing.assert_close(total_share, torch.ones(n_layers))
    without_aux = active_model(tokens, attention_mask=mask, labels=tokens).loss
    coef = active_model.config.balance_loss_coef
    torch.testing.assert_close(out.loss, without_aux + coef * out.aux_loss)
    # masked statistics equal the statistics of the real tokens alone
    real = mask.reshape(-1).bool()
    direct = routing_statistics([logits[real] for logits in out.router_logits],
                                [b.gate.selection_bias for b in active_model.moe_blocks()],
                                active_model.moe_blocks()[0].layout, 2, None, active_model.config.balance_tau,
                                routers=[b.gate for b in active_model.moe_blocks()])
    torch.testing.assert_close(stats["ffn_experts_per_token"], direct["ffn_experts_per_token"])


def test_balance_loss_weights_zero_computation_experts_by_tau():
    from upcycle.modeling.moepp_layer import ExpertLayout

    layout = ExpertLayout(n_ffn=2, n_zero=1, n_copy=0, n_constant=0)
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    bias = torch.zeros(1)
    probabilities = torch.softmax(logits, dim=-1)
    # top-1 choices: 0, 1, 2, 2 -> f = [1/4, 1/4, 1/2]
    f = torch.tensor([0.25, 0.25, 0.5])
    p = probabilities.mean(dim=0)
    for tau in (0.25, 1.0):
        stats = routing_statistics([logits], [bias], layout, 1, None, tau)
        expected = 3 * (f[0] * p[0] + f[1] * p[1] + tau * f[2] * p[2])
        torch.testing.assert_close(stats["balance_loss"], expected)
    assert stats["ffn_experts_per_token"].item() == 0.5
