"""`upcycle eval` and upcycle.evaluation.evaluate: perplexity, FFN experts per token, shares, load balance, KL."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from transformers import MixtralForCausalLM

from upcycle.budget.calibrate import calibrate_model
from upcycle.checkpoint.loading import load_causal_lm
from upcycle.data.blocks import load_checkpoint_tokenizer, load_token_blocks
from upcycle.evaluation.evaluate import evaluate_model

BLOCK_SIZE = 64


@pytest.fixture(scope="module")
def heldout(text_corpus, text_tokenizer) -> torch.Tensor:
    """16 blocks of text the model never saw (heldout.txt; the loader's own split does not matter here)."""
    blocks = load_token_blocks(text_corpus / "heldout.txt", text_tokenizer, BLOCK_SIZE, max_tokens=20_000)
    assert blocks.train.shape[0] >= 16
    return blocks.train[:16]  # (16, 64)


@pytest.fixture(scope="module")
def models(trained_mixtral, trained_moepp):
    return load_causal_lm(trained_mixtral), load_causal_lm(trained_moepp)


def test_source_perplexity_is_exp_of_transformers_loss(models, heldout):
    source, _ = models
    assert isinstance(source, MixtralForCausalLM)
    report = evaluate_model(source, heldout, batch_size=4)
    with torch.no_grad():
        losses = [source(batch, labels=batch).loss for batch in heldout.split(4)]  # transformers' own loss
    assert report.perplexity == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    low, high = report.perplexity_interval_95
    assert low < report.perplexity < high
    assert report.tokens == 16 * (BLOCK_SIZE - 1) and not report.is_moepp
    # Routing of a source: every token uses top-k FFN experts; the loads are the top-k of its router logits.
    assert report.ffn_experts_per_token == 2.0 and report.zero_computation_share == {"zero": 0.0, "copy": 0.0,
                                                                                       "constant": 0.0}
    with torch.no_grad():
        router_logits = source(heldout, output_router_logits=True).router_logits
    for layer, logits in zip(report.per_layer, router_logits):
        loads = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=8).double()
        assert layer.ffn_load_cv == pytest.approx((loads.std(unbiased=False) / loads.mean()).item(), rel=1e-6)


def test_converted_model_evaluates_like_its_source(models, heldout):
    source, moepp = models
    expected = evaluate_model(source, heldout)
    report = evaluate_model(moepp, heldout, source_model=source)
    assert report.is_moepp and report.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
    assert report.kl_to_source == pytest.approx(0.0, abs=1e-6)
    # paired on the same blocks, the converted model is its source: ratio 1 with an interval of float rounding
    low, high = report.perplexity_ratio_to_source_interval_95
    assert report.perplexity_ratio_to_source == pytest.approx(1.0, abs=1e-5) and 1 - 1e-5 < low <= high < 1 + 1e-5
    assert report.ffn_experts_per_token == 2.0 and sum(report.zero_computation_share.values()) == 0.0
    assert [layer.layer for layer in report.per_layer] == [0, 1, 2]
    for ours, theirs in zip(report.per_layer, expected.per_layer):
        assert ours.ffn_load_cv == pytest.approx(theirs.ffn_load_cv, rel=1e-6)


