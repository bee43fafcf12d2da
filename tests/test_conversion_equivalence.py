"""Function preservation: converted tiny Mixtrals give transformers' MixtralForCausalLM logits and generations."""

import json

import pytest
import torch
from conftest import save_source, tiny_mixtral
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from upcycle.surgery.convert import ConvertOptions, convert

LAYOUTS = [("per-expert", False), ("per-expert", True), ("fused", False), ("fused", True)]


@pytest.mark.parametrize("layout,sharded", LAYOUTS)
def test_logits_and_generation_equal_source(tmp_path, layout, sharded):
    source = tiny_mixtral(seed=1)
    save_source(source, tmp_path / "src", layout, sharded)
    if sharded:
        assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    report = convert(tmp_path / "src", tmp_path / "out", ConvertOptions())
    assert report.plan.expert_layout == layout

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "MoePPMixtralForCausalLM"
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in source.parameters())
    tokens = torch.randint(0, source.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = source(tokens).logits, model(tokens).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    prompt = tokens[:1, :5]
    reference = source.generate(prompt, max_new_tokens=12, do_sample=False)
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, reference)
    assert torch.equal(without_cache, reference)


def test_unchanged_tensors_keep_names_and_bytes(tmp_path, per_expert_source):
    convert(per_expert_source, tmp_path / "out", ConvertOptions())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(per_expert_source / "model.safetensors"), "pt") as source_file:
        for name in source_file.keys():  # noqa: SIM118 (safe_open is not a dict)
            with safe_open(str(tmp_path / "out" / index[name]), "pt") as output_file:
                assert torch.equal(output_file.get_tensor(name), source_file.get_tensor(name)), name
    source_bytes = (per_expert_source / "model.safetensors").read_bytes()
    assert (tmp_path / "out" / "model-00001-of-00002.safetensors").read_bytes() == source_bytes
    assert not (tmp_path / "out" / "model.safetensors").exists()  # transformers would ignore the index


def test_outputs_carry_provenance_card_and_tokenizer_files(tmp_path, per_expert_source):
    (per_expert_source / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    try:
        convert(per_expert_source, tmp_path / "out", ConvertOptions(n_constant=3), command="upcycle convert a b")
    finally:
        (per_expert_source / "tokenizer_config.json").unlink()
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    assert (out / "generation_config.json").is_file()
    record = json.loads((out / "upcycle.json").read_text())
    assert record["tool"] == "upcycle" and record["source"] == per_expert_source.name  # no private path
    assert set(record["source_files_sha256"]) == {"model.safetensors"}
    assert len(record["source_files_sha256"]["model.safetensors"]) == 64
    assert record["history"][0]["options"]["n_constant"] == 3
    config = json.loads((out / "config.json").read_text())
    assert (config["n_zero_experts"], config["n_copy_experts"], config["n_constant_experts"]) == (1, 1, 3)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycle_moepp.MoePPMixtralForCausalLM"
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "upcycle convert a b" in card


@pytest.mark.parametrize("counts", [(0, 0, 0), (2, 0, 1), (0, 3, 0), (1, 1, 5)])
def test_any_expert_counts_preserve_the_function(tmp_path, per_expert_source, source_model, counts):
    n_zero, n_copy, n_constant = counts
    convert(per_expert_source, tmp_path / "out",
            ConvertOptions(n_zero=n_zero, n_copy=n_copy, n_constant=n_constant, gating_residual=n_zero % 2 == 0))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, source_model(tokens).logits, atol=1e-5, rtol=0)
