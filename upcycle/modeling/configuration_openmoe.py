"""Configuration of OpenMoE checkpoints, and of their MoE++ conversions.

OpenMoE checkpoints (Hub OrionZheng/openmoe-base, -8b, -8b-chat, -34b-200B) say `"model_type": "llama"` with
`"architectures": ["OpenMoeForCausalLM"]`: a Llama config plus MoE fields. `OpenMoeConfig` reads exactly those
fields; its own model_type is "openmoe" so that registering it never shadows Llama.

This file is copied into every converted checkpoint as remote code: it imports only transformers and its sibling
files (relative imports), never `upcycle`.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .moepp_fields import MoePPFields


@strict
class OpenMoeConfig(LlamaConfig):
    """A Llama config with OpenMoE's MoE fields (names and defaults as in ColossalAI's `set_openmoe_args`).

    Decoder layer i (0-based) is an MoE layer iff (i + 1) % moe_layer_interval == 0.
    """

    model_type = "openmoe"

    num_experts: int = 16  # FFN experts per MoE layer
    moe_layer_interval: int = 4  # every moe_layer_interval-th layer is an MoE layer
    router_topk: int = 2  # experts per token (OpenMoE ships top-2)
    router_capacity_factor_train: float = 1.25  # capacity factor in training mode
    router_capacity_factor_eval: float = 2.0  # capacity factor in eval mode (tokens are dropped at inference too)
    router_min_capacity: int = 4  # lower bound of an expert's capacity
    hidden_act: str = "swiglu"  # OpenMoE's gated MLP: a * silu(b) on the two halves of gate_proj
    output_router_logits: bool = False  # return router logits (and, for MoE++, routing statistics) by default

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if (i + 1) % self.moe_layer_interval == 0]

    def validate_architecture(self):
        """OpenMoE-8B has 24 heads of 128 on a 2048-wide model: head_dim is explicit, so no divisibility rule."""
        if self.moe_layer_interval < 1:
            raise ValueError(f"moe_layer_interval must be 1 or more, got {self.moe_layer_interval}")
        if not 0 < self.router_topk <= self.num_experts:
            raise ValueError(f"router_topk must be in [1, num_experts], got {self.router_topk}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "swiglu":
            raise ValueError(f"OpenMoE's MLPs use hidden_act 'swiglu', got {self.hidden_act!r}")


@strict
class MoePPOpenMoeConfig(OpenMoeConfig, MoePPFields):
    """An OpenMoE config with MoE++ zero-computation experts and gating residuals."""

    model_type = "moepp_openmoe"


__all__ = ["MoePPOpenMoeConfig", "OpenMoeConfig"]
