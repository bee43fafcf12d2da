"""`zero_computation_denominator`: what switching zero-computation experts on does to the FFN weights of a family
that does not renormalise its top-k weights (docs/layer-math.md, "The softmax denominator").

Checked against transformers' own Qwen2-MoE, OLMoE and DeepSeek-V2 blocks: under "ffn_only" a token whose top-k
holds only FFN experts gets exactly the source block's output while zero-computation experts are switched on (and
selected by other tokens); under "switched_on" its FFN weights shrink.
"""

import types

import pytest
import torch
import transformers
from test_families import COMMON, FAMILIES

from upcycle.converters import family_for_config
from upcycle.modeling.configuration_upcycle_moepp import (
    MoePPDeepseekV2Config,
    MoePPOlmoeConfig,
    MoePPQwen2MoeConfig,
    MoePPQwen3MoeConfig,
)
from upcycle.modeling.modeling_moepp_deepseek_v2 import MoePPDeepseekV2Moe
from upcycle.modeling.modeling_moepp_olmoe import MoePPOlmoeSparseMoeBlock
from upcycle.modeling.modeling_moepp_qwen2_moe import MoePPQwen2MoeSparseMoeBlock
from upcycle.modeling.modeling_moepp_qwen3_moe import MoePPQwen3MoeSparseMoeBlock
from upcycle.surgery.moepp_config import moepp_config
from upcycle.surgery.plan import ZeroComputationCounts

# name: (transformers config, transformers block, MoE++ config, MoE++ block)
BLOCKS = {
    "qwen2_moe": ("Qwen2MoeConfig", transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock,
                  MoePPQwen2MoeConfig, MoePPQwen2MoeSparseMoeBlock),
    "olmoe": ("OlmoeConfig", transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock,
              MoePPOlmoeConfig, MoePPOlmoeSparseMoeBlock),
    "deepseek_v2": ("DeepseekV2Config", transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe,
                    MoePPDeepseekV2Config, MoePPDeepseekV2Moe),
}
N_TOKENS = 64


def source_and_moepp(name: str, denominator: str, semantics: str = "keep_weight", seed: int = 0):
    """transformers' block with random weights, and the MoE++ block holding the same tensors, its zero-computation
    experts switched on with random router rows and biases that send some tokens (not all) to them."""
    config_name, source_class, moepp_config_class, moepp_class = BLOCKS[name]
    fields = COMMON | FAMILIES[name].fields
    torch.manual_seed(seed)
    source = source_class(getattr(transformers, config_name)(**fields)).eval()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_(0.0, 0.5)
    config = moepp_config_class(**fields, zero_expert_semantics=semantics, zero_computation_denominator=denominator)
    block = moepp_class(config, has_residual=False).eval()
    missing, unexpected = block.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all("zero_computation" in key or "selection_bias" in key for key in missing)
    with torch.no_grad():
        block.gate.zero_computation_weight.normal_(0.0, 0.5)
        block.gate.selection_bias.copy_(torch.tensor([0.5, 0.0, -0.5, -1.0]))
    return source, block


