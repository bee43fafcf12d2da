"""`upcycle analyze` and upcycle.evaluation.analyses: the paper's routing analyses against direct counts of each
router's own selection on the logits the model returns, the gating residual on/off against a model whose residual
weights are zero, the source reference, parts of speech, the command's outputs and its refusals."""

import copy
import importlib.util
import json

import pytest
import torch
from cli_runner import run_cli
from test_every_family_chain import CHAIN, build_source

from upcycle.budget.calibrate import calibrate_model
from upcycle.checkpoint.loading import load_causal_lm
from upcycle.data.blocks import load_token_blocks
from upcycle.evaluation.analyses import analyze_model
from upcycle.evaluation.parts_of_speech import block_token_kinds, load_tagger

BLOCK_SIZE = 48
DATA = ["--block-size", str(BLOCK_SIZE), "--max-tokens", "20000", "--batch-size", "4"]


@pytest.fixture(scope="module")
def heldout(text_corpus, text_tokenizer) -> torch.Tensor:
    blocks = load_token_blocks(text_corpus / "heldout.txt", text_tokenizer, BLOCK_SIZE, max_tokens=10_000)
    return blocks.train[:8]  # (8, 48)


def calibrated_model(trained_moepp, heldout):
    """The tiny trained MoE++ model with random zero-computation router rows (as training leaves them: their
    logits vary by token), calibrated to 1.0 FFN experts per token: in every layer tokens use 0, 1 or 2."""
    model = load_causal_lm(trained_moepp)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.moe_blocks():
            block.gate.zero_computation_weight.normal_(0.0, 0.3)
    calibrate_model(model, list(heldout.split(4)), target=1.0)
    return model


@pytest.fixture(scope="module")
def calibrated(trained_moepp, heldout):
    return calibrated_model(trained_moepp, heldout)


@pytest.fixture(scope="module")
def calibrated_folder(tmp_path_factory, trained_moepp, text_corpus):
    """The same checkpoint calibrated on disk by `upcycle calibrate`."""
    from upcycle.budget.calibrate import CalibrateOptions, calibrate

    output = tmp_path_factory.mktemp("analyze") / "calibrated"
    calibrate(trained_moepp, output, str(text_corpus / "train.txt"),
              CalibrateOptions(target_ffn_per_token=0.75, batches=4, batch_size=4, block_size=BLOCK_SIZE,
                               max_tokens=20_000))
    return output


def direct_routing(model, blocks):
    """(T, L) FFN experts used, (L, 3) zero/copy/constant slots, (T, L) confidence, L x (T, N+Z) logits."""
    with torch.no_grad():
        router_logits = model(blocks, output_router_logits=True, use_cache=False).router_logits
    used, types, confidence = [], [], []
    for block, logits in zip(model.moe_blocks(), router_logits, strict=True):
        layout = block.layout
        index = block.gate.select_experts(logits.float())  # (T, k)
        used.append((index < layout.n_ffn).sum(dim=-1))
        types.append(torch.stack([((index >= start) & (index < end)).sum() for start, end in
                                  ((layout.n_ffn, layout.copy_start), (layout.copy_start, layout.constant_start),
                                   (layout.constant_start, layout.n_total))]))
        confidence.append(torch.softmax(logits[:, :layout.n_ffn].float(), dim=-1).max(dim=-1).values)
    return torch.stack(used, dim=1), torch.stack(types), torch.stack(confidence, dim=1), router_logits


