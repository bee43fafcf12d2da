"""`upcycle calibrate`: set the selection biases from data so that a target number of FFN experts per token holds.

No training: only the saved selection biases change. How (docs/budget.md says why):
- Per layer, not one global price: each MoE layer gets its own offset, so that every layer, not only the
  average, lands on the target. Layers are calibrated front to back, because a layer's router input (hidden
  states and the gating residual) depends on the routing of the layers before it.
- Within a layer, one offset moves every zero-computation expert together, so the layer's FFN experts per token
  is a non-increasing step function of the offset: bisection finds it. The bias does not change the layer's router
  logits, only which experts win, so each layer needs one forward pass (stopped at that layer) and the bisection
  runs on the captured logits.
- Relative split: a layer whose biases are finite (trained or calibrated before) keeps their differences, and
  a switched-off expert (-inf) stays off. A layer with every bias at -inf (fresh from `convert`) gets a ladder in
  priority order, Zero first, then Constant, then Copy: each next type sits a gap below the previous one, the gap
  being the layer's whole selection-score range (the router's `selection_scores`: router logits for softmax routers,
  sigmoid scores for DeepSeek-V3) on the calibration tokens, so types fill one after another. Zero
  first because, untrained, it is the gentlest change: with Zero and one FFN expert selected, that expert gets
  weight 1 (the source's top-1). Tokens then go to zero FFN experts through Constant (0.5 x before training),
  then Copy (x).
- Biases are rounded to the dtype stored in the checkpoint while searching, so what is saved is what was measured.
The mean on held-out blocks (not the calibration blocks) is measured with the final biases and recorded.
"""

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint.loading import load_causal_lm
from ..checkpoint.model_card import write_model_card
from ..checkpoint.output_dir import atomic_output_dir, check_output_path
from ..checkpoint.provenance import read_provenance, write_provenance
from ..checkpoint.source import read_config, read_weight_map
from ..converters import family_for_moepp_config
from ..data.blocks import load_checkpoint_tokenizer
from ..data.options import DataOptions
from ..errors import UpcycleError
from ..evaluation.baselines import knob_search
from ..evaluation.evaluate import evaluate_model

DEFAULT_PRIORITY = ("zero", "constant", "copy")
BISECTION_STEPS = 60
TOLERANCE = 0.05  # |held-out FFN experts per token - target| the calibration promises on enough data
SELECTION_BIAS_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\..*selection_bias$")


@dataclass(kw_only=True)
class CalibrateOptions(DataOptions):
    """Every option of `upcycle calibrate` (the data options are upcycle.data.options.DataOptions')."""

    target_ffn_per_token: float
    batches: int = 8
    batch_size: int = 8
    priority: tuple[str, ...] = DEFAULT_PRIORITY
    overwrite: bool = False

    def validate(self, top_k: int, n_zero_computation: int) -> None:
        fewest = max(top_k - n_zero_computation, 0)  # every zero-computation expert selected
        if not fewest <= self.target_ffn_per_token <= top_k:
            raise UpcycleError(f"the target must be between {fewest} and {top_k} FFN experts per token "
                               f"(top-{top_k} with {n_zero_computation} zero-computation experts per layer)")
        if self.batches < 1 or self.batch_size < 1:
            raise UpcycleError("--batches and --batch-size must be at least 1")
        self.validate_data_options()
        if sorted(self.priority) != sorted(DEFAULT_PRIORITY):
            raise UpcycleError(f"the priority must name each of {', '.join(DEFAULT_PRIORITY)} once")


