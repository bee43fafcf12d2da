"""MoE++ for Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B), in transformers' modular style.

What differs from Qwen3-MoE: the sparse block's router (MoE++ router over FFN + zero-computation experts, with the
gating residual); everything else is Qwen3-MoE's, through the shared mixins of moepp_model.py. Routing is
Qwen3-MoE's own: softmax, top-k, renormalised when `norm_topk_prob` is set (true in the published checkpoints),
weights cast to the model dtype. No shared expert. Dense layers (`mlp_only_layers`, `decoder_sparse_step`) stay
Qwen3MoeMLP; the gating residual skips them.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
The FFN experts are transformers' own `Qwen3MoeExperts` (decorated with @use_experts_implementation, so the
grouped_mm / batched_mm / eager implementations all apply).
"""

from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeDecoderLayer,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoePreTrainedModel,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
    Qwen3MoeSparseMoeBlock,
)
from transformers.utils.output_capturing import OutputRecorder

from .configuration_upcycle_moepp import MoePPQwen3MoeConfig
from .moepp_layer import ExpertLayout, MoePPRouter
from .moepp_model import (
    MoePPBlockMixin,
    MoePPDecoderLayerMixin,
    MoePPForCausalLMMixin,
    MoePPModelMixin,
    MoePPPreTrainedMixin,
    register_source_layout,
)

register_source_layout(MoePPQwen3MoeConfig.model_type, "qwen3_moe")


class MoePPQwen3MoeSparseMoeBlock(MoePPBlockMixin, Qwen3MoeSparseMoeBlock):
    """Qwen3-MoE's routed experts behind the MoE++ router."""

    routing_weights_in_input_dtype = True  # Qwen3MoeTopKRouter casts its top-k weights to the logits' dtype

    def __init__(self, config: MoePPQwen3MoeConfig, has_residual: bool):
        super().__init__(config)
        layout = ExpertLayout.from_config(config, n_ffn=config.num_experts)
        self.add_moepp_parts(MoePPRouter(
            layout, config.hidden_size, config.num_experts_per_tok, has_residual,
            renormalize=config.norm_topk_prob, zero_expert_semantics=config.zero_expert_semantics,
            zero_computation_denominator=config.zero_computation_denominator,
        ), config.hidden_size)


class MoePPQwen3MoeDecoderLayer(MoePPDecoderLayerMixin, Qwen3MoeDecoderLayer):
    moe_block_class = MoePPQwen3MoeSparseMoeBlock


class MoePPQwen3MoePreTrainedModel(MoePPPreTrainedMixin, Qwen3MoePreTrainedModel):
    config: MoePPQwen3MoeConfig
    config_class = MoePPQwen3MoeConfig
    _no_split_modules = ["MoePPQwen3MoeDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoePPQwen3MoeDecoderLayer, index=1),  # (hidden, G_j); None in dense layers
        "hidden_states": OutputRecorder(MoePPQwen3MoeDecoderLayer, index=0),
        "attentions": OutputRecorder(Qwen3MoeAttention, index=1),
    }


class MoePPQwen3MoeModel(MoePPModelMixin, MoePPQwen3MoePreTrainedModel, Qwen3MoeModel):
    decoder_layer_class = MoePPQwen3MoeDecoderLayer
    norm_class = Qwen3MoeRMSNorm
    rotary_class = Qwen3MoeRotaryEmbedding
    mask_rule = "sliding_window"  # sliding-window mask when config.sliding_window is set (use_sliding_window)


class MoePPQwen3MoeForCausalLM(MoePPForCausalLMMixin, MoePPQwen3MoePreTrainedModel, Qwen3MoeForCausalLM):
    model_class = MoePPQwen3MoeModel


__all__ = ["MoePPQwen3MoeForCausalLM", "MoePPQwen3MoeModel", "MoePPQwen3MoePreTrainedModel"]
