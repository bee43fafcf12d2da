"""Check a source checkpoint against its family spec and config, before any byte is written.

Expected shapes come from the family spec alone (no torch, no transformers: start-up stays near `cp -r`): its
tensor tables give every tensor but the FFN experts, its expert layouts the per-expert or fused expert keys.
tests/test_source_tensor_tables.py checks the tables against transformers' own classes built on the meta device.
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..checkpoint.source import SourceCheckpoint
from ..converters import FamilySpec
from ..converters.spec import MissingConfigField, flag_is_set, int_field, resolve_shape, unloaded_layer
from ..errors import UpcycleError

__all__ = ["ConversionPlan", "ZeroComputationCounts", "expected_shapes", "plan_conversion", "resolve_shape"]


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


def expected_shapes(spec: FamilySpec, config: dict) -> dict[str, tuple[int, ...]]:
    """In-memory tensor name -> shape of the source model: the spec's tensor tables, plus the in-memory expert
    keys of every MoE layer (the layout without `{expert}` placeholders). No torch, no transformers."""
    shape_config = _shape_config(spec, config)
    return _table_shapes(spec, shape_config) | _in_memory_expert_shapes(spec, shape_config)


def _shape_config(spec: FamilySpec, config: dict) -> dict:
    """config.json with the family's aliases, defaults and derived values; a missing field -> a clear error."""
    with _missing_field_as_error(spec):
        return spec.shape_config(config)


@contextmanager
def _missing_field_as_error(spec: FamilySpec) -> Iterator[None]:
    try:
        yield
    except MissingConfigField as missing:
        raise UpcycleError(
            f"config.json lacks the field {missing.field!r} that a {spec.name} config has"
        ) from None


def _layers_by_scope(spec: FamilySpec, shape_config: dict) -> dict[str, list[int | None]]:
    n_layers = int_field(shape_config, "num_hidden_layers")
    moe_layers = set(spec.moe_layers(shape_config))
    return {
        "model": [None],
        "every_layer": list(range(n_layers)),
        "moe_layer": sorted(moe_layers),
        "dense_layer": [layer for layer in range(n_layers) if layer not in moe_layers],
    }


def _table_shapes(spec: FamilySpec, shape_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the spec's `tensors` table whose `when` flag holds, in each layer of its scope."""
    shapes: dict[str, tuple[int, ...]] = {}
    with _missing_field_as_error(spec):
        layers = _layers_by_scope(spec, shape_config)
        for rule in spec.tensors:
            if rule.when is not None and not flag_is_set(rule.when, shape_config):
                continue
            shape = resolve_shape(rule.shape, shape_config)
            for layer in layers[rule.scope]:
                shapes[rule.template.format(layer=layer)] = shape
    return shapes


def _in_memory_expert_shapes(spec: FamilySpec, shape_config: dict) -> dict[str, tuple[int, ...]]:
    """The source class's own expert keys (fused or OpenMoE's input-major tensors) in every MoE layer."""
    layout = spec.in_memory_expert_layout()
    with _missing_field_as_error(spec):
        rules = {template: resolve_shape(rule, shape_config) for template, rule in layout.keys.items()}
        moe_layers = spec.moe_layers(shape_config)
    return {
        (spec.moepp_prefix + template).format(layer=layer): shape
        for layer in moe_layers for template, shape in rules.items()
    }


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

    shape_config = _shape_config(spec, config)
    expert_keys = _in_memory_expert_shapes(spec, shape_config)
    expected = _table_shapes(spec, shape_config) | expert_keys
    layer_patterns = [
        re.compile(re.escape(prefix).replace(re.escape("{layer}"), r"(\d+)")) for prefix in spec.moe_prefixes
    ]
    moe_layers = spec.moe_layers(shape_config)
    if not moe_layers:
        raise UpcycleError(f"this {spec.name} config has no MoE layer, so there is nothing to convert")
    layouts_found = set()
    covered: set[str] = set()
    for name, info in sorted(source.tensors.items()):  # sorted: the same first error on every run
        if unloaded_layer(name, spec, shape_config):
            continue  # carried over unchanged, as the source class ignores it on load
        canonical = _canonical_name(name, spec, layer_patterns)
        if canonical in expected:
            want = expected[canonical]
            covered.add(canonical)
        else:
            want, layout = _expert_key_shape(canonical, spec, shape_config, moe_layers, n_ffn)
            if want is None:
                raise UpcycleError(f"tensor {name} is not part of a {spec.name} model with this config")
            layouts_found.add(layout)
        if tuple(info.shape) != tuple(want):
            raise UpcycleError(
                f"tensor {name} has shape {list(info.shape)} but the config implies {list(want)}"
            )
    if len(layouts_found) > 1:
        raise UpcycleError("the checkpoint mixes per-expert and fused expert layouts")
    if layouts_found:  # per-expert layout: the in-memory expert keys are covered by per-expert keys
        _check_per_expert_complete(source, spec, moe_layers, n_ffn, layer_patterns)
        covered |= set(expert_keys)
    # a tied LM head is the embedding under a second name: checkpoints of tied models may leave it out
    optional = {"lm_head.weight"} if shape_config.get("tie_word_embeddings") else set()
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


def _expert_key_shape(canonical: str, spec: FamilySpec, config: dict, moe_layers: list[int], n_ffn: int,
                      ) -> tuple[tuple[int, ...] | None, str | None]:
    """Shape and layout name of a per-expert key, or (None, None) if the name is not one."""
    for layout in spec.expert_layouts:
        for template, rule in layout.keys.items():
            if "{expert}" not in template:
                continue
            pattern = re.escape(spec.moepp_prefix + template)
            pattern = pattern.replace(re.escape("{layer}"), r"(\d+)").replace(re.escape("{expert}"), r"(\d+)")
            match = re.fullmatch(pattern, canonical)
            if match and int(match.group(1)) in moe_layers and int(match.group(2)) < n_ffn:
                with _missing_field_as_error(spec):
                    return resolve_shape(rule, config), layout.name
    return None, None


def _check_per_expert_complete(source: SourceCheckpoint, spec: FamilySpec, moe_layers: list[int], n_ffn: int,
                               layer_patterns: list[re.Pattern]) -> None:
    """Every per-expert key of every MoE layer is there, once a layer has expert 0 in that layout."""
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