def test_statistics_equal_a_direct_count(calibrated, heldout, text_tokenizer):
    result = analyze_model(calibrated, heldout, text_tokenizer, batch_size=4)
    used, types, confidence, router_logits = direct_routing(calibrated, heldout)
    tokens, layers = used.shape
    top_k = calibrated.moe_blocks()[0].gate.top_k
    assert result["tokens"] == tokens == heldout.numel()
    row = result["rows"][0]
    assert row["ffn_experts_per_token_per_layer"] == pytest.approx(used.double().mean(dim=0).tolist(), abs=1e-9)
    assert 0.7 < row["ffn_experts_per_token"] < 1.3  # calibrated to 1.0
    assert all(len(used[:, layer].unique()) > 1 for layer in range(layers))  # so correlations are defined
    shares = (types.sum(dim=0).double() / (tokens * layers * top_k)).tolist()
    assert list(row["zero_computation_share"].values()) == pytest.approx(shares, abs=1e-9)
    assert row["zero_computation_share"]["zero"] > 0
    # Pearson between adjacent layers, per token, as numpy-free torch.corrcoef computes it
    correlation = result["adjacent_layer_correlation"]
    expected = torch.corrcoef(used.double().T)
    assert correlation["ffn_experts_per_token"] == pytest.approx(
        [expected[layer, layer + 1].item() for layer in range(layers - 1)], abs=1e-9)
    expected = torch.corrcoef(confidence.double().T)
    assert correlation["router_confidence"] == pytest.approx(
        [expected[layer, layer + 1].item() for layer in range(layers - 1)], abs=1e-6)
    assert correlation["source_router_confidence"] is None
    # kinds: every token counted once; punctuation's mean against the decoded tokens themselves
    kinds = result["token_kinds"]["kinds"]
    assert sum(kind["tokens"] for kind in kinds.values()) == tokens
    punctuation = torch.tensor([not any(character.isalnum() for character in text_tokenizer.decode([token]))
                                for token in heldout.reshape(-1).tolist()])
    assert kinds["punctuation"]["tokens"] == int(punctuation.sum())
    assert kinds["punctuation"]["ffn_experts_per_token"] == pytest.approx(
        used[punctuation].double().mean().item(), abs=1e-9)
    # routing scores with the residual on: moments of each router's probabilities over its switched-on experts
    for position, (block, logits) in enumerate(zip(calibrated.moe_blocks(), router_logits)):
        on = torch.cat([torch.ones(block.layout.n_ffn, dtype=torch.bool), ~torch.isneginf(block.gate.selection_bias)])
        probabilities = block.gate.routing_probabilities(logits.float())[:, on].double()
        stats = result["routing_scores"]["per_layer"]["probabilities"][position]["on"]
        assert stats["mean"] == pytest.approx(1.0 / int(on.sum()), rel=1e-6)  # a softmax's mean, whatever it is
        assert stats["variance"] == pytest.approx(probabilities.var(unbiased=False).item(), rel=1e-6)
        assert (stats["min"], stats["max"]) == pytest.approx((probabilities.min().item(), probabilities.max().item()))
        raw = result["routing_scores"]["per_layer"]["logits"][position]["on"]
        assert raw["mean"] == pytest.approx(logits.float()[:, on].double().mean().item(), rel=1e-6)
    # a calibrated model's residual weights are the converted zeros: residual off is the same model
    assert result["routing_scores"]["gating_residual_nonzero"] is False
    for row in result["routing_scores"]["per_layer"]["logits"]:
        assert row["on"] == row["off"]


def test_residual_off_equals_a_model_whose_residual_weights_are_zero(trained_moepp, heldout, text_tokenizer):
    model = calibrated_model(trained_moepp, heldout)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.moe_blocks():
            if block.gate.residual_weight is not None:
                block.gate.residual_weight.normal_(0.0, 0.3)
    trained_residual = [block.gate.residual_weight.clone() for block in model.moe_blocks()[1:]]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.moe_blocks()[1:]:
            block.gate.residual_weight.zero_()
    result = analyze_model(model, heldout, text_tokenizer, batch_size=4)
    zeroed = analyze_model(twin, heldout, text_tokenizer, batch_size=4)
    assert result["routing_scores"]["gating_residual_nonzero"] and not zeroed["routing_scores"]["gating_residual_nonzero"]
    for kind in ("probabilities", "logits"):
        rows, twin_rows = result["routing_scores"]["per_layer"][kind], zeroed["routing_scores"]["per_layer"][kind]
        for row, twin_row in zip(rows, twin_rows):
            assert row["off"] == pytest.approx(twin_row["on"], rel=1e-9, abs=1e-12)
        assert rows[0]["on"] == pytest.approx(rows[0]["off"], rel=1e-9)  # the first MoE layer has no residual
        assert any(row["on"]["variance"] != pytest.approx(row["off"]["variance"], rel=1e-3) for row in rows[1:])
    # the model's own residual weights are back after the off pass
    for block, weight in zip(model.moe_blocks()[1:], trained_residual):
        assert torch.equal(block.gate.residual_weight, weight)


