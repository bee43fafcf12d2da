"""Once selection biases are raised by hand, Zero, Copy and Constant experts act as the math says.

The reference here is a direct per-token computation written from docs/layer-math.md, independent of the
vectorised block: softmax over all N+Z logits, top-k of logits + bias, the Zero semantics, renormalisation.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MIXTRAL

from upcycle.modeling.configuration_upcycle_moepp import MoePPMixtralConfig
from upcycle.modeling.modeling_upcycle_moepp import MoePPMixtralSparseMoeBlock

N = TINY_MIXTRAL["num_local_experts"]


def make_block(n_zero=1, n_copy=1, n_constant=2, semantics="drop_and_renormalize", seed=0):
    torch.manual_seed(seed)
    config = MoePPMixtralConfig(**TINY_MIXTRAL, n_zero_experts=n_zero, n_copy_experts=n_copy,
                                n_constant_experts=n_constant, zero_expert_semantics=semantics)
    block = MoePPMixtralSparseMoeBlock(config, has_residual=False).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0.0, 0.5)
    return block


def ffn_expert(block, expert: int, x: torch.Tensor) -> torch.Tensor:
    gate_up, down = block.experts.gate_up_proj[expert], block.experts.down_proj[expert]  # (2I, D), (D, I)
    gate, up = (gate_up @ x).chunk(2)
    return down @ (F.silu(gate) * up)


def reference_output(block, x: torch.Tensor, bias: torch.Tensor, semantics: str) -> torch.Tensor:
    """Per token: x (D,) -> y (D,), straight from the formulas."""
    layout = block.layout
    router = torch.cat([block.gate.weight, block.gate.zero_computation_weight])  # (N+Z, D)
    logits = router @ x
    switched_on = torch.cat([torch.ones(layout.n_ffn, dtype=torch.bool), ~torch.isneginf(bias)])
    probabilities = torch.softmax(logits.masked_fill(~switched_on, float("-inf")), dim=-1)
    scores = logits + torch.cat([torch.zeros(layout.n_ffn), bias])
    chosen = torch.topk(scores, block.gate.top_k).indices.tolist()
    weights = {i: probabilities[i].item() for i in chosen}
    zero_ids = range(layout.n_ffn, layout.copy_start)
    if semantics == "drop_and_renormalize":
        weights = {i: 0.0 if i in zero_ids else w for i, w in weights.items()}
    total = sum(weights.values())
    weights = {i: (w / total if total > 0 else 0.0) for i, w in weights.items()}
    y = torch.zeros_like(x)
    for i, w in weights.items():
        if i < layout.n_ffn:
            y += w * ffn_expert(block, i, x)
        elif i in zero_ids:
            continue
        elif i < layout.constant_start:  # copy
            y += w * x
        else:  # constant
            j = i - layout.constant_start
            a = torch.softmax(block.zero_computation_experts.constant_ratio_weight[j] @ x, dim=-1)
            y += w * (a[0] * x + a[1] * block.zero_computation_experts.constant_vectors[j])
    return y


def run(block, bias, semantics, tokens=12):
    x = torch.randn(1, tokens, block.gate.weight.shape[1])
    with torch.no_grad():
        block.gate.selection_bias.copy_(bias)
        y, _ = block(x, None)
        expected = torch.stack([reference_output(block, t, bias, semantics) for t in x[0]])
    return x[0], y[0], expected


@pytest.mark.parametrize("semantics", ["drop_and_renormalize", "keep_weight"])
@pytest.mark.parametrize("forced", ["zero", "copy", "constant0", "constant1"])
def test_forced_zero_computation_expert_matches_direct_computation(semantics, forced):
    block = make_block(semantics=semantics)
    index = {"zero": 0, "copy": 1, "constant0": 2, "constant1": 3}[forced]
    bias = torch.full((4,), float("-inf"))
    bias[index] = 100.0  # always in the top-2, beside the best FFN expert
    x, y, expected = run(block, bias, semantics)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    if forced == "zero" and semantics == "drop_and_renormalize":
        # Zero + FFN_i: FFN_i gets weight exactly 1 (official MoE++ 7B)
        router = torch.cat([block.gate.weight, block.gate.zero_computation_weight])
        best = (x @ router.T)[:, :N].argmax(dim=-1)
        direct = torch.stack([ffn_expert(block, int(e), t) for e, t in zip(best, x)])
        torch.testing.assert_close(y, direct, atol=1e-5, rtol=1e-5)


def test_copy_expert_alone_passes_the_token_unchanged():
    block = make_block(n_zero=0, n_copy=2, n_constant=0)
    bias = torch.full((2,), 100.0)  # both slots copy: weights renormalise to 1 in total
    x, y, expected = run(block, bias, "drop_and_renormalize")
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_two_zero_experts_make_the_layer_add_nothing():
    block = make_block(n_zero=2, n_copy=0, n_constant=0)
    _, y, _ = run(block, torch.full((2,), 100.0), "drop_and_renormalize")
    assert torch.equal(y, torch.zeros_like(y))


def test_mixed_biases_match_direct_computation():
    block = make_block(n_zero=1, n_copy=1, n_constant=2, semantics="keep_weight", seed=4)
    _, y, expected = run(block, torch.tensor([0.3, -0.2, 0.1, 0.4]), "keep_weight", tokens=40)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_raising_the_selection_bias_lowers_ffn_experts_per_token(converted):
    from upcycle.checkpoint.loading import load_causal_lm
    from upcycle.surgery.verify import probe_tokens

    model = load_causal_lm(converted)
    tokens = probe_tokens(model.config.vocab_size, batch=4, length=32)
    measured = []
    for bias in (float("-inf"), -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 50.0):
        for block in model.moe_blocks():
            block.gate.selection_bias.fill_(bias)
        with torch.no_grad():
            stats = model(tokens, output_router_logits=True).routing_statistics
        measured.append(stats["ffn_experts_per_token"].mean().item())
    assert measured[0] == 2.0 and measured[-1] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(measured)), measured
    assert len(set(measured)) > 3  # the knob moves through intermediate budgets, not only 2 -> 0
