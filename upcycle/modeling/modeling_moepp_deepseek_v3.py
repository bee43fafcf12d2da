"""MoE++ for DeepSeek-V3, in transformers' modular style.

What differs from DeepSeek-V3: the MoE block's router. DeepSeek-V3 scores experts with a sigmoid of fp32 logits,
selects on score + `e_score_correction_bias` (a selection-only bias, loss-free balancing) within the `topk_group`
best of `n_group` groups (a group's score: the sum of its two best biased scores), weights the chosen experts by
their unbiased scores, renormalises them when `norm_topk_prob` is set and scales them by `routed_scaling_factor`.

Zero-computation experts under this routing (the definition this file implements, see docs/families.md):
- score: sigmoid(G_z), like an FFN expert's (0.5 at conversion: zero router rows);
- selection: score + selection bias, outside the groups (always eligible once switched on); the correction bias
  stays FFN-only; at conversion every selection bias is -inf, so the top-k is exactly DeepSeek-V3's;
- weight: the unbiased score, through the Zero semantics and the renormalisation, then scaled like every routed
  expert. Since the sigmoid has no shared denominator, a switched-off expert changes no other weight: exact
  preservation needs nothing more.
- probabilities for statistics and the balance loss: scores of switched-on experts divided by their sum.
The shared experts are added to every token; the first `first_k_dense_replace` layers stay dense and the gating
residual starts at the first MoE layer.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
The FFN experts are transformers' own `DeepseekV3Experts` (decorated with @use_experts_implementation, so the
grouped_mm / batched_mm / eager implementations all apply).
"""

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3MoE,
    DeepseekV3PreTrainedModel,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)
from transformers.utils.output_capturing import OutputRecorder

from .configuration_upcycle_moepp import MoePPDeepseekV3Config
from .moepp_layer import ExpertLayout, MoePPRouter, limit_to_groups, normalize_top_k_weights
from .moepp_model import (
    MoePPBlockMixin,
    MoePPDecoderLayerMixin,
    MoePPForCausalLMMixin,
    MoePPModelMixin,
    MoePPPreTrainedMixin,
    register_source_layout,
)

register_source_layout(MoePPDeepseekV3Config.model_type, "deepseek_v3")


class MoePPDeepseekV3Router(MoePPRouter):
    """DeepSeek-V3's sigmoid, bias-corrected, group-limited routing over FFN + zero-computation experts."""

    def __init__(self, layout: ExpertLayout, config: MoePPDeepseekV3Config, has_residual: bool):
        super().__init__(
            layout, config.hidden_size, config.num_experts_per_tok, has_residual,
            renormalize=config.norm_topk_prob,
            zero_expert_semantics=config.zero_expert_semantics,
            scaling_factor=config.routed_scaling_factor,
            logits_in_float32=True,
        )
        self.n_group, self.topk_group = config.n_group, config.topk_group
        # (N,) DeepSeek-V3's selection-only correction bias of the FFN experts, kept from the source checkpoint
        self.register_buffer("e_score_correction_bias", torch.zeros(layout.n_ffn, dtype=torch.float32))

    def routing_probabilities(self, logits: torch.Tensor, selection_bias: torch.Tensor | None = None) -> torch.Tensor:
        """(T, N+Z) -> (T, N+Z): sigmoid scores of the switched-on experts, divided by their sum."""
        switched_on = self.switched_on(selection_bias).to(logits.device)  # (N+Z,)
        scores = logits.sigmoid().masked_fill(~switched_on, 0.0)
        return scores / scores.sum(dim=-1, keepdim=True)

    def expert_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, N+Z) -> (T, N+Z) in sigmoid-score units: FFN experts' sigmoid scores plus the correction bias,
        limited to the best groups (-inf elsewhere); zero-computation experts' sigmoid scores, outside every group.
        A selection bias is therefore in sigmoid-score units (scores lie in (0, 1))."""
        n_ffn = self.layout.n_ffn
        scores = logits.float().sigmoid()  # (T, N+Z)
        ffn_scores = scores[:, :n_ffn] + self.e_score_correction_bias.float()  # (T, N)
        grouped = ffn_scores.reshape(logits.shape[0], self.n_group, n_ffn // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
        ffn_scores = limit_to_groups(ffn_scores, group_scores, self.topk_group)
        return torch.cat([ffn_scores, scores[:, n_ffn:]], dim=-1)  # (T, N+Z)

    def top_k_weights(self, logits: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """(T, N+Z), (T, k) -> (T, k): unbiased sigmoid scores, Zero semantics, renormalisation, scaling."""
        weights = logits.sigmoid().gather(-1, top_k_index)  # (T, k)
        weights = normalize_top_k_weights(
            weights, top_k_index, self.layout, self.renormalize, self.zero_expert_semantics
        )
        return weights * self.scaling_factor


class MoePPDeepseekV3MoE(MoePPBlockMixin, DeepseekV3MoE):
    """DeepSeek-V3's routed experts behind the MoE++ router, plus its shared experts."""

    def __init__(self, config: MoePPDeepseekV3Config, has_residual: bool):
        super().__init__(config)
        layout = ExpertLayout.from_config(config, n_ffn=config.n_routed_experts)
        self.add_moepp_parts(MoePPDeepseekV3Router(layout, config, has_residual), config.hidden_size)

    def shared_expert_output(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.shared_experts(tokens)


class MoePPDeepseekV3DecoderLayer(MoePPDecoderLayerMixin, DeepseekV3DecoderLayer):
    moe_block_class = MoePPDeepseekV3MoE


class MoePPDeepseekV3PreTrainedModel(MoePPPreTrainedMixin, DeepseekV3PreTrainedModel):
    config: MoePPDeepseekV3Config
    config_class = MoePPDeepseekV3Config
    _no_split_modules = ["MoePPDeepseekV3DecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoePPDeepseekV3DecoderLayer, index=1),  # (hidden, G_j); None in dense layers
        "hidden_states": OutputRecorder(MoePPDeepseekV3DecoderLayer, index=0),
        "attentions": OutputRecorder(DeepseekV3Attention, index=1),
    }


class MoePPDeepseekV3Model(MoePPModelMixin, MoePPDeepseekV3PreTrainedModel, DeepseekV3Model):
    decoder_layer_class = MoePPDeepseekV3DecoderLayer
    norm_class = DeepseekV3RMSNorm
    rotary_class = DeepseekV3RotaryEmbedding
    mask_rule = "causal"


class MoePPDeepseekV3ForCausalLM(MoePPForCausalLMMixin, MoePPDeepseekV3PreTrainedModel, DeepseekV3ForCausalLM):
    model_class = MoePPDeepseekV3Model


__all__ = ["MoePPDeepseekV3ForCausalLM", "MoePPDeepseekV3Model", "MoePPDeepseekV3PreTrainedModel"]
