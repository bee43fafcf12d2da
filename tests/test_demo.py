"""`upcycle demo`, the README's main command, runs end to end on the embedded default (shortened here)."""

import json
from pathlib import Path

import pytest
from cli_runner import run_cli

from upcycle.demo import DEMO_MODEL, DemoOptions, run_demo


def test_the_embedded_model_ships_with_its_tokenizer_and_training_record():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert (DEMO_MODEL / name).is_file(), name
    assert (DEMO_MODEL / "model.safetensors").stat().st_size < 25 * 1024 * 1024
    record = json.loads((DEMO_MODEL / "training.json").read_text())
    assert record["heldout_tokens"] > 50_000
    assert record["heldout_perplexity"] < 150  # a trained model, not random weights (random: about 4096)
    # routers specialised: mean router entropy clearly below the uniform distribution's
    assert max(record["router_entropy_per_layer"]) < 0.9 * record["uniform_entropy"]


@pytest.mark.slow
def test_full_demo_meets_the_shape_of_results(tmp_path):
    results = run_demo(DemoOptions(output=tmp_path / "demo"))
    assert [budget["target"] for budget in results["budgets"]] == [1.5, 1.0]


def test_short_demo_runs_and_replaces_only_its_own_output(tmp_path):
    output = tmp_path / "demo"
    options = DemoOptions(output=output, train_steps=2, calibration_blocks=8, max_heldout_blocks=8)
    results = run_demo(options, echo=lambda message: None)
    saved = json.loads((output / "results.json").read_text())
    assert saved["source"]["ffn_experts_per_token"] == 2.0
    for budget, target in zip(saved["budgets"], (1.5, 1.0)):
        assert budget["target"] == target
        for kind in ("baseline", "calibrated", "trained"):
            assert budget[kind]["perplexity"] > 1.0
            assert abs(budget[kind]["ffn_experts_per_token"] - target) < 0.3, (kind, budget[kind])
    for plot in ("perplexity_vs_ffn_experts.png", "slot_share_per_layer.png", "ffn_experts_by_token_kind.png"):
        assert (output / "plots" / plot).stat().st_size > 1000
    assert set(results["token_kinds"]) == {"punctuation", "word piece", "word"}
    assert (output / "trained-1" / "config.json").is_file()

    run_demo(options, echo=lambda message: None)  # its own earlier output: replaced
    assert (output / "results.json").is_file()


def test_demo_refuses_a_folder_it_did_not_write(capsys, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = run_cli(capsys, "demo", "--output", other)
    assert refused.exit_code == 1 and "not an earlier demo output" in refused.stderr
    assert (other / "notes.txt").read_text() == "mine"


def test_readme_has_exactly_the_two_setup_commands():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    setup = readme.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
