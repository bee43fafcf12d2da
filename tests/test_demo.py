"""`upcycle demo`, the README's main command, runs end to end on the embedded default (shortened here)."""

import json
from pathlib import Path

import pytest
from cli_runner import run_cli

from upcycle.demo import DEMO_MODEL, DemoOptions, format_table, run_demo


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
    assert [budget["target"] for budget in results["budgets"]] == [1.5, 1.0, 0.75]


def test_short_demo_runs_and_replaces_only_its_own_output(tmp_path):
    output = tmp_path / "demo"
    options = DemoOptions(output=output, train_steps=2, calibration_blocks=8, max_heldout_blocks=8, task_limit=8,
                          analysis_blocks=4)
    messages = []
    run_demo(options, echo=messages.append)
    saved = json.loads((output / "results.json").read_text())
    assert saved["source"]["ffn_experts_per_token"] == 2.0
    source_task = saved["source"]["task"]
    assert (source_task["name"], source_task["samples"], source_task["ffn_experts_per_token"]) == \
        ("upcycle_stdlib_cloze", 8, 2.0)
    assert 0.0 <= source_task["metrics"]["acc"]["value"] <= 1.0 and source_task["metrics"]["acc"]["stderr"] > 0
    for budget, target in zip(saved["budgets"], (1.5, 1.0, 0.75), strict=True):
        assert budget["target"] == target
        for kind in ("baseline", "control", "calibrated", "trained"):
            row = budget[kind]
            assert row["perplexity"] > 1.0
            histogram = row["ffn_experts_histogram"]
            assert set(histogram) == {"0", "1", "2"} and abs(sum(histogram.values()) - 1.0) < 1e-6, kind
            assert len(row["ffn_experts_histogram_per_layer"]) == 4
        for kind in ("baseline", "control", "trained"):  # calibration alone cannot go below one without training
            assert abs(budget[kind]["ffn_experts_per_token"] - target) < 0.3, (kind, budget[kind])
            task = budget[kind]["task"]  # the task's own tokens, routed by the arm's routers (the baseline's rule)
            assert task["name"] == "upcycle_stdlib_cloze" and set(task["metrics"]) == {"acc", "perplexity"}, task
            assert abs(task["ffn_experts_per_token"] - target) < 0.35, (kind, task)
        assert "task" not in budget["calibrated"]
        assert budget["control"]["rule"] == {1.5: budget["baseline"]["rule"], 1.0: "top_k",
                                             0.75: "top_1_confident"}[target]
        paired = budget["trained"]["paired_vs_control"]
        assert paired["interval_95"][0] <= paired["perplexity_ratio"] <= paired["interval_95"][1]
        assert set(budget["token_kinds"]) == {"punctuation", "word piece", "word"}
    for plot in ("perplexity_vs_ffn_experts.png", "slot_share_per_layer.png", "ffn_experts_by_token_kind.png"):
        assert (output / "plots" / plot).stat().st_size > 1000
    table = format_table(saved)
    assert "task (± se)" in table.splitlines()[0] and "upcycle_stdlib_cloze, acc on 8 examples" in table
    source_cell = f"{source_task['metrics']['acc']['value']:.3f} ±{source_task['metrics']['acc']['stderr']:.3f}"
    assert table.splitlines()[1].endswith(source_cell)

    analysis = saved["analysis"]
    assert (analysis["target"], analysis["checkpoint"], analysis["blocks"]) == (0.75, "trained-0.75", 4)
    assert "analysis/analysis.json" in analysis["files"] and "analysis/ffn_experts_heatmap.png" in analysis["files"]
    for name in analysis["files"]:
        assert (output / name).stat().st_size > 1000, name
    written = json.loads((output / "analysis" / "analysis.json").read_text())
    assert [(row["name"], row["kind"]) for row in written["rows"]] == [("upcycle_stdlib_cloze", "task"),
                                                                      ("held-out text", "data")]
    assert written["adjacent_layer_correlation"]["source_router_confidence"] is not None
    assert len(written["findings"]) == len(analysis["findings"]) == 6
    assert any("s] source: upcycle_stdlib_cloze acc" in message for message in messages)  # progress lines
    assert any("s] budget 0.75: routing analyses of the trained MoE++" in message for message in messages)
    for name in ("trained-1", "control-1", "control-0.75"):
        assert (output / name / "config.json").is_file()
    assert json.loads((output / "control-1" / "config.json").read_text())["routing_rule"] == "top_k"

    run_demo(options, echo=lambda message: None)  # its own earlier output: replaced
    assert (output / "results.json").is_file()


def test_demo_refuses_a_folder_it_did_not_write(capsys, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = run_cli(capsys, "demo", "--output", other)
    assert refused.exit_code == 1 and "not an earlier demo output" in refused.stderr
    assert (other / "notes.txt").read_text() == "mine"
    refused = run_cli(capsys, "demo", "--output", tmp_path / "new", "--task", "hellaswag")
    assert refused.exit_code == 1 and "local tasks" in refused.stderr and not (tmp_path / "new").exists()


def test_readme_has_exactly_the_two_setup_commands():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    setup = readme.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
