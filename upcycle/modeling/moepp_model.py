"""The family-independent MoE++ model: block, decoder layer, model loop and causal-LM head, as mixins.

Each family variant (modeling_upcycle_moepp.py for Mixtral, modeling_moepp_<family>.py for the others) subclasses
the transformers family classes in modular style and mixes these in, so it writes only what differs: which
router, which experts and shared expert, which mask rule. What every family shares lives here once:
- the block: family router -> FFN experts (sentinel slots skipped) + zero-computation experts + shared expert;
- the decoder layer: the family's attention and norms, then either the MoE++ block (which takes the previous MoE
  layer's router logits and returns its own) or the family's dense MLP (which passes them on unchanged);
- the model loop: carries the gating residual between *consecutive MoE layers*, skipping dense layers;
- the causal-LM head: routing statistics and the heterogeneous balance loss from the routers' own methods.

Copied into every converted checkpoint as remote code: imports only torch, transformers and its siblings.
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
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import MixtralModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import capture_outputs

from .moepp_layer import MoePPRouter, ZeroComputationExperts, ffn_slots, relaxed_selection_term, routing_statistics

try:  # transformers' init functions skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache`; support both.
CACHE_ARG = "cache" if "cache" in inspect.signature(MixtralModel.forward).parameters else "past_key_values"


def accepts_past_key_values(forward):
    """A forward with a `cache` argument that, like the families' own, still takes `past_key_values` (renamed to
    `cache` with transformers' deprecation warning). Before 5.24 `past_key_values` is the name: nothing to do."""
    if CACHE_ARG != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


def register_source_layout(moepp_model_type: str, source_model_type: str) -> None:
    """Load the source's on-disk expert layout (per-expert or fused) exactly as transformers loads the source's.

    transformers skips its conversion mapping for an unknown model type, so each MoE++ model type borrows its
    source family's mapping.
    """
    try:
        register_checkpoint_conversion_mapping(moepp_model_type, get_checkpoint_conversion_mapping(source_model_type))
    except ValueError:  # already registered (module imported twice: package and remote code)
        pass


def each_expert_output(ffn_output, zero_computation_experts: ZeroComputationExperts, tokens: torch.Tensor,
                       n_ffn: int):
    """A function index (T, m) -> (T, m, D): the output of each listed expert (FFN or zero-computation) with
    weight 1. `ffn_output(tokens, index (T, 1), weights (T, 1))` runs the FFN experts (sentinel N skipped)."""

    def outputs(index: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(tokens.shape[0], 1, device=tokens.device, dtype=torch.float32)  # (T, 1)
        columns = []
        for column in index.unbind(dim=-1):
            column = column[:, None]  # (T, 1)
            is_ffn = column < n_ffn
            ffn = ffn_output(tokens, column.masked_fill(~is_ffn, n_ffn), ones * is_ffn)  # (T, D)
            columns.append(ffn.to(tokens.dtype) + zero_computation_experts(tokens, column, ones * ~is_ffn))
        return torch.stack(columns, dim=1)  # (T, m, D)

    return outputs


def with_relaxed_selection(output: torch.Tensor, router: MoePPRouter, tokens: torch.Tensor,
                           previous_logits: torch.Tensor | None, logits: torch.Tensor, top_k_index: torch.Tensor,
                           expert_outputs) -> torch.Tensor:
    """output (T, D) plus the training-only relaxed-selection term (exactly 0 in value; see moepp_layer)."""
    term = relaxed_selection_term(router, tokens, previous_logits, logits, top_k_index, expert_outputs)
    return output if term is None else output + term.to(output.dtype)


@dataclass
class MoePPCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """The family's output plus `routing_statistics`: per MoE layer (L,) tensors, see `routing_statistics`."""

    routing_statistics: dict[str, torch.Tensor] | None = None


@dataclass
class MoePPModelOutputWithPast(MoeModelOutputWithPast):
    """The base model's output; `router_logits` holds one (T, N+Z) tensor per MoE layer (dense layers have none)."""


class MoePPBlockMixin:
    """An MoE++ sparse block: the family's experts (and shared expert) behind the MoE++ router.

    A family block subclasses transformers' block with this mixin first, calls the family's __init__, then
    `add_moepp_parts` with its router; it overrides `shared_expert_output` when the family has a shared expert.
    """

    # Qwen-MoE and OLMoE cast their top-k weights to the model dtype before the experts; Mixtral and DeepSeek
    # keep them in fp32. Matching this keeps bf16 outputs bit-close to the source's.
    routing_weights_in_input_dtype: bool = False

    def add_moepp_parts(self, router: MoePPRouter, hidden_size: int) -> None:
        self.layout = router.layout
        self.gate = router  # replaces the family's router: same `weight`, plus the MoE++ tensors
        # Slots routed to zero-computation experts reach the FFN experts as the sentinel index N with weight 0.
        # With this flag set, transformers' eager and grouped_mm implementations skip sentinel rows (no FFN
        # compute); batched_mm computes them and multiplies by the zero weight.
        self.experts._is_expert_parallel = True
        self.zero_computation_experts = ZeroComputationExperts(self.layout, hidden_size)

    def ffn_experts_on_routed_slots(self, tokens: torch.Tensor, ffn_index: torch.Tensor,
                                    ffn_weights: torch.Tensor) -> torch.Tensor:
        """Eager path: the FFN experts see only the slots routed to them, so no sentinel row is gathered,
        masked or multiplied (transformers' sentinel masking costs several % of the layer).

        tokens (T, D), ffn_index (T, k) with sentinel N for zero-computation slots, ffn_weights (T, k) -> (T, D).
        At the full budget there is no sentinel and the experts run exactly as in the source.
        """
        is_ffn = ffn_index < self.layout.n_ffn  # (T, k)
        if bool(is_ffn.all()):
            self.experts._is_expert_parallel = False  # no sentinel: transformers' path, no masking
            output = self.experts(tokens, ffn_index, ffn_weights)
            self.experts._is_expert_parallel = True  # what a compiled graph is traced with
            return output
        token_rows, slots = is_ffn.nonzero(as_tuple=True)  # (S_ffn,) each
        self.experts._is_expert_parallel = False
        routed = self.experts(tokens[token_rows], ffn_index[token_rows, slots, None],
                              ffn_weights[token_rows, slots, None])  # (S_ffn, D), one slot per row
        self.experts._is_expert_parallel = True
        return torch.zeros_like(tokens).index_add_(0, token_rows, routed.to(tokens.dtype))

    def shared_expert_output(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """tokens (T, D) -> the always-on shared expert's contribution (T, D), or None without one."""
        return None

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None):
        """hidden_states (B, S, D), previous_logits (B*S, N+Z) or None -> output (B, S, D), logits (B*S, N+Z)."""
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_dim)  # (T, D)
        logits, top_k_weights, top_k_index = self.gate(tokens, previous_logits)
        ffn_index, ffn_weights = ffn_slots(top_k_index, top_k_weights, self.layout.n_ffn)
        if self.routing_weights_in_input_dtype:
            ffn_weights = ffn_weights.to(tokens.dtype)
        if torch.compiler.is_compiling():
            output = self.experts(tokens, ffn_index, ffn_weights)  # (T, D), sentinel rows masked and skipped
        else:
            output = self.ffn_experts_on_routed_slots(tokens, ffn_index, ffn_weights)  # (T, D)
        output = output + self.zero_computation_experts(tokens, top_k_index, top_k_weights)
        if self.training and self.gate.selection_signal is not None:
            output = with_relaxed_selection(output, self.gate, tokens, previous_logits, logits, top_k_index,
                                            each_expert_output(
                self.ffn_experts_on_routed_slots, self.zero_computation_experts, tokens, self.layout.n_ffn))
        shared = self.shared_expert_output(tokens)
        if shared is not None:
            output = output + shared
        return output.reshape(batch_size, sequence_length, hidden_dim), logits


