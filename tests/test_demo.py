"""`upcycle demo`, the README's main command, runs end to end on the embedded default."""

import json
from pathlib import Path

from cli_runner import run_cli


def test_demo_runs_and_replaces_only_its_own_output(capsys, tmp_path):
    output = tmp_path / "demo"
    result = run_cli(capsys, "demo", "--output", output)
    assert result.exit_code == 0, result.stderr
    results = json.loads((output / "upcycle-demo.json").read_text())
    assert results["verify"]["greedy_generation_equal"] is True
    assert results["verify"]["max_logit_difference"] < 1e-4
    budgets = [row["ffn_experts_per_token"] for row in results["budget_knob"]]
    assert budgets[0] == 2.0 and budgets == sorted(budgets, reverse=True) and budgets[-1] < 0.5
    assert (output / "moepp" / "config.json").is_file()
    assert run_cli(capsys, "demo", "--output", output).exit_code == 0  # its own earlier output: replaced

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
