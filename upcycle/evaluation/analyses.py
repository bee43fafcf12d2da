"""`upcycle analyze`: the MoE++ paper's routing analyses, measured on the user's own MoE++ model.

On the data's held-out blocks (and on each of `--tasks`, through upcycle.evaluation.downstream):
1. FFN experts per token per MoE layer, one row per task (and one for the data): the task x layer heatmap, with
   the spread across rows per layer (the paper: shallow and last layers vary most across tasks);
2. the share of routing slots that went to each zero-computation type (zero / copy / constant) per row;
3. per-token Pearson correlation between adjacent MoE layers of FFN experts per token (the paper: expert load
   correlates between adjacent layers), and of router confidence (`routing_scores.router_confidence`) for the
   model and, with `--source`, for the source: a source uses k FFN experts for every token, so its confidence is
   the reference on the same axis;
4. FFN experts per token (mean over MoE layers) by kind of token (`parts_of_speech`: punctuation, word piece, and
   the word's part of speech when HanTa is installed);
5. routing-score mean, variance and range per layer with the gating residual on and off (`routing_scores`).
Routing counts come from `record_routing` (the model's own routers, one definition of routing); scores from the
router logits the model returns. `paper_findings` states each of the paper's claims and whether it holds here.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.output_dir import atomic_output_dir, check_output_path
from ..checkpoint.source import read_config
from ..data.options import DataOptions
from ..errors import UpcycleError
from .parts_of_speech import TAGGER_NAME, load_tagger, token_kinds_of_blocks
from .routing_record import record_routing
from .routing_scores import (
    ScoreMoments,
    add_layer_scores,
    gating_residual_off,
    has_gating_residual,
    router_confidence,
    score_summary,
)
from .token_kinds import by_token_kind

SCORE_KINDS = ("probabilities", "logits")
RESULTS_FILE = "analysis.json"


@dataclass(kw_only=True)
class AnalyzeOptions(DataOptions):
    """Every option of `upcycle analyze` (the data options are upcycle.data.options.DataOptions')."""

    batch_size: int = 8
    max_blocks: int | None = None  # analyse at most this many held-out blocks
    tasks: tuple[str, ...] = ()  # downstream task names (upcycle.evaluation.downstream), one heatmap row each
    task_limit: float | None = None  # examples per task: a count (>= 1) or a fraction (< 1); None: all
    overwrite: bool = False

    def task_options(self):
        """The options of upcycle.evaluation.downstream's `evaluate_tasks` for --tasks."""
        from .downstream import TaskOptions

        return TaskOptions(limit=self.task_limit, batch_size=self.batch_size)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UpcycleError("--batch-size must be at least 1")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise UpcycleError("--max-blocks must be at least 1")
        self.validate_data_options()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of x (T,) and y (T,); None when either is constant (no correlation is defined)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum().item() / scale.item() if scale > 1e-12 else None


def adjacent_correlations(values: torch.Tensor) -> list[float | None]:
    """values (T, L) per token and MoE layer -> L - 1 correlations, of layers (0, 1), (1, 2), ..."""
    return [pearson(values[:, layer], values[:, layer + 1]) for layer in range(values.shape[1] - 1)]


def routing_row(name: str, kind: str, summary: dict) -> dict:
    """One heatmap row from a RoutingRecord summary."""
    return {"name": name, "kind": kind, "tokens": summary["tokens"],
            "ffn_experts_per_token": summary["ffn_experts_per_token"],
            "ffn_experts_per_token_per_layer": summary["ffn_experts_per_token_per_layer"],
            "zero_computation_share": summary["zero_computation_share"]}


def _new_moments(layers: int) -> dict[str, list[ScoreMoments]]:
    return {kind: [ScoreMoments() for _ in range(layers)] for kind in SCORE_KINDS}


def _score_pass(model, blocks: torch.Tensor, batch_size: int, moments: dict, confidence: list | None) -> None:
    """One pass over blocks (n, S): every layer's scores into `moments`, (T, L) confidences into `confidence`."""
    routers = [block.gate for block in model.moe_blocks()]
    for batch in blocks.split(batch_size):
        logits = model(batch, output_router_logits=True, use_cache=False).router_logits  # L x (T, N+Z)
        for position, (router, layer_logits) in enumerate(zip(routers, logits, strict=True)):
            add_layer_scores(router, layer_logits, moments["probabilities"][position], moments["logits"][position])
        if confidence is not None:
            confidence.append(torch.stack([router_confidence(layer_logits, router.layout.n_ffn)
                                           for router, layer_logits in zip(routers, logits)], dim=1).cpu())


def source_confidence(source_model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """(T, L) router confidence of a source on blocks (n, S), from the router logits it returns (None: none)."""
    rows = []
    for batch in blocks.split(batch_size):
        router_logits = getattr(source_model(batch, output_router_logits=True, use_cache=False), "router_logits",
                                None)
        if not router_logits:
            return None
        rows.append(torch.stack([router_confidence(logits, logits.shape[-1]) for logits in router_logits],
                                dim=1).cpu())
    return torch.cat(rows)


@torch.no_grad()
def analyze_model(model, blocks: torch.Tensor, tokenizer, source_model=None, batch_size: int = 8,
                  tagger=None, data_name: str = "data") -> dict:
    """Analyses 1-5 of the module docstring on token blocks (n, S) for an in-memory MoE++ model (data row only)."""
    if not hasattr(model, "moe_blocks"):
        raise UpcycleError("routing analyses need an MoE++ model (zero-computation experts); run upcycle convert")
    was_training = model.training
    model.eval()
    layers = len(model.moe_blocks())
    on, off = _new_moments(layers), _new_moments(layers)
    confidence: list[torch.Tensor] = []  # (T, L) per batch
    residual = has_gating_residual(model)
    try:
        with record_routing(model, keep_tokens=True) as record:
            _score_pass(model, blocks, batch_size, on, confidence)
        if residual:
            with gating_residual_off(model):
                _score_pass(model, blocks, batch_size, off, None)
        else:  # every W_g is zero: the model with the residual off is this very model
            off = on
    finally:
        model.train(was_training)
    summary = record.summary()
    ffn_used = record.ffn_used  # (T, L)
    kinds = token_kinds_of_blocks(record.token_ids, blocks.shape[1], tokenizer, tagger)
    reference = source_confidence(source_model, blocks, batch_size) if source_model is not None else None
    return {
        "tokens": summary["tokens"],
        "layers": summary["layers"],
        "rows": [routing_row(data_name, "data", summary)],
        "adjacent_layer_correlation": {
            "layer_pairs": [[a, b] for a, b in zip(summary["layers"], summary["layers"][1:])],
            "ffn_experts_per_token": adjacent_correlations(ffn_used),
            "router_confidence": adjacent_correlations(torch.cat(confidence)),
            "source_router_confidence": adjacent_correlations(reference) if reference is not None else None,
        },
        "token_kinds": {"tagger": TAGGER_NAME if tagger is not None else None,
                        "kinds": by_token_kind(kinds, ffn_used)},
        "routing_scores": {
            "gating_residual_nonzero": residual,
            "per_layer": {kind: [{"layer": layer} | row for layer, row in
                                 zip(summary["layers"], score_summary(on[kind], off[kind]))]
                          for kind in SCORE_KINDS},
        },
    }


def task_row(result) -> dict:
    """One heatmap row from a task's result (upcycle.evaluation.downstream.TaskResult): its routing and metrics."""
    return routing_row(result.name, "task", result.routing) | {"metrics": result.metrics}


def task_rows(model, tokenizer, options: AnalyzeOptions) -> list[dict]:
    """One heatmap row per task of `options.tasks`, from upcycle.evaluation.downstream's routing summaries."""
    from .downstream import evaluate_tasks

    return [task_row(result) for result in evaluate_tasks(model, tokenizer, list(options.tasks),
                                                          options.task_options())]


def write_analysis(result: dict, folder: Path, shown_as: Path | str) -> dict:
    """Complete `result` (every row in place: the spread across rows, the paper's findings) and write its plots
    and analysis.json into `folder`; the paths it names are under `shown_as`, where the folder ends up."""
    from .analysis_findings import layer_spread, paper_findings
    from .analysis_plots import write_analysis_plots

    result["layer_spread_across_rows"] = layer_spread(result["rows"])
    result["findings"] = paper_findings(result)
    result["output"] = str(shown_as)
    result["plots"] = [str(Path(shown_as) / path.name) for path in write_analysis_plots(result, folder)]
    (folder / RESULTS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _check_inputs(checkpoint: Path, source: Path | None, output: Path, options: AnalyzeOptions) -> None:
    """Refuse bad inputs in one sentence before any model is loaded."""
    options.validate()
    if options.tasks:
        options.task_options().validate()
    if "n_zero_experts" not in read_config(checkpoint):
        raise UpcycleError(f"{checkpoint} is not an MoE++ checkpoint (no zero-computation experts); analyze needs "
                           "one: run upcycle convert (and calibrate or train) first, and pass the source as --source")
    protected = (checkpoint,)
    if source is not None:
        if "n_zero_experts" in read_config(source):
            raise UpcycleError(f"--source {source} is an MoE++ checkpoint; give the source MoE checkpoint that "
                               "was converted")
        protected += (source,)
    check_output_path(output, options.overwrite, protected)


def analyze_checkpoint(checkpoint: Path, data: str, output: Path, source: Path | None = None,
                       options: AnalyzeOptions | None = None) -> dict:
    """Load CHECKPOINT (and SOURCE), run the analyses on DATA's held-out blocks (and on --tasks), state the paper's
    findings, and write OUTPUT atomically: analysis.json and the PNG plots (upcycle.evaluation.analysis_plots)."""
    from ..checkpoint.loading import load_causal_lm
    from ..data.blocks import load_checkpoint_tokenizer

    options = options or AnalyzeOptions()
    checkpoint, output = Path(checkpoint), Path(output)
    source = Path(source) if source is not None else None
    _check_inputs(checkpoint, source, output, options)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    blocks = options.token_blocks(data, tokenizer).heldout[: options.max_blocks]  # (n, S)
    model = load_causal_lm(checkpoint)
    source_model = load_causal_lm(source) if source is not None else None
    if source_model is not None and source_model.config.vocab_size != model.config.vocab_size:
        raise UpcycleError(f"--source {source} has another vocabulary than {checkpoint}; give its own source")
    result = {"checkpoint": str(checkpoint.resolve()), "data": str(data),
              "source": str(source.resolve()) if source is not None else None, "tasks": list(options.tasks),
              "blocks": blocks.shape[0], "block_size": blocks.shape[1]}
    result |= analyze_model(model, blocks, tokenizer, source_model, options.batch_size, load_tagger(),
                            data_name=Path(str(data)).name or str(data))
    if options.tasks:
        result["rows"] = task_rows(model, tokenizer, options) + result["rows"]
    final = output.resolve()
    with atomic_output_dir(output, options.overwrite) as partial:
        write_analysis(result, partial, final)
    return result


def format_analysis(result: dict) -> str:
    """A short human-readable summary: one line per row, the correlations, the kinds, each finding."""
    lines = [(f"{result['tokens']:,} tokens ({result['blocks']} held-out blocks of {result['block_size']}), "
             f"MoE layers {result['layers']}")]
    for row in result["rows"]:
        shares = ", ".join(f"{kind} {share:.3f}" for kind, share in row["zero_computation_share"].items())
        per_layer = ", ".join(f"{value:.2f}" for value in row["ffn_experts_per_token_per_layer"])
        lines.append(f"  {row['name']}: {row['ffn_experts_per_token']:.3f} FFN experts per token (per layer "
                     f"{per_layer}); zero-computation share of slots: {shares}")
    for finding in result["findings"]:
        verdict = {True: "holds", False: "does not hold", None: "not measured"}[finding["holds"]]
        lines.append(f"- {finding['claim']}: {verdict}. {finding['evidence']}")
    lines.append(f"wrote {result['output']}")
    return "\n".join(lines)
