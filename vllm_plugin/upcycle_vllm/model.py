"""MoE++ causal LMs for vLLM: Mixtral and Qwen3-MoE families, built on vLLM's own layers.

Attention, norms, embeddings, the LM head, the dense MLP and the FFN experts (FusedMoE) are vLLM's; what is
new is the MoE++ block (layer.py) and a model loop that carries each MoE layer's router logits G_j to the next MoE
layer (the gating residual), skipping dense layers. Checkpoints load from upcycle's safetensors layout as
written by `upcycle convert` (source tensors under their source names: Mixtral's `block_sparse_moe.` or `mlp.`,
per-expert `w1/w2/w3` or `gate_proj/up_proj/down_proj`; MoE++ tensors under `mlp.gate.*` and
`mlp.zero_computation_experts.*`).
"""

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, extract_layer_index, make_layers
from vllm.sequence import IntermediateTensors

from .config import moepp_field
from .layer import ExpertLayout, MoePPSparseBlock


class _Family:
    """What differs between the families this plugin serves."""

    name: str
    ckpt_names: tuple[str, str, str]
    routing_weights_in_input_dtype = False

    def n_ffn(self, config) -> int: ...
    def moe_layers(self, config) -> list[int]: ...
    def renormalize(self, config) -> bool: ...
    def expert_intermediate_size(self, config) -> int: ...
    def attention(self, config, cache_config, quant_config, prefix: str) -> nn.Module: ...
    def dense_mlp(self, config, quant_config, prefix: str) -> nn.Module: ...


class _Mixtral(_Family):
    name = "mixtral"
    ckpt_names = ("w1", "w2", "w3")

    def n_ffn(self, config):
        return config.num_local_experts

    def moe_layers(self, config):
        return list(range(config.num_hidden_layers))

    def renormalize(self, config):
        return True

    def expert_intermediate_size(self, config):
        return config.intermediate_size

    def attention(self, config, cache_config, quant_config, prefix):
        from vllm.model_executor.models.mixtral import MixtralAttention

        return MixtralAttention(config=config, hidden_size=config.hidden_size,
                                num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                                max_position=config.max_position_embeddings, cache_config=cache_config,
                                quant_config=quant_config, prefix=prefix)


class _Qwen3Moe(_Family):
    name = "qwen3_moe"
    ckpt_names = ("gate_proj", "down_proj", "up_proj")
    routing_weights_in_input_dtype = True  # Qwen3-MoE casts its top-k weights to the model dtype

    def n_ffn(self, config):
        return config.num_experts

    def moe_layers(self, config):
        dense = getattr(config, "mlp_only_layers", None) or []
        return [layer for layer in range(config.num_hidden_layers)
                if layer not in dense and config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0]

    def renormalize(self, config):
        return bool(config.norm_topk_prob)

    def expert_intermediate_size(self, config):
        return config.moe_intermediate_size

    def attention(self, config, cache_config, quant_config, prefix):
        from vllm.model_executor.models.qwen3_moe import Qwen3MoeAttention

        return Qwen3MoeAttention(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                                 num_kv_heads=config.num_key_value_heads, rope_parameters=config.rope_parameters,
                                 max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
                                 head_dim=getattr(config, "head_dim", None), rms_norm_eps=config.rms_norm_eps,
                                 qkv_bias=getattr(config, "attention_bias", False), cache_config=cache_config,
                                 quant_config=quant_config, prefix=prefix)

    def dense_mlp(self, config, quant_config, prefix):
        from vllm.model_executor.models.qwen3_moe import Qwen3MoeMLP

        return Qwen3MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                           hidden_act=config.hidden_act, quant_config=quant_config, prefix=prefix)


class MoePPDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, family: _Family, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        layer_idx = extract_layer_index(prefix)
        moe_layers = family.moe_layers(config)
        self.self_attn = family.attention(config, vllm_config.cache_config, quant_config, f"{prefix}.self_attn")
        self.is_moe_layer = layer_idx in moe_layers
        if self.is_moe_layer:
            if moepp_field(config, "routing_rule") is not None:
                raise ValueError("this checkpoint is a trained control (routing_rule "
                                 f"{moepp_field(config, 'routing_rule')!r}), which the plugin does not serve; "
                                 "serve the MoE++ checkpoint or the source")
            layout = ExpertLayout(family.n_ffn(config), moepp_field(config, "n_zero_experts"),
                                  moepp_field(config, "n_copy_experts"), moepp_field(config, "n_constant_experts"))
            self.mlp = MoePPSparseBlock(
                config, layout=layout, top_k=config.num_experts_per_tok,
                intermediate_size=family.expert_intermediate_size(config), renormalize=family.renormalize(config),
                zero_expert_semantics=moepp_field(config, "zero_expert_semantics"),
                zero_computation_denominator=moepp_field(config, "zero_computation_denominator"),
                zero_computation_scores=moepp_field(config, "zero_computation_scores"),
                # the first MoE layer has no previous logits, so no gating-residual matrix
                has_residual=bool(moepp_field(config, "gating_residual")) and layer_idx != moe_layers[0],
                ckpt_names=family.ckpt_names, routing_weights_in_input_dtype=family.routing_weights_in_input_dtype,
                quant_config=quant_config, params_dtype=vllm_config.model_config.dtype, prefix=f"{prefix}.mlp",
            )
        else:
            self.mlp = family.dense_mlp(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, previous_logits):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        if self.is_moe_layer:
            hidden_states, logits = self.mlp(hidden_states, previous_logits)
            return hidden_states, residual, logits
        return self.mlp(hidden_states), residual, previous_logits  # dense layer: G_{j-1} passes through


class MoePPModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, family: _Family, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise NotImplementedError("upcycle_vllm: pipeline parallelism is not supported (the gating residual "
                                      "would have to cross stages)")
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: MoePPDecoderLayer(vllm_config, family, prefix),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        previous_logits = None  # G of the last MoE layer; None before the first
        for layer in self.layers:
            hidden_states, residual, previous_logits = layer(positions, hidden_states, residual, previous_logits)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class _MoePPForCausalLM(nn.Module):
    family: _Family
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={".block_sparse_moe.": ".mlp."},  # classic Mixtral keys; MoE++ tensors under .mlp.
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".mlp.gate_proj": (".mlp.gate_up_proj", 0),  # dense layers (Qwen's mlp_only_layers)
            ".mlp.up_proj": (".mlp.gate_up_proj", 1),
        },
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = MoePPModel(vllm_config=vllm_config, family=self.family, prefix=f"{prefix}model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def moe_blocks(self) -> list[MoePPSparseBlock]:
        return [layer.mlp for layer in self.model.layers if getattr(layer, "is_moe_layer", False)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self, ignore_unexpected_suffixes=["rotary_emb.inv_freq"])
        loaded = loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
        blocks = self.moe_blocks()
        for block in blocks:
            block.gate.finalize()
        for block, following in zip(blocks, blocks[1:] + [None]):
            block.pass_logits = following is not None and following.gate.residual_weight_f32 is not None
        return loaded


class MoePPMixtralForCausalLM(_MoePPForCausalLM):
    family = _Mixtral()


class MoePPQwen3MoeForCausalLM(_MoePPForCausalLM):
    family = _Qwen3Moe()