def test_source_reference_is_the_sources_router_confidence(calibrated, heldout, text_tokenizer, trained_mixtral):
    source = load_causal_lm(trained_mixtral)
    result = analyze_model(calibrated, heldout, text_tokenizer, source_model=source, batch_size=4)
    with torch.no_grad():
        router_logits = source(heldout, output_router_logits=True).router_logits
    confidence = torch.stack([torch.softmax(logits.float(), dim=-1).max(dim=-1).values for logits in router_logits],
                             dim=1).double()  # (T, L)
    expected = torch.corrcoef(confidence.T)
    assert result["adjacent_layer_correlation"]["source_router_confidence"] == pytest.approx(
        [expected[layer, layer + 1].item() for layer in range(confidence.shape[1] - 1)], abs=1e-6)


def test_kinds_of_tokens_without_and_with_a_tagger():
    texts = ["The", " function", " return", "s", " a", " list", ".", "\n", "x", "=", "42"]
    assert block_token_kinds(texts, None) == ["word", "word", "word", "word piece", "word", "word", "punctuation",
                                              "punctuation", "word", "punctuation", "word"]
    if importlib.util.find_spec("HanTa") is None:
        pytest.skip("HanTa is not installed: parts of speech are not tested")
    kinds = block_token_kinds(texts, load_tagger())
    assert kinds[:7] == ["determiner", "noun", "verb", "word piece", "determiner", "noun", "punctuation"]
    assert kinds[-1] == "number"


def test_command_writes_json_and_plots(capsys, tmp_path, calibrated_folder, trained_mixtral, text_corpus):
    output = tmp_path / "analysis"
    result = run_cli(capsys, "analyze", calibrated_folder, "--data", text_corpus / "heldout.txt", "--output", output,
                     "--source", trained_mixtral, "--max-blocks", "6", "--json", *DATA)
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)  # one JSON document, nothing else on stdout
    assert json.loads((output / "analysis.json").read_text()) == printed
    assert printed["blocks"] == 6 and printed["tokens"] == 6 * BLOCK_SIZE
    assert [row["kind"] for row in printed["rows"]] == ["data"]
    assert len(printed["adjacent_layer_correlation"]["source_router_confidence"]) == len(printed["layers"]) - 1
    assert len(printed["findings"]) == 6
    assert {path.split("/")[-1] for path in printed["plots"]} == {
        "ffn_experts_heatmap.png", "zero_computation_share.png", "adjacent_layer_correlation.png",
        "ffn_experts_by_token_kind.png", "routing_scores_residual.png"}
    assert all((output / name).read_bytes().startswith(b"\x89PNG") for name in
               (path.split("/")[-1] for path in printed["plots"]))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["analysis"]  # no partial folder left
    text = run_cli(capsys, "analyze", calibrated_folder, "--data", text_corpus / "heldout.txt", "--output", output,
                   "--max-blocks", "2", "--overwrite", *DATA)
    assert text.exit_code == 0 and "FFN experts per token" in text.stdout and "wrote" in text.stdout


def test_bad_inputs_are_one_sentence(capsys, tmp_path, calibrated_folder, trained_mixtral, text_corpus):
    data = ["--data", str(text_corpus / "heldout.txt"), *DATA]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["analyze", trained_mixtral, *data, "--output", tmp_path / "a"], "is not an MoE++ checkpoint"),
        (["analyze", calibrated_folder, "--data", tmp_path / "missing.txt", "--output", tmp_path / "b"],
         "does not exist"),
        (["analyze", calibrated_folder, *data, "--output", existing], "already exists"),
        (["analyze", calibrated_folder, *data, "--output", tmp_path / "c", "--source", calibrated_folder],
         "is an MoE++ checkpoint"),
        (["analyze", calibrated_folder, *data, "--output", calibrated_folder / "inside"], "overlaps the input"),
        (["analyze", tmp_path / "nowhere", *data, "--output", tmp_path / "d"], "does not exist"),
        (["analyze", calibrated_folder, *data, "--output", tmp_path / "e", "--tasks", ","], "--tasks takes"),
    ]
    for command, message in cases:
        result = run_cli(capsys, *command)
        assert result.exit_code == 1, (command, result.stdout)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert (existing / "keep.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing"]


