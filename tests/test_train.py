"""`upcycle train`: trainable sets, losses, budget controller, resume, NaN stop, output (issue 4)."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from cli_runner import run_cli
from safetensors import safe_open

from upcycle.budget.controller import BudgetController, first_pick_thresholds
from upcycle.checkpoint.loading import load_causal_lm
from upcycle.errors import UpcycleError
from upcycle.training import TrainingStopped, TrainOptions, build_options, recipe, run_training
from upcycle.training.losses import compute_losses, zero_computation_switched_off
from upcycle.training.metrics import read_metrics
from upcycle.training.trainable import is_ffn_expert, select_trainable

SMALL = {"block_size": 32, "micro_batch_size": 4, "max_tokens": 12_000, "eval_max_blocks": 16, "progress": False,
         "tensorboard": False, "checkpoint_every": 0}


def small_options(tmp_path, model, corpus, **overrides) -> TrainOptions:
    values = SMALL | {"model": str(model), "data": str(corpus / "train.txt"), "output": str(tmp_path / "out"),
                      "steps": 4, "target_ffn_per_token": 1.5} | overrides
    return TrainOptions(**values).validate()


def step_records(run_dir) -> list[dict]:
    return [record for record in read_metrics(run_dir) if "event" not in record]


def tensors(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    found = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as handle:
            found |= {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return found


LOAD_ALONE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert "upcycle" not in sys.modules
tokens = torch.arange(40).view(2, 20) % model.config.vocab_size
out = model(tokens, output_router_logits=True)
print(json.dumps({"logit_sum": out.logits.double().sum().item(),
                  "ffn": out.routing_statistics["ffn_experts_per_token"].mean().item()}))
"""


def test_done_when_30_steps_at_target_1_5_land_within_0_15_on_heldout_text(tmp_path, trained_moepp, text_corpus):
    options = small_options(tmp_path, trained_moepp, text_corpus, steps=30, block_size=64, micro_batch_size=8,
                            max_tokens=60_000, eval_data=str(text_corpus / "heldout.txt"), eval_max_blocks=64)
    report = run_training(options, command="upcycle train (test)")
    heldout = report.heldout
    assert abs(heldout["ffn_experts_per_token"] - 1.5) <= 0.15, heldout
    assert math.isfinite(heldout["perplexity"]) and heldout["heldout_tokens"] == 64 * 64
    # The controller ramped the target from the source's k = 2 down to 1.5 and logged its state every step.
    records = step_records(report.run_dir)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[0]["target_ffn_per_token"] > 1.9 and records[-1]["target_ffn_per_token"] == 1.5
    assert records[0]["ffn_experts_per_token"] > 1.9  # starts near the source's k (few tokens pick zc experts)
    assert all(len(r["selection_bias"]) == 3 and len(r["controller_integral"]) == 3 for r in records)

    # Output: convert's format, provenance, card; FFN experts untouched (default set), routers trained.
    output = report.output
    for name in ("config.json", "modeling_upcycle_moepp.py", "moepp_layer.py", "tokenizer.json", "README.md"):
        assert (output / name).is_file(), name
    history = json.loads((output / "upcycle.json").read_text())["history"]
    assert [step["step"] for step in history] == ["convert", "train"]
    assert history[-1]["measured_ffn_experts_per_token"] == heldout["ffn_experts_per_token"]
    assert history[-1]["options"]["target_ffn_per_token"] == 1.5 and history[-1]["command"]
    assert "upcycle train" in (output / "README.md").read_text()
    before = load_causal_lm(trained_moepp).state_dict()
    after = load_causal_lm(output)
    after_state = after.state_dict()
    for name, tensor in before.items():
        if is_ffn_expert(name) or "self_attn" in name or "embed" in name:
            assert torch.equal(tensor, after_state[name]), name
    assert not torch.equal(before["model.layers.1.mlp.gate.zero_computation_weight"],
                           after_state["model.layers.1.mlp.gate.zero_computation_weight"])
    assert all(torch.isfinite(block.gate.selection_bias).all() for block in after.moe_blocks())

    # It loads with transformers alone (remote code, no upcycle import) and computes what upcycle computes.
    loaded = json.loads(subprocess.run([sys.executable, "-c", LOAD_ALONE, str(output)], capture_output=True,
                                       text=True, check=True).stdout)
    tokens = torch.arange(40).view(2, 20) % after.config.vocab_size
    with torch.no_grad():
        expected = after(tokens, output_router_logits=True)
    assert loaded["logit_sum"] == pytest.approx(expected.logits.double().sum().item(), rel=1e-6)
    assert loaded["ffn"] == pytest.approx(expected.routing_statistics["ffn_experts_per_token"].mean().item())


