"""MoE++ for the Mixtral family, in transformers' modular style: subclass Mixtral, write only what differs.

What differs from Mixtral: the sparse MoE block (router over FFN + zero-computation experts, gating residual
passed explicitly from one MoE layer to the next) and, through the shared mixins of moepp_model.py, the decoder
layer and model loop that carry that residual and the causal-LM head that reports routing statistics and adds the
heterogeneous balance loss.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
The FFN experts are transformers' own `MixtralExperts` (decorated with @use_experts_implementation, so the
grouped_mm / batched_mm / eager implementations all apply; transformers looks for that decorator's name in
this module's source to allow choosing one).
"""

import torch
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    MixtralSparseMoeBlock,
)
from transformers.utils.output_capturing import OutputRecorder

from .configuration_upcycle_moepp import MoePPMixtralConfig
from .moepp_layer import ExpertLayout, MoePPRouter
from .moepp_model import (
    CACHE_ARG,
    MoePPBlockMixin,
    MoePPCausalLMOutputWithPast,
    MoePPDecoderLayerMixin,
    MoePPForCausalLMMixin,
    MoePPModelMixin,
    MoePPModelOutputWithPast,
    MoePPPreTrainedMixin,
    register_source_layout,
)

register_source_layout(MoePPMixtralConfig.model_type, "mixtral")


class MoePPMixtralSparseMoeBlock(MoePPBlockMixin, MixtralSparseMoeBlock):
    """Mixtral's sparse MoE block with zero-computation experts and a gating residual."""

    def __init__(self, config: MoePPMixtralConfig, has_residual: bool):
        super().__init__(config)
        layout = ExpertLayout.from_config(config, n_ffn=config.num_local_experts)
        self.add_moepp_parts(MoePPRouter(
            layout, config.hidden_size, config.num_experts_per_tok, has_residual,
            renormalize=True,  # Mixtral renormalises its top-k weights
            zero_expert_semantics=config.zero_expert_semantics,
        ), config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None):
        """Mixtral's router jitter (training only), then the MoE++ block: (B, S, D) -> (B, S, D), (B*S, N+Z)."""
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        return super().forward(hidden_states, previous_logits)


class MoePPMixtralDecoderLayer(MoePPDecoderLayerMixin, MixtralDecoderLayer):
    moe_block_class = MoePPMixtralSparseMoeBlock


class MoePPMixtralPreTrainedModel(MoePPPreTrainedMixin, MixtralPreTrainedModel):
    config: MoePPMixtralConfig
    config_class = MoePPMixtralConfig
    _no_split_modules = ["MoePPMixtralDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoePPMixtralDecoderLayer, index=1),  # (hidden, G_j); None in dense layers
        "hidden_states": OutputRecorder(MoePPMixtralDecoderLayer, index=0),
        "attentions": OutputRecorder(MixtralAttention, index=1),
    }


class MoePPMixtralModel(MoePPModelMixin, MoePPMixtralPreTrainedModel, MixtralModel):
    decoder_layer_class = MoePPMixtralDecoderLayer
    norm_class = MixtralRMSNorm
    rotary_class = MixtralRotaryEmbedding
    mask_rule = "sliding_window"


class MoePPMixtralForCausalLM(MoePPForCausalLMMixin, MoePPMixtralPreTrainedModel, MixtralForCausalLM):
    model_class = MoePPMixtralModel


__all__ = [
    "CACHE_ARG",
    "MoePPCausalLMOutputWithPast",
    "MoePPMixtralForCausalLM",
    "MoePPMixtralModel",
    "MoePPMixtralPreTrainedModel",
    "MoePPModelOutputWithPast",
]