def test_histogram_of_ffn_experts_is_a_direct_count(models, heldout, trained_moepp):
    """How compute is spent: shares of (token, layer) pairs using 0, 1, 2 FFN experts, against a count of each
    layer's own selection; a source spends k everywhere."""
    source, _ = models
    model = load_causal_lm(trained_moepp)
    calibrate_model(model, list(heldout.split(8)), target=1.0)
    report = evaluate_model(model, heldout, batch_size=8)
    with torch.no_grad():
        router_logits = model(heldout, output_router_logits=True).router_logits
    direct = torch.zeros(3)
    for block, logits, layer in zip(model.moe_blocks(), router_logits, report.per_layer, strict=True):
        used = (block.gate.select_experts(logits.float()) < block.layout.n_ffn).sum(dim=-1)  # (T,)
        counts = torch.bincount(used, minlength=3).float()  # (3,) tokens using 0, 1, 2 FFN experts
        assert list(layer.ffn_experts_histogram.values()) == pytest.approx((counts / used.numel()).tolist(), abs=1e-6)
        direct += counts
    direct /= direct.sum()
    assert list(report.ffn_experts_histogram) == ["0", "1", "2"]
    assert list(report.ffn_experts_histogram.values()) == pytest.approx(direct.tolist(), abs=1e-6)
    mean = sum(int(count) * share for count, share in report.ffn_experts_histogram.items())
    assert mean == pytest.approx(report.ffn_experts_per_token, abs=1e-6)
    assert evaluate_model(source, heldout[:2]).ffn_experts_histogram == {"0": 0.0, "1": 0.0, "2": 1.0}


def test_budget_shows_in_every_metric(models, heldout, trained_moepp):
    source, _ = models
    model = load_causal_lm(trained_moepp)
    for block in model.moe_blocks():  # absolute scores: calibration alone reaches below one FFN expert per token
        block.gate.zero_computation_scores = "absolute"
    calibrate_model(model, list(heldout.split(8)), target=0.8)
    report = evaluate_model(model, heldout, source_model=source, batch_size=8)
    with torch.no_grad():
        output = model(heldout, output_router_logits=True)
        source_logits = source(heldout).logits
    stats = output.routing_statistics
    assert report.ffn_experts_per_token == pytest.approx(stats["ffn_experts_per_token"].mean().item(), abs=1e-6)
    assert report.ffn_experts_per_token == pytest.approx(0.8, abs=0.02)  # calibrated on these very blocks
    for kind in ("zero", "copy", "constant"):
        assert report.zero_computation_share[kind] == pytest.approx(stats[f"{kind}_share"].mean().item(), abs=1e-6)
    assert report.zero_computation_share["zero"] > 0.3 and report.zero_computation_share["constant"] > 0.0
    for layer in report.per_layer:  # shares of the k slots add up to 1
        ffn_share = layer.ffn_experts_per_token / 2
        assert ffn_share + layer.zero_share + layer.copy_share + layer.constant_share == pytest.approx(1.0)
    expected_kl = F.kl_div(F.log_softmax(output.logits, -1), F.log_softmax(source_logits, -1), log_target=True,
                           reduction="none").sum(-1).mean()
    assert report.kl_to_source == pytest.approx(expected_kl.item(), rel=1e-4) and report.kl_to_source > 1e-4
    nll = F.cross_entropy(output.logits[:, :-1].transpose(1, 2), heldout[:, 1:])
    assert report.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert not model.training
    # the paired ratio: exp of the mean per-block loss difference to transformers' own loss of the source
    with torch.no_grad():
        source_losses = torch.stack([source(block[None], labels=block[None]).loss for block in heldout]).double()
        model_losses = torch.stack([model(block[None], labels=block[None]).loss for block in heldout]).double()
    differences = model_losses - source_losses  # (16,)
    assert report.perplexity_ratio_to_source == pytest.approx(math.exp(differences.mean().item()), rel=1e-5)
    low, high = report.perplexity_ratio_to_source_interval_95
    # whether the budget's cost is significant depends on how far the 50-step fixture source trained (here it is
    # not: the interval holds 1); what this test pins is the pairing and the interval around the ratio
    assert low < report.perplexity_ratio_to_source < high
    # pairing: the ratio's interval is narrower than what the two unpaired intervals would allow
    unpaired = 1.96 * math.sqrt(model_losses.var().item() / 16 + source_losses.var().item() / 16)
    assert math.log(high) - math.log(low) < 2 * unpaired


