"""`upcycle calibrate` and `upcycle eval`: thin wrappers over upcycle.budget.calibrate and upcycle.evaluate."""

import json
from pathlib import Path

import click

from .cli import _command_line, cli


def _data_options(command):
    """Options shared by calibrate and eval: how the data becomes token blocks."""
    options = [
        click.option("--data", required=True, help="A .txt / .jsonl / .parquet file, a folder of .txt files, or "
                                                   "a Hub dataset name (online)."),
        click.option("--text-field", default="text", show_default=True, help="The text field of .jsonl/.parquet."),
        click.option("--block-size", type=click.IntRange(min=2), default=256, show_default=True,
                     help="Tokens per packed sequence."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Sequences per forward pass."),
        click.option("--heldout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
                     show_default=True, help="Share of documents held out (split by a hash of each document)."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=None,
                     help="Read at most this many tokens of the data (documents in order)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Order of the training blocks."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--target-ffn-per-token", "target", type=float, required=True,
              help="Mean FFN experts per token to reach (between top-k minus the zero-computation experts and top-k).")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for the calibrated checkpoint.")
@_data_options
@click.option("--batches", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration batches (from the data's training blocks).")
@click.option("--priority", default="zero,constant,copy", show_default=True,
              help="Order in which zero-computation types take tokens, for layers whose biases are all -inf.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def calibrate(checkpoint, target, output, data, text_field, block_size, batch_size, heldout_fraction, max_tokens,
              seed, batches, priority, overwrite) -> None:
    """Set CHECKPOINT's selection biases so that a target number of FFN experts per token holds (no training)."""
    from .budget.calibrate import TOLERANCE, CalibrateOptions
    from .budget.calibrate import calibrate as run_calibrate

    options = CalibrateOptions(
        target_ffn_per_token=target, batches=batches, batch_size=batch_size, block_size=block_size, seed=seed,
        heldout_fraction=heldout_fraction, max_tokens=max_tokens, text_field=text_field,
        priority=tuple(kind.strip() for kind in priority.split(",")), overwrite=overwrite,
    )
    report = run_calibrate(checkpoint, output, data, options, command=_command_line())
    per_layer = ", ".join(f"{value:.2f}" for value in report.heldout_per_layer)
    click.echo(f"calibrated {len(report.layers)} MoE layers on {report.calibration_tokens:,} tokens: "
               f"{report.heldout_ffn_experts_per_token:.3f} FFN experts per token on {report.heldout_tokens:,} "
               f"held-out tokens (target {target:g}; per layer {per_layer}), held-out perplexity "
               f"{report.heldout_perplexity:.3f}; wrote {report.output}")
    if not report.within_tolerance:
        click.echo(f"warning: the held-out mean misses the target by more than {TOLERANCE}; calibrate on more "
                   "data (--batches, --block-size) or held-out text closer to the calibration text", err=True)


@cli.command(name="eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@_data_options
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The source checkpoint: adds KL(source || model) per token.")
@click.option("--max-blocks", type=click.IntRange(min=1), default=None, help="Evaluate at most this many blocks.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Write per-layer plots (PNG) into this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(checkpoint, data, text_field, block_size, batch_size, heldout_fraction, max_tokens, seed, source,
             max_blocks, plots_dir, as_json) -> None:
    """Perplexity, FFN experts per token, zero-computation shares, load balance (and KL to SOURCE) on held-out text."""
    from .evaluate import EvalOptions, evaluate_checkpoint, format_report

    options = EvalOptions(block_size=block_size, batch_size=batch_size, seed=seed, heldout_fraction=heldout_fraction,
                          max_tokens=max_tokens, max_blocks=max_blocks, text_field=text_field)
    report = evaluate_checkpoint(checkpoint, data, source, options)
    result = report.as_dict()
    if plots_dir is not None:
        from .plots import write_eval_plots

        result["plots"] = [str(path) for path in write_eval_plots(result, plots_dir)]
    click.echo(json.dumps(result, indent=2) if as_json else format_report(report))
    if plots_dir is not None and not as_json:
        click.echo(f"plots: {', '.join(result['plots'])}")
