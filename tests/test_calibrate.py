"""`upcycle calibrate`: selection biases from data, so that a target number of FFN experts per token holds."""

import json
import shutil

import pytest
import torch
from cli_runner import run_cli
from conftest import folder_digest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from upcycle.budget.calibrate import bisect_offset, ffn_experts_per_token, relative_biases
from upcycle.data.blocks import load_token_blocks
from upcycle.modeling.moepp_layer import ExpertLayout, MoePPRouter

# 6k calibration tokens; about 10k held-out tokens (a quarter of the documents among the first 50k tokens)
DATA_ARGS = ("--block-size", "64", "--max-tokens", "50000", "--heldout-fraction", "0.25", "--batches", "12",
             "--batch-size", "8")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, trained_moepp, text_corpus):
    """Outputs of `upcycle calibrate` at 1.5 and 1.0 FFN experts per token, with the CLI's stdout."""
    outputs = {}
    folder = tmp_path_factory.mktemp("calibrated")
    for target in ("1.5", "1.0"):
        output = folder / f"target-{target}"
        outputs[float(target)] = (output, _run(trained_moepp, text_corpus, target, output))
    return outputs


def _run(checkpoint, corpus, target, output, data_args=DATA_ARGS) -> str:
    """`upcycle calibrate` through the entry point (a module fixture cannot use capsys); returns what it printed."""
    import contextlib
    import io
    import sys

    from upcycle.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["upcycle", "calibrate", str(checkpoint), "--data", str(corpus / "train.txt"), "--output", str(output),
            "--target-ffn-per-token", target, *data_args]
    old_argv, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as ex:
            main()
            sys.exit(0)
    finally:
        sys.argv = old_argv
    assert ex.value.code in (0, None), stderr.getvalue()
    return stdout.getvalue() + stderr.getvalue()


@pytest.mark.parametrize("target", [1.5, 1.0])
def test_calibrate_lands_on_the_target_on_heldout_text(calibrated, trained_moepp, text_corpus, text_tokenizer,
                                                       target):
    output, printed = calibrated[target]
    step = json.loads((output / "upcycle.json").read_text())["history"][-1]
    assert step["step"] == "calibrate" and step["options"]["target_ffn_per_token"] == target
    measured = step["measured_ffn_experts_per_token"]
    assert abs(measured - target) <= 0.05, measured  # the issue asks for 0.1; calibrate promises 0.05
    assert all(abs(value - target) <= 0.1 for value in step["per_layer_ffn_experts_per_token"])  # every layer
    assert "warning" not in printed and f"{measured:.3f} FFN experts per token" in printed
    if target != 1.5:
        return
    # Independently: load the output with transformers alone and count FFN experts per token on the held-out blocks.
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype=torch.float32).eval()
    heldout = load_token_blocks(text_corpus / "train.txt", text_tokenizer, 64, heldout_fraction=0.25,
                                max_tokens=50_000).heldout
    assert step["heldout_tokens"] == heldout.numel()
    per_layer = []
    with torch.no_grad():
        for batch in heldout.split(8):
            stats = model(batch, output_router_logits=True).routing_statistics
            per_layer.append(stats["ffn_experts_per_token"] * batch.numel())
    recount = (torch.stack(per_layer).sum(0) / heldout.numel()).mean().item()
    assert recount == pytest.approx(measured, abs=1e-6)


def test_calibrated_checkpoint_keeps_convert_format_and_changes_only_biases(calibrated, trained_moepp):
    output, _ = calibrated[1.5]
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in trained_moepp.iterdir())
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index == json.loads((trained_moepp / "model.safetensors.index.json").read_text())
    before, after = {}, {}
    for shard in sorted(set(index["weight_map"].values())):
        before |= load_file(trained_moepp / shard)
        after |= load_file(output / shard)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    biases = {name for name in before if name.endswith("selection_bias")}
    assert changed == biases and len(biases) == 3
    for name in biases:
        assert torch.isneginf(before[name]).all() and torch.isfinite(after[name]).all()
        bias = after[name]  # (Z,) = zero, copy, constant, constant: Zero first, then Constant, then Copy
        assert bias[0] > bias[2] == bias[3] > bias[1]
    for name in ("config.json", "tokenizer.json", "modeling_upcycle_moepp.py"):
        assert (output / name).read_bytes() == (trained_moepp / name).read_bytes()