class MoePPDecoderLayerMixin:
    """The family's decoder layer with its MoE block replaced by `moe_block_class` in the config's MoE layers.

    Returns (hidden_states, router_logits): an MoE layer's own G_j (T, N+Z), None in a dense layer. The model
    loop keeps the last MoE layer's logits across dense layers (they are never passed through one: a checkpointed
    layer must not return its own input), so the gating residual links consecutive MoE layers.
    """

    moe_block_class: type

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        moe_layers = config.moe_layers()
        self.is_moe_layer = layer_idx in moe_layers
        if self.is_moe_layer:
            # The first MoE layer has no previous logits, so it has no gating-residual matrix.
            has_residual = config.gating_residual and layer_idx != moe_layers[0]
            self.mlp = self.moe_block_class(config, has_residual=has_residual)
            self.mlp.gate.configure_selection(config, moe_layers.index(layer_idx))

    def forward(self, hidden_states, previous_logits=None, **kwargs):
        """The family's layer; `kwargs` (position embeddings, mask, cache...) go to attention as the family passes them."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if self.is_moe_layer:
            hidden_states, router_logits = self.mlp(hidden_states, previous_logits)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, router_logits


class MoePPPreTrainedMixin:
    """New MoE++ tensors start neutral (see MoePPRouter / ZeroComputationExperts): nothing changes at conversion."""

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MoePPRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.zero_computation_weight)
            if module.residual_weight is not None:
                init.zeros_(module.residual_weight)
            init.constant_(module.selection_bias, float("-inf"))
            if getattr(module, "e_score_correction_bias", None) is not None:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, ZeroComputationExperts):
            init.zeros_(module.constant_vectors)
            init.zeros_(module.constant_ratio_weight)


class MoePPModelMixin:
    """The family's base model with MoE++ decoder layers and a loop that carries the gating residual.

    `mask_rule` says how the family builds its attention masks: "causal" (one causal mask), "sliding_window"
    (sliding-window mask when `config.sliding_window` is set, as Mixtral and Qwen3-MoE do) or "layer_types"
    (one mask per `config.layer_types` entry, as Qwen2-MoE does).
    """

    decoder_layer_class: type
    norm_class: type
    rotary_class: type
    mask_rule: str = "causal"

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)  # the family's __init__ would build its own layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self.rotary_class(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def layer_attention_masks(self, inputs_embeds, attention_mask, position_ids, cache) -> list:
        """One attention mask per decoder layer, built as the family builds them."""
        n_layers = self.config.num_hidden_layers
        mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=position_ids, **{CACHE_ARG: cache})
        if self.mask_rule == "layer_types":
            layer_types = self.config.layer_types[:n_layers]
            if isinstance(attention_mask, dict):  # already prepared, e.g. by `generate`
                return [attention_mask[kind] for kind in layer_types]
            builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
            masks = {kind: builders[kind](**mask_kwargs) for kind in set(layer_types)}
            return [masks[kind] for kind in layer_types]
        builder = create_causal_mask
        if self.mask_rule == "sliding_window" and getattr(self.config, "sliding_window", None) is not None:
            builder = create_sliding_window_causal_mask
        return [builder(**mask_kwargs)] * n_layers

    @capture_outputs
    @accepts_past_key_values
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> MoePPModelOutputWithPast:
        """The family's model loop, carrying each MoE layer's router logits to the next MoE layer.

        `router_logits` are returned when `output_router_logits` (argument, else config) is set: `capture_outputs`
        records them from each MoE decoder layer's output (`_can_record_outputs`), outside activation
        checkpointing, so they are the very tensors the loop passes on (with their gradients).
        """
        kwargs.pop("output_router_logits", None)  # read by capture_outputs
        if "past_key_values" in kwargs:  # the argument's name before transformers 5.24
            cache = cache if cache is not None else kwargs.pop("past_key_values")
            kwargs.pop("past_key_values", None)
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
        masks = self.layer_attention_masks(inputs_embeds, attention_mask, position_ids, cache)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        previous_logits = None  # G of the last MoE layer seen; None before the first
        for decoder_layer, mask in zip(self.layers[: self.config.num_hidden_layers], masks):
            hidden_states, layer_logits = decoder_layer(
                hidden_states,
                # positional: gradient checkpointing carries positional tensors
                previous_logits if decoder_layer.is_moe_layer else None,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{CACHE_ARG: cache},
                **kwargs,
            )
            if decoder_layer.is_moe_layer:
                previous_logits = layer_logits
        hidden_states = self.norm(hidden_states)
        return MoePPModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_ARG: cache})


def resolve_return_dict(config, kwargs: dict) -> bool:
    """Pop `return_dict` from a head's kwargs: the argument, else `config.return_dict` (True by default)."""
    return_dict = kwargs.pop("return_dict", None)
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


