"""upcycle.evaluation.routing_record: routing counted from the model's own routers, whoever runs the model."""

import pytest
import torch

from upcycle.budget.calibrate import calibrate_model
from upcycle.checkpoint.loading import load_causal_lm
from upcycle.data.blocks import load_token_blocks
from upcycle.evaluation.evaluate import evaluate_model
from upcycle.evaluation.routing_record import record_routing

BLOCK_SIZE = 48


@pytest.fixture(scope="module")
def heldout(text_corpus, text_tokenizer) -> torch.Tensor:
    blocks = load_token_blocks(text_corpus / "heldout.txt", text_tokenizer, BLOCK_SIZE, max_tokens=10_000)
    return blocks.train[:8]  # (8, 48)


@pytest.fixture(scope="module")
def calibrated(trained_moepp, heldout):
    """The tiny MoE++ model at 0.75 FFN experts per token: some tokens skip a layer's FFN experts."""
    model = load_causal_lm(trained_moepp)
    calibrate_model(model, list(heldout.split(4)), target=0.75)
    return model


def test_record_matches_eval_and_a_direct_count(calibrated, heldout):
    report = evaluate_model(calibrated, heldout, batch_size=4)
    with torch.no_grad(), record_routing(calibrated, keep_tokens=True) as record:
        calibrated(heldout, use_cache=False)
    summary = record.summary()
    assert summary["tokens"] == heldout.numel()
    assert summary["layers"] == [layer.layer for layer in report.per_layer]
    assert summary["ffn_experts_per_token_per_layer"] == pytest.approx(
        [layer.ffn_experts_per_token for layer in report.per_layer], abs=1e-6)
    assert summary["zero_computation_share"] == pytest.approx(report.zero_computation_share, abs=1e-6)
    assert summary["ffn_experts_histogram"] == pytest.approx(report.ffn_experts_histogram, abs=1e-6)
    # per token, against each router's own selection on the logits the model returns
    with torch.no_grad():
        router_logits = calibrated(heldout, output_router_logits=True, use_cache=False).router_logits
    for position, (block, logits) in enumerate(zip(calibrated.moe_blocks(), router_logits, strict=True)):
        index = block.gate.select_experts(logits.float())  # (T, k)
        assert torch.equal(record.ffn_used[:, position], (index < block.layout.n_ffn).sum(dim=-1))
        layout = block.layout
        assert torch.equal(record.slot_types[:, position, 0],
                           ((index >= layout.n_ffn) & (index < layout.copy_start)).sum(dim=-1))
    assert torch.equal(record.token_ids, heldout.reshape(-1))
    assert 0 < summary["ffn_experts_histogram"]["0"] and 0 < summary["ffn_experts_histogram"]["1"]


def test_padding_is_not_counted(calibrated, heldout):
    """A right-padded batch with its attention mask counts exactly the tokens of the unpadded rows."""
    lengths = [BLOCK_SIZE, 30, 17]
    with torch.no_grad(), record_routing(calibrated, keep_tokens=True) as alone:
        for row, length in enumerate(lengths):
            calibrated(heldout[row:row + 1, :length], use_cache=False)
    padded = heldout[:3].clone()
    mask = torch.zeros_like(padded)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        padded[row, length:] = 0
    with torch.no_grad(), record_routing(calibrated, keep_tokens=True) as batched:
        calibrated(padded, attention_mask=mask, use_cache=False)
    assert batched.tokens == alone.tokens == sum(lengths)
    assert torch.equal(batched.token_ids, alone.token_ids)
    assert torch.equal(batched.ffn_used, alone.ffn_used)
    assert batched.summary() == alone.summary()


def test_a_source_uses_its_top_k_everywhere_and_generation_counts_each_step(trained_mixtral, heldout):
    source = load_causal_lm(trained_mixtral)
    with torch.no_grad(), record_routing(source) as record:
        source(heldout[:2], use_cache=False)
    summary = record.summary()
    assert summary["tokens"] == heldout[:2].numel()
    assert summary["ffn_experts_per_token"] == source.config.num_experts_per_tok
    assert summary["zero_computation_share"] == {"zero": 0.0, "copy": 0.0, "constant": 0.0}
    with torch.no_grad(), record_routing(source) as record:
        source.generate(heldout[:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert record.tokens == 8 + 4  # the prompt, then one position per step (the last token is not fed back)


def test_ffn_experts_by_token_kind_adds_up_to_the_mean(calibrated, heldout, text_tokenizer):
    from upcycle.evaluation.parts_of_speech import BASE_KINDS
    from upcycle.evaluation.token_kinds import ffn_experts_by_token_kind

    by_kind = ffn_experts_by_token_kind(calibrated, heldout, text_tokenizer, batch_size=4)
    assert tuple(by_kind) == BASE_KINDS
    assert sum(kind["tokens"] for kind in by_kind.values()) == heldout.numel()
    punctuation = sum(not any(character.isalnum() for character in text_tokenizer.decode([token]))
                      for token in heldout.reshape(-1))
    assert by_kind["punctuation"]["tokens"] == punctuation
    report = evaluate_model(calibrated, heldout, batch_size=4)
    weighted = sum(kind["ffn_experts_per_token"] * kind["tokens"] for kind in by_kind.values())
    assert weighted / heldout.numel() == pytest.approx(report.ffn_experts_per_token, abs=1e-6)
