"""OpenMoE's forward as a transformers model: transformers has no OpenMoE class, so the project writes its own.

The math follows the PyTorch implementation OpenMoE's checkpoints were published with (hpcaitech/ColossalAI at
commit 12e7c28d5, examples/language/openmoe/model/modeling_openmoe.py and colossalai/moe/{layers,routers,
experts,utils}.py); docs/openmoe.md lists every choice with its source line. In short:
- pre-norm layers; every `moe_layer_interval`-th layer is an MoE layer followed by an extra dense MLP;
- attention without 1/sqrt(d) scaling, rotate-half RoPE with base 10000, key position 0 always visible;
- gated MLPs: down(a * silu(b) * up(x)) with [a | b] = gate(x);
- top-k router: softmax over all experts, argmax picks, raw (not renormalised) probabilities as weights,
  and expert capacity enforced in eval mode as in training (over-capacity assignments are dropped).

Parameter names and layouts are the checkpoints' own (experts input-major: x @ W), so a checkpoint loads with
no key mapping. Copied into every converted checkpoint as remote code: imports only torch, transformers and its
siblings.
"""

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaModel, LlamaRMSNorm
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_openmoe import OpenMoeConfig

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache`; support both.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
ROPE_BASE = 10000.0  # hard-coded in OpenMoE's attention (generate_fixed_pos_embedding(..., 1.0, 1e4))


def accepts_past_key_values(forward):
    """A forward with a `cache` argument that still takes `past_key_values` (renamed to `cache` with transformers'
    deprecation warning, as transformers' own models do from 5.24). Before 5.24 `past_key_values` is the name."""
    if CACHE_ARG != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


def pop_cache(kwargs: dict):
    """The KV cache, under either transformers' argument name."""
    cache = kwargs.pop(CACHE_ARG, None)
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        cache = cache if cache is not None else value
    return cache


def resolve_flag(config, kwargs: dict, name: str, default: bool) -> bool:
    """Pop a boolean forward argument such as `return_dict`: the argument, else the config's value, else default."""
    value = kwargs.pop(name, None)
    return value if value is not None else getattr(config, name, default)


def swiglu(gate: torch.Tensor) -> torch.Tensor:
    """OpenMoE's "swiglu" activation: (..., 2I) -> (..., I), first half times silu of the second half."""
    first, second = gate.chunk(2, dim=-1)
    return first * F.silu(second)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class OpenMoeRotaryEmbedding(nn.Module):
    """Rotate-half RoPE over the whole head_dim, base 10000, angles in fp32 (pairs j and j + d/2).

    Frequencies are computed in every call (no buffer): nothing to re-initialise after meta-device loading.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, S) -> cos, sin (B, S, d) in fp32."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device) / self.head_dim
        inverse_frequency = 1.0 / ROPE_BASE**exponent  # (d/2,)
        angles = position_ids.float()[..., None] * inverse_frequency  # (B, S, d/2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


class OpenMoeAttention(nn.Module):
    """Multi-head attention with grouped KV heads; scores q.k^T are NOT divided by sqrt(head_dim)."""

    def __init__(self, config: OpenMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], cache=None) -> torch.Tensor:
        """hidden_states (B, S, D), attention_bias (B, 1, S, K) additive, cos/sin (B, S, d) -> (B, S, D)."""
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.to(query.dtype).unsqueeze(1) for t in position_embeddings)  # (B, 1, S, d)
        query = query * cos + rotate_half(query) * sin  # (B, H, S, d)
        key = key * cos + rotate_half(key) * sin  # (B, Hkv, S, d)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, Hkv, K, d)
        repeats = self.n_heads // self.n_kv_heads
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        scores = query @ key.transpose(2, 3) + attention_bias  # (B, H, S, K), no 1/sqrt(d)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = (weights @ value).transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.o_proj(output)


class OpenMoeMLP(nn.Module):
    """The dense gated MLP (dense layers' `mlp` and MoE layers' `extra_mlp`): gate_proj is (2I, D)."""

    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x)) * self.up_proj(x))


class OpenMoeExperts(nn.Module):
    """E gated-MLP experts stored input-major, as OpenMoE checkpoints hold them (used as x @ W)."""

    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        n, hidden, inter = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = n
        self.wi_gate = nn.Parameter(torch.empty(n, hidden, 2 * inter))  # (E, D, 2I)
        self.wi_up = nn.Parameter(torch.empty(n, hidden, inter))  # (E, D, I)
        self.wo = nn.Parameter(torch.empty(n, inter, hidden))  # (E, I, D)

    def forward(self, tokens: torch.Tensor, expert_index: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """tokens (T, D), expert_index (T, k), expert_weights (T, k) -> (T, D) = sum_j w_j Expert_{i_j}(x).

        Index E (the sentinel) means "no FFN expert": such slots are skipped, no compute.
        """
        output = torch.zeros_like(tokens)
        hit = torch.unique(expert_index[expert_index < self.num_experts])
        for expert in hit.tolist():
            token_idx, slot = torch.where(expert_index == expert)
            x = tokens[token_idx]  # (t, D)
            hidden = swiglu(x @ self.wi_gate[expert]) * (x @ self.wi_up[expert])  # (t, I)
            expert_out = (hidden @ self.wo[expert]) * expert_weights[token_idx, slot, None].to(tokens.dtype)
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
        return output


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """ColossalAI's MoeRouter.get_capacity: floor(k * cf * T / E), rounded up to even, at least min_capacity."""
    capacity = math.floor(top_k * capacity_factor * n_tokens / n_experts)
    capacity += capacity % 2
    return max(capacity, min_capacity)


def within_capacity(expert_index: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit: index (T, k) -> keep (T, k) bool.

    Each expert's slots are filled by all first choices in token order, then all second choices, and so on
    (ColossalAI's Top2Router: rank2 counts every first choice, kept or not). Sentinel slots (index >= E) use no
    capacity and are reported as kept.
    """
    n_tokens, top_k = expert_index.shape
    one_hot = F.one_hot(expert_index.clamp_max(n_experts), n_experts + 1)[..., :n_experts]  # (T, k, E)
    by_choice = one_hot.transpose(0, 1).reshape(top_k * n_tokens, n_experts)  # (k*T, E), choice-major order
    rank = by_choice.cumsum(dim=0) - 1  # (k*T, E): position of each assignment in its expert's queue
    fits = ((rank < capacity) | (by_choice == 0)).all(dim=-1)  # (k*T,)
    return fits.view(top_k, n_tokens).transpose(0, 1)  # (T, k)


class OpenMoeSparseBlock(nn.Module):
    """OpenMoE's MoE block (ColossalAI SparseMLP with Top2Router): router, capacity, input-major experts."""

    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        self.top_k = config.router_topk
        self.capacity_factors = (config.router_capacity_factor_train, config.router_capacity_factor_eval)
        self.min_capacity = config.router_min_capacity
        self.gate_weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)
        self.experts = OpenMoeExperts(config)

    def capacity(self, n_tokens: int, n_experts: int) -> int:
        factor = self.capacity_factors[0] if self.training else self.capacity_factors[1]
        return expert_capacity(n_tokens, n_experts, self.top_k, factor, self.min_capacity)

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None = None):
        """hidden_states (B, S, D) -> output (B, S, D), router logits (B*S, E). `previous_logits` is unused."""
        batch, length, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # (T, D): every token of the call is one routing group
        logits = F.linear(tokens, self.gate_weight).float()  # (T, E), router math in fp32
        probabilities = torch.softmax(logits, dim=-1)  # (T, E)
        remaining, choices = probabilities, []
        for _ in range(self.top_k):  # argmax, then argmax of the rest (ties: lowest index), as Top2Router
            choice = remaining.argmax(dim=-1)  # (T,)
            choices.append(choice)
            remaining = remaining.scatter(-1, choice[:, None], float("-inf"))
        expert_index = torch.stack(choices, dim=-1)  # (T, k)
        weights = probabilities.gather(-1, expert_index)  # (T, k), raw probabilities: not renormalised
        keep = within_capacity(expert_index, self.experts.num_experts, self.capacity(tokens.shape[0],
                                                                                    self.experts.num_experts))
        expert_index = expert_index.masked_fill(~keep, self.experts.num_experts)  # dropped -> sentinel
        weights = weights.masked_fill(~keep, 0.0)
        output = self.experts(tokens, expert_index, weights)
        return output.view(batch, length, hidden), logits


class OpenMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm layer: attention, then the MLP or MoE block, then (MoE layers only) the extra dense MLP."""

    def __init__(self, config: OpenMoeConfig, layer_idx: int):
        super().__init__()
        self.is_moe = (layer_idx + 1) % config.moe_layer_interval == 0
        self.self_attn = OpenMoeAttention(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_moe:
            self.mlp = self.build_moe_block(config, layer_idx)
            self.pre_extra_mlp_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.extra_mlp = OpenMoeMLP(config)
        else:
            self.mlp = OpenMoeMLP(config)

    def build_moe_block(self, config: OpenMoeConfig, layer_idx: int) -> nn.Module:
        return OpenMoeSparseBlock(config)

    def forward(self, hidden_states: torch.Tensor, previous_logits: torch.Tensor | None, attention_bias=None,
                position_embeddings=None, cache=None):
        """-> hidden_states (B, S, D), and the router logits of this layer (MoE) or `previous_logits` (dense).

        `previous_logits` is positional so that gradient checkpointing carries it.
        """
        residual = hidden_states
        hidden_states = residual + self.self_attn(
            self.input_layernorm(hidden_states), attention_bias, position_embeddings, cache
        )
        normed = self.post_attention_layernorm(hidden_states)
        if not self.is_moe:
            return hidden_states + self.mlp(normed), previous_logits
        moe_output, router_logits = self.mlp(normed, previous_logits)
        hidden_states = hidden_states + moe_output
        hidden_states = hidden_states + self.extra_mlp(self.pre_extra_mlp_layernorm(hidden_states))
        return hidden_states, router_logits


def attention_bias(attention_mask: torch.Tensor | None, batch: int, length: int, past: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask (B, 1, S, past + S): causal and padding, with key position 0 always visible (as OpenMoE)."""
    total = past + length
    query_position = torch.arange(past, total, device=device)[:, None]  # (S, 1)
    allowed = torch.arange(total, device=device)[None, :] <= query_position  # (S, K)
    allowed = allowed[None, None].expand(batch, 1, length, total)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("OpenMoE models take a 2-D attention_mask (batch, past + sequence)")
        allowed = allowed & attention_mask[:, None, None, -total:].bool()
    allowed = allowed.clone()
    allowed[..., 0] = True
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class OpenMoePreTrainedModel(PreTrainedModel):
    config: OpenMoeConfig
    config_class = OpenMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OpenMoeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, OpenMoeSparseBlock):
            nn.init.normal_(module.gate_weight, mean=0.0, std=std)
        elif isinstance(module, OpenMoeExperts):
            for weight in (module.wi_gate, module.wi_up, module.wo):
                nn.init.normal_(weight, mean=0.0, std=std)


class OpenMoeModel(OpenMoePreTrainedModel):
    decoder_layer_class = OpenMoeDecoderLayer

    def __init__(self, config: OpenMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = OpenMoeRotaryEmbedding(config.head_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @accepts_past_key_values
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, **kwargs) -> MoeModelOutputWithPast:
        """Embeddings (no scaling), the layers carrying the last MoE layer's router logits, the final norm.

        `router_logits` holds one (B*S, E') tensor per MoE layer when `output_router_logits` (argument, else
        config) is set. Positions default to past + 0..S-1. `return_dict=False` returns `output.to_tuple()`.
        """
        return_dict = resolve_flag(self.config, kwargs, "return_dict", default=True)
        output_router_logits = resolve_flag(self.config, kwargs, "output_router_logits", default=False)
        cache = cache if cache is not None else pop_cache(kwargs)
        pop_cache(kwargs)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None].expand(batch, -1)
        bias = attention_bias(attention_mask, batch, length, past, inputs_embeds.dtype, inputs_embeds.device)
        position_embeddings = self.rotary_emb(position_ids)
        hidden_states = inputs_embeds
        all_hidden_states = [hidden_states] if output_hidden_states else None
        router_logits, previous_logits = [], None
        for layer in self.layers:
            hidden_states, logits = layer(hidden_states, previous_logits, attention_bias=bias,
                                          position_embeddings=position_embeddings, cache=cache)
            if layer.is_moe:
                router_logits.append(logits)
                previous_logits = logits
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            router_logits=tuple(router_logits) if output_router_logits else None,
            **{CACHE_ARG: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class OpenMoeForCausalLM(OpenMoePreTrainedModel, GenerationMixin):
    """OpenMoE with its untied LM head; logits in fp32. The loss is plain next-token cross-entropy (OpenMoE's
    training-only extras, label smoothing and the router/output z-losses, are not reproduced)."""

    model_class = OpenMoeModel

    def __init__(self, config: OpenMoeConfig):
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @accepts_past_key_values
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_router_logits=None, logits_to_keep=0,
                **kwargs) -> MoeCausalLMOutputWithPast:
        """`output_router_logits` and `return_dict`: the argument, else the config's."""
        return_dict = resolve_flag(self.config, kwargs, "return_dict", default=True)
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_router_logits=output_router_logits, return_dict=True, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        output = self.make_output(outputs, logits, loss, attention_mask, output_router_logits)
        return output if return_dict else output.to_tuple()

    def make_output(self, outputs, logits, loss, attention_mask, output_router_logits: bool):
        """The causal-LM output; the MoE++ variant adds routing statistics and the balance loss here."""
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits if output_router_logits else None,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
        )


__all__ = ["OpenMoeForCausalLM", "OpenMoeModel", "OpenMoePreTrainedModel"]