def test_eval_cli_json_and_plots(capsys, tmp_path, trained_moepp, trained_mixtral, text_corpus):
    args = ("--data", text_corpus / "heldout.txt", "--block-size", "32", "--max-blocks", "6", "--max-tokens", "5000")
    result = run_cli(capsys, "eval", trained_moepp, *args, "--source", trained_mixtral, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("perplexity", "ffn_experts_per_token", "zero_computation_share", "per_layer", "kl_to_source",
                "ffn_load_cv", "perplexity_interval_95"):
        assert key in report
    assert set(report["zero_computation_share"]) == {"zero", "copy", "constant"}
    assert len(report["per_layer"]) == 3 and report["blocks"] == 6 and math.isfinite(report["perplexity"])
    result = run_cli(capsys, "eval", trained_mixtral, *args)
    assert result.exit_code == 0 and "perplexity" in result.stdout and "layer   2" in result.stdout
    pytest.importorskip("matplotlib")
    result = run_cli(capsys, "eval", trained_moepp, *args, "--plots", tmp_path / "plots")
    assert result.exit_code == 0, result.stderr
    for name in ("ffn_experts_per_layer.png", "slot_share_per_layer.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_bad_eval_inputs_are_one_sentence(capsys, tmp_path, trained_moepp, text_corpus):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(trained_moepp, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    other_vocab = tmp_path / "other-vocab"
    MixtralForCausalLM(_small_config()).save_pretrained(other_vocab)
    data = text_corpus / "heldout.txt"
    cases = [
        ((trained_moepp, "--data", tmp_path / "missing.jsonl"), "does not exist"),
        ((no_tokenizer, "--data", data), "has no tokenizer"),
        ((tmp_path / "nowhere", "--data", data), "not a checkpoint folder"),
        ((trained_moepp, "--data", data, "--source", other_vocab), "different vocabularies"),
        ((trained_moepp, "--data", data, "--block-size", "100000"), "fewer than two blocks"),
    ]
    for args, message in cases:
        result = run_cli(capsys, "eval", *args, "--max-tokens", "3000", "--block-size", "32") if "--block-size" \
            not in args else run_cli(capsys, "eval", *args)
        assert result.exit_code == 1, (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, (args, result.stderr)


def _small_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)


def test_eval_cli_runs_a_training_free_baseline(capsys, trained_moepp, trained_mixtral, text_corpus):
    """`upcycle eval --baseline RULE --target-ffn-per-token F`: the rule's knob fitted on the train blocks, held-out
    perplexity and compute under that rule, equal to running the rule in-process with the same knob."""
    from upcycle.evaluation.baselines import variable_k_routing

    args = ("--data", text_corpus / "heldout.txt", "--block-size", "32", "--max-blocks", "6", "--max-tokens", "5000")
    result = run_cli(capsys, "eval", trained_moepp, *args, "--baseline", "top_p", "--target-ffn-per-token", "1.5",
                     "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["baseline"]["rule"] == "top_p" and report["baseline"]["target"] == 1.5
    assert abs(report["ffn_experts_per_token"] - 1.5) < 0.15
    assert report["ffn_experts_histogram"]["0"] == 0.0
    assert report["per_layer"] and all(layer["zero_share"] == 0.0 for layer in report["per_layer"])  # dropped: none
    model = load_causal_lm(trained_moepp)
    blocks = load_token_blocks(text_corpus / "heldout.txt", load_checkpoint_tokenizer(trained_moepp), 32,
                               max_tokens=5000)
    with variable_k_routing(model, "top_p", report["baseline"]["knob"]):
        direct = evaluate_model(model, blocks.heldout[:6])
    assert report["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    for bad, message in ((("--baseline", "top_p"), "go together"),
                         (("--baseline", "top_p", "--target-ffn-per-token", "0.5"), "between 1 and 2")):
        refused = run_cli(capsys, "eval", trained_moepp, *args, *bad)
        assert refused.exit_code == 1 and message in refused.stderr and "Traceback" not in refused.stderr
    refused = run_cli(capsys, "eval", trained_mixtral, *args, "--baseline", "top_p", "--target-ffn-per-token", "1.5")
    assert refused.exit_code == 1 and "convert the source first" in refused.stderr
