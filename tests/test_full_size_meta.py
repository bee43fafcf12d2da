"""The real Mixtral-8x7B config on the meta device: the conversion's key set and shapes, no memory, no download."""

import pytest
import torch
import transformers
from test_openmoe import OPENMOE_8B
from test_source_tensor_tables import reference_shapes

from upcycle.checkpoint.safetensors_header import TensorInfo
from upcycle.checkpoint.source import SourceCheckpoint
from upcycle.converters import family_for_config
from upcycle.modeling.configuration_upcycle_moepp import MoePPMixtralConfig
from upcycle.modeling.modeling_upcycle_moepp import MoePPMixtralForCausalLM
from upcycle.surgery.moepp_config import moepp_config
from upcycle.surgery.new_tensors import new_tensors
from upcycle.surgery.plan import expected_shapes, plan_conversion, resolve_shape

# config.json of mistralai/Mixtral-8x7B-v0.1 (as published on the Hub)
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32000,
}


def classic_hub_headers(config: dict) -> dict[str, TensorInfo]:
    """The tensor names and shapes of the Hub checkpoint (per-expert w1/w2/w3 under block_sparse_moe)."""
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**config))
    headers = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.experts." in name:
            continue
        headers[name.replace(".mlp.", ".block_sparse_moe.")] = TensorInfo("BF16", tuple(tensor.shape))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    for layer in range(config["num_hidden_layers"]):
        for expert in range(config["num_local_experts"]):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
            headers[prefix + "w1.weight"] = TensorInfo("BF16", (inter, hidden))
            headers[prefix + "w3.weight"] = TensorInfo("BF16", (inter, hidden))
            headers[prefix + "w2.weight"] = TensorInfo("BF16", (hidden, inter))
    return headers


def test_mixtral_8x7b_keys_and_shapes_on_meta():
    headers = classic_hub_headers(MIXTRAL_8X7B)
    assert len(headers) == 32 * (8 * 3 + 7) + 3  # 995 tensors, as in the Hub index
    source = SourceCheckpoint(path=None, config=MIXTRAL_8X7B, shard_files=["model.safetensors"],
                              weight_map={name: "model.safetensors" for name in headers}, tensors=headers)
    plan = plan_conversion(source, family_for_config(MIXTRAL_8X7B), counts=None)
    assert (plan.counts.zero, plan.counts.copy, plan.counts.constant) == (1, 1, 2)  # the paper's 8-expert split
    added = new_tensors(plan, gating_residual=True)
    assert all(tensor.dtype == torch.bfloat16 for tensor in added.values())

    config = MoePPMixtralConfig(**{k: v for k, v in moepp_config(MIXTRAL_8X7B, plan, True, "drop_and_renormalize")
                                   .items() if k != "model_type"})
    with torch.device("meta"):
        model = MoePPMixtralForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with torch.device("meta"):
        source_model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL_8X7B))
    source_in_memory = {name: tuple(t.shape) for name, t in source_model.state_dict().items()}
    assert expected_shapes(family_for_config(MIXTRAL_8X7B), MIXTRAL_8X7B) == source_in_memory  # the tables
    written = source_in_memory | {name: tuple(t.shape) for name, t in added.items()}
    assert written == expected  # every key the MoE++ model has comes from the source or the surgery, same shape
    assert expected["model.layers.31.mlp.gate.residual_weight"] == (12, 12)
    assert "model.layers.0.mlp.gate.residual_weight" not in expected
    n_added = sum(t.numel() for name, t in added.items() if not name.endswith("selection_bias"))
    # per layer: zero-computation router rows (4, 4096), constant vectors (2, 4096), ratio matrices (2, 2, 4096);
    # gating residual (12, 12) in every MoE layer but the first
    assert n_added == 32 * (4 * 4096 + 2 * 4096 + 2 * 2 * 4096) + 31 * 12 * 12


# ---- Every other family at full size: the published config.json values (Hugging Face Hub, file as published by
# each model's authors; `auto_map`, `quantization_config` and other keys transformers' classes do not read are
# kept where the file has them, as a user's download would).

# config.json of Qwen/Qwen1.5-MoE-A2.7B
QWEN1_5_MOE_A2_7B = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.39.0.dev0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
# config.json of Qwen/Qwen2-57B-A14B
QWEN2_57B_A14B = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
    "max_window_layers": 28, "model_type": "qwen2_moe", "moe_intermediate_size": 2560, "norm_topk_prob": False,
    "num_attention_heads": 28, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# config.json of Qwen/Qwen3-30B-A3B
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# config.json of Qwen/Qwen3-235B-A22B
QWEN3_235B_A22B = QWEN3_30B_A3B | {
    "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 94, "moe_intermediate_size": 1536,
    "num_attention_heads": 64, "num_hidden_layers": 94,
}
# config.json of allenai/OLMoE-1B-7B-0924
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}
# config.json of deepseek-ai/DeepSeek-V2-Lite
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                 "AutoModel": "modeling_deepseek.DeepseekV2Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128,
    "vocab_size": 102400,
}
# config.json of deepseek-ai/DeepSeek-V3
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

