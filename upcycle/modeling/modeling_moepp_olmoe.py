"""MoE++ for OLMoE (OLMoE-1B-7B), in transformers' modular style.

What differs from OLMoE: the sparse block's router (MoE++ router over FFN + zero-computation experts, with the
gating residual); everything else (attention with q/k norms, norms, rotary) is OLMoE's, through the shared mixins
of moepp_model.py. Routing is OLMoE's own: softmax, top-k, renormalised only when `norm_topk_prob` is set (false
for OLMoE-1B-7B), weights cast to the model dtype. Every layer is an MoE layer; no shared expert.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
The FFN experts are transformers' own `OlmoeExperts` (decorated with @use_experts_implementation, so the
grouped_mm / batched_mm / eager implementations all apply).
"""

from transformers.models.olmoe.modeling_olmoe import (
    OlmoeAttention,
    OlmoeDecoderLayer,
    OlmoeForCausalLM,
    OlmoeModel,
    OlmoePreTrainedModel,
    OlmoeRMSNorm,
    OlmoeRotaryEmbedding,
    OlmoeSparseMoeBlock,
)
from transformers.utils.output_capturing import OutputRecorder

from .configuration_upcycle_moepp import MoePPOlmoeConfig
from .moepp_layer import ExpertLayout, MoePPRouter
from .moepp_model import (
    MoePPBlockMixin,
    MoePPDecoderLayerMixin,
    MoePPForCausalLMMixin,
    MoePPModelMixin,
    MoePPPreTrainedMixin,
    register_source_layout,
)

register_source_layout(MoePPOlmoeConfig.model_type, "olmoe")


class MoePPOlmoeSparseMoeBlock(MoePPBlockMixin, OlmoeSparseMoeBlock):
    """OLMoE's routed experts behind the MoE++ router."""

    routing_weights_in_input_dtype = True  # OlmoeTopKRouter casts its top-k weights to the logits' dtype

    def __init__(self, config: MoePPOlmoeConfig, has_residual: bool):
        super().__init__(config)
        layout = ExpertLayout.from_config(config, n_ffn=config.num_experts)
        self.add_moepp_parts(MoePPRouter(
            layout, config.hidden_size, config.num_experts_per_tok, has_residual,
            renormalize=config.norm_topk_prob, zero_expert_semantics=config.zero_expert_semantics,
            zero_computation_denominator=config.zero_computation_denominator,
        ), config.hidden_size)


class MoePPOlmoeDecoderLayer(MoePPDecoderLayerMixin, OlmoeDecoderLayer):
    moe_block_class = MoePPOlmoeSparseMoeBlock


class MoePPOlmoePreTrainedModel(MoePPPreTrainedMixin, OlmoePreTrainedModel):
    config: MoePPOlmoeConfig
    config_class = MoePPOlmoeConfig
    _no_split_modules = ["MoePPOlmoeDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoePPOlmoeDecoderLayer, index=1),  # (hidden, G_j); None in dense layers
        "hidden_states": OutputRecorder(MoePPOlmoeDecoderLayer, index=0),
        "attentions": OutputRecorder(OlmoeAttention, index=1),
    }


class MoePPOlmoeModel(MoePPModelMixin, MoePPOlmoePreTrainedModel, OlmoeModel):
    decoder_layer_class = MoePPOlmoeDecoderLayer
    norm_class = OlmoeRMSNorm
    rotary_class = OlmoeRotaryEmbedding
    mask_rule = "causal"


class MoePPOlmoeForCausalLM(MoePPForCausalLMMixin, MoePPOlmoePreTrainedModel, OlmoeForCausalLM):
    model_class = MoePPOlmoeModel


__all__ = ["MoePPOlmoeForCausalLM", "MoePPOlmoeModel", "MoePPOlmoePreTrainedModel"]
