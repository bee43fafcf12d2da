"""The model card of every checkpoint: huggingface_hub's ModelCard, parsed back with ModelCard.load."""

import json
import shutil
from pathlib import Path

from cli_runner import run_cli
from huggingface_hub import ModelCard

from upcycle.checkpoint.inspect import inspect_checkpoint
from upcycle.checkpoint.model_card import build_model_card, looks_like_repo_id, write_model_card

MIXTRAL_ID = "mistralai/Mixtral-8x7B-v0.1"
# A 1x1 PNG (the smallest valid file), standing in for the plots `upcycle eval --plots` writes.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5b1f1cd0000000049454e44ae426082"
)


def copy_of(folder: Path, tmp_path: Path, name: str = "checkpoint") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def test_converted_checkpoint_card_parses_with_the_hub_fields(capsys, tmp_path, per_expert_source):
    source = copy_of(per_expert_source, tmp_path, "source")
    (source / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# The source's own card\n")
    output = tmp_path / "moepp"
    assert run_cli(capsys, "convert", source, output).exit_code == 0

    card = ModelCard.load(output / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"moe", "moe++"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"  # carried over from the source's front matter
    assert "base_model" not in data and "base_model_relation" not in data  # a local source has no Hub id
    config = json.loads((output / "config.json").read_text())
    for kind, count in [("ffn", config["num_local_experts"]), ("zero", config["n_zero_experts"]),
                        ("copy", config["n_copy_experts"]), ("constant", config["n_constant_experts"])]:
        assert f"| {kind} | {count} |" in card.text
    budget = inspect_checkpoint(output).ffn_experts_per_token
    assert f"mean FFN experts per token: {budget:.2f}" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("moepp", trust_remote_code=True)' in card.text
    [step] = json.loads((output / "upcycle.json").read_text())["history"]
    assert step["command"].startswith("upcycle convert ") and f"\n{step['command']}\n" in card.text
    assert "## Evaluation" not in card.text and "## Plots" not in card.text  # nothing measured yet
    # Round trip: what ModelCard.load parsed writes back byte for byte, and a rebuild gives the same card.
    assert str(card) == (output / "README.md").read_text()
    assert str(build_model_card(output, name="moepp")) == str(card)


def test_base_model_and_relation_round_trip(tmp_path, converted):
    checkpoint = copy_of(converted, tmp_path)
    written = write_model_card(checkpoint, name="me/tiny-moepp", base_model=MIXTRAL_ID)
    loaded = ModelCard.load(checkpoint / "README.md")
    assert str(loaded) == written  # the written text is a fixed point of huggingface_hub's parser
    assert loaded.data.base_model == MIXTRAL_ID
    # A full set of weights derived from the base (new router rows, experts, later training): a finetune.
    assert loaded.data.to_dict()["base_model_relation"] == "finetune"
    assert loaded.data.to_dict() == build_model_card(checkpoint, name="me/tiny-moepp").data.to_dict()
    assert f"[`{MIXTRAL_ID}`](https://huggingface.co/{MIXTRAL_ID})" in loaded.text
    # A later refresh (push) without --base-model keeps the one the card already names.
    assert build_model_card(checkpoint).data.base_model == MIXTRAL_ID
    # A folder holding only a PEFT adapter is related as an adapter.
    (checkpoint / "adapter_config.json").write_text("{}")
    assert build_model_card(checkpoint).data.to_dict()["base_model_relation"] == "adapter"


def test_provenance_source_that_looks_like_a_hub_id_is_the_base_model(tmp_path, converted):
    checkpoint = copy_of(converted, tmp_path)
    (checkpoint / "README.md").unlink()
    record = json.loads((checkpoint / "upcycle.json").read_text())
    (checkpoint / "upcycle.json").write_text(json.dumps(record | {"source": MIXTRAL_ID}))
    assert build_model_card(checkpoint).data.base_model == MIXTRAL_ID
    assert looks_like_repo_id(MIXTRAL_ID)
    assert not looks_like_repo_id(str(converted)) and not looks_like_repo_id("./models/x")
    assert not looks_like_repo_id("models") and not looks_like_repo_id("a/b/c")


def test_eval_results_and_plots_enter_the_card(tmp_path, converted):
    checkpoint = copy_of(converted, tmp_path)
    record = json.loads((checkpoint / "upcycle.json").read_text())
    record["history"] += [
        {"step": "calibrate", "command": "upcycle calibrate ck --data d.txt --target-ffn-per-token 1.5 --output o",
         "measured_ffn_experts_per_token": 1.5, "metrics": {"perplexity": 12.345, "ffn_experts_per_token": 1.5}},
        {"step": "train", "command": "upcycle train --model o --data d.txt --output t --steps 20",
         "metrics": {"perplexity": 11.0, "kl_to_source": {"mean": 0.0123}, "per_layer": [1, 2]}},
    ]
    (checkpoint / "upcycle.json").write_text(json.dumps(record))
    (checkpoint / "plots").mkdir()
    (checkpoint / "plots" / "quality_vs_compute.png").write_bytes(TINY_PNG)

    written = write_model_card(checkpoint, name="me/tiny-moepp")
    text = ModelCard.load(checkpoint / "README.md").text
    assert "| step | perplexity | ffn_experts_per_token | kl_to_source/mean |" in text
    assert "| calibrate | 12.35 | 1.5 |  |" in text and "| train | 11 |  | 0.0123 |" in text
    assert "![quality vs compute](plots/quality_vs_compute.png)" in text
    convert, *commands = [step["command"] for step in record["history"]]
    assert convert == ""  # the fixture converts from Python: the card says so, with the options, in a comment
    assert "```bash\n# convert called from Python with options {" in text
    assert "\n" + "\n".join(commands) + "\n```" in text
    assert written.endswith(text)  # the body after the front matter, as ModelCard.load parses it


def test_budget_that_depends_on_the_data_is_said_so(monkeypatch, tmp_path, converted):
    """Raised selection biases and no measurement yet: inspect reports None, the card says how to measure it."""
    import dataclasses

    from upcycle.checkpoint import model_card

    summary = dataclasses.replace(inspect_checkpoint(converted), ffn_experts_per_token=None,
                                  parameters_active_per_token=None)
    monkeypatch.setattr(model_card, "inspect_checkpoint", lambda path: summary)
    text = build_model_card(copy_of(converted, tmp_path)).text
    assert "mean FFN experts per token: depends on the data" in text and "active parameters" not in text
