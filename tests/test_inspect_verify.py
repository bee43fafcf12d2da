"""`upcycle inspect` and `upcycle verify` through the command line."""

import json
import shutil

import torch
from cli_runner import run_cli
from safetensors.torch import load_file, save_file


def test_convert_prints_a_summary(capsys, tmp_path, per_expert_source):
    result = run_cli(capsys, "convert", per_expert_source, tmp_path / "out", "--zero", "2", "--no-gating-residual")
    assert result.exit_code == 0, result.stderr
    assert "4 FFN + 2 zero, 1 copy, 2 constant" in result.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["gating_residual"] is False


def test_inspect_json(capsys, converted, per_expert_source, source_model):
    result = run_cli(capsys, "inspect", converted, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["family"] == "mixtral" and summary["is_moepp"] is True
    assert summary["experts"] == {"ffn": 4, "zero": 1, "copy": 1, "constant": 2}
    assert summary["layers"] == 3 and summary["moe_layers"] == 3
    source_parameters = sum(p.numel() for p in source_model.parameters())
    assert summary["parameters_total"] == source_parameters + summary["parameters_added"]
    # per layer: (4, 32) router rows + (2, 32) constant vectors + (2, 2, 32) ratios; (8, 8) residual after layer 0
    assert summary["parameters_added"] == 3 * (4 * 32 + 2 * 32 + 4 * 32) + 2 * 64
    expert_parameters = 3 * 4 * 3 * 32 * 48
    assert summary["parameters_active_per_token"] == summary["parameters_total"] - expert_parameters // 2
    assert summary["ffn_experts_per_token"] == 2.0
    assert summary["provenance"]["source"] == per_expert_source.name  # no private path
    source_summary = json.loads(run_cli(capsys, "inspect", per_expert_source, "--json").stdout)
    assert source_summary["is_moepp"] is False and source_summary["parameters_added"] == 0


def test_inspect_text(capsys, converted):
    result = run_cli(capsys, "inspect", converted)
    assert result.exit_code == 0
    assert "4 ffn, 1 zero, 1 copy, 2 constant per MoE layer, top-2" in result.stdout


def test_verify_passes_on_a_fresh_conversion(capsys, per_expert_source, converted):
    result = run_cli(capsys, "verify", per_expert_source, converted)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("ok:") and "greedy generation identical" in result.stdout


def test_verify_fails_and_names_the_first_parting_layer(capsys, tmp_path, per_expert_source, converted):
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.gate.selection_bias"
    tensors = load_file(broken / index[name])
    tensors[name] = torch.full_like(tensors[name], 10.0)  # layer 1 now routes every token to zero-computation
    save_file(tensors, broken / index[name], metadata={"format": "pt"})
    result = run_cli(capsys, "verify", per_expert_source, broken)
    assert result.exit_code == 1
    assert "verification failed" in result.stderr and "decoder layer 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_and_inspect_bad_paths(capsys, tmp_path):
    for args in (("inspect", tmp_path / "nope"), ("verify", tmp_path / "a", tmp_path / "b")):
        result = run_cli(capsys, *args)
        assert result.exit_code == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