def test_default_set_gives_expert_weights_no_gradient(trained_moepp):
    model = load_causal_lm(trained_moepp).train()
    model, summary = select_trainable(model, TrainOptions())
    assert summary.ffn_expert_parameters_trainable == 0
    assert summary.trainable_parameters < summary.total_parameters / 50
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=tokens, labels=tokens, output_router_logits=True).loss.backward()
    for name, parameter in model.named_parameters():
        trainable = ".mlp.gate." in name or ".zero_computation_experts." in name
        assert parameter.requires_grad == trainable, name
        assert (parameter.grad is not None) == trainable, name
    _, full_summary = select_trainable(load_causal_lm(trained_moepp), dataclasses.replace(TrainOptions(),
                                                                                            trainable="full"))
    assert full_summary.trainable_parameters == full_summary.total_parameters


def test_self_distillation_teacher_is_the_source(trained_moepp, trained_mixtral):
    model = load_causal_lm(trained_moepp).train()
    biases = [block.gate.selection_bias for block in model.moe_blocks()]
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    converted = compute_losses(model, tokens, biases, 0.01, distill_weight=1.0)
    assert converted.distill_kl.item() == pytest.approx(0.0, abs=1e-6)  # student = teacher at conversion
    for bias in biases:
        bias.fill_(1.0)  # zero-computation experts switched on: the student departs from the source
    moved = compute_losses(model, tokens, biases, 0.01, distill_weight=1.0)
    assert moved.distill_kl.item() > 1e-6 and moved.ffn_experts_per_token.mean() < 2.0
    source = load_causal_lm(trained_mixtral)
    with torch.no_grad(), zero_computation_switched_off(biases):
        teacher_logits = model(tokens).logits
    assert torch.allclose(teacher_logits, source(tokens).logits, atol=1e-4)
    assert all(bool((bias == 1.0).all()) for bias in biases)  # restored after the teacher pass


def test_controller_ramp_sign_and_start(trained_moepp):
    controller = BudgetController(source_top_k=2, target=1.0, total_steps=10, ramp_fraction=0.5,
                                  learning_rate=0.5, start_share=0.05)
    assert [controller.target_at(step) for step in (0, 1, 5, 9)] == [2.0, 1.8, 1.0, 1.0]
    model = load_causal_lm(trained_moepp)
    tokens = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    biases = [block.gate.selection_bias for block in model.moe_blocks()]
    with torch.no_grad():
        logits = model(tokens, output_router_logits=True).router_logits
        scores = [block.gate.selection_scores(layer) for block, layer in zip(model.moe_blocks(), logits)]
    controller.initialise(scores, biases, model.moe_blocks()[0].layout.n_ffn)
    controller.apply(biases)
    with torch.no_grad():
        stats = model(tokens, output_router_logits=True).routing_statistics
    # About start_share of the tokens now pick one zero-computation expert: exactly so in the first layer, whose
    # input the biases do not change; later layers' inputs move with the routing before them (and the residual).
    measured = stats["ffn_experts_per_token"]
    assert measured[0].item() == pytest.approx(1.95, abs=0.03)
    assert torch.allclose(measured[1:], torch.full((2,), 1.95), atol=0.07)
    thresholds = first_pick_thresholds(scores[0], 8, 2)
    assert (thresholds < controller.biases[0, 0]).float().mean().item() == pytest.approx(0.05, abs=0.01)
    level = controller.biases.clone()
    logged = controller.update(torch.tensor([2.0, 1.8, 1.0]))  # target after one step: 1.8
    assert logged["controller_error"] == pytest.approx([0.2, 0.0, -0.8])
    assert controller.biases[0, 0] > level[0, 0] and controller.biases[1, 0] == level[1, 0]
    assert controller.biases[2, 0] < level[2, 0]
    restored = BudgetController(2, 1.0, 10)
    restored.load_state_dict(controller.state_dict())
    assert torch.equal(restored.biases, controller.biases) and restored.step == 1


