"""Function preservation for every family beyond Mixtral: tiny random sources, built by transformers' own classes
and saved in both on-disk layouts, convert to MoE++ checkpoints whose logits and greedy generations (with and
without KV cache) equal the source's; the converted checkpoints load with transformers alone (upcycle cannot even
be imported in the loader).

Each tiny config exercises what its family adds: dense layers between MoE layers (Qwen2-MoE `mlp_only_layers`,
DeepSeek `first_k_dense_replace`), shared experts, no renormalisation (Qwen2-MoE, OLMoE, DeepSeek-V2),
renormalisation (Qwen3-MoE, DeepSeek-V3), group-limited top-k (DeepSeek-V2 and V3), sigmoid scores with a
non-zero correction bias and a scaling factor (DeepSeek-V3).
"""

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from upcycle.converters import family_for_config
from upcycle.surgery.convert import ConvertOptions, convert

COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)
DEEPSEEK_ATTENTION = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                          v_head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
                          first_k_dense_replace=1)


@dataclass(frozen=True)
class TinyFamily:
    name: str
    config_class: str
    model_class: str
    fields: dict
    router_scale: float  # sharpen transformers' near-uniform router init so routing decisions are not ties


FAMILIES = {
    "qwen2_moe": TinyFamily("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36, num_hidden_layers=4,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1]), 25.0),
    "qwen3_moe": TinyFamily("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3, head_dim=8, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True), 25.0),
    "olmoe": TinyFamily("olmoe", "OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=24, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        eos_token_id=None), 25.0),  # OLMoE's default eos id lies outside the tiny vocabulary
    "deepseek_v3": TinyFamily("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        DEEPSEEK_ATTENTION, q_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True), 5.0),
    "deepseek_v2": TinyFamily("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        DEEPSEEK_ATTENTION, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=2,
        routed_scaling_factor=1.5), 25.0),
}


def tiny_source(family: TinyFamily, seed: int = 0, **overrides):
    """A random source model of the family, routers sharpened (and DeepSeek-V3's correction bias non-zero)."""
    torch.manual_seed(seed)
    config = getattr(transformers, family.config_class)(**(COMMON | family.fields | overrides))
    model = getattr(transformers, family.model_class)(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is None or not hasattr(gate, "top_k"):
                continue  # a dense layer
            gate.weight.mul_(family.router_scale)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(0.2 * torch.randn(gate.weight.shape[0], generator=generator))
    return model


def convert_source(source, folder, layout: str, options: ConvertOptions | None = None):
    source.save_pretrained(folder / "src", save_original_format=(layout == "per-expert"))
    report = convert(folder / "src", folder / "out", options or ConvertOptions())
    return report, folder / "out"


def assert_same_function(source, converted, tokens: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        expected, actual = source(tokens).logits, converted(tokens).logits
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
    prompt = tokens[:1, :5]
    reference = source.generate(prompt, max_new_tokens=10, do_sample=False)
    with_cache = converted.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    without_cache = converted.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, reference)
    assert torch.equal(without_cache, reference)


def probe(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (3, 13), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_conversion_preserves_the_function(tmp_path, name, layout):
    family = FAMILIES[name]
    source = tiny_source(family, seed=1)
    report, out = convert_source(source, tmp_path, layout)
    assert report.plan.spec.name == name and report.plan.expert_layout == layout
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == report.plan.spec.moepp_model_class
    moe_layers = [i for i, layer in enumerate(model.model.layers) if layer.is_moe_layer]
    assert moe_layers == report.plan.moe_layers
    assert_same_function(source, model, probe())


LOAD_EACH = textwrap.dedent(
    """
    import json, sys
    sys.modules["upcycle"] = None  # any `import upcycle` now fails: only the checkpoints' own code may run
    import torch
    from transformers import AutoModelForCausalLM
    tokens = torch.tensor(json.loads(sys.argv[1]))
    results = {}
    for path in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(tokens).logits
        generated = model.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False)
        results[path] = {"module": type(model).__module__, "logits": logits.tolist(), "generated": generated.tolist()}
    print(json.dumps(results))
    """
)


def test_every_family_loads_with_transformers_alone(tmp_path):
    """One interpreter (start-up is the slow part) loads every family's converted checkpoint without upcycle."""
    sources, outputs = {}, {}
    for name, family in FAMILIES.items():
        sources[name] = tiny_source(family, seed=2)
        _, outputs[name] = convert_source(sources[name], tmp_path / name, "per-expert")
    tokens = probe(5)[:2, :10]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_EACH, json.dumps(tokens.tolist()), *map(str, outputs.values())],
        capture_output=True, text=True, cwd=tmp_path, check=False,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    for name, source in sources.items():
        loaded = payload[str(outputs[name])]
        assert loaded["module"].startswith("transformers_modules"), name
        with torch.no_grad():
            expected = source(tokens).logits
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-5, rtol=0)
        assert loaded["generated"] == source.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False).tolist()


def test_gating_residual_links_consecutive_moe_layers_across_dense_ones(tmp_path):
    """Qwen2-MoE with layer 1 dense: MoE layers 0, 2, 3; layer 2's residual reads layer 0's logits."""
    source = tiny_source(FAMILIES["qwen2_moe"], seed=3)
    report, out = convert_source(source, tmp_path, "fused")
    assert report.plan.moe_layers == [0, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    gates = [block.gate for block in model.moe_blocks()]
    assert [gate.residual_weight is None for gate in gates] == [True, False, False]
    tokens = probe(7)
    with torch.no_grad():
        before = model(tokens, output_router_logits=True).router_logits
        gates[1].residual_weight.copy_(torch.eye(gates[1].residual_weight.shape[0]))  # G_2 = W_2 x + G_0
        after = model(tokens, output_router_logits=True).router_logits
    assert len(before) == 3
    torch.testing.assert_close(after[1], before[1] + before[0])


def test_deepseek_v3_source_fields_reach_the_router(tmp_path):
    source = tiny_source(FAMILIES["deepseek_v3"], seed=4)
    _, out = convert_source(source, tmp_path, "per-expert")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    gate = model.moe_blocks()[0].gate
    torch.testing.assert_close(gate.e_score_correction_bias, source.model.layers[1].mlp.gate.e_score_correction_bias)
    assert gate.e_score_correction_bias.abs().sum() > 0 and gate.scaling_factor == 2.5 and gate.renormalize
    assert model.moe_blocks()[0].gate.residual_weight is None  # layer 1 is the first MoE layer


def test_family_specs_agree_with_transformers_on_moe_layers():
    """The spec's moe_layers hook, the MoE++ config's moe_layers() and transformers' own layers agree."""
    cases = [("qwen2_moe", dict(mlp_only_layers=[], decoder_sparse_step=2)), ("qwen2_moe", {}),
             ("deepseek_v2", {}), ("deepseek_v3", dict(first_k_dense_replace=2)), ("olmoe", {})]
    for name, overrides in cases:
        family = FAMILIES[name]
        config = getattr(transformers, family.config_class)(**(COMMON | family.fields | overrides))
        config_dict = config.to_dict() | {"architectures": [family.model_class]}
        spec = family_for_config(config_dict)
        with torch.device("meta"):
            model = getattr(transformers, family.model_class)(config)
        sparse = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
        assert spec.moe_layers(config_dict) == sparse, name


def test_activation_checkpointing_across_dense_layers_gives_the_same_gradients(tmp_path):
    """Qwen2-MoE with a dense layer between MoE layers: the gating residual crosses a checkpointed dense layer."""
    _, out = convert_source(tiny_source(FAMILIES["qwen2_moe"], seed=6), tmp_path, "fused")
    tokens = probe(8)
    gradients = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).train()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for block in model.moe_blocks():
                block.gate.selection_bias.fill_(0.0)
                if block.gate.residual_weight is not None:
                    block.gate.residual_weight.copy_(0.1 * torch.randn(block.gate.residual_weight.shape,
                                                                       generator=generator))
        if checkpointing:
            model.activation_checkpointing_enable()
        model(tokens, labels=tokens, output_router_logits=True, use_cache=False).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    assert "model.layers.2.mlp.gate.residual_weight" in gradients[0]  # reached across dense layer 1
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5)


def test_deepseek_v3_multi_token_prediction_layer_is_carried_over(tmp_path):
    """DeepSeek-V3 checkpoints hold an extra decoder layer (model.layers.61: multi-token prediction) that
    transformers does not load: conversion keeps its tensors byte for byte and the function is unchanged."""
    from safetensors.torch import load_file, save_file

    source = tiny_source(FAMILIES["deepseek_v3"], seed=6)
    source.save_pretrained(tmp_path / "src", save_original_format=True)
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    last = source.config.num_hidden_layers - 1  # the MTP layer repeats a decoder layer's tensors, plus its own
    mtp = {name.replace(f"model.layers.{last}.", f"model.layers.{last + 1}."): tensor.clone()
           for name, tensor in state.items() if name.startswith(f"model.layers.{last}.")}
    hidden = source.config.hidden_size
    mtp |= {f"model.layers.{last + 1}.enorm.weight": torch.ones(hidden),
            f"model.layers.{last + 1}.hnorm.weight": torch.ones(hidden),
            f"model.layers.{last + 1}.eh_proj.weight": torch.randn(hidden, 2 * hidden)}
    save_file(state | mtp, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.pop("num_mtp_layers", None)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))

    convert(tmp_path / "src", tmp_path / "out", ConvertOptions())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    written = {}
    for shard in set(index.values()):
        written |= load_file(str(tmp_path / "out" / shard))
    for name, tensor in mtp.items():
        assert torch.equal(written[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    assert len(model.model.layers) == source.config.num_hidden_layers
    assert_same_function(source, model.eval(), probe(8))
