"""A source family as data: which config fields mean what, which tensors the source has, how routing works.

The conversion surgery is one generic piece of code driven by a `FamilySpec`; adding a family adds a spec (and
its MoE++ model variant), never a branch in the surgery. Every tensor of the source model is listed as data
(`TensorRule`s and the expert layouts), with the config class's aliases and defaults, so that checking a
checkpoint needs neither torch nor transformers (tests compare the tables with transformers' own classes).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UpcycleError

# A shape rule: one item per dimension, each an int or a product of config fields and ints separated by "*"
# ("hidden_size", "2*intermediate_size", "num_attention_heads*head_dim").
ShapeRule = tuple[str | int, ...]

# Where a `TensorRule` occurs: once in the model, in every decoder layer, in the MoE layers only
# (`FamilySpec.moe_layers`), or in the other (dense) layers only.
SCOPES = ("model", "every_layer", "moe_layer", "dense_layer")


class MissingConfigField(KeyError):
    """A config field a shape rule needs is absent from config.json and from the family's defaults."""

    @property
    def field(self) -> str:
        return str(self.args[0])


def int_field(config: dict, name: str) -> int:
    """config[name] as an int: a missing field raises MissingConfigField, a non-integer one a clear error."""
    if name not in config:
        raise MissingConfigField(name)
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpcycleError(f"config.json's {name!r} is {value!r}, not a whole number")
    return value


def resolve_shape(rule: ShapeRule, config: dict) -> tuple[int, ...]:
    """("num_local_experts", "2*intermediate_size", 4) -> (8, 28672, 4) for Mixtral-8x7B's config."""

    def resolve(item: str | int) -> int:
        if isinstance(item, int):
            return item
        product = 1
        for factor in item.split("*"):
            factor = factor.strip()
            product *= int(factor) if factor.isdigit() else int_field(config, factor)
        return product

    return tuple(resolve(item) for item in rule)


def flag_is_set(when: str, config: dict) -> bool:
    """`when` names a config field that must be truthy ("qkv_bias") or, with a "!" prefix, falsy."""
    negate = when.startswith("!")
    name = when.removeprefix("!")
    if name not in config:
        raise MissingConfigField(name)
    return bool(config[name]) != negate


@dataclass(frozen=True)
class TensorRule:
    """One tensor of the source model, by its in-memory transformers 5 name.

    `template` may hold `{layer}`; `scope` is one of SCOPES; `when` (optional) names a boolean config field, or a
    flag the family's `derive` hook computes, that must be truthy ("!" prefix: falsy) for the tensor to exist.
    """

    template: str
    shape: ShapeRule
    scope: str = "every_layer"
    when: str | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown tensor scope {self.scope!r}; one of {SCOPES}")
        if (self.scope == "model") == ("{layer}" in self.template):
            raise ValueError(f"{self.template}: only layer-scoped templates have a {{layer}} placeholder")


@dataclass(frozen=True)
class ExpertKeyLayout:
    """One on-disk layout of a layer's FFN experts: key templates (relative to the MoE prefix) and shapes.

    The layout whose templates have no `{expert}` placeholder is also the in-memory layout of the source class."""

    name: str
    keys: dict[str, ShapeRule]


def _unchanged(config: dict) -> dict:
    return config


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
    # For families transformers lacks: returns the project's own source class (used to load the source, and by
    # tests as the reference for `tensors`). None: `source_class` names a transformers class.
    source_class_loader: Callable[[], type] | None = None
    # Modules (remote-code files) holding the MoE++ config and model classes, for the output's auto_map.
    moepp_config_module: str = "configuration_upcycle_moepp"
    moepp_model_module: str = "modeling_upcycle_moepp"
    renormalize_field: str | None = None
    # Config field counting extra decoder layers after the last one, which the source class does not load
    # (DeepSeek-V3's multi-token-prediction layers: transformers ignores their keys). Their tensors are carried
    # over unchanged and not checked; the MoE++ model ignores them as the source class does.
    unloaded_layers_field: str | None = None
    # Every tensor of the source model but the FFN experts (those are `expert_layouts`), in-memory names.
    tensors: tuple[TensorRule, ...] = ()
    # The source config class's `attribute_map` (alias -> field), as data.
    config_aliases: dict[str, str] = field(default_factory=dict)
    # The source config class's defaults for the shape-relevant fields a config.json may omit.
    config_defaults: dict[str, object] = field(default_factory=dict)
    # config (aliases and defaults filled in) -> config plus the derived values the shape rules and `when` flags
    # use (head_dim from hidden_size / heads, DeepSeek's q_lora flag...): what the config class's __post_init__
    # and the modules' __init__ compute.
    derive: Callable[[dict], dict] = _unchanged

    def source_model_class(self) -> type:
        """The class that computes the source model: the project's own, or transformers'. Never called on the
        convert path (it imports torch and transformers)."""
        if self.source_class_loader is not None:
            return self.source_class_loader()
        import transformers

        return getattr(transformers, self.source_class)

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
        config = dict(config)
        for alias, target in self.config_aliases.items():
            if alias not in config and target in config:
                config[alias] = config[target]
            elif target not in config and alias in config:
                config[target] = config[alias]
        return config

    def with_defaults(self, config: dict) -> dict:
        """Aliases filled in, then the config class's defaults for the fields config.json omits."""
        config = self.with_aliases(config)
        return {**self.config_defaults, **config}

    def shape_config(self, config: dict) -> dict:
        """Every value the shape rules and `when` flags read: aliases, defaults, then the `derive` hook."""
        return self.derive(self.with_defaults(config))

    def moe_layer_indices(self, config: dict) -> list[int]:
        """The decoder layers that are MoE layers, from the spec's `moe_layers` hook."""
        return self.moe_layers(self.with_defaults(config))

    def n_experts(self, config: dict) -> int:
        return int(self.with_aliases(config)[self.n_experts_field])

    def top_k(self, config: dict) -> int:
        return int(self.with_aliases(config)[self.top_k_field])

    def in_memory_expert_layout(self) -> ExpertKeyLayout:
        """The expert layout the source class itself has (its templates carry no `{expert}` placeholder)."""
        return next(layout for layout in self.expert_layouts if not any("{expert}" in key for key in layout.keys))


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


def unloaded_layer(name: str, spec: FamilySpec, config: dict) -> bool:
    """Whether `name` belongs to a decoder layer past the last one that the source class does not load."""
    if spec.unloaded_layers_field is None or not name.startswith("model.layers."):
        return False
    index = name.split(".")[2]
    first, count = config["num_hidden_layers"], config.get(spec.unloaded_layers_field) or 0
    return index.isdigit() and first <= int(index) < first + int(count)
