"""Zero-expert semantics and routing of the non-Mixtral families, checked against direct per-token computations
written from docs/families.md (independent of the vectorised blocks), once selection biases are raised by hand.

Qwen2-MoE (`norm_topk_prob` false) is the non-renormalising family tested under both semantics; DeepSeek-V3 checks
the sigmoid router's definition of zero-computation experts (score sigmoid(G), outside the groups, scaled).
"""

import itertools
import types

import pytest
import torch
import torch.nn.functional as F
from test_families import COMMON, FAMILIES, tiny_source

from upcycle.converters import family_for_config
from upcycle.modeling import moepp_class
from upcycle.modeling.configuration_upcycle_moepp import MoePPDeepseekV3Config, MoePPQwen2MoeConfig
from upcycle.modeling.modeling_moepp_deepseek_v3 import MoePPDeepseekV3MoE
from upcycle.modeling.modeling_moepp_qwen2_moe import MoePPQwen2MoeSparseMoeBlock
from upcycle.surgery.moepp_config import moepp_config
from upcycle.surgery.plan import ZeroComputationCounts


def randomize(block, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0.0, 0.5)
    return block.eval()


def ffn_expert(experts, expert: int, x: torch.Tensor) -> torch.Tensor:
    gate_up, down = experts.gate_up_proj[expert], experts.down_proj[expert]  # (2I, D), (D, I)
    gate, up = (gate_up @ x).chunk(2)
    return down @ (F.silu(gate) * up)


def zero_computation_output(block, index: int, x: torch.Tensor) -> torch.Tensor:
    layout = block.layout
    if index < layout.copy_start:  # zero
        return torch.zeros_like(x)
    if index < layout.constant_start:  # copy
        return x
    j = index - layout.constant_start
    a = torch.softmax(block.zero_computation_experts.constant_ratio_weight[j] @ x, dim=-1)
    return a[0] * x + a[1] * block.zero_computation_experts.constant_vectors[j]


def combine(block, x: torch.Tensor, weights: dict[int, float]) -> torch.Tensor:
    y = torch.zeros_like(x)
    for i, w in weights.items():
        y += w * (ffn_expert(block.experts, i, x) if i < block.layout.n_ffn else zero_computation_output(block, i, x))
    return y


def qwen2_reference(block, x: torch.Tensor, semantics: str) -> torch.Tensor:
    """Qwen2-MoE without renormalisation: softmax over switched-on experts, top-k of logits + bias, no rescaling
    (keep_weight), or the Zero expert's weight shared by the others in proportion (drop_and_renormalize)."""
    layout, gate = block.layout, block.gate
    logits = torch.cat([gate.weight, gate.zero_computation_weight]) @ x
    switched_on = torch.cat([torch.ones(layout.n_ffn, dtype=torch.bool), ~torch.isneginf(gate.selection_bias)])
    probabilities = torch.softmax(logits.masked_fill(~switched_on, float("-inf")), dim=-1)
    chosen = torch.topk(logits + torch.cat([torch.zeros(layout.n_ffn), gate.selection_bias]), gate.top_k).indices
    weights = {int(i): probabilities[i].item() for i in chosen}
    if semantics == "drop_and_renormalize":
        total = sum(weights.values())
        kept = {i: (0.0 if layout.n_ffn <= i < layout.copy_start else w) for i, w in weights.items()}
        weights = {i: w * total / sum(kept.values()) for i, w in kept.items()}
    shared = torch.sigmoid(block.shared_expert_gate.weight @ x) * block.shared_expert(x[None])[0]
    return combine(block, x, weights) + shared


@pytest.mark.parametrize("semantics", ["keep_weight", "drop_and_renormalize"])
@pytest.mark.parametrize("bias", [[100.0, float("-inf"), float("-inf"), float("-inf")], [0.3, -0.2, 0.1, 0.4]])
def test_qwen2_moe_zero_semantics_without_renormalisation(semantics, bias):
    family = FAMILIES["qwen2_moe"]
    config = MoePPQwen2MoeConfig(**(COMMON | family.fields), zero_expert_semantics=semantics)
    block = randomize(MoePPQwen2MoeSparseMoeBlock(config, has_residual=False), seed=1)
    x = torch.randn(1, 16, COMMON["hidden_size"])
    with torch.no_grad():
        block.gate.selection_bias.copy_(torch.tensor(bias))
        y, _ = block(x, None)
        expected = torch.stack([qwen2_reference(block, t, semantics) for t in x[0]])
    torch.testing.assert_close(y[0], expected, atol=1e-5, rtol=1e-5)


def test_qwen2_moe_zero_expert_under_each_semantics():
    """Zero + FFN_a + FFN_b (top-3): keep_weight leaves p_a, p_b; drop_and_renormalize gives them p_z too."""
    family = FAMILIES["qwen2_moe"]
    outputs = {}
    for semantics in ("keep_weight", "drop_and_renormalize"):
        config = MoePPQwen2MoeConfig(**(COMMON | family.fields), zero_expert_semantics=semantics)
        block = randomize(MoePPQwen2MoeSparseMoeBlock(config, has_residual=False), seed=2)
        block.gate.selection_bias.copy_(torch.tensor([100.0, float("-inf"), float("-inf"), float("-inf")]))
        with torch.no_grad():
            logits, weights, index = block.gate(torch.randn(5, COMMON["hidden_size"]))
        probabilities = block.gate.routing_probabilities(logits)
        outputs[semantics] = (weights, probabilities.gather(-1, index), index)
    keep, gathered, index = outputs["keep_weight"]
    assert (index == 6).any(dim=-1).all()  # the Zero expert (index N = 6) is in every token's top-3
    torch.testing.assert_close(keep, gathered)  # the family's own weights: no renormalisation
    drop, gathered, index = outputs["drop_and_renormalize"]
    torch.testing.assert_close(drop.sum(-1), gathered.sum(-1))  # the selected mass is kept...
    assert torch.equal(drop[index == 6], torch.zeros_like(drop[index == 6]))  # ...by the FFN experts alone