@dataclass
class LayerCalibration:
    layer: int
    offset: float  # the offset found by bisection, added to the layer's relative biases
    calibration_ffn_experts_per_token: float  # on the calibration tokens
    selection_bias: list[float] = field(default_factory=list)  # (Z,) as saved


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer being calibrated has its router logits."""


def _type_of_slot(layout) -> list[str]:
    """The type of each zero-computation expert, in the order of the (Z,) selection bias."""
    return ["zero"] * layout.n_zero + ["copy"] * layout.n_copy + ["constant"] * layout.n_constant


def ladder_gap(ffn_scores: torch.Tensor, relative_scores: bool) -> float:
    """The distance between consecutive types of the priority ladder, in the bias's units.

    Absolute scores: the layer's whole FFN score range, so types fill one after another. Relative scores (each
    zero-computation score is raised by the token's best FFN score): the spread over tokens of the gap between
    the best two FFN scores, so the next type sits just behind the best FFN expert, where training can teach
    the tokens that need no FFN expert to take it (the relaxed selection learns from pairs near the boundary).
    """
    finite_scores = ffn_scores[torch.isfinite(ffn_scores)]
    if not relative_scores:
        return float(finite_scores.max() - finite_scores.min()) + 1.0
    best_two = ffn_scores.topk(2, dim=-1).values  # (T, 2)
    margins = best_two[:, 0] - best_two[:, 1]
    margins = margins[torch.isfinite(margins)]
    return float(margins.std()) if margins.numel() > 1 else 1.0


def relative_biases(current: torch.Tensor, layout, ffn_scores: torch.Tensor, priority: tuple[str, ...],
                    relative_scores: bool = False) -> torch.Tensor:
    """(Z,) biases up to the offset: the current ones if any is finite, else the priority ladder (see module doc).

    ffn_scores (T, N): the router's FFN selection scores (`selection_scores`, the selection bias's units).
    """
    if not torch.isneginf(current).all():
        finite = current[torch.isfinite(current)]
        return current.float() - finite.max().float()
    gap = ladder_gap(ffn_scores, relative_scores)
    rank = {kind: position for position, kind in enumerate(priority)}
    return torch.tensor([-gap * rank[kind] for kind in _type_of_slot(layout)], dtype=torch.float32)


def ffn_experts_per_token(router, logits: torch.Tensor, bias: torch.Tensor) -> float:
    """Mean number of FFN experts among each token's selection by `router`: logits (T, N+Z), bias (Z,)."""
    index = router.select_experts(logits, bias)  # (T, k)
    return (index < router.layout.n_ffn).sum(dim=-1).float().mean().item()


def bisect_offset(router, logits: torch.Tensor, relative: torch.Tensor, target: float,
                  stored_dtype: torch.dtype) -> tuple[float, torch.Tensor, float]:
    """The offset whose (rounded) biases bring the layer's FFN experts per token closest to `target`.

    The layer's own router selects (its family's rule: softmax top-k, DeepSeek's groups and sigmoid scores), and
    the search range comes from its `selection_scores`, the units the bias is added in.
    Returns (offset, bias (Z,) float32, FFN experts per token reached on these logits).
    """
    logits = logits.float()
    n_ffn = router.layout.n_ffn
    scores = router.selection_scores(logits)  # (T, N+Z)
    ffn_scores = scores[:, :n_ffn][torch.isfinite(scores[:, :n_ffn])]  # experts outside a token's groups: -inf
    enabled = torch.isfinite(relative)

    def biases(offset: float) -> torch.Tensor:
        return (relative + offset).to(stored_dtype).float()

    zero_computation = scores[:, n_ffn:][:, enabled] + relative[enabled]  # (T, Z_on)
    low = float(ffn_scores.min() - zero_computation.max()) - 1.0  # no zero-computation expert wins
    high = float(ffn_scores.max() - zero_computation.min()) + 1.0  # every enabled one wins
    value_low = ffn_experts_per_token(router, logits, biases(low))
    value_high = ffn_experts_per_token(router, logits, biases(high))
    for _ in range(BISECTION_STEPS):  # invariant: value_low > target >= value_high (non-increasing in offset)
        if value_low <= target or value_high > target:
            break
        middle = (low + high) / 2
        value = ffn_experts_per_token(router, logits, biases(middle))
        if value > target:
            low, value_low = middle, value
        else:
            high, value_high = middle, value
    offset, value = (low, value_low) if abs(value_low - target) < abs(value_high - target) else (high, value_high)
    return offset, biases(offset), value