def test_recalibrating_keeps_the_relative_biases(tmp_path, calibrated, text_corpus):
    first, _ = calibrated[1.5]
    output = tmp_path / "again"
    _run(first, text_corpus, "1.2", output, ("--block-size", "64", "--max-tokens", "10000", "--batches", "2"))
    history = json.loads((output / "upcycle.json").read_text())["history"]
    assert [step["step"] for step in history] == ["convert", "calibrate", "calibrate"]
    assert history[-1]["measured_ffn_experts_per_token"] < history[-2]["measured_ffn_experts_per_token"]
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index[next(name for name in index if name.endswith("selection_bias"))]
    old, new = load_file(first / shard), load_file(output / shard)
    for name in (name for name in old if name.endswith("selection_bias")):
        torch.testing.assert_close(new[name] - new[name][0], old[name] - old[name][0])
        assert new[name][0] > old[name][0]  # fewer FFN experts: higher biases


def test_bisection_reaches_a_target_on_random_logits():
    torch.manual_seed(0)
    layout = ExpertLayout(n_ffn=8, n_zero=1, n_copy=1, n_constant=2)
    router = MoePPRouter(layout, hidden_size=4, top_k=2, has_residual=False, renormalize=True,
                         zero_expert_semantics="drop_and_renormalize")
    logits = torch.randn(4000, layout.n_total)
    relative = relative_biases(torch.full((4,), float("-inf")), layout, logits[:, :8], ("zero", "constant", "copy"))
    previous = 2.0
    for target in (1.9, 1.5, 1.0, 0.6, 0.0):
        _, bias, reached = bisect_offset(router, logits, relative, target, torch.float32)
        assert abs(reached - target) < 2e-3  # one token is 1/4000 = 2.5e-4
        assert ffn_experts_per_token(router, logits, bias) == reached <= previous
        previous = reached
    # A partly switched-off layer keeps its -inf expert off and the others' differences.
    current = torch.tensor([0.5, float("-inf"), -1.0, 0.0])
    relative = relative_biases(current, layout, logits[:, :8], ("zero", "constant", "copy"))
    assert torch.isneginf(relative[1]) and relative[0] - relative[2] == 1.5
    _, bias, _ = bisect_offset(router, logits, relative, 1.2, torch.bfloat16)
    assert torch.isneginf(bias[1]) and torch.equal(bias, bias.to(torch.bfloat16).float())


def test_bad_calibrate_inputs_are_one_sentence(capsys, tmp_path, trained_moepp, text_corpus):
    data = text_corpus / "heldout.txt"
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(trained_moepp, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    existing = tmp_path / "existing"
    existing.mkdir()
    digest = folder_digest(trained_moepp)
    cases = [
        ((trained_moepp, "--target-ffn-per-token", "2.5"), "target must be between 0 and 2"),
        ((trained_moepp, "--target-ffn-per-token", "-1"), "target must be between 0 and 2"),
        ((no_tokenizer, "--target-ffn-per-token", "1.5"), "has no tokenizer"),
        ((trained_moepp, "--target-ffn-per-token", "1.5", "--data", tmp_path / "missing.txt"), "does not exist"),
        ((trained_moepp, "--target-ffn-per-token", "1.5", "--priority", "zero,copy"), "priority must name"),
        ((trained_moepp, "--target-ffn-per-token", "1.5", "--output", existing), "--overwrite"),
        ((trained_moepp, "--target-ffn-per-token", "1.5", "--output", trained_moepp / "inside"), "overlaps"),
        ((tmp_path, "--target-ffn-per-token", "1.5"), "no config.json"),
    ]
    for args, message in cases:
        args = list(args)
        if "--data" not in args:
            args += ["--data", data]
        if "--output" not in args:
            args += ["--output", tmp_path / "out"]
        result = run_cli(capsys, "calibrate", *args, "--block-size", "32")
        assert result.exit_code == 1, (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, (args, result.stderr)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if "upcycle-partial" in p.name]
    assert folder_digest(trained_moepp) == digest