def deepseek_v3_reference(block, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 routing over N + Z experts, per token, from the definition in docs/families.md."""
    layout, gate = block.layout, block.gate
    n = layout.n_ffn
    scores = torch.sigmoid(torch.cat([gate.weight, gate.zero_computation_weight]) @ x)  # (N+Z,)
    choice = scores[:n] + gate.e_score_correction_bias
    groups = choice.reshape(gate.n_group, n // gate.n_group)
    best_groups = torch.topk(groups.topk(2).values.sum(-1), gate.topk_group).indices.tolist()
    eligible = [i for i in range(n) if i // (n // gate.n_group) in best_groups]
    candidates = {i: choice[i].item() for i in eligible}
    candidates |= {n + j: (scores[n + j] + gate.selection_bias[j]).item() for j in range(layout.n_zero_computation)}
    chosen = sorted(candidates, key=candidates.get, reverse=True)[: gate.top_k]
    weights = {i: scores[i].item() for i in chosen}
    if gate.zero_expert_semantics == "drop_and_renormalize":
        weights = {i: (0.0 if n <= i < layout.copy_start else w) for i, w in weights.items()}
    total = sum(weights.values())
    weights = {i: gate.scaling_factor * (w / total if total > 0 else 0.0) for i, w in weights.items()}
    return combine(block, x, weights) + block.shared_experts(x[None])[0]


@pytest.mark.parametrize("semantics", ["drop_and_renormalize", "keep_weight"])
@pytest.mark.parametrize("forced", [0, 1, 2])  # zero, copy, constant
def test_deepseek_v3_zero_computation_experts_match_their_definition(semantics, forced):
    family = FAMILIES["deepseek_v3"]
    config = MoePPDeepseekV3Config(**(COMMON | family.fields), zero_expert_semantics=semantics,
                                   n_zero_experts=1, n_copy_experts=1, n_constant_experts=2)
    block = randomize(MoePPDeepseekV3MoE(config, has_residual=False), seed=3)
    bias = torch.full((4,), float("-inf"))
    bias[forced] = 10.0
    x = torch.randn(1, 16, COMMON["hidden_size"])
    with torch.no_grad():
        block.gate.selection_bias.copy_(bias)
        block.gate.e_score_correction_bias.normal_(0.0, 0.2)
        y, _ = block(x, None)
        expected = torch.stack([deepseek_v3_reference(block, t) for t in x[0]])
        index = block.gate.select_experts(block.gate.compute_logits(x[0], None))
    assert (index == 8 + forced).any(dim=-1).all()
    torch.testing.assert_close(y[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "deepseek_v2"])
def test_raising_the_selection_bias_lowers_ffn_experts_per_token(name):
    source = tiny_source(FAMILIES[name], seed=5)
    spec = family_for_config(source.config.to_dict() | {"architectures": [FAMILIES[name].model_class]})
    config_class = moepp_class(spec.moepp_config_module, spec.moepp_config_class)
    model_class = moepp_class(spec.moepp_model_module, spec.moepp_model_class)
    torch.manual_seed(0)
    model = model_class(config_class(**source.config.to_dict())).eval()
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)  # the source's sharp routers
    assert not unexpected and all(".gate." in key or "zero_computation" in key for key in missing)
    top_k = source.config.num_experts_per_tok
    tokens = torch.randint(0, COMMON["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(0))
    # logit units for softmax routers; sigmoid-score units (in [0, 1]) for DeepSeek-V3
    biases = (float("-inf"), -4.0, -1.0, 0.0, 1.0, 4.0, 100.0) if name != "deepseek_v3" else (
        float("-inf"), -0.6, -0.3, 0.0, 0.3, 0.6, 100.0)
    measured = []
    for bias in biases:
        for block in model.moe_blocks():
            block.gate.selection_bias.fill_(bias)
        with torch.no_grad():
            measured.append(model(tokens, output_router_logits=True).routing_statistics["ffn_experts_per_token"])
    means = [m.mean().item() for m in measured]
    assert means[0] == top_k and means[-1] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(means)), means
    assert len(set(means)) > 3


@pytest.mark.parametrize("name,renormalises", [("qwen2_moe", False), ("qwen3_moe", True), ("olmoe", False),
                                                ("deepseek_v2", False), ("deepseek_v3", True)])
def test_default_zero_semantics_follow_the_family(name, renormalises):
    family = FAMILIES[name]
    config = {"architectures": [family.model_class], "num_hidden_layers": 2} | family.fields
    spec = family_for_config(config)
    assert spec.renormalizes(config) is renormalises
    plan = types.SimpleNamespace(spec=spec, counts=ZeroComputationCounts(1, 1, 2))
    written = moepp_config(config, plan, gating_residual=True, zero_expert_semantics=None)
    assert written["zero_expert_semantics"] == ("drop_and_renormalize" if renormalises else "keep_weight")
    assert written["auto_map"]["AutoModelForCausalLM"] == f"{spec.moepp_model_module}.{spec.moepp_model_class}"
