"""MoE++ for OpenMoE checkpoints: subclass the project's OpenMoE model, write only what differs.

What differs: the MoE block (router over FFN + zero-computation experts with the gating residual, the FFN
experts' capacity counted over FFN slots only), the decoder layer that builds it, and the causal-LM output that
reports routing statistics and adds the heterogeneous balance loss. Dense layers and the extra dense MLP after
each MoE layer are OpenMoE's; the gating residual links consecutive MoE layers across the dense layers between
them (the model loop carries the last MoE layer's logits), and the first MoE layer has no residual matrix.

On disk the source router keeps its name and bytes, `model.layers.{i}.mlp.gate_weight` (E, D); loading renames
it to the router's `mlp.gate.weight` (a checkpoint conversion mapping registered for this model_type, reversed
on save). Expert tensors keep OpenMoE's names and input-major layout.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_openmoe import MoePPOpenMoeConfig
from .modeling_openmoe import (
    CACHE_ARG,
    OpenMoeDecoderLayer,
    OpenMoeExperts,
    OpenMoeForCausalLM,
    OpenMoeModel,
    OpenMoePreTrainedModel,
    expert_capacity,
    within_capacity,
)
from .moepp_layer import ExpertLayout, MoePPRouter, ZeroComputationExperts, ffn_slots
from .moepp_model import add_balance_loss, each_expert_output, with_relaxed_selection

try:
    register_checkpoint_conversion_mapping(
        MoePPOpenMoeConfig.model_type, [WeightRenaming(".mlp.gate_weight", ".mlp.gate.weight")]
    )
except ValueError:  # already registered (this module imported twice: package and remote code)
    pass


@dataclass
class MoePPCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """OpenMoE's output plus `routing_statistics`: per MoE layer (L,) tensors, see `routing_statistics`."""

    routing_statistics: dict[str, torch.Tensor] | None = None


class MoePPOpenMoeSparseBlock(nn.Module):
    """OpenMoE's MoE block with zero-computation experts and a gating residual.

    Routing: MoePPRouter without renormalisation (OpenMoE combines raw top-k probabilities). Capacity: OpenMoE's
    rule over the N FFN experts (C from all T tokens of the call, first choices then second choices in token
    order); slots routed to zero-computation experts use no capacity (they have none to exhaust).
    """

    def __init__(self, config: MoePPOpenMoeConfig, has_residual: bool):
        super().__init__()
        self.layout = ExpertLayout.from_config(config, n_ffn=config.num_experts)
        self.top_k = config.router_topk
        self.capacity_factors = (config.router_capacity_factor_train, config.router_capacity_factor_eval)
        self.min_capacity = config.router_min_capacity
        self.gate = MoePPRouter(
            self.layout, config.hidden_size, config.router_topk, has_residual,
            renormalize=False,  # OpenMoE does not renormalise its top-k weights
            zero_expert_semantics=config.zero_expert_semantics,
            zero_computation_denominator=config.zero_computation_denominator,
        )
        self.experts = OpenMoeExperts(config)
        self.zero_computation_experts = ZeroComputationExperts(self.layout, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None):
        """hidden_states (B, S, D), previous_logits (B*S, N+Z) or None -> output (B, S, D), logits (B*S, N+Z)."""
        batch, length, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # (T, D)
        logits, top_k_weights, top_k_index = self.gate(tokens, previous_logits)  # top_k_index best first
        ffn_index, ffn_weights = ffn_slots(top_k_index, top_k_weights, self.layout.n_ffn)  # ZC slots -> N, 0
        factor = self.capacity_factors[0] if self.training else self.capacity_factors[1]
        capacity = expert_capacity(tokens.shape[0], self.layout.n_ffn, self.top_k, factor, self.min_capacity)
        keep = within_capacity(ffn_index, self.layout.n_ffn, capacity)  # (T, k)
        ffn_index = ffn_index.masked_fill(~keep, self.layout.n_ffn)
        ffn_weights = ffn_weights.masked_fill(~keep, 0.0)
        output = self.experts(tokens, ffn_index, ffn_weights)  # (T, D)
        output = output + self.zero_computation_experts(tokens, top_k_index, top_k_weights)
        if self.training and self.gate.selection_signal is not None:
            output = with_relaxed_selection(output, self.gate, tokens, previous_logits, logits, top_k_index,
                                            each_expert_output(
                self.experts, self.zero_computation_experts, tokens, self.layout.n_ffn))
        return output.view(batch, length, hidden), logits


class MoePPOpenMoeDecoderLayer(OpenMoeDecoderLayer):
    def build_moe_block(self, config: MoePPOpenMoeConfig, layer_idx: int) -> nn.Module:
        # The first MoE layer has no previous logits, so it has no gating-residual matrix.
        is_first_moe_layer = layer_idx == config.moe_layers()[0]
        block = MoePPOpenMoeSparseBlock(config, has_residual=config.gating_residual and not is_first_moe_layer)
        block.gate.configure_selection(config, config.moe_layers().index(layer_idx))
        return block


class MoePPOpenMoePreTrainedModel(OpenMoePreTrainedModel):
    config: MoePPOpenMoeConfig
    config_class = MoePPOpenMoeConfig
    _no_split_modules = ["MoePPOpenMoeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # New MoE++ tensors start neutral (see MoePPRouter / ZeroComputationExperts): nothing changes at conversion.
        if isinstance(module, MoePPRouter):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            nn.init.zeros_(module.zero_computation_weight)
            if module.residual_weight is not None:
                nn.init.zeros_(module.residual_weight)
            module.selection_bias.fill_(float("-inf"))
        elif isinstance(module, ZeroComputationExperts):
            nn.init.zeros_(module.constant_vectors)
            nn.init.zeros_(module.constant_ratio_weight)


class MoePPOpenMoeModel(MoePPOpenMoePreTrainedModel, OpenMoeModel):
    decoder_layer_class = MoePPOpenMoeDecoderLayer


class MoePPOpenMoeForCausalLM(MoePPOpenMoePreTrainedModel, OpenMoeForCausalLM):
    model_class = MoePPOpenMoeModel

    def moe_blocks(self) -> list[MoePPOpenMoeSparseBlock]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def make_output(self, outputs, logits, loss, attention_mask, output_router_logits: bool):
        aux_loss, stats = None, None
        if output_router_logits:
            loss, aux_loss, stats = add_balance_loss(self, outputs, loss, attention_mask, self.config.router_topk)
        return MoePPCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits if output_router_logits else None,
            routing_statistics=stats,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
        )


__all__ = ["MoePPOpenMoeForCausalLM", "MoePPOpenMoeModel", "MoePPOpenMoePreTrainedModel"]
