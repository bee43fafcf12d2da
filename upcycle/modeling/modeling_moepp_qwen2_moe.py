"""MoE++ for Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B), in transformers' modular style.

What differs from Qwen2-MoE: the sparse block's router (MoE++ router over FFN + zero-computation experts, with the
gating residual); everything else is Qwen2-MoE's, through the shared mixins of moepp_model.py. Routing is Qwen2-MoE's
own: softmax, top-k, renormalised only when `norm_topk_prob` is set (false in the published checkpoints), weights
cast to the model dtype; the shared expert, gated by sigmoid(shared_expert_gate x), is added to every token.
Dense layers (`mlp_only_layers`, `decoder_sparse_step`) stay Qwen2MoeMLP; the gating residual skips them.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
The FFN experts are transformers' own `Qwen2MoeExperts` (decorated with @use_experts_implementation, so the
grouped_mm / batched_mm / eager implementations all apply).
"""

import torch
import torch.nn.functional as F
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeAttention,
    Qwen2MoeDecoderLayer,
    Qwen2MoeForCausalLM,
    Qwen2MoeModel,
    Qwen2MoePreTrainedModel,
    Qwen2MoeRMSNorm,
    Qwen2MoeRotaryEmbedding,
    Qwen2MoeSparseMoeBlock,
)
from transformers.utils.output_capturing import OutputRecorder

from .configuration_upcycle_moepp import MoePPQwen2MoeConfig
from .moepp_layer import ExpertLayout, MoePPRouter
from .moepp_model import (
    MoePPBlockMixin,
    MoePPDecoderLayerMixin,
    MoePPForCausalLMMixin,
    MoePPModelMixin,
    MoePPPreTrainedMixin,
    register_source_layout,
)

register_source_layout(MoePPQwen2MoeConfig.model_type, "qwen2_moe")


class MoePPQwen2MoeSparseMoeBlock(MoePPBlockMixin, Qwen2MoeSparseMoeBlock):
    """Qwen2-MoE's block (routed experts + sigmoid-gated shared expert) behind the MoE++ router."""

    routing_weights_in_input_dtype = True  # Qwen2MoeTopKRouter casts its top-k weights to the logits' dtype

    def __init__(self, config: MoePPQwen2MoeConfig, has_residual: bool):
        super().__init__(config)
        layout = ExpertLayout.from_config(config, n_ffn=config.num_experts)
        self.add_moepp_parts(MoePPRouter(
            layout, config.hidden_size, config.num_experts_per_tok, has_residual,
            renormalize=config.norm_topk_prob, zero_expert_semantics=config.zero_expert_semantics,
            zero_computation_denominator=config.zero_computation_denominator,
        ), config.hidden_size)

    def shared_expert_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, D): sigmoid(shared_expert_gate x) * shared_expert(x), as Qwen2-MoE computes it."""
        return F.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)


class MoePPQwen2MoeDecoderLayer(MoePPDecoderLayerMixin, Qwen2MoeDecoderLayer):
    moe_block_class = MoePPQwen2MoeSparseMoeBlock


class MoePPQwen2MoePreTrainedModel(MoePPPreTrainedMixin, Qwen2MoePreTrainedModel):
    config: MoePPQwen2MoeConfig
    config_class = MoePPQwen2MoeConfig
    _no_split_modules = ["MoePPQwen2MoeDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoePPQwen2MoeDecoderLayer, index=1),  # (hidden, G_j); None in dense layers
        "hidden_states": OutputRecorder(MoePPQwen2MoeDecoderLayer, index=0),
        "attentions": OutputRecorder(Qwen2MoeAttention, index=1),
    }


class MoePPQwen2MoeModel(MoePPModelMixin, MoePPQwen2MoePreTrainedModel, Qwen2MoeModel):
    decoder_layer_class = MoePPQwen2MoeDecoderLayer
    norm_class = Qwen2MoeRMSNorm
    rotary_class = Qwen2MoeRotaryEmbedding
    mask_rule = "layer_types"  # one mask per config.layer_types entry (full or sliding attention)


class MoePPQwen2MoeForCausalLM(MoePPForCausalLMMixin, MoePPQwen2MoePreTrainedModel, Qwen2MoeForCausalLM):
    model_class = MoePPQwen2MoeModel


__all__ = ["MoePPQwen2MoeForCausalLM", "MoePPQwen2MoeModel", "MoePPQwen2MoePreTrainedModel"]
