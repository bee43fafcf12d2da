"""`upcycle eval`: quality against compute, for MoE++ and source checkpoints alike.

On packed held-out token blocks (upcycle.data), `evaluate_model` measures:
- perplexity: exp of the mean next-token cross-entropy over every predicted token (L - 1 per block), with a 95%
  interval from the spread of per-block losses (blocks are treated as independent samples);
- FFN experts per token, overall (mean over MoE layers) and per layer; for a source model this is its top-k;
- how compute is spent: the share of (token, MoE layer) pairs that used 0, 1, ..., k FFN experts, overall and
  per layer (`ffn_experts_histogram`; a source puts everything at k, top-1 routing everything at 1);
- the share of each zero-computation type: of the k routing slots per token, the share that went to Zero, Copy
  and Constant experts (so ffn_share + the three shares = 1 and ffn_experts_per_token = k * ffn_share);
- FFN load balance: the coefficient of variation (population std / mean) of the FFN experts' loads (slots each
  received) per layer, 0 when perfectly balanced;
- with a source model: the token-level mean KL(source || model) of the next-token distributions, and the paired
  perplexity ratio model / source on the same blocks: exp of the mean per-block loss difference, with a 95%
  bootstrap interval over blocks. Pairing removes the spread of the text itself, so the ratio's interval is far
  tighter than the two perplexities' own intervals (±1% where those are ±8% on the demo).
Routing of an MoE++ model comes from its `routing_statistics` (the one source of truth); a source model's from
the top-k of the router logits it returns, which is its selection for softmax-top-k routers (Mixtral, Qwen-MoE,
OLMoE).
"""

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint.loading import load_causal_lm
from ..converters import family_for_config
from ..data.blocks import load_checkpoint_tokenizer
from ..data.options import DataOptions
from ..errors import UpcycleError
from .baselines import BASELINES, fit_knob, variable_k_routing

ZERO_COMPUTATION_TYPES = ("zero", "copy", "constant")
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class LayerEval:
    layer: int  # decoder-layer index (the MoE layer's position when it cannot be told)
    ffn_experts_per_token: float
    zero_share: float
    copy_share: float
    constant_share: float
    ffn_load_cv: float
    ffn_experts_histogram: dict[str, float] = field(default_factory=dict)  # "0".."k" -> share of tokens


@dataclass
class EvalReport:
    perplexity: float
    perplexity_interval_95: tuple[float, float]
    loss: float  # mean next-token cross-entropy (nats)
    tokens: int  # predicted tokens
    blocks: int
    block_size: int
    is_moepp: bool
    top_k: int | None
    ffn_experts_per_token: float | None
    zero_computation_share: dict[str, float]
    ffn_load_cv: float | None
    kl_to_source: float | None
    per_layer: list[LayerEval] = field(default_factory=list)
    # "0".."k" -> share of (token, MoE layer) pairs that used that many FFN experts (None: no routing seen)
    ffn_experts_histogram: dict[str, float] | None = None
    # model perplexity / source perplexity on the same blocks, and its 95% bootstrap interval (None: no source)
    perplexity_ratio_to_source: float | None = None
    perplexity_ratio_to_source_interval_95: tuple[float, float] | None = None
    # a training-free baseline's routing ({"rule", "knob", "target"}), None for the model's own routing
    baseline: dict | None = None
    # (n,) mean loss per block, for paired comparisons of models on the same blocks (`paired_against`); not in JSON
    block_losses: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("block_losses", None)
        data["perplexity_interval_95"] = list(self.perplexity_interval_95)
        if self.perplexity_ratio_to_source_interval_95 is not None:
            data["perplexity_ratio_to_source_interval_95"] = list(self.perplexity_ratio_to_source_interval_95)
        return data


BOOTSTRAP_RESAMPLES = 10_000