# name -> (config, MoE layers, FFN experts N, zero/copy/constant split by the paper's rule)
FULL_SIZE = {
    "Qwen1.5-MoE-A2.7B": (QWEN1_5_MOE_A2_7B, list(range(24)), 60, (1, 1, 13)),
    "Qwen2-57B-A14B": (QWEN2_57B_A14B, list(range(28)), 64, (1, 1, 14)),
    "Qwen3-30B-A3B": (QWEN3_30B_A3B, list(range(48)), 128, (1, 1, 30)),
    "Qwen3-235B-A22B": (QWEN3_235B_A22B, list(range(94)), 128, (1, 1, 30)),
    "OLMoE-1B-7B": (OLMOE_1B_7B, list(range(16)), 64, (1, 1, 14)),
    "DeepSeek-V2-Lite": (DEEPSEEK_V2_LITE, list(range(1, 27)), 64, (1, 1, 14)),
    "DeepSeek-V3": (DEEPSEEK_V3, list(range(3, 61)), 256, (1, 1, 62)),
}


def per_expert_hub_headers(spec, config: dict, in_memory: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """Names and shapes of a Hub checkpoint in the family's per-expert layout (gate_proj/up_proj/down_proj), from
    the source class's in-memory shapes."""
    aliased = spec.with_aliases(config)
    headers = {name: TensorInfo("BF16", shape) for name, shape in in_memory.items() if ".mlp.experts." not in name}
    per_expert = next(layout for layout in spec.expert_layouts if layout.name == "per-expert")
    for layer in spec.moe_layer_indices(config):
        for expert in range(spec.n_experts(config)):
            for template, rule in per_expert.keys.items():
                name = (spec.moepp_prefix + template).format(layer=layer, expert=expert)
                headers[name] = TensorInfo("BF16", resolve_shape(rule, aliased))
    return headers


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_family_keys_and_shapes_on_meta(name):
    from upcycle.modeling import moepp_class

    config, moe_layers, n_ffn, split = FULL_SIZE[name]
    spec = family_for_config(config)
    source_in_memory = reference_shapes(spec, config)  # transformers' class on the meta device
    assert expected_shapes(spec, config) == source_in_memory  # the spec's tables agree with it
    headers = per_expert_hub_headers(spec, config, source_in_memory)
    source = SourceCheckpoint(path=None, config=config, shard_files=["model.safetensors"],
                              weight_map={key: "model.safetensors" for key in headers}, tensors=headers)
    plan = plan_conversion(source, spec, counts=None)
    assert (plan.moe_layers, plan.n_ffn, plan.expert_layout) == (moe_layers, n_ffn, "per-expert")
    assert (plan.counts.zero, plan.counts.copy, plan.counts.constant) == split
    added = new_tensors(plan, gating_residual=True, device="meta")
    written_config = moepp_config(config, plan, True)
    config_class = moepp_class(spec.moepp_config_module, spec.moepp_config_class)
    moepp = config_class(**{key: value for key, value in written_config.items() if key != "model_type"})
    assert moepp.moe_layers() == moe_layers
    with torch.device("meta"):
        model = moepp_class(spec.moepp_model_module, spec.moepp_model_class)(moepp)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    written = source_in_memory | {key: tuple(t.shape) for key, t in added.items()}
    assert written == expected  # every key of the MoE++ model comes from the source or the surgery, same shape
    n_total = n_ffn + sum(split)
    last, first = moe_layers[-1], moe_layers[0]
    assert expected[f"model.layers.{last}.mlp.gate.residual_weight"] == (n_total, n_total)
    assert f"model.layers.{first}.mlp.gate.residual_weight" not in expected  # the first MoE layer has none
    if first > 0:  # dense layers before the first MoE layer have no router at all
        assert not any(key.startswith("model.layers.0.mlp.gate.") for key in expected)


def test_openmoe_8b_tables_equal_the_meta_model():
    """The project's OpenMoE class is the reference where transformers has none."""
    spec = family_for_config(OPENMOE_8B)
    assert expected_shapes(spec, OPENMOE_8B) == reference_shapes(spec, OPENMOE_8B)