@pytest.mark.skipif(importlib.util.find_spec("upcycle.evaluation.downstream") is None,
                    reason="upcycle.evaluation.downstream (evaluate_tasks) is not there yet")
def test_tasks_add_one_row_each(capsys, tmp_path, calibrated_folder, text_corpus):
    result = run_cli(capsys, "analyze", calibrated_folder, "--data", text_corpus / "heldout.txt", "--output",
                     tmp_path / "out", "--tasks", "upcycle_stdlib_module,upcycle_stdlib_cloze", "--limit", "8", "--max-blocks", "4",
                     "--json", *DATA)
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert [row["name"] for row in printed["rows"]][:2] == ["upcycle_stdlib_module", "upcycle_stdlib_cloze"]
    assert printed["layer_spread_across_rows"] is not None
    for row in printed["rows"][:2]:
        assert row["tokens"] > 0 and row["metrics"]
        assert len(row["ffn_experts_per_token_per_layer"]) == len(printed["layers"])


FAMILY_DEFAULT_RUN = ("qwen2_moe", "deepseek_v3_groups")  # the rest (and OpenMoE) with -m slow


@pytest.mark.parametrize("name", [name if name in FAMILY_DEFAULT_RUN else pytest.param(name, marks=pytest.mark.slow)
                                  for name in CHAIN])
def test_every_family_is_analyzed(capsys, tmp_path, text_corpus, text_tokenizer, name):
    """convert -> calibrate to 1.5 -> analyze with the source as reference, on a tiny model of each family."""
    source = build_source(name, tmp_path / "source", text_tokenizer)
    data = ["--data", str(text_corpus / "train.txt"), "--block-size", "32", "--max-tokens", "8000"]
    for command in (["convert", source, tmp_path / "moepp"],
                    ["calibrate", tmp_path / "moepp", "--target-ffn-per-token", "1.5", "--output",
                     tmp_path / "calibrated", "--batches", "4", *data]):
        assert run_cli(capsys, *command).exit_code == 0, command[0]
    result = run_cli(capsys, "analyze", tmp_path / "calibrated", "--source", source, "--output", tmp_path / "analysis",
                     "--json", *data)
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert 1.0 < printed["rows"][0]["ffn_experts_per_token"] < 2.0
    correlation = printed["adjacent_layer_correlation"]
    assert len(correlation["ffn_experts_per_token"]) == len(printed["layers"]) - 1
    assert correlation["source_router_confidence"] is not None
    assert len(printed["findings"]) == 6 and len(printed["plots"]) == 5


def test_findings_say_when_they_cannot_be_told():
    """A one-row run without a tagger, residual weights zero, one type used: the verdicts that need more say so."""
    from upcycle.evaluation.analysis_findings import layer_spread, paper_findings

    row = {"name": "data", "ffn_experts_per_token": 1.5, "ffn_experts_per_token_per_layer": [1.4, 1.6, 1.5],
           "zero_computation_share": {"zero": 0.25, "copy": 0.0, "constant": 0.0}}
    result = {"rows": [row], "adjacent_layer_correlation": {"ffn_experts_per_token": [0.3, 0.2]},
              "token_kinds": {"kinds": {"word": {"ffn_experts_per_token": 1.6, "tokens": 100},
                                        "word piece": {"ffn_experts_per_token": 1.2, "tokens": 100}}},
              "routing_scores": {"gating_residual_nonzero": False}, "layer_spread_across_rows": layer_spread([row])}
    assert [finding["holds"] for finding in paper_findings(result)] == [True, None, None, True, None, None]
    other = dict(row, name="task", ffn_experts_per_token=1.3, ffn_experts_per_token_per_layer=[1.4, 1.0, 1.5])
    result |= {"rows": [other, row], "layer_spread_across_rows": layer_spread([other, row]),
               "adjacent_layer_correlation": {"ffn_experts_per_token": [0.3, -0.1]}}
    assert [finding["holds"] for finding in paper_findings(result)][:3] == [False, False, True]
