"""Training-free variable-k baselines on transformers' MixtralForCausalLM."""

import torch
from conftest import tiny_mixtral

from upcycle.evaluation.baselines import fit_knob, keep_mask, measure, variable_k_routing


def test_neutral_knobs_leave_the_source_unchanged():
    model = tiny_mixtral(seed=2)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens).logits
        for rule, knob in (("dynamic_skipping", 0.0), ("top_p", 1.0)):
            with variable_k_routing(model, rule, knob) as counter:
                torch.testing.assert_close(model(tokens).logits, reference, atol=1e-6, rtol=0)
            assert counter.ffn_experts_per_token == 2.0
        torch.testing.assert_close(model(tokens).logits, reference)  # restored on exit


def test_skipping_every_second_expert_equals_a_top1_mixtral():
    model = tiny_mixtral(seed=2)
    top1 = tiny_mixtral(seed=2, num_experts_per_tok=1)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), variable_k_routing(model, "dynamic_skipping", 0.51) as counter:
        torch.testing.assert_close(model(tokens).logits, top1(tokens).logits, atol=1e-5, rtol=0)
    assert counter.ffn_experts_per_token == 1.0


def test_keep_mask_rules():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    _, keep = keep_mask(probabilities, 2, "dynamic_skipping", 0.3)  # second weights 0.22, 0.47
    assert keep.tolist() == [[True, False], [True, True]]
    _, keep = keep_mask(probabilities, 2, "top_p", 0.6)  # first masses 0.7 and 0.4
    assert keep.tolist() == [[True, False], [True, True]]


def test_fitted_knob_hits_the_target():
    model = tiny_mixtral(seed=3)
    blocks = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    for rule in ("dynamic_skipping", "top_p"):
        knob = fit_knob(model, blocks, rule, target=1.5)
        assert abs(measure(model, blocks, rule, knob) - 1.5) < 0.05
