"""Check a source checkpoint against its family spec and config, before any byte is written.

Expected shapes come from two places: transformers' own source class built on the meta device (every tensor but
the per-expert FFN keys, no memory used), and the spec's expert layouts (per-expert or fused keys).
"""

import re
from dataclasses import dataclass

import torch

from ..checkpoint.source import SourceCheckpoint
from ..converters import FamilySpec
from ..errors import UpcycleError


@dataclass(frozen=True)
class ZeroComputationCounts:
    zero: int
    copy: int
    constant: int

    @property
    def total(self) -> int:
        return self.zero + self.copy + self.constant

    @classmethod
    def paper_default(cls, n_ffn: int) -> "ZeroComputationCounts":
        """Z = max(N/4, 4) zero-computation experts: one zero, one copy, the rest constant.

        This reproduces the published configurations (1/1/2 for 8 and 16 FFN experts, 1/1/6 for 32); the
        paper's formula max(N/4 - zero - copy, 1) for the constant count would give 1/1/1 at N = 8, which no
        published model uses."""
        total = max(n_ffn // 4, 4)
        return cls(zero=1, copy=1, constant=total - 2)


@dataclass(frozen=True)
class ConversionPlan:
    spec: FamilySpec
    expert_layout: str  # name of the on-disk expert layout found
    moe_layers: list[int]
    n_ffn: int
    top_k: int
    hidden_size: int
    router_dtype: str  # safetensors dtype of the source routers: new tensors use it
    counts: ZeroComputationCounts


def source_config_object(spec: FamilySpec, config: dict):
    """transformers' config object for the source, from plain JSON (no remote code)."""
    source_class = spec.source_model_class()
    config_class = source_class.config_class
    fields = {key: value for key, value in config.items() if key not in ("model_type", "auto_map")}
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as error:
        raise UpcycleError(f"the config is not a valid {spec.name} config: {error}") from error


def expected_shapes(spec: FamilySpec, config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for transformers' source class, built on the meta device."""
    source_class = spec.source_model_class()
    with torch.device("meta"):
        model = source_class(source_config_object(spec, config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def resolve_shape(rule: tuple, config: dict) -> tuple[int, ...]:
    """("num_local_experts", "2*intermediate_size", 4) -> (8, 28672, 4) for Mixtral-8x7B's config."""

    def resolve(item) -> int:
        if isinstance(item, int):
            return item
        factor, _, field = item.rpartition("*")
        return int(factor or 1) * int(config[field])

    return tuple(resolve(item) for item in rule)


def _canonical_name(name: str, spec: FamilySpec, layer_patterns: list[re.Pattern]) -> str:
    """Map any of the spec's MoE prefixes to the in-memory prefix (e.g. block_sparse_moe -> mlp)."""
    for pattern in layer_patterns:
        match = pattern.match(name)
        if match:
            return spec.moepp_prefix.format(layer=match.group(1)) + name[match.end():]
    return name


def plan_conversion(source: SourceCheckpoint, spec: FamilySpec, counts: ZeroComputationCounts | None,
                    ) -> ConversionPlan:
    """Validate every source tensor's name and shape; return what the surgery will add."""
    config = spec.with_aliases(source.config)
    for field in (spec.n_experts_field, spec.top_k_field, "hidden_size", "num_hidden_layers"):
        if not isinstance(config.get(field), int):
            raise UpcycleError(f"config.json lacks the integer field {field!r} that a {spec.name} config has")
    n_ffn, top_k, hidden = spec.n_experts(config), spec.top_k(config), int(config["hidden_size"])
    if not 0 < top_k <= n_ffn:
        raise UpcycleError(f"config.json says {top_k} experts per token but only {n_ffn} experts")
    counts = counts or ZeroComputationCounts.paper_default(n_ffn)
    for name, count in (("zero", counts.zero), ("copy", counts.copy), ("constant", counts.constant)):
        if count < 0:
            raise UpcycleError(f"the number of {name} experts must be 0 or more, got {count}")

    expected = expected_shapes(spec, config)
    layer_patterns = [
        re.compile(re.escape(prefix).replace(re.escape("{layer}"), r"(\d+)")) for prefix in spec.moe_prefixes
    ]
    moe_layers = spec.moe_layers(config)
    if not moe_layers:
        raise UpcycleError(f"this {spec.name} config has no MoE layer, so there is nothing to convert")
    layouts_found = set()
    covered: set[str] = set()
    for name, info in sorted(source.tensors.items()):  # sorted: the same first error on every run
        canonical = _canonical_name(name, spec, layer_patterns)
        if canonical in expected:
            want = expected[canonical]
            covered.add(canonical)
        else:
            want, layout = _expert_key_shape(canonical, spec, config, moe_layers, n_ffn)
            if want is None:
                raise UpcycleError(f"tensor {name} is not part of a {spec.name} model with this config")
            layouts_found.add(layout)
        if tuple(info.shape) != tuple(want):
            raise UpcycleError(
                f"tensor {name} has shape {list(info.shape)} but the config implies {list(want)}"
            )
    if len(layouts_found) > 1:
        raise UpcycleError("the checkpoint mixes per-expert and fused expert layouts")
    fused_keys = {key for key in expected if ".experts." in key}
    if layouts_found:  # per-expert layout: the fused in-memory keys are covered by per-expert keys
        _check_per_expert_complete(source, spec, config, moe_layers, n_ffn, layer_patterns)
        covered |= fused_keys
    optional = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    missing = sorted(set(expected) - covered - optional)
    if missing:
        raise UpcycleError(f"the checkpoint lacks tensor {missing[0]} that a {spec.name} model needs")
    router_name = spec.moepp_prefix.format(layer=moe_layers[0]) + spec.router_key
    router_dtype = next(
        info.dtype for name, info in source.tensors.items()
        if _canonical_name(name, spec, layer_patterns) == router_name
    )
    layout_name = layouts_found.pop() if layouts_found else "fused"
    return ConversionPlan(spec, layout_name, moe_layers, n_ffn, top_k, hidden, router_dtype, counts)


def _expert_key_shape(canonical: str, spec: FamilySpec, config: dict, moe_layers: list[int], n_ffn: int):
    """Shape and layout name of a per-expert key, or (None, None) if the name is not one."""
    for layout in spec.expert_layouts:
        for template, rule in layout.keys.items():
            if "{expert}" not in template:
                continue
            pattern = re.escape(spec.moepp_prefix + template)
            pattern = pattern.replace(re.escape("{layer}"), r"(\d+)").replace(re.escape("{expert}"), r"(\d+)")
            match = re.fullmatch(pattern, canonical)
            if match and int(match.group(1)) in moe_layers and int(match.group(2)) < n_ffn:
                return resolve_shape(rule, config), layout.name
    return None, None


def _check_per_expert_complete(source, spec, config, moe_layers, n_ffn, layer_patterns) -> None:
    present = {_canonical_name(name, spec, layer_patterns) for name in source.tensors}
    for layout in spec.expert_layouts:
        templates = [template for template in layout.keys if "{expert}" in template]
        for layer in moe_layers:
            for expert in range(n_ffn):
                for template in templates:
                    key = (spec.moepp_prefix + template).format(layer=layer, expert=expert)
                    if key not in present and any(
                        (spec.moepp_prefix + t).format(layer=layer, expert=0) in present for t in templates
                    ):
                        raise UpcycleError(f"the checkpoint lacks expert tensor {key}")
