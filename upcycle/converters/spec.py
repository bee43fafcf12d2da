"""A source family as data: which config fields mean what, where the MoE tensors live, how routing works.

The conversion surgery is one generic piece of code driven by a `FamilySpec`; adding a family adds a spec (and
its MoE++ model variant), never a branch in the surgery.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

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
    # Whether the family renormalises its top-k weights to sum to 1; `renormalize_field`, when set, names the
    # config field that decides it (e.g. Qwen's `norm_topk_prob`), with `renormalizes_top_k` as its default.
    renormalizes_top_k: bool
    # Prefix under which the converted model keeps one MoE layer's new tensors (the in-memory module path).
    moepp_prefix: str
    # Which decoder layers are MoE layers (default: all of them).
    moe_layers: Callable[[dict], list[int]] = field(
        default=lambda config: list(range(config["num_hidden_layers"]))
    )
    # For families transformers lacks: returns the project's own source class (built on the meta device to check
    # shapes, and used to load the source). None: `source_class` names a transformers class.
    source_class_loader: Callable[[], type] | None = None
    # Modules (remote-code files) holding the MoE++ config and model classes, for the output's auto_map.
    moepp_config_module: str = "configuration_upcycle_moepp"
    moepp_model_module: str = "modeling_upcycle_moepp"

    def source_model_class(self) -> type:
        """The class that computes the source model: the project's own, or transformers'."""
        if self.source_class_loader is not None:
            return self.source_class_loader()
        import transformers

        return getattr(transformers, self.source_class)

    renormalize_field: str | None = None

    def renormalizes(self, config: dict) -> bool:
        if self.renormalize_field is None:
            return self.renormalizes_top_k
        return bool(config.get(self.renormalize_field, self.renormalizes_top_k))

    def default_zero_expert_semantics(self, config: dict) -> str:
        """The official MoE++ semantics for families that renormalise; the family's own normalisation otherwise."""
        return "drop_and_renormalize" if self.renormalizes(config) else "keep_weight"

    def with_aliases(self, config: dict) -> dict:
        """config.json with every alias of the family's config class filled in both ways (transformers 5 writes
        Qwen3-MoE's `num_experts` as `num_local_experts`; the Hub's files say `num_experts`)."""
        try:
            attribute_map = self.source_model_class().config_class.attribute_map
        except (AttributeError, ImportError):
            attribute_map = {}
        config = dict(config)
        for alias, target in attribute_map.items():
            if alias not in config and target in config:
                config[alias] = config[target]
            elif target not in config and alias in config:
                config[target] = config[alias]
        return config

    def moe_layer_indices(self, config: dict) -> list[int]:
        """The decoder layers that are MoE layers, from the spec's `moe_layers` hook."""
        return self.moe_layers(self.with_aliases(config))

    def n_experts(self, config: dict) -> int:
        return int(self.with_aliases(config)[self.n_experts_field])

    def top_k(self, config: dict) -> int:
        return int(self.with_aliases(config)[self.top_k_field])


def swiglu_expert_layouts(n_experts_field: str, intermediate_field: str) -> tuple[ExpertKeyLayout, ...]:
    """The two layouts of gate/up/down SwiGLU experts (Qwen-MoE, OLMoE, DeepSeek): per-expert Linear weights
    (`save_original_format=True`, the Hub's layout) and transformers 5's fused 3-D tensors."""
    return (
        ExpertKeyLayout(
            name="per-expert",
            keys={
                "experts.{expert}.gate_proj.weight": (intermediate_field, "hidden_size"),
                "experts.{expert}.up_proj.weight": (intermediate_field, "hidden_size"),
                "experts.{expert}.down_proj.weight": ("hidden_size", intermediate_field),
            },
        ),
        ExpertKeyLayout(
            name="fused",
            keys={
                "experts.gate_up_proj": (n_experts_field, f"2*{intermediate_field}", "hidden_size"),
                "experts.down_proj": (n_experts_field, "hidden_size", intermediate_field),
            },
        ),
    )
