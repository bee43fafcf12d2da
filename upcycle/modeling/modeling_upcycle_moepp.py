"""MoE++ for the Mixtral family, in transformers' modular style: subclass Mixtral, write only what differs.

What differs: the sparse MoE block (router over FFN + zero-computation experts, gating residual passed
explicitly from one MoE layer to the next), the decoder layer and model loop that carry that residual, and the
causal-LM head that reports routing statistics and adds the heterogeneous balance loss.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
The FFN experts are transformers' own `MixtralExperts` (decorated with @use_experts_implementation, so the
grouped_mm / batched_mm / eager implementations all apply; transformers looks for that decorator's name in
this module's source to allow choosing one).
"""

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralDecoderLayer,
    MixtralExperts,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_upcycle_moepp import MoePPMixtralConfig
from .moepp_layer import (
    ExpertLayout,
    MoePPRouter,
    ZeroComputationExperts,
    ffn_slots,
    routing_statistics,
)

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache`; support both.
CACHE_ARG = "cache" if "cache" in inspect.signature(MixtralModel.forward).parameters else "past_key_values"

# Checkpoints keep the source's on-disk expert layout (classic per-expert `w1/w2/w3` or fused): loading maps it
# exactly as transformers maps Mixtral's, which it would otherwise skip for an unknown model type.
try:
    register_checkpoint_conversion_mapping(
        MoePPMixtralConfig.model_type, get_checkpoint_conversion_mapping("mixtral")
    )
except ValueError:  # already registered (this module imported twice: package and remote code)
    pass


@dataclass
class MoePPCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Mixtral's output plus `routing_statistics`: per MoE layer (L,) tensors, see `routing_statistics`."""

    routing_statistics: dict[str, torch.Tensor] | None = None


@dataclass
class MoePPModelOutputWithPast(MoeModelOutputWithPast):
    """The base model's output; `router_logits` holds one (T, N+Z) tensor per MoE layer."""


class MoePPMixtralSparseMoeBlock(nn.Module):
    """Mixtral's sparse MoE block with zero-computation experts and a gating residual."""

    def __init__(self, config: MoePPMixtralConfig, has_residual: bool):
        super().__init__()
        self.layout = ExpertLayout.from_config(config, n_ffn=config.num_local_experts)
        self.jitter_noise = config.router_jitter_noise
        self.gate = MoePPRouter(
            self.layout, config.hidden_size, config.num_experts_per_tok, has_residual,
            renormalize=True,  # Mixtral renormalises its top-k weights
            zero_expert_semantics=config.zero_expert_semantics,
        )
        self.experts = MixtralExperts(config)
        # Slots routed to zero-computation experts reach the FFN experts as the sentinel index N with weight 0.
        # With this flag set, transformers' eager and grouped_mm implementations skip sentinel rows (no FFN
        # compute); batched_mm computes them and multiplies by the zero weight.
        self.experts._is_expert_parallel = True
        self.zero_computation_experts = ZeroComputationExperts(self.layout, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None):
        """hidden_states (B, S, D), previous_logits (B*S, N+Z) or None -> output (B, S, D), logits (B*S, N+Z)."""
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        tokens = hidden_states.view(-1, hidden_dim)  # (T, D)
        logits, top_k_weights, top_k_index = self.gate(tokens, previous_logits)
        ffn_index, ffn_weights = ffn_slots(top_k_index, top_k_weights, self.layout.n_ffn)
        output = self.experts(tokens, ffn_index, ffn_weights)  # (T, D)
        output = output + self.zero_computation_experts(tokens, top_k_index, top_k_weights)
        return output.reshape(batch_size, sequence_length, hidden_dim), logits


class MoePPMixtralDecoderLayer(MixtralDecoderLayer):
    """Mixtral's decoder layer, passing the gating residual: returns (hidden_states, router_logits)."""

    def __init__(self, config: MoePPMixtralConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # The first MoE layer (layer 0: every Mixtral layer is an MoE layer) has no previous logits, so it has
        # no gating-residual matrix.
        self.mlp = MoePPMixtralSparseMoeBlock(config, has_residual=config.gating_residual and layer_idx > 0)

    def forward(self, hidden_states, previous_logits=None, **kwargs):
        """Mixtral's layer; `kwargs` (position embeddings, mask, cache...) go to attention as Mixtral passes them."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, router_logits = self.mlp(hidden_states, previous_logits)
        return residual + hidden_states, router_logits


class MoePPMixtralPreTrainedModel(MixtralPreTrainedModel):
    config: MoePPMixtralConfig
    config_class = MoePPMixtralConfig
    _no_split_modules = ["MoePPMixtralDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": OutputRecorder(MoePPMixtralDecoderLayer, index=0),
        "attentions": OutputRecorder(MixtralAttention, index=1),
    }

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


class MoePPMixtralModel(MoePPMixtralPreTrainedModel, MixtralModel):
    def __init__(self, config: MoePPMixtralConfig):
        MoePPMixtralPreTrainedModel.__init__(self, config)  # MixtralModel.__init__ would build Mixtral layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MoePPMixtralDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                **kwargs) -> MoePPModelOutputWithPast:
        """Mixtral's model loop, carrying each MoE layer's router logits to the next as the gating residual."""
        kwargs.pop("output_router_logits", None)  # router logits are always returned by this loop
        cache = kwargs.pop(CACHE_ARG, None)
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        router_logits = []  # one (T, N+Z) tensor per MoE layer
        previous_logits = None
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, previous_logits = decoder_layer(
                hidden_states,
                previous_logits,  # positional: gradient checkpointing carries positional tensors
                attention_mask=causal_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{CACHE_ARG: cache},
                **kwargs,
            )
            router_logits.append(previous_logits)
        hidden_states = self.norm(hidden_states)
        return MoePPModelOutputWithPast(
            last_hidden_state=hidden_states,
            router_logits=tuple(router_logits),
            **{CACHE_ARG: cache},
        )


class MoePPMixtralForCausalLM(MoePPMixtralPreTrainedModel, MixtralForCausalLM):
    def __init__(self, config: MoePPMixtralConfig):
        MoePPMixtralPreTrainedModel.__init__(self, config)  # MixtralForCausalLM.__init__ would build a Mixtral
        self.model = MoePPMixtralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def moe_blocks(self) -> list[MoePPMixtralSparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, output_router_logits=None, logits_to_keep=0, **kwargs) -> MoePPCausalLMOutputWithPast:
        """Mixtral's forward; with `output_router_logits`, also routing statistics and the balance loss."""
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss, stats = None, None
        if output_router_logits:
            token_mask = None
            if attention_mask is not None and attention_mask.dim() == 2:  # (B, past + S): keep the current S
                sequence_length = outputs.last_hidden_state.shape[1]
                token_mask = attention_mask[:, -sequence_length:].reshape(-1)
            blocks = self.moe_blocks()
            stats = routing_statistics(
                list(outputs.router_logits),
                [block.gate.selection_bias for block in blocks],
                blocks[0].layout,
                self.config.num_experts_per_tok,
                token_mask,
                self.config.balance_tau,
            )
            aux_loss = stats["balance_loss"]
            if loss is not None:
                loss = loss + self.config.balance_loss_coef * aux_loss.to(loss.device)
        return MoePPCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            routing_statistics=stats,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
        )


__all__ = ["MoePPMixtralForCausalLM", "MoePPMixtralModel", "MoePPMixtralPreTrainedModel"]