def paired_ratio(block_losses: torch.Tensor, reference_losses: torch.Tensor,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """exp(mean(block_losses - reference_losses)) and its 95% bootstrap interval, resampling blocks (tokens within
    a block are correlated; blocks are the unit). Both (n,) mean losses per block on the same blocks."""
    differences = (block_losses - reference_losses).double()  # (n,)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(differences), (resamples, len(differences)), generator=generator)
    means = differences[picks].mean(dim=1)  # (resamples,)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(differences.mean().item()), (math.exp(low), math.exp(high))


def paired_against(report: "EvalReport", reference: "EvalReport") -> dict:
    """Perplexity ratio of `report` over `reference` (evaluated on the same blocks) and its 95% bootstrap interval."""
    if report.block_losses is None or reference.block_losses is None or \
            report.block_losses.shape != reference.block_losses.shape:
        raise UpcycleError("a paired comparison needs both models evaluated on the same blocks")
    ratio, interval = paired_ratio(report.block_losses, reference.block_losses)
    return {"perplexity_ratio": ratio, "interval_95": list(interval)}


def model_top_k(model) -> int | None:
    """Experts per token: an MoE++ model's routers say it; a source's family spec names its config field
    (`num_experts_per_tok`, OpenMoE's `router_topk`). None for a model no family describes."""
    if hasattr(model, "moe_blocks"):
        return model.moe_blocks()[0].gate.top_k
    try:
        spec = family_for_config(model.config.to_dict())
    except UpcycleError:
        return None
    return getattr(model.config, spec.top_k_field, None)


def _moe_layer_indices(model, count: int) -> list[int]:
    """Decoder-layer index of each MoE layer, from the router parameter names when they tell it."""
    if hasattr(model, "moe_blocks"):
        names = {id(block): name for name, block in model.named_modules()}
        found = [LAYER_INDEX.search(names.get(id(block), "")) for block in model.moe_blocks()]
        if all(found) and len(found) == count:
            return [int(match.group(1)) for match in found]
    return list(range(count))


class _RoutingTotals:
    """Slots per expert and tokens, summed over batches: (L, E) counts where E = N + Z (or N for a source)."""

    def __init__(self):
        self.slot_counts: torch.Tensor | None = None  # (L, E)
        self.used_counts: torch.Tensor | None = None  # (L, k+1) tokens that used 0..k FFN experts
        self.tokens = 0

    def add(self, slot_counts: torch.Tensor, used_counts: torch.Tensor, tokens: int) -> None:
        self.slot_counts = slot_counts if self.slot_counts is None else self.slot_counts + slot_counts
        self.used_counts = used_counts if self.used_counts is None else self.used_counts + used_counts
        self.tokens += tokens


def _histogram(shares: torch.Tensor) -> dict[str, float]:
    """(k+1,) shares -> {"0": share, ..., "k": share}."""
    return {str(count): share for count, share in enumerate(shares.tolist())}


def _moepp_slot_counts(output, tokens: int, top_k: int) -> torch.Tensor:
    """(L, N+Z) slots per expert, from routing_statistics' expert_share (f sums to 1 over the k slots)."""
    return output.routing_statistics["expert_share"].double().cpu() * tokens * top_k


def _source_slot_counts(output, top_k: int) -> torch.Tensor | None:
    """(L, N) slots per expert from the top-k of each layer's router logits, or None if none are returned."""
    router_logits = getattr(output, "router_logits", None)
    if not router_logits:
        return None
    counts = []
    for logits in router_logits:  # (T, N) each
        index = logits.float().topk(top_k, dim=-1).indices  # (T, k)
        counts.append(F.one_hot(index, logits.shape[-1]).sum(dim=(0, 1)).double().cpu())
    return torch.stack(counts)


def _layer_evals(totals: _RoutingTotals, layout, top_k: int, layer_indices: list[int]) -> list[LayerEval]:
    per_layer = []
    n_ffn = layout.n_ffn if layout is not None else totals.slot_counts.shape[1]
    for position, counts in enumerate(totals.slot_counts):  # (E,) slots per expert
        share = counts / (totals.tokens * top_k)  # (E,) share of slots
        ffn_loads = counts[:n_ffn]
        mean_load = ffn_loads.mean().clamp_min(1e-12)
        by_type = {"zero": 0.0, "copy": 0.0, "constant": 0.0}
        if layout is not None:
            by_type = {
                "zero": share[layout.n_ffn:layout.copy_start].sum().item(),
                "copy": share[layout.copy_start:layout.constant_start].sum().item(),
                "constant": share[layout.constant_start:layout.n_total].sum().item(),
            }
        per_layer.append(LayerEval(
            layer=layer_indices[position],
            ffn_experts_per_token=top_k * share[:n_ffn].sum().item(),
            zero_share=by_type["zero"], copy_share=by_type["copy"], constant_share=by_type["constant"],
            ffn_load_cv=(ffn_loads.std(unbiased=False) / mean_load).item(),
        ))
    return per_layer


def _block_losses(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of (B, L) tokens -> (B,) mean next-token cross-entropy per block, on the CPU."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")  # (B, L-1)
    return nll.mean(dim=1).cpu()


def _token_kl(source_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(source || model): logits (B, L, V) each -> scalar."""
    source_log_probs = F.log_softmax(source_logits.float(), dim=-1)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_probs, source_log_probs, log_target=True, reduction="sum")


@torch.no_grad()
def evaluate_model(model, blocks: torch.Tensor, source_model=None, batch_size: int = 8) -> EvalReport:
    """Evaluate an in-memory causal LM (MoE++ or not) on token blocks (n, L); see the module docstring."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise UpcycleError("evaluation needs at least one block of at least two tokens")
    if source_model is not None and source_model.config.vocab_size != model.config.vocab_size:
        raise UpcycleError("the model and the source have different vocabularies, so KL cannot be compared")
    was_training = model.training
    model.eval()
    is_moepp = hasattr(model, "moe_blocks")
    top_k = model_top_k(model)
    device = next(model.parameters()).device
    block_losses: list[torch.Tensor] = []  # (B,) mean loss per block
    source_block_losses: list[torch.Tensor] = []  # (B,) the source's, on the same blocks
    kl_sum, kl_tokens = 0.0, 0
    totals = _RoutingTotals()
    try:
        for batch in blocks.split(batch_size):
            batch = batch.to(device)  # (B, L)
            output = model(batch, output_router_logits=top_k is not None, use_cache=False)
            block_losses.append(_block_losses(output.logits, batch))
            if top_k is not None:
                counts = (_moepp_slot_counts(output, batch.numel(), top_k) if is_moepp
                          else _source_slot_counts(output, top_k))
                if counts is not None:
                    if is_moepp:  # (L, k+1) tokens using 0..k FFN experts
                        used = output.routing_statistics["ffn_experts_histogram"].double().cpu() * batch.numel()
                    else:  # a source: every token uses k FFN experts in every MoE layer
                        used = torch.zeros(counts.shape[0], top_k + 1, dtype=torch.float64)
                        used[:, top_k] = batch.numel()
                    totals.add(counts, used, batch.numel())
            if source_model is not None:
                source_device = next(source_model.parameters()).device
                source_logits = source_model(batch.to(source_device), use_cache=False).logits.to(device)
                kl_sum += _token_kl(source_logits, output.logits).item()
                source_block_losses.append(_block_losses(source_logits, batch))
                kl_tokens += batch.numel()
    finally:
        model.train(was_training)
    losses = torch.cat(block_losses).double()  # (n,)
    loss = losses.mean().item()
    spread = 1.96 * losses.std().item() / math.sqrt(len(losses)) if len(losses) > 1 else float("nan")
    layout = model.moe_blocks()[0].layout if is_moepp else None
    per_layer = []
    if totals.slot_counts is not None:
        per_layer = _layer_evals(totals, layout, top_k, _moe_layer_indices(model, totals.slot_counts.shape[0]))
        for layer, used in zip(per_layer, totals.used_counts):
            layer.ffn_experts_histogram = _histogram(used / totals.tokens)
    if is_moepp and model.moe_blocks()[0].gate.routing_rule is not None:  # a rule: a dropped slot is no expert
        for layer in per_layer:  # (it holds the first zero-computation expert, of whatever type, at weight 0)
            layer.zero_share = layer.copy_share = layer.constant_share = 0.0
    mean = (lambda values: sum(values) / len(values)) if per_layer else (lambda values: None)
    ratio, ratio_interval = (paired_ratio(losses, torch.cat(source_block_losses).double())
                             if source_model is not None else (None, None))
    return EvalReport(
        perplexity=math.exp(loss),
        perplexity_interval_95=(math.exp(loss - spread), math.exp(loss + spread)),
        loss=loss,
        tokens=blocks.shape[0] * (blocks.shape[1] - 1),
        blocks=blocks.shape[0],
        block_size=blocks.shape[1],
        is_moepp=is_moepp,
        top_k=top_k,
        ffn_experts_per_token=mean([layer.ffn_experts_per_token for layer in per_layer]),
        zero_computation_share={kind: mean([getattr(layer, f"{kind}_share") for layer in per_layer]) or 0.0
                                for kind in ZERO_COMPUTATION_TYPES},
        ffn_load_cv=mean([layer.ffn_load_cv for layer in per_layer]),
        kl_to_source=kl_sum / kl_tokens if source_model is not None else None,
        per_layer=per_layer,
        ffn_experts_histogram=(_histogram(totals.used_counts.sum(dim=0) / totals.used_counts.sum())
                               if totals.used_counts is not None else None),
        perplexity_ratio_to_source=ratio,
        perplexity_ratio_to_source_interval_95=ratio_interval,
        block_losses=losses,
    )


def evaluate_baseline(model, fit_blocks: torch.Tensor, heldout: torch.Tensor, rule: str, target: float,
                      source_model=None, batch_size: int = 8) -> EvalReport:
    """A training-free rule at a budget: the knob fitted on `fit_blocks`, then `evaluate_model` on `heldout`
    with every router routing by the rule (its `routing_rule`: the statistics are the rule's own; a dropped slot
    is no expert, so the zero-computation shares stay 0)."""
    if rule not in BASELINES:
        raise UpcycleError(f"unknown baseline {rule!r}; choose one of {', '.join(BASELINES)}")
    top_k = model.moe_blocks()[0].gate.top_k if hasattr(model, "moe_blocks") else None
    low, high = baseline_range(rule, top_k or 1)
    if top_k is not None and not low <= target <= high:
        raise UpcycleError(f"the {rule} baseline keeps between {low:g} and {high:g} FFN experts per token; "
                           f"got a target of {target:g}")
    knob = fit_knob(model, fit_blocks, rule, target)
    with variable_k_routing(model, rule, knob):
        report = evaluate_model(model, heldout, source_model, batch_size)
    return dataclasses.replace(report, baseline={"rule": rule, "knob": knob, "target": target})


def baseline_range(rule: str, top_k: int) -> tuple[float, float]:
    """The FFN experts per token a training-free rule can reach: top_1_confident 0 to 1, the others 1 to k."""
    return (0.0, 1.0) if rule == "top_1_confident" else (1.0, float(top_k))


@dataclass(kw_only=True)
class EvalOptions(DataOptions):
    """Every option of `upcycle eval` (the data options are upcycle.data.options.DataOptions')."""

    batch_size: int = 8
    max_blocks: int | None = None
    baseline: str | None = None  # dynamic_skipping, top_p or top_1_confident: evaluate that rule instead
    target_ffn_per_token: float | None = None  # the baseline's budget (its knob is fitted on the train blocks)
    fit_blocks: int = 32  # train blocks the baseline's knob is fitted on


def evaluate_checkpoint(checkpoint: Path, data: str, source: Path | None = None,
                        options: EvalOptions | None = None) -> EvalReport:
    """Load CHECKPOINT (and SOURCE), tokenize DATA with CHECKPOINT's tokenizer, evaluate on its held-out blocks."""

    options = options or EvalOptions()
    if options.batch_size < 1:
        raise UpcycleError("--batch-size must be at least 1")
    if (options.baseline is None) != (options.target_ffn_per_token is None):
        raise UpcycleError("--baseline and --target-ffn-per-token go together: a training-free rule at a budget")
    options.validate_data_options()
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    model = load_causal_lm(Path(checkpoint))
    source_model = load_causal_lm(Path(source)) if source is not None else None
    blocks = options.token_blocks(data, tokenizer)
    heldout = blocks.heldout if options.max_blocks is None else blocks.heldout[: options.max_blocks]
    if options.baseline is not None:
        return evaluate_baseline(model, blocks.train[: options.fit_blocks], heldout, options.baseline,
                                 options.target_ffn_per_token, source_model, options.batch_size)
    return evaluate_model(model, heldout, source_model, options.batch_size)


def format_report(report: EvalReport) -> str:
    """A short human-readable summary: headline numbers, then one line per MoE layer."""
    low, high = report.perplexity_interval_95
    headline = (f"perplexity {report.perplexity:.3f} (95% interval {low:.3f}-{high:.3f}) on {report.tokens:,} "
                f"held-out tokens ({report.blocks} blocks of {report.block_size})")
    lines = [headline]
    if report.ffn_experts_per_token is not None:
        shares = ", ".join(f"{kind} {value:.3f}" for kind, value in report.zero_computation_share.items())
        lines.append(f"FFN experts per token {report.ffn_experts_per_token:.3f} (top-{report.top_k}); "
                     f"zero-computation share of slots: {shares}; FFN load CV {report.ffn_load_cv:.3f}")
    if report.ffn_experts_histogram is not None:
        shares = ", ".join(f"{count}: {100 * share:.1f}%" for count, share in report.ffn_experts_histogram.items())
        lines.append(f"(token, layer) pairs by FFN experts used: {shares}")
    if report.kl_to_source is not None:
        lines.append(f"KL(source || model) {report.kl_to_source:.4g} nats per token")
    if report.perplexity_ratio_to_source is not None:
        ratio_low, ratio_high = report.perplexity_ratio_to_source_interval_95
        lines.append(f"perplexity / source's on the same blocks {report.perplexity_ratio_to_source:.4f} "
                     f"(95% interval {ratio_low:.4f}-{ratio_high:.4f}, paired)")
    if report.baseline is not None:
        lines.append(f"training-free baseline {report.baseline['rule']} (knob {report.baseline['knob']:.4g}, fitted to "
                     f"{report.baseline['target']:g} FFN experts per token on the train blocks)")
    for layer in report.per_layer:
        lines.append(f"  layer {layer.layer:>3}: {layer.ffn_experts_per_token:.3f} FFN experts per token, zero "
                     f"{layer.zero_share:.3f}, copy {layer.copy_share:.3f}, constant {layer.constant_share:.3f}, "
                     f"load CV {layer.ffn_load_cv:.3f}")
    return "\n".join(lines)
