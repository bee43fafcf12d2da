"""Plots of an evaluation (per-layer routing) and of quality against compute (several evaluations).

matplotlib (a dependency, imported on first use) draws off-screen (Agg) and writes PNG files.
"""

from pathlib import Path

from ..errors import UpcycleError

SLOT_COLOURS = {"ffn": "#4c72b0", "zero": "#dd8452", "copy": "#55a868", "constant": "#c44e52"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_eval_plots(report: dict, folder: Path) -> list[Path]:
    """Per-layer FFN experts per token, and per-layer share of routing slots by expert type; returns the files."""
    per_layer = report.get("per_layer") or []
    if not per_layer:
        raise UpcycleError("this evaluation has no MoE layers to plot")
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = [str(layer["layer"]) for layer in per_layer]
    written = []

    figure, axes = plt.subplots(figsize=(max(4.0, 0.4 * len(layers) + 2), 3.2))
    axes.bar(layers, [layer["ffn_experts_per_token"] for layer in per_layer], color=SLOT_COLOURS["ffn"])
    axes.axhline(report["ffn_experts_per_token"], color="black", linestyle="--", linewidth=1,
                 label=f"mean {report['ffn_experts_per_token']:.2f}")
    if report.get("top_k"):
        axes.set_ylim(0, report["top_k"] * 1.05)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("FFN experts per token")
    axes.legend(loc="lower right")
    figure.tight_layout()
    written.append(folder / "ffn_experts_per_layer.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(max(4.0, 0.4 * len(layers) + 2), 3.2))
    bottom = [0.0] * len(per_layer)
    shares = {"ffn": [1.0 - layer["zero_share"] - layer["copy_share"] - layer["constant_share"]
                      for layer in per_layer]}
    shares |= {kind: [layer[f"{kind}_share"] for layer in per_layer] for kind in ("zero", "copy", "constant")}
    for kind, values in shares.items():
        axes.bar(layers, values, bottom=bottom, color=SLOT_COLOURS[kind], label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set_ylim(0, 1)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("share of routing slots")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    written.append(folder / "slot_share_per_layer.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written


def write_quality_vs_compute(points: list[dict], path: Path, title: str = "") -> Path:
    """Perplexity against FFN experts per token; points: dicts with ffn_experts_per_token, perplexity, label
    (and optionally perplexity_interval_95 for error bars). Points with the same label are joined by a line."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(5.0, 3.6))
    for label in dict.fromkeys(point["label"] for point in points):
        series = sorted((point for point in points if point["label"] == label),
                        key=lambda point: point["ffn_experts_per_token"])
        x = [point["ffn_experts_per_token"] for point in series]
        y = [point["perplexity"] for point in series]
        errors = None
        if all(point.get("perplexity_interval_95") for point in series):
            errors = [[p["perplexity"] - p["perplexity_interval_95"][0] for p in series],
                      [p["perplexity_interval_95"][1] - p["perplexity"] for p in series]]
        axes.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=label)
    axes.set_xlabel("FFN experts per token")
    axes.set_ylabel("held-out perplexity")
    if title:
        axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
