"""Training-free variable-k baselines, run on converted MoE++ models of any family through their routers, against
transformers' own source classes: neutral knobs give the source, skipping every second expert gives the source
family's own model at top-1 (renormalising Mixtral, non-renormalising Qwen2-MoE with a shared expert)."""

import pytest
import torch
from conftest import tiny_mixtral
from test_families import FAMILIES, convert_source, tiny_source

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.errors import UpcycleError
from upcycle.evaluation.baselines import fit_knob, measure, variable_k_routing
from upcycle.modeling.moepp_layer import rule_keep_mask as keep_mask


def converted_pair(tmp_path, family: str, **overrides):
    """(source, converted MoE++ model, the source rebuilt at top-1 with the same weights) for a tiny family."""
    if family == "mixtral":
        source, top1 = tiny_mixtral(seed=2, **overrides), tiny_mixtral(seed=2, num_experts_per_tok=1, **overrides)
    else:
        source = tiny_source(FAMILIES[family], seed=2, **overrides)
        top1 = tiny_source(FAMILIES[family], seed=2, **(overrides | {"num_experts_per_tok": 1}))
    _, out = convert_source(source, tmp_path, "fused")
    return source, load_causal_lm(out), top1


TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_neutral_knobs_leave_the_source_unchanged(tmp_path, family):
    source, model, _ = converted_pair(tmp_path, family)
    top_k = model.moe_blocks()[0].gate.top_k
    with torch.no_grad():
        reference = source(TOKENS).logits
        for rule, knob in (("dynamic_skipping", 0.0), ("top_p", 1.0)):
            with variable_k_routing(model, rule, knob) as counter:
                torch.testing.assert_close(model(TOKENS).logits, reference, atol=1e-5, rtol=0)
            assert counter.ffn_experts_per_token == top_k
        torch.testing.assert_close(model(TOKENS).logits, reference, atol=1e-5, rtol=0)  # restored on exit


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_keeping_one_expert_equals_the_family_at_top1(tmp_path, family):
    """Mixtral renormalises (top-1 weight 1); Qwen2-MoE does not (top-1 weight = its softmax probability)."""
    _, model, top1 = converted_pair(tmp_path, family)
    with torch.no_grad(), variable_k_routing(model, "top_p", 0.0) as counter:
        torch.testing.assert_close(model(TOKENS).logits, top1(TOKENS).logits, atol=1e-5, rtol=0)
    assert counter.ffn_experts_per_token == 1.0


def test_keep_mask_rules():
    probabilities = torch.tensor([[0.7, 0.2], [0.4, 0.35]])  # each token's selected experts, best first
    keep = keep_mask(probabilities, "dynamic_skipping", 0.3)  # second renormalised weights 0.22, 0.47
    assert keep.tolist() == [[True, False], [True, True]]
    keep = keep_mask(probabilities, "top_p", 0.6)  # first masses 0.7 and 0.4
    assert keep.tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_fitted_knob_hits_the_target(tmp_path, family):
    _, model, _ = converted_pair(tmp_path, family)
    blocks = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    for rule in ("dynamic_skipping", "top_p"):
        knob = fit_knob(model, blocks, rule, target=1.5)
        assert abs(measure(model, blocks, rule, knob) - 1.5) < 0.05
        with torch.no_grad(), variable_k_routing(model, rule, knob) as counter:
            model(blocks)
        histogram = counter.ffn_experts_histogram  # how the baseline spends compute: 1 or 2 FFN experts, never 0
        assert histogram["0"] == 0.0 and sum(histogram.values()) == pytest.approx(1.0)
        assert sum(int(count) * share for count, share in histogram.items()) == pytest.approx(
            counter.ffn_experts_per_token)


def test_a_source_model_is_refused_in_one_sentence():
    with pytest.raises(UpcycleError, match="convert the source first"), variable_k_routing(tiny_mixtral(), "top_p", 1.0):
        pass
