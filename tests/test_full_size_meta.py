"""The real Mixtral-8x7B config on the meta device: the conversion's key set and shapes, no memory, no download."""

import torch
import transformers

from upcycle.checkpoint.safetensors_header import TensorInfo
from upcycle.checkpoint.source import SourceCheckpoint
from upcycle.converters import family_for_config
from upcycle.modeling.configuration_upcycle_moepp import MoePPMixtralConfig
from upcycle.modeling.modeling_upcycle_moepp import MoePPMixtralForCausalLM
from upcycle.surgery.moepp_config import moepp_config
from upcycle.surgery.new_tensors import new_tensors
from upcycle.surgery.plan import plan_conversion

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
    written = source_in_memory | {name: tuple(t.shape) for name, t in added.items()}
    assert written == expected  # every key the MoE++ model has comes from the source or the surgery, same shape
    assert expected["model.layers.31.mlp.gate.residual_weight"] == (12, 12)
    assert "model.layers.0.mlp.gate.residual_weight" not in expected
    n_added = sum(t.numel() for name, t in added.items() if not name.endswith("selection_bias"))
    # per layer: zero-computation router rows (4, 4096), constant vectors (2, 4096), ratio matrices (2, 2, 4096);
    # gating residual (12, 12) in every MoE layer but the first
    assert n_added == 32 * (4 * 4096 + 2 * 4096 + 2 * 2 * 4096) + 31 * 12 * 12
