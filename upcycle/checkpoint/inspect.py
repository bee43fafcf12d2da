"""`upcycle inspect`: what a checkpoint is, from its config and shard headers (no tensor data but biases)."""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..converters import family_for_config, moepp_family
from .float_bytes import all_equal
from .provenance import read_provenance
from .safetensors_header import read_tensor_bytes
from .source import SourceCheckpoint, open_source

ADDED_MARKERS = ("gate.zero_computation_weight", "gate.residual_weight", "gate.selection_bias",
                 "zero_computation_experts.")


@dataclass
class CheckpointSummary:
    path: str
    family: str
    is_moepp: bool
    layers: int
    moe_layers: int
    experts: dict[str, int]  # per MoE layer, by type
    experts_per_token: int
    parameters_total: int
    parameters_added: int
    parameters_active_per_token: int | None
    ffn_experts_per_token: float | None  # at the current budget; None when it depends on the data
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    provenance: dict | None = None
    routing: dict | None = None  # MoE++ selection fields: scores, and a trained control's rule and knob

    def as_dict(self) -> dict:
        return asdict(self)


BUFFER_SUFFIXES = ("gate.selection_bias", "gate.e_score_correction_bias")  # saved buffers, not parameters


def count_parameters(numels: dict[str, int]) -> int:
    """Parameters among named tensors (tensor name -> element count), leaving out saved buffers."""
    return sum(numel for name, numel in numels.items() if not name.endswith(BUFFER_SUFFIXES))


def _is_expert_tensor(name: str) -> bool:
    return ".experts." in name and "zero_computation_experts" not in name


def current_budget(source: SourceCheckpoint, top_k: int, provenance: dict | None) -> float | None:
    """Mean FFN experts per token at the saved selection biases: top-k while every bias is -inf."""
    bias_keys = [name for name in source.tensors if name.endswith("gate.selection_bias")]
    all_off = True
    for name in bias_keys:
        raw = read_tensor_bytes(source.path / source.weight_map[name], name)
        if not all_equal(raw, -math.inf, source.tensors[name].dtype):
            all_off = False
            break
    if all_off:
        return float(top_k)
    for step in reversed((provenance or {}).get("history", [])):
        measured = step.get("measured_ffn_experts_per_token")
        if measured is not None:
            return float(measured)
    return None


def inspect_checkpoint(path: Path) -> CheckpointSummary:
    source = open_source(Path(path))
    config = source.config
    moepp_spec = moepp_family(config)
    spec = moepp_spec or family_for_config(config)
    n_ffn, top_k = spec.n_experts(config), spec.top_k(config)
    moe_layers = spec.moe_layer_indices(config)
    experts = {"ffn": n_ffn}
    if moepp_spec:
        experts |= {kind: int(config.get(f"n_{kind}_experts", 0)) for kind in ("zero", "copy", "constant")}
    numels = {name: info.numel for name, info in source.tensors.items()}
    total = count_parameters(numels)
    added = count_parameters({name: n for name, n in numels.items() if any(m in name for m in ADDED_MARKERS)})
    expert_parameters = sum(info.numel for name, info in source.tensors.items() if _is_expert_tensor(name))
    provenance = read_provenance(source.path)
    budget = current_budget(source, top_k, provenance) if moepp_spec else float(top_k)
    active = None
    if budget is not None:
        active = round(total - expert_parameters + expert_parameters * budget / n_ffn)
    files = {shard: (source.path / shard).stat().st_size for shard in source.shard_files}
    return CheckpointSummary(
        path=str(source.path), family=spec.name, is_moepp=moepp_spec is not None,
        layers=int(config["num_hidden_layers"]), moe_layers=len(moe_layers), experts=experts,
        experts_per_token=top_k, parameters_total=total, parameters_added=added,
        parameters_active_per_token=active, ffn_experts_per_token=budget, files=files, provenance=provenance,
        routing={"zero_computation_scores": config.get("zero_computation_scores", "absolute"),
                 "routing_rule": config.get("routing_rule"), "routing_rule_knob": config.get("routing_rule_knob")}
        if moepp_spec else None,
    )


def format_summary(summary: CheckpointSummary) -> str:
    kind = "MoE++" if summary.is_moepp else "source MoE"
    experts = ", ".join(f"{count} {name}" for name, count in summary.experts.items())
    active = "depends on the data (run upcycle eval)" if summary.parameters_active_per_token is None else (
        f"{summary.parameters_active_per_token:,} at {summary.ffn_experts_per_token:.2f} FFN experts per token"
    )
    lines = [
        f"{summary.path}",
        f"  family:      {summary.family} ({kind})",
        f"  layers:      {summary.layers} ({summary.moe_layers} MoE)",
        f"  experts:     {experts} per MoE layer, top-{summary.experts_per_token}",
        f"  parameters:  {summary.parameters_total:,} total, {summary.parameters_added:,} added by MoE++",
        f"  active:      {active}",
        f"  files:       {len(summary.files)} shards, {sum(summary.files.values()):,} bytes",
    ]
    if summary.routing:
        rule = summary.routing["routing_rule"]
        lines.append(f"  routing:     zero-computation scores {summary.routing['zero_computation_scores']}" + (
            f"; a trained control: rule {rule}, knob {summary.routing['routing_rule_knob']:.4g}" if rule else ""))
    if summary.provenance:
        steps = ", ".join(step.get("step", "?") for step in summary.provenance.get("history", []))
        lines.append(
            f"  provenance:  upcycle {summary.provenance.get('tool_version')} from {summary.provenance.get('source')}"
            f" ({steps})"
        )
    return "\n".join(lines)
