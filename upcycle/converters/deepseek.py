"""DeepSeek-V2 (V2, V2-Lite) and DeepSeek-V3.

Both: router `mlp.gate.weight` (E, D) in fp32 arithmetic, routed SwiGLU experts
`mlp.experts.{e}.gate_proj/up_proj/down_proj` on the Hub (fused in transformers 5), shared experts
`mlp.shared_experts.*`, the first `first_k_dense_replace` layers dense, weights scaled by `routed_scaling_factor`.
V2: softmax, greedy or group-limited greedy top-k, never renormalised. V3: sigmoid scores, selection on score +
`mlp.gate.e_score_correction_bias` within the best groups, renormalised when `norm_topk_prob` (true for V3).
"""

from .spec import FamilySpec, TensorRule, int_field, swiglu_expert_layouts
from .tensor_rules import LAYER, embeddings_and_head, layer_norms, router, swiglu_mlp


def deepseek_moe_layers(config: dict) -> list[int]:
    """DeepseekV2/V3DecoderLayer's rule: layer i is an MoE layer iff i >= first_k_dense_replace."""
    first_moe = int(config.get("first_k_dense_replace") or 0)
    return list(range(first_moe, int(config["num_hidden_layers"])))


def derive_deepseek(config: dict) -> dict:
    """The widths DeepseekV2/V3Attention computes, and whether queries go through a low-rank projection."""
    nope, rope = int_field(config, "qk_nope_head_dim"), int_field(config, "qk_rope_head_dim")
    q_lora = config.get("q_lora_rank") is not None
    return config | {
        "qk_head_dim": nope + rope,  # per-head query/key width
        "kv_a_proj_size": int_field(config, "kv_lora_rank") + rope,  # latent kv plus the shared rotary key
        "kv_b_head_dim": nope + int_field(config, "v_head_dim"),  # per-head key (no rope) plus value width
        "q_lora": q_lora,  # q_a_proj -> q_a_layernorm -> q_b_proj; else a plain q_proj
        "q_lora_with_bias": q_lora and bool(config.get("attention_bias")),
    }


def latent_attention() -> tuple[TensorRule, ...]:
    """Multi-head latent attention (DeepSeek-V2 and V3): low-rank queries (or a full q_proj when q_lora_rank is
    None), a compressed kv latent with a shared rotary key, `attention_bias` on q_a/kv_a/o."""
    prefix = LAYER + "self_attn."
    q_out = "num_attention_heads*qk_head_dim"
    return (
        TensorRule(prefix + "q_proj.weight", (q_out, "hidden_size"), when="!q_lora"),
        TensorRule(prefix + "q_a_proj.weight", ("q_lora_rank", "hidden_size"), when="q_lora"),
        TensorRule(prefix + "q_a_proj.bias", ("q_lora_rank",), when="q_lora_with_bias"),
        TensorRule(prefix + "q_a_layernorm.weight", ("q_lora_rank",), when="q_lora"),
        TensorRule(prefix + "q_b_proj.weight", (q_out, "q_lora_rank"), when="q_lora"),
        TensorRule(prefix + "kv_a_proj_with_mqa.weight", ("kv_a_proj_size", "hidden_size")),
        TensorRule(prefix + "kv_a_proj_with_mqa.bias", ("kv_a_proj_size",), when="attention_bias"),
        TensorRule(prefix + "kv_a_layernorm.weight", ("kv_lora_rank",)),
        TensorRule(prefix + "kv_b_proj.weight", ("num_attention_heads*kv_b_head_dim", "kv_lora_rank")),
        TensorRule(prefix + "o_proj.weight", ("hidden_size", "num_attention_heads*v_head_dim")),
        TensorRule(prefix + "o_proj.bias", ("hidden_size",), when="attention_bias"),
    )


def deepseek_tensors(mlp_bias: str | None, correction_bias: bool) -> tuple[TensorRule, ...]:
    """Every non-expert tensor: V2's MLPs take `mlp_bias`; V3's router has `e_score_correction_bias` (E,)."""
    shared_width = "moe_intermediate_size*n_shared_experts"  # n_shared_experts experts fused into one MLP
    return (
        *embeddings_and_head(), *layer_norms(), *latent_attention(), router("n_routed_experts"),
        *((TensorRule(LAYER + "mlp.gate.e_score_correction_bias", ("n_routed_experts",), scope="moe_layer"),)
          if correction_bias else ()),
        *swiglu_mlp("mlp.shared_experts", shared_width, scope="moe_layer", bias=mlp_bias),
        *swiglu_mlp("mlp", "intermediate_size", scope="dense_layer", bias=mlp_bias),
    )


DEEPSEEK_V2 = FamilySpec(
    name="deepseek_v2",
    architectures=("DeepseekV2ForCausalLM",),
    model_types=("deepseek_v2",),
    source_class="DeepseekV2ForCausalLM",
    moepp_model_type="moepp_deepseek_v2",
    moepp_config_class="MoePPDeepseekV2Config",
    moepp_model_class="MoePPDeepseekV2ForCausalLM",
    moepp_model_module="modeling_moepp_deepseek_v2",
    n_experts_field="n_routed_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate.weight",
    expert_layouts=swiglu_expert_layouts("n_routed_experts", "moe_intermediate_size"),
    renormalizes_top_k=False,  # transformers' DeepseekV2TopkRouter ignores norm_topk_prob
    moepp_prefix="model.layers.{layer}.mlp.",
    moe_layers=deepseek_moe_layers,
    tensors=deepseek_tensors(mlp_bias="mlp_bias", correction_bias=False),
    config_aliases={"num_experts": "n_routed_experts"},
    config_defaults={"vocab_size": 102400, "intermediate_size": 11008, "num_attention_heads": 32,
                     "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536, "n_shared_experts": 2,
                     "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                     "moe_intermediate_size": 1407, "attention_bias": False, "mlp_bias": False,
                     "tie_word_embeddings": False},
    derive=derive_deepseek,
)

DEEPSEEK_V3 = FamilySpec(
    name="deepseek_v3",
    architectures=("DeepseekV3ForCausalLM",),
    model_types=("deepseek_v3",),
    source_class="DeepseekV3ForCausalLM",
    moepp_model_type="moepp_deepseek_v3",
    moepp_config_class="MoePPDeepseekV3Config",
    moepp_model_class="MoePPDeepseekV3ForCausalLM",
    moepp_model_module="modeling_moepp_deepseek_v3",
    n_experts_field="n_routed_experts",
    top_k_field="num_experts_per_tok",
    moe_prefixes=("model.layers.{layer}.mlp.",),
    router_key="gate.weight",
    expert_layouts=swiglu_expert_layouts("n_routed_experts", "moe_intermediate_size"),
    renormalizes_top_k=True,  # DeepseekV3Config's default for norm_topk_prob
    renormalize_field="norm_topk_prob",
    moepp_prefix="model.layers.{layer}.mlp.",
    moe_layers=deepseek_moe_layers,
    tensors=deepseek_tensors(mlp_bias=None, correction_bias=True),
    unloaded_layers_field="num_nextn_predict_layers",  # the MTP layer (model.layers.61 in DeepSeek-V3)
    config_aliases={"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    config_defaults={"vocab_size": 129280, "intermediate_size": 18432, "num_attention_heads": 128,
                     "first_k_dense_replace": 3, "kv_lora_rank": 512, "q_lora_rank": 1536, "n_shared_experts": 1,
                     "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                     "moe_intermediate_size": 2048, "attention_bias": False, "tie_word_embeddings": False},
    derive=derive_deepseek,
)