def kill_at_step_3(monkeypatch):
    """Make the recipe stop (KeyboardInterrupt) when step 3 starts: steps 1 and 2 are done and checkpointed.
    Returns what undoes it."""
    real_train_step = recipe.train_step

    def killed_at_step_3(step, *args, **kwargs):
        if step == 2:  # 0-based
            raise KeyboardInterrupt
        return real_train_step(step, *args, **kwargs)

    monkeypatch.setattr(recipe, "train_step", killed_at_step_3)
    return lambda: monkeypatch.setattr(recipe, "train_step", real_train_step)


def test_resume_after_a_kill_gives_the_same_losses(tmp_path, trained_moepp, text_corpus, monkeypatch):
    common = {"steps": 4, "checkpoint_every": 2, "gradient_accumulation_steps": 2, "micro_batch_size": 2}
    uninterrupted = run_training(small_options(tmp_path / "a", trained_moepp, text_corpus, **common))
    undo_kill = kill_at_step_3(monkeypatch)
    options = small_options(tmp_path / "b", trained_moepp, text_corpus, **common)
    with pytest.raises(KeyboardInterrupt):
        run_training(options)
    assert not (tmp_path / "b" / "out").exists()  # no output from a killed run
    undo_kill()
    with pytest.raises(UpcycleError, match="pass --resume"):
        run_training(options)
    resumed = run_training(dataclasses.replace(options, resume=True))

    expected = {r["step"]: r for r in step_records(uninterrupted.run_dir)}
    got = step_records(resumed.run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for record in got:
        for key in ("loss", "lm_loss", "balance_loss", "ffn_experts_per_token", "selection_bias", "grad_norm"):
            assert record[key] == expected[record["step"]][key], (record["step"], key)
    assert resumed.heldout == uninterrupted.heldout
    assert torch.equal(tensors(resumed.output)["model.layers.2.mlp.gate.selection_bias"],
                       tensors(uninterrupted.output)["model.layers.2.mlp.gate.selection_bias"])


def test_a_resumed_control_continues_from_its_steered_knobs(tmp_path, trained_moepp, text_corpus, monkeypatch):
    """A trained control's knobs are training state: killed after its step-2 checkpoint and resumed, it steps
    from the knobs it had steered to (not knobs fitted anew) and lands where the uninterrupted run does."""
    common = {"steps": 4, "checkpoint_every": 2, "routing_rule": "dynamic_skipping", "budget_fit_blocks": 8}
    uninterrupted = run_training(small_options(tmp_path / "a", trained_moepp, text_corpus, **common))
    undo_kill = kill_at_step_3(monkeypatch)
    options = small_options(tmp_path / "b", trained_moepp, text_corpus, **common)
    with pytest.raises(KeyboardInterrupt):
        run_training(options)
    undo_kill()
    resumed = run_training(dataclasses.replace(options, resume=True))
    expected = {r["step"]: r for r in step_records(uninterrupted.run_dir)}
    got = step_records(resumed.run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert expected[2]["routing_rule_knobs"] != expected[1]["routing_rule_knobs"]  # the knobs were steered
    for record in got:
        for key in ("loss", "routing_rule_knobs", "ffn_experts_per_token"):
            assert record[key] == expected[record["step"]][key], (record["step"], key)
    configs = [json.loads((run.output / "config.json").read_text()) for run in (uninterrupted, resumed)]
    assert configs[0]["routing_rule_layer_knobs"] == configs[1]["routing_rule_layer_knobs"]


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, trained_moepp, text_corpus,
                                                                           monkeypatch, capsys):
    calls = {"n": 0}
    real_compute_losses = recipe.compute_losses

    def nan_at_third_step(*args, **kwargs):
        losses = real_compute_losses(*args, **kwargs)
        calls["n"] += 1
        return dataclasses.replace(losses, loss=losses.loss * float("nan")) if calls["n"] == 3 else losses

    monkeypatch.setattr(recipe, "compute_losses", nan_at_third_step)
    output = tmp_path / "out"
    result = run_cli(capsys, "train", "--model", trained_moepp, "--data", text_corpus / "train.txt", "--output",
                     output, "--steps", "5", "--no-progress", "--target-ffn-per-token", "1.5", "block_size=32",
                     "max_tokens=8000", "checkpoint_every=2", "eval_max_blocks=4")
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    assert "training stopped at step 3: the loss is nan" in message and "step-000002" in message
    assert not output.exists()
    run_dir = tmp_path / "out-training"
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    good = tensors(run_dir / "checkpoints" / "step-000002")
    assert all(torch.isfinite(t).all() for name, t in good.items() if "selection_bias" not in name)
    assert read_metrics(run_dir)[-1]["event"] == "stopped"


def test_lora_is_merged_on_save_into_a_plain_checkpoint(tmp_path, trained_moepp, text_corpus):
    pytest.importorskip("peft")
    report = run_training(small_options(tmp_path, trained_moepp, text_corpus, trainable="lora", steps=2,
                                        learning_rate=1e-2, lora_rank=4))
    assert report.trainable["ffn_expert_parameters_trainable"] == 0  # adapters learn, not the expert weights
    saved = tensors(report.output)
    assert not any("lora" in name for name in saved)
    before = load_causal_lm(trained_moepp).state_dict()
    assert set(saved) == set(before)
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(saved["model.layers.0.mlp.experts.gate_up_proj"],
                           before["model.layers.0.mlp.experts.gate_up_proj"])
    assert load_causal_lm(report.output).config.model_type == "moepp_mixtral"


def test_full_set_with_accumulation_and_activation_checkpointing(tmp_path, trained_moepp, text_corpus):
    plain = run_training(small_options(tmp_path / "a", trained_moepp, text_corpus, trainable="full", steps=1,
                                       gradient_accumulation_steps=2, micro_batch_size=2, learning_rate=1e-4))
    checkpointed = run_training(small_options(tmp_path / "b", trained_moepp, text_corpus, trainable="full",
                                              steps=1, gradient_accumulation_steps=2, micro_batch_size=2,
                                              learning_rate=1e-4, activation_checkpointing=True))
    first, second = step_records(plain.run_dir)[0], step_records(checkpointed.run_dir)[0]
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert second["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-5)
    before = load_causal_lm(trained_moepp).state_dict()["model.layers.0.mlp.experts.down_proj"]
    assert not torch.equal(tensors(plain.output)["model.layers.0.mlp.experts.down_proj"], before)


def test_options_precedence_and_clear_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 7\nlearning_rate: 0.01\ntarget_ffn_per_token: 1.2\nmodel: m\ndata: d\noutput: o\n")
    options = build_options(config, {"steps": 9, "learning_rate": None}, ["target_ffn_per_token=1.1", "lora_rank=4"])
    assert (options.steps, options.learning_rate, options.target_ffn_per_token, options.lora_rank) == (9, 0.01, 1.1, 4)
    assert build_options(config, {}, ["target_ffn_per_token=null"]).target_ffn_per_token is None
    bad = [
        (["learning_rte=1"], "did you mean learning_rate"),
        (["steps=two"], "steps expects int"),
        (["steps"], "KEY=VALUE"),
        (["steps=0"], "steps must be 1 or more"),
        (["trainable=half"], "trainable must be one of"),
        (["balance_tau=0"], "balance_tau must be in"),
    ]
    for overrides, message in bad:
        with pytest.raises(UpcycleError, match=message):
            build_options(config, {}, overrides)
    with pytest.raises(UpcycleError, match="missing model"):
        build_options(None, {"data": "d", "output": "o"})
    config.write_text("- a list\n")
    with pytest.raises(UpcycleError, match="must be a mapping"):
        build_options(config)


def test_cli_refuses_bad_inputs_before_training(tmp_path, capsys, trained_moepp, text_corpus):
    data = str(text_corpus / "train.txt")
    cases = [
        (["--model", tmp_path / "none", "--data", data, "--output", tmp_path / "o"], "is not a checkpoint folder"),
        (["--model", trained_moepp, "--data", data, "--output", trained_moepp], "overlaps the input"),
        (["--model", trained_moepp, "--data", data, "--output", tmp_path / "o", "--lora", "--full"], "choose one"),
        (["--model", trained_moepp, "--data", data, "--output", tmp_path / "o", "--resume"], "holds no complete"),
    ]
    for args, message in cases:
        result = run_cli(capsys, "train", "--no-progress", *args)
        assert result.exit_code == 1 and message in result.stderr, (args, result.stderr)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for path in trained_moepp.iterdir():
        if not path.name.startswith("tokenizer"):
            (no_tokenizer / path.name).symlink_to(path)
    result = run_cli(capsys, "train", "--model", no_tokenizer, "--data", data, "--output", tmp_path / "o")
    assert result.exit_code == 1 and "has no tokenizer" in result.stderr
    assert issubclass(TrainingStopped, UpcycleError)  # the CLI prints it as one sentence