def routing(block, x: torch.Tensor):
    logits = block.gate.compute_logits(x, None)
    return logits, block.gate.select_experts(logits)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_ffn_only_keeps_the_source_output_of_tokens_that_keep_their_ffn_experts(name):
    source, block = source_and_moepp(name, "ffn_only")
    x = torch.randn(1, N_TOKENS, COMMON["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(x)
        y, _ = block(x, None)
        _, index = routing(block, x[0])
    all_ffn = (index < block.layout.n_ffn).all(dim=-1)  # (T,)
    assert 0 < int(all_ffn.sum()) < N_TOKENS  # some tokens use zero-computation experts, others do not
    torch.testing.assert_close(y[0][all_ffn], expected[0][all_ffn], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_switched_on_shrinks_the_ffn_weights_of_those_tokens(name):
    _, on = source_and_moepp(name, "switched_on")
    _, ffn_only = source_and_moepp(name, "ffn_only")
    x = torch.randn(N_TOKENS, COMMON["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, index = routing(on, x)
        all_ffn = (index < on.layout.n_ffn).all(dim=-1)
        shrunk, kept = on.gate.top_k_weights(logits, index), ffn_only.gate.top_k_weights(logits, index)
    scale = on.gate.scaling_factor
    source = torch.softmax(logits[:, : on.layout.n_ffn], dim=-1).gather(-1, index.clamp_max(on.layout.n_ffn - 1))
    torch.testing.assert_close(kept[all_ffn], scale * source[all_ffn])
    # one softmax over every switched-on expert: each FFN weight is the source's times sum_ffn / sum_on < 1
    exp = logits.exp()
    factor = exp[:, : on.layout.n_ffn].sum(-1) / exp.sum(-1)  # (T,), every zero-computation expert is on
    torch.testing.assert_close(shrunk[all_ffn], kept[all_ffn] * factor[all_ffn, None])
    assert (factor < 1).all()


@pytest.mark.parametrize("semantics", ["keep_weight", "drop_and_renormalize"])
def test_ffn_only_weights_of_tokens_with_zero_computation_experts(semantics):
    """FFN slots: the source's probabilities; zero-computation slots: their softmax over every switched-on expert;
    then the Zero semantics as before (keep_weight: Zero + FFN_a gives FFN_a the source's p_a)."""
    _, block = source_and_moepp("olmoe", "ffn_only", semantics)
    x = torch.randn(N_TOKENS, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, index = routing(block, x)
        weights = block.gate.top_k_weights(logits, index)
    n_ffn = block.layout.n_ffn
    source = torch.softmax(logits[:, :n_ffn], dim=-1)  # (T, N)
    every = torch.softmax(logits, dim=-1)  # (T, N+Z), every zero-computation expert is switched on
    gathered = torch.where(index < n_ffn, source.gather(-1, index.clamp_max(n_ffn - 1)), every.gather(-1, index))
    is_zero = (index >= n_ffn) & (index < block.layout.copy_start)
    assert is_zero.any() and ((index >= block.layout.copy_start).any())
    if semantics == "keep_weight":
        expected = gathered
    else:
        kept = gathered.masked_fill(is_zero, 0.0)
        expected = kept * gathered.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)


def test_a_family_that_renormalises_is_unchanged_by_the_option():
    fields = COMMON | FAMILIES["qwen3_moe"].fields  # norm_topk_prob true
    x = torch.randn(N_TOKENS, COMMON["hidden_size"], generator=torch.Generator().manual_seed(4))
    weights = []
    for denominator in ("switched_on", "ffn_only"):
        torch.manual_seed(0)
        config = MoePPQwen3MoeConfig(**fields, zero_computation_denominator=denominator)
        block = MoePPQwen3MoeSparseMoeBlock(config, has_residual=False).eval()
        with torch.no_grad():
            block.gate.weight.normal_(0.0, 0.5)
            block.gate.zero_computation_weight.normal_(0.0, 0.5)
            block.gate.selection_bias.copy_(torch.tensor([0.5, 0.0, -0.5, -1.0]))
            weights.append(block.gate(x)[1])
    assert torch.equal(weights[0], weights[1])


def test_conversion_writes_ffn_only_and_old_configs_keep_switched_on():
    family = FAMILIES["olmoe"]
    source = {"architectures": [family.model_class], "num_hidden_layers": 2} | family.fields
    plan = types.SimpleNamespace(spec=family_for_config(source), counts=ZeroComputationCounts(1, 1, 2))
    written = moepp_config(source, plan, gating_residual=True)
    assert written["zero_computation_denominator"] == "ffn_only"
    old = {key: value for key, value in written.items() if key != "zero_computation_denominator"}
    assert MoePPOlmoeConfig(**old).zero_computation_denominator == "switched_on"
    with pytest.raises(Exception, match="zero_computation_denominator"):
        MoePPOlmoeConfig(**(old | {"zero_computation_denominator": "ffn"}))


def test_convert_chooses_the_denominator_and_the_card_says_which(capsys, tmp_path):
    """`upcycle convert --denominator switched_on` writes it; the card names the denominator in plain words."""
    import json

    from cli_runner import run_cli
    from test_families import tiny_source

    tiny_source(FAMILIES["qwen2_moe"]).save_pretrained(tmp_path / "src")
    for choice in ("ffn_only", "switched_on"):
        flags = [] if choice == "ffn_only" else ["--denominator", choice]
        result = run_cli(capsys, "convert", tmp_path / "src", tmp_path / choice, *flags)
        assert result.exit_code == 0, result.stderr
        assert json.loads((tmp_path / choice / "config.json").read_text())["zero_computation_denominator"] == choice
        assert f"Denominator `{choice}`" in (tmp_path / choice / "README.md").read_text()
    refused = run_cli(capsys, "convert", tmp_path / "src", tmp_path / "bad", "--denominator", "ffn")
    assert refused.exit_code != 0 and not (tmp_path / "bad").exists()