def add_balance_loss(model, outputs, loss, attention_mask, top_k: int):
    """Routing statistics of `outputs.router_logits` (real tokens only) and the loss plus beta * balance loss.

    Returns (loss or None, balance loss, statistics); shared by every family's causal-LM head.
    """
    token_mask = None
    if attention_mask is not None and attention_mask.dim() == 2:  # (B, past + S): keep the current S
        token_mask = attention_mask[:, -outputs.last_hidden_state.shape[1]:].reshape(-1)
    blocks = model.moe_blocks()
    stats = routing_statistics(
        list(outputs.router_logits),
        [block.gate.selection_bias for block in blocks],
        blocks[0].layout,
        top_k,
        token_mask,
        model.config.balance_tau,
        routers=[block.gate for block in blocks],
    )
    aux_loss = stats["balance_loss"]
    if loss is not None:
        loss = loss + model.config.balance_loss_coef * aux_loss.to(loss.device)
        selection = [block.gate.selection_loss for block in blocks if block.gate.selection_loss is not None]
        if selection:  # training with the "output_change" selection signal (moepp_layer.relaxed_selection_term)
            stats["selection_loss"] = torch.stack(selection).sum()
            loss = loss + stats["selection_loss"].to(loss.device)
    return loss, aux_loss, stats


class MoePPForCausalLMMixin:
    """The family's causal LM with an MoE++ base model; reports routing statistics and adds the balance loss."""

    model_class: type

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)  # the family's __init__ would build its own model
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def moe_blocks(self) -> list[MoePPBlockMixin]:
        """The MoE++ blocks in layer order (dense layers left out)."""
        return [layer.mlp for layer in self.model.layers if layer.is_moe_layer]

    @accepts_past_key_values
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_router_logits=None, logits_to_keep=0,
                **kwargs) -> MoePPCausalLMOutputWithPast:
        """The family's forward; with `output_router_logits`, also routing statistics and the balance loss.

        `return_dict=False` (argument, else `config.return_dict`) returns `output.to_tuple()`.
        """
        return_dict = resolve_return_dict(self.config, kwargs)
        output_router_logits = (
            output_router_logits if output_router_logits is not None
            else getattr(self.config, "output_router_logits", False)
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss, stats = None, None
        if output_router_logits:
            loss, aux_loss, stats = add_balance_loss(self, outputs, loss, attention_mask, self.config.num_experts_per_tok)
        output = MoePPCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            routing_statistics=stats,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
        )
        return output if return_dict else output.to_tuple()
