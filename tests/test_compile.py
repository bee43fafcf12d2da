"""torch.compile of the MoE++ model runs (whole graph, no breaks) and matches eager."""

import pytest
import torch

from upcycle.checkpoint.loading import load_causal_lm


def active_model(converted):
    """The converted model with zero-computation experts in use, so every code path is traced."""
    model = load_causal_lm(converted)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.moe_blocks():
            block.gate.zero_computation_weight.copy_(
                torch.randn(block.gate.zero_computation_weight.shape, generator=generator))
            block.gate.selection_bias.fill_(0.3)
            block.zero_computation_experts.constant_vectors.normal_(generator=generator)
    return model


def compiled_matches_eager(model, backend: str) -> None:
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(tokens, use_cache=False, output_router_logits=True)
        compiled = torch.compile(model, backend=backend, fullgraph=True)(
            tokens, use_cache=False, output_router_logits=True)
    stats = eager.routing_statistics["ffn_experts_per_token"]
    assert 0.1 < stats.mean().item() < 1.9  # zero-computation experts really selected
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.routing_statistics["ffn_experts_per_token"], stats)


def test_compile_full_graph_matches_eager(converted):
    torch._dynamo.reset()
    compiled_matches_eager(active_model(converted), backend="aot_eager")


@pytest.mark.slow
def test_compile_with_inductor_matches_eager(converted):
    torch._dynamo.reset()
    compiled_matches_eager(active_model(converted), backend="inductor")
