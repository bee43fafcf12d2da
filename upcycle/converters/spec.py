"""A source family as data: which config fields mean what, where the MoE tensors live, how routing works.

The conversion surgery is one generic piece of code driven by a `FamilySpec`; adding a family adds a spec (and
its MoE++ model variant), never a branch in the surgery.
"""

from dataclasses import dataclass, field
from typing import Callable

# Names of the per-expert tensors, with `{layer}` and `{expert}` placeholders, mapped to a shape rule.
# A shape rule is a tuple of config-field names, "factor*field" products, or literal ints.
ShapeRule = tuple[str | int, ...]


@dataclass(frozen=True)
class ExpertKeyLayout:
    """One on-disk layout of a layer's FFN experts: key templates (relative to the MoE prefix) and shapes."""

    name: str
    keys: dict[str, ShapeRule]


@dataclass(frozen=True)
class FamilySpec:
    """Everything the generic conversion needs to know about one source family."""

    name: str  # e.g. "mixtral"
    architectures: tuple[str, ...]  # config.architectures[0] values that select this family
    model_types: tuple[str, ...]  # config.model_type values that select it (checked after architectures)
    source_class: str  # transformers' class for the source, e.g. "MixtralForCausalLM"
    moepp_model_type: str  # model_type of the converted checkpoint
    moepp_config_class: str  # class names inside upcycle/modeling (remote code)
    moepp_model_class: str
    n_experts_field: str
    top_k_field: str
    # Where one MoE layer's tensors live in the checkpoint; every prefix a supported layout may use.
    moe_prefixes: tuple[str, ...]
    router_key: str  # relative to the MoE prefix, shape (n_experts, hidden_size)
    expert_layouts: tuple[ExpertKeyLayout, ...]
    renormalizes_top_k: bool
    # Prefix under which the converted model keeps one MoE layer's new tensors (the in-memory module path).
    moepp_prefix: str
    # Which decoder layers are MoE layers (default: all of them).
    moe_layers: Callable[[dict], list[int]] = field(
        default=lambda config: list(range(config["num_hidden_layers"]))
    )

    def n_experts(self, config: dict) -> int:
        return int(config[self.n_experts_field])

    def top_k(self, config: dict) -> int:
        return int(config[self.top_k_field])
