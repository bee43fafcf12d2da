"""Routing rules saved in a checkpoint (trained controls), relative zero-computation scores, and the relaxed
selection that teaches zero-computation rows, against transformers' own source classes where one exists."""

import json

import pytest
import torch
from conftest import tiny_mixtral
from test_families import FAMILIES, convert_source, tiny_source

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.errors import UpcycleError
from upcycle.evaluation.baselines import variable_k_routing
from upcycle.surgery.convert import ConvertOptions
from upcycle.training import TrainOptions, run_training
from upcycle.training.losses import compute_losses

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def converted(tmp_path, family: str, scores: str = "relative", **overrides):
    """(source, converted folder, the source rebuilt at top-1 with the same weights)."""
    if family == "mixtral":
        source, top1 = tiny_mixtral(seed=2, **overrides), tiny_mixtral(seed=2, num_experts_per_tok=1, **overrides)
    else:
        source = tiny_source(FAMILIES[family], seed=2, **overrides)
        top1 = tiny_source(FAMILIES[family], seed=2, **(overrides | {"num_experts_per_tok": 1}))
    _, out = convert_source(source, tmp_path, "fused", ConvertOptions(zero_computation_scores=scores))
    return source, out, top1


def with_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text()) | fields
    (folder / "config.json").write_text(json.dumps(config))
    return load_causal_lm(folder)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_saved_top_1_rule_is_the_family_at_top_1(tmp_path, family):
    """A control checkpoint (routing_rule top_k, knob 1) computes transformers' own model at top-1."""
    _source, folder, top1 = converted(tmp_path, family)
    model = with_config(folder, routing_rule="top_k", routing_rule_knob=1.0)
    with torch.no_grad():
        output = model(TOKENS, output_router_logits=True)
        torch.testing.assert_close(output.logits, top1(TOKENS).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.routing_statistics["ffn_experts_per_token"], torch.ones(len(model.moe_blocks())))


def test_top_1_confident_keeps_one_expert_or_none(tmp_path):
    _, folder, top1 = converted(tmp_path, "mixtral")
    model = with_config(folder, routing_rule="top_1_confident", routing_rule_knob=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, top1(TOKENS).logits, atol=1e-5, rtol=0)
    with torch.no_grad(), variable_k_routing(model, "top_1_confident", 1.01) as counter:
        model(TOKENS)  # no probability reaches 1.01: every layer is skipped
    assert counter.ffn_experts_per_token == 0.0
    with torch.no_grad(), variable_k_routing(model, "top_1_confident", 0.6) as counter:
        model(TOKENS)
    assert 0.0 < counter.ffn_experts_per_token < 1.0


def test_relative_scores_make_a_calibrated_zero_expert_dynamic_skipping(tmp_path):
    """With relative scores and zero rows, the Zero expert at bias b takes the second slot exactly when
    f2 - f1 < b, i.e. when the second expert's renormalised weight is under sigmoid(b): dynamic skipping."""
    _, folder, _ = converted(tmp_path, "mixtral")
    model = load_causal_lm(folder)
    threshold = 0.3
    bias = torch.tensor([threshold / (1 - threshold)]).log()  # Zero's bias; copy and constant stay off
    for block in model.moe_blocks():
        block.gate.selection_bias[: block.layout.n_zero] = bias
    with torch.no_grad():
        moepp = model(TOKENS, output_router_logits=True)
        with variable_k_routing(model, "dynamic_skipping", threshold) as counter:
            skipping = model(TOKENS).logits
    torch.testing.assert_close(moepp.logits, skipping, atol=1e-5, rtol=0)
    ffn = moepp.routing_statistics["ffn_experts_per_token"].mean().item()
    assert ffn == pytest.approx(counter.ffn_experts_per_token)
    assert 1.0 < ffn < 2.0


def test_absolute_scores_keep_checkpoints_before_the_field(tmp_path):
    _, folder, _ = converted(tmp_path, "mixtral", scores="absolute")
    config = json.loads((folder / "config.json").read_text())
    assert config["zero_computation_scores"] == "absolute"
    del config["zero_computation_scores"]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_causal_lm(folder).moe_blocks()[0].gate.zero_computation_scores == "absolute"


