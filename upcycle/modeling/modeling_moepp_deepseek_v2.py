"""MoE++ for DeepSeek-V2 (DeepSeek-V2, DeepSeek-V2-Lite), in transformers' modular style.

What differs from DeepSeek-V2: the MoE block's router. DeepSeek-V2 routes with a softmax over all experts
(router logits in fp32), picks the top-k greedily or group-limited (`topk_method` "group_limited_greedy": only the
`topk_group` groups with the highest best-expert probability are eligible), never renormalises, and scales the
weights by `routed_scaling_factor`. The MoE++ router keeps all of that; zero-computation experts are outside the
groups (always eligible once switched on). The shared experts (`n_shared_experts` x `moe_intermediate_size`) are
added to every token, as in DeepSeek-V2; the first `first_k_dense_replace` layers stay dense and the gating residual
starts at the first MoE layer.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
The FFN experts are transformers' own `DeepseekV2Experts` (decorated with @use_experts_implementation, so the
grouped_mm / batched_mm / eager implementations all apply).
"""

import torch
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2DecoderLayer,
    DeepseekV2ForCausalLM,
    DeepseekV2Model,
    DeepseekV2Moe,
    DeepseekV2PreTrainedModel,
    DeepseekV2RMSNorm,
    DeepseekV2RotaryEmbedding,
)
from transformers.utils.output_capturing import OutputRecorder

from .configuration_upcycle_moepp import MoePPDeepseekV2Config
from .moepp_layer import ExpertLayout, MoePPRouter, limit_to_groups
from .moepp_model import (
    MoePPBlockMixin,
    MoePPDecoderLayerMixin,
    MoePPForCausalLMMixin,
    MoePPModelMixin,
    MoePPPreTrainedMixin,
    register_source_layout,
)

register_source_layout(MoePPDeepseekV2Config.model_type, "deepseek_v2")


class MoePPDeepseekV2Router(MoePPRouter):
    """DeepSeek-V2's routing over FFN + zero-computation experts: softmax, (group-limited) greedy top-k, scaled."""

    def __init__(self, layout: ExpertLayout, config: MoePPDeepseekV2Config, has_residual: bool):
        super().__init__(
            layout, config.hidden_size, config.num_experts_per_tok, has_residual,
            renormalize=False,  # DeepseekV2TopkRouter never renormalises (its norm_topk_prob is unused)
            zero_expert_semantics=config.zero_expert_semantics,
            zero_computation_denominator=config.zero_computation_denominator,
            scaling_factor=config.routed_scaling_factor,
            logits_in_float32=True,
        )
        self.group_limited = config.topk_method == "group_limited_greedy"
        self.n_group, self.topk_group = config.n_group, config.topk_group

    def expert_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, N+Z) -> (T, N+Z) in router-logit units. Group-limited: a group's score is its best expert's
        probability, which ranks as its best logit does, so groups and experts are chosen on logits; FFN experts
        outside the best groups get -inf. Zero-computation experts sit outside every group."""
        logits = logits.float()
        if not self.group_limited:
            return logits
        n_ffn = self.layout.n_ffn
        ffn_logits = logits[:, :n_ffn]  # (T, N)
        group_scores = ffn_logits.reshape(logits.shape[0], self.n_group, n_ffn // self.n_group).amax(dim=-1)
        ffn_scores = limit_to_groups(ffn_logits, group_scores, self.topk_group)  # (T, N)
        return torch.cat([ffn_scores, logits[:, n_ffn:]], dim=-1)  # (T, N+Z)


class MoePPDeepseekV2Moe(MoePPBlockMixin, DeepseekV2Moe):
    """DeepSeek-V2's routed experts behind the MoE++ router, plus its shared experts."""

    def __init__(self, config: MoePPDeepseekV2Config, has_residual: bool):
        super().__init__(config)
        layout = ExpertLayout.from_config(config, n_ffn=config.n_routed_experts)
        self.add_moepp_parts(MoePPDeepseekV2Router(layout, config, has_residual), config.hidden_size)

    def shared_expert_output(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.shared_experts(tokens)


class MoePPDeepseekV2DecoderLayer(MoePPDecoderLayerMixin, DeepseekV2DecoderLayer):
    moe_block_class = MoePPDeepseekV2Moe


class MoePPDeepseekV2PreTrainedModel(MoePPPreTrainedMixin, DeepseekV2PreTrainedModel):
    config: MoePPDeepseekV2Config
    config_class = MoePPDeepseekV2Config
    _no_split_modules = ["MoePPDeepseekV2DecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoePPDeepseekV2DecoderLayer, index=1),  # (hidden, G_j); None in dense layers
        "hidden_states": OutputRecorder(MoePPDeepseekV2DecoderLayer, index=0),
        "attentions": OutputRecorder(DeepseekV2Attention, index=1),
    }


class MoePPDeepseekV2Model(MoePPModelMixin, MoePPDeepseekV2PreTrainedModel, DeepseekV2Model):
    decoder_layer_class = MoePPDeepseekV2DecoderLayer
    norm_class = DeepseekV2RMSNorm
    rotary_class = DeepseekV2RotaryEmbedding
    mask_rule = "causal"


class MoePPDeepseekV2ForCausalLM(MoePPForCausalLMMixin, MoePPDeepseekV2PreTrainedModel, DeepseekV2ForCausalLM):
    model_class = MoePPDeepseekV2Model


__all__ = ["MoePPDeepseekV2ForCausalLM", "MoePPDeepseekV2Model", "MoePPDeepseekV2PreTrainedModel"]