@torch.no_grad()
def layer_router_logits(model, layer: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """Router logits (T, N+Z) of MoE layer `layer` on the batches, stopping each forward pass there."""
    block = model.moe_blocks()[layer]
    captured: list[torch.Tensor] = []

    def capture(module, inputs, output):
        captured.append(output[1].detach().float())  # MoE++ blocks return (output, router logits)
        raise _StopForward

    handle = block.register_forward_hook(capture)
    try:
        for batch in batches:
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


@torch.no_grad()
def calibrate_model(model, batches: list[torch.Tensor], target: float, priority: tuple[str, ...] = DEFAULT_PRIORITY,
                    stored_dtype: torch.dtype = torch.float32) -> list[LayerCalibration]:
    """Set every MoE layer's selection biases in place, front to back, so each layer reaches `target`."""
    results = []
    for layer, block in enumerate(model.moe_blocks()):
        logits = layer_router_logits(model, layer, batches)  # (T, N+Z)
        router, layout = block.gate, block.layout
        ffn_scores = router.selection_scores(logits)[:, : layout.n_ffn]  # (T, N), in the bias's units
        relative = relative_biases(router.selection_bias, layout, ffn_scores, priority,
                                   router.zero_computation_scores == "relative")
        offset, bias, reached = bisect_offset(router, logits, relative, target, stored_dtype)
        block.gate.selection_bias.copy_(bias.to(block.gate.selection_bias.dtype))
        results.append(LayerCalibration(layer, offset, reached, bias.tolist()))
    return results


@dataclass
class CalibrationReport:
    output: Path
    target_ffn_per_token: float
    heldout_ffn_experts_per_token: float
    heldout_per_layer: list[float]
    heldout_perplexity: float
    calibration_tokens: int
    heldout_tokens: int
    layers: list[LayerCalibration]

    @property
    def within_tolerance(self) -> bool:
        return abs(self.heldout_ffn_experts_per_token - self.target_ffn_per_token) <= TOLERANCE


def _selection_bias_keys(checkpoint: Path, n_layers: int) -> tuple[dict[int, str], dict[str, str]]:
    """Decoder-layer index -> the selection-bias tensor name on disk, and the weight map."""
    weight_map = read_weight_map(checkpoint)
    keys = {}
    for name in weight_map:
        if match := SELECTION_BIAS_KEY.search(name):
            keys[int(match.group(1))] = name
    if len(keys) != n_layers:
        raise UpcycleError(f"{checkpoint} stores {len(keys)} selection biases for {n_layers} MoE layers; "
                           "is it an MoE++ checkpoint made by upcycle convert?")
    return keys, weight_map


def _moe_layer_indices(model) -> list[int]:
    """Decoder-layer index of each MoE block, read from the buffer names (model.layers.{i}...selection_bias)."""
    indices = [int(match.group(1)) for name, _ in model.named_buffers()
               if (match := SELECTION_BIAS_KEY.search(name))]
    if len(indices) != len(model.moe_blocks()):
        raise UpcycleError("cannot tell which decoder layer each MoE block belongs to")
    return indices


def _stored_dtype(checkpoint: Path, shard: str, key: str) -> torch.dtype:
    """The dtype a selection bias is saved in (biases are rounded to it while searching)."""
    from safetensors import safe_open

    from ..checkpoint.dtypes import torch_dtype

    with safe_open(str(checkpoint / shard), framework="pt") as reader:
        return torch_dtype(reader.get_slice(key).get_dtype())


def write_calibrated_checkpoint(checkpoint: Path, partial: Path, biases: dict[str, torch.Tensor],
                                weight_map: dict[str, str]) -> None:
    """Copy the checkpoint folder into `partial`, rewriting only the shard(s) that hold the selection biases."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = {weight_map[key] for key in biases}
    for path in sorted(checkpoint.iterdir()):
        if path.is_dir():
            shutil.copytree(path, partial / path.name)
        elif path.name not in shards:
            shutil.copy2(path, partial / path.name)
    for shard in sorted(shards):
        with safe_open(str(checkpoint / shard), framework="pt") as reader:
            metadata = reader.metadata()
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (safe_open is not a dict)  # a small shard: the MoE++ tensors
        for key, value in biases.items():
            if weight_map[key] == shard:
                tensors[key] = value.to(tensors[key].dtype).reshape(tensors[key].shape)
        save_file(tensors, str(partial / shard), metadata=metadata)


def calibrate(checkpoint: Path, output: Path, data: str, options: CalibrateOptions,
              command: str = "") -> CalibrationReport:
    """Validate, calibrate on the data's train blocks, measure on its held-out blocks, write OUTPUT atomically."""
    checkpoint, output = Path(checkpoint), Path(output)
    config = read_config(checkpoint)
    if "n_zero_experts" not in config:
        raise UpcycleError(f"{checkpoint} is not an MoE++ checkpoint (no zero-computation experts); "
                           "run upcycle convert first")
    n_zero_computation = sum(int(config.get(f"n_{kind}_experts", 0)) for kind in ("zero", "copy", "constant"))
    options.validate(int(config[family_for_moepp_config(config).top_k_field]), n_zero_computation)
    check_output_path(output, options.overwrite, protected=(checkpoint,))
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    blocks = options.token_blocks(data, tokenizer)
    model = load_causal_lm(checkpoint)
    layer_indices = _moe_layer_indices(model)
    keys, weight_map = _selection_bias_keys(checkpoint, len(layer_indices))
    stored = _stored_dtype(checkpoint, weight_map[keys[layer_indices[0]]], keys[layer_indices[0]])

    calibration = blocks.train[: options.batches * options.batch_size]
    batches = list(calibration.split(options.batch_size))
    layers = calibrate_model(model, batches, options.target_ffn_per_token, tuple(options.priority), stored)
    evaluation = evaluate_model(model, blocks.heldout, batch_size=options.batch_size)  # same numbers as upcycle eval
    heldout_mean = evaluation.ffn_experts_per_token
    heldout_per_layer = [layer.ffn_experts_per_token for layer in evaluation.per_layer]

    biases = {keys[index]: block.gate.selection_bias.detach().clone()
              for index, block in zip(layer_indices, model.moe_blocks())}
    report = CalibrationReport(output.resolve(), options.target_ffn_per_token, heldout_mean, heldout_per_layer,
                               evaluation.perplexity, calibration.numel(), blocks.heldout.numel(), layers)
    with atomic_output_dir(output, options.overwrite) as partial:
        write_calibrated_checkpoint(checkpoint, partial, biases, weight_map)
        record = read_provenance(checkpoint) or {"tool": "upcycle", "source": str(checkpoint), "history": []}
        record.setdefault("history", []).append({
            "step": "calibrate",
            "command": command,
            "options": asdict(options) | {"data": str(data), "priority": list(options.priority)},
            "measured_ffn_experts_per_token": heldout_mean,
            "per_layer_ffn_experts_per_token": heldout_per_layer,
            "heldout_tokens": report.heldout_tokens,
            "calibration_tokens": report.calibration_tokens,
            "metrics": {"heldout_ffn_experts_per_token": round(heldout_mean, 4),
                        "heldout_perplexity": round(evaluation.perplexity, 4)},
        })
        write_provenance(partial, record)
        _refresh_model_card(partial, output.name)
    return report


def _refresh_model_card(folder: Path, name: str) -> None:
    """Rebuild README.md from the folder's files (the card lists every step of upcycle.json's history)."""
    write_model_card(folder, name=name)


@torch.no_grad()
def fit_rule_per_layer(model, batches: list[torch.Tensor], rule: str, target: float) -> list[float]:
    """A trained control's knobs, one per MoE layer, fitted front to back as calibration fits biases, so that
    every layer (not only the mean) uses `target` FFN experts per token under `rule`. Every router is set to the
    rule; each layer's knob is found by bisection on its captured router logits, through its own selection."""
    routers = [block.gate for block in model.moe_blocks()]
    for router in routers:
        router.routing_rule = rule
    knobs = []
    for layer, router in enumerate(routers):
        if rule == "top_k":
            knob = float(round(target))
        else:
            logits = layer_router_logits(model, layer, batches)  # (T, N+Z), earlier layers at their knobs
            low, high, skips_more_when_higher = knob_search(rule)
            for _ in range(30):
                router.routing_rule_knob = (low + high) / 2
                used = (router.select_experts(logits) < router.layout.n_ffn).sum(dim=-1).float().mean().item()
                if (used > target) == skips_more_when_higher:
                    low = router.routing_rule_knob
                else:
                    high = router.routing_rule_knob
            knob = (low + high) / 2
        router.routing_rule_knob = knob
        knobs.append(knob)
    return knobs