def run_with_signal(model, tokens: torch.Tensor, signal: str | None, zero_bias: float) -> tuple[torch.Tensor, float]:
    """One training forward and backward of an MoE++ model with the Zero experts switched on at `zero_bias` and
    the selection signal `signal` (None: off); (logits, summed |gradient| of the last layer's Zero rows)."""
    model.train().config.balance_loss_coef = 0.0  # the balance loss reaches every row through the probabilities
    for block in model.moe_blocks():
        block.gate.selection_bias[: block.layout.n_zero] = zero_bias
        block.gate.selection_signal = signal
    model.zero_grad()
    output = model(tokens, labels=tokens, output_router_logits=True)
    output.loss.backward()
    assert ("selection_loss" in output.routing_statistics) == (signal == "output_change")
    gate = model.moe_blocks()[-1].gate
    grad = gate.zero_computation_weight.grad
    return output.logits.detach(), 0.0 if grad is None else grad[: gate.layout.n_zero].abs().sum().item()


@pytest.mark.parametrize("signal", ["output_change", "straight_through"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_selection_signals_change_no_value_and_teach_the_zero_row(tmp_path, family, signal):
    """Neither signal changes the forward value; with one, the Zero expert's router row gets a gradient from the
    training loss, without one none (its weight is dropped and its output is 0)."""
    _, folder, _ = converted(tmp_path, family)
    model = load_causal_lm(folder)
    zero_bias = -0.05 if family == "deepseek_v3" else -1.0  # near the second FFN expert's score
    logits_off, gradient_off = run_with_signal(model, TOKENS, None, zero_bias)
    logits_on, gradient_on = run_with_signal(model, TOKENS, signal, zero_bias)
    assert torch.equal(logits_off, logits_on)
    assert gradient_on > 0.0
    if family != "deepseek_v3":  # DeepSeek-V3's Zero keeps its sigmoid weight in the normalisation
        assert gradient_off < 1e-6 * gradient_on  # rounding only: the renormalisation cancels it


def test_a_control_distils_from_the_source_not_from_its_rule(tmp_path):
    source, folder, top1 = converted(tmp_path, "mixtral")
    model = with_config(folder, routing_rule="top_k", routing_rule_knob=1.0).train()
    moe_blocks = model.moe_blocks()
    biases = [block.gate.selection_bias for block in moe_blocks]
    routers = [block.gate for block in moe_blocks]
    with_rule_off = compute_losses(model, TOKENS, biases, 0.0, distill_weight=1.0, routers=routers)
    without = compute_losses(model, TOKENS, biases, 0.0, distill_weight=1.0)
    with torch.no_grad():
        expected = torch.nn.functional.kl_div(top1(TOKENS).logits.log_softmax(-1).flatten(0, 1),
                                              source(TOKENS).logits.log_softmax(-1).flatten(0, 1),
                                              log_target=True, reduction="batchmean")
    assert with_rule_off.distill_kl.item() == pytest.approx(expected.item(), rel=1e-4)
    assert without.distill_kl.item() == pytest.approx(0.0, abs=1e-6)  # a teacher routing by the rule: itself


def test_train_a_control_fits_its_knob_and_saves_its_rule(tmp_path, trained_moepp, text_corpus):
    common = {"data": str(text_corpus / "train.txt"), "block_size": 32, "micro_batch_size": 4, "max_tokens": 12_000,
              "eval_max_blocks": 8, "progress": False, "tensorboard": False, "checkpoint_every": 0, "steps": 2,
              "target_ffn_per_token": 1.5, "budget_fit_blocks": 16}
    report = run_training(TrainOptions(model=str(trained_moepp), output=str(tmp_path / "control"),
                                       routing_rule="dynamic_skipping", **common))
    config = json.loads((tmp_path / "control" / "config.json").read_text())
    assert config["routing_rule"] == "dynamic_skipping" and 0.0 < config["routing_rule_knob"] < 0.5
    assert report.heldout["ffn_experts_per_token"] == pytest.approx(1.5, abs=0.25)
    model = load_causal_lm(tmp_path / "control")
    assert all(block.gate.routing_rule == "dynamic_skipping" for block in model.moe_blocks())
    moepp = run_training(TrainOptions(model=str(trained_moepp), output=str(tmp_path / "moepp"), **common))
    assert json.loads((tmp_path / "moepp" / "config.json").read_text())["routing_rule"] is None
    assert moepp.heldout["ffn_experts_per_token"] < 2.0


def test_a_top_k_control_needs_a_whole_budget_before_anything_loads():
    options = TrainOptions(model="m", data="d", output="o", routing_rule="top_k", target_ffn_per_token=1.5)
    with pytest.raises(UpcycleError, match="whole numbers"):
        options.validate()
