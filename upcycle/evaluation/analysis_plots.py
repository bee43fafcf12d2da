"""The plots of `upcycle analyze` (upcycle.evaluation.analyses), one PNG per analysis.

- ffn_experts_heatmap.png: FFN experts per token, rows (tasks, then the data) x MoE layers, values written in;
- zero_computation_share.png: share of routing slots per zero-computation type, one group of bars per row;
- adjacent_layer_correlation.png: per-token correlation between adjacent MoE layers of FFN experts per token and
  of router confidence (model, and the source's as the reference);
- ffn_experts_by_token_kind.png: mean FFN experts per token by kind of token, most hungry first;
- routing_scores_residual.png: per layer, routing-score variance (top) and mean with min-max range (bottom) with
  the gating residual on and off, for router logits and router probabilities.
"""

from pathlib import Path

from .plots import SLOT_COLOURS, _pyplot

RESIDUAL_COLOURS = {"on": "#4c72b0", "off": "#dd8452"}


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def heatmap(plt, result: dict, folder: Path) -> Path:
    rows, layers = result["rows"], [str(layer) for layer in result["layers"]]
    values = [row["ffn_experts_per_token_per_layer"] for row in rows]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.7 * len(layers) + 3), 0.5 * len(rows) + 1.8))
    image = axes.imshow(values, aspect="auto", cmap="viridis")
    for y, row in enumerate(values):
        for x, value in enumerate(row):
            axes.text(x, y, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    axes.set_xticks(range(len(layers)), layers)
    axes.set_yticks(range(len(rows)), [row["name"] for row in rows])
    axes.set_xlabel("decoder layer")
    figure.colorbar(image, ax=axes, label="FFN experts per token")
    return _save(plt, figure, folder / "ffn_experts_heatmap.png")


def zero_computation_bars(plt, result: dict, folder: Path) -> Path:
    rows, kinds = result["rows"], ("zero", "copy", "constant")
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.2))
    width = 0.8 / len(kinds)
    for position, kind in enumerate(kinds):
        axes.bar([index + (position - 1) * width for index in range(len(rows))],
                 [row["zero_computation_share"][kind] for row in rows], width, color=SLOT_COLOURS[kind], label=kind)
    axes.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=20, ha="right")
    axes.set_ylabel("share of routing slots")
    axes.legend()
    return _save(plt, figure, folder / "zero_computation_share.png")


def correlation_lines(plt, result: dict, folder: Path) -> Path:
    correlation = result["adjacent_layer_correlation"]
    pairs = [f"{a}-{b}" for a, b in correlation["layer_pairs"]]
    series = {"FFN experts per token": correlation["ffn_experts_per_token"],
              "router confidence": correlation["router_confidence"],
              "source router confidence": correlation["source_router_confidence"]}
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(pairs) + 3), 3.2))
    for label, values in series.items():
        if values is not None and any(value is not None for value in values):
            axes.plot(pairs, [float("nan") if value is None else value for value in values], marker="o", label=label)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_ylim(-1, 1)
    axes.set_xlabel("adjacent decoder layers")
    axes.set_ylabel("per-token Pearson correlation")
    axes.legend(fontsize=8)
    return _save(plt, figure, folder / "adjacent_layer_correlation.png")


def token_kind_bars(plt, result: dict, folder: Path) -> Path:
    kinds = result["token_kinds"]["kinds"]
    names = list(kinds)
    figure, axes = plt.subplots(figsize=(5.0, 0.35 * len(names) + 1.2))
    axes.barh(names, [kinds[name]["ffn_experts_per_token"] for name in names], color=SLOT_COLOURS["ffn"])
    for y, name in enumerate(names):
        axes.text(kinds[name]["ffn_experts_per_token"], y, f" {kinds[name]['tokens']:,}", va="center", fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("FFN experts per token (mean over MoE layers); token counts at the bars")
    return _save(plt, figure, folder / "ffn_experts_by_token_kind.png")


def residual_panels(plt, result: dict, folder: Path) -> Path:
    per_layer = result["routing_scores"]["per_layer"]
    figure, axes = plt.subplots(2, len(per_layer), figsize=(4.2 * len(per_layer), 5.0), squeeze=False)
    for column, (kind, rows) in enumerate(per_layer.items()):
        layers = [row["layer"] for row in rows]
        for offset, state in ((-0.15, "on"), (0.15, "off")):
            x = [index + offset for index in range(len(layers))]
            axes[0][column].bar(x, [row[state]["variance"] for row in rows], 0.3, color=RESIDUAL_COLOURS[state],
                                label=f"residual {state}")
            means = [row[state]["mean"] for row in rows]
            spans = [[mean - row[state]["min"] for mean, row in zip(means, rows)],
                     [row[state]["max"] - mean for mean, row in zip(means, rows)]]
            axes[1][column].errorbar(x, means, yerr=spans, fmt="o", capsize=3, color=RESIDUAL_COLOURS[state],
                                     label=f"residual {state}")
        for row_axes, label in ((axes[0][column], f"variance of router {kind}"),
                                (axes[1][column], f"router {kind}: mean, min-max")):
            row_axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
            row_axes.set_ylabel(label, fontsize=8)
            row_axes.legend(fontsize=7)
        axes[1][column].set_xlabel("decoder layer")
    return _save(plt, figure, folder / "routing_scores_residual.png")


def write_analysis_plots(result: dict, folder: Path) -> list[Path]:
    """Every plot of the module docstring into `folder`; returns the files."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [draw(plt, result, folder) for draw in (heatmap, zero_computation_bars, correlation_lines,
                                                   token_kind_bars, residual_panels)]
