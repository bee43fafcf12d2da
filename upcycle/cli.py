"""The `upcycle` command: one short function per command, each a thin wrapper over the library."""

import json
import os
import shlex
import sys
from pathlib import Path

import click

from .errors import UpcycleError


def _quiet_libraries() -> None:
    """Keep transformers' and huggingface_hub's progress bars and load reports out of the CLI's output.

    Through their environment variables, read when they are first imported, so that commands that never import
    them (`convert` of a safetensors source, `--help`) do not pay for it; directly where they are loaded already.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _command_line() -> str:
    return shlex.join(["upcycle", *sys.argv[1:]])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="upcycle")
def cli() -> None:
    """Turn existing Mixture-of-Experts checkpoints into MoE++ models."""
    _quiet_libraries()


@cli.command()
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--zero", "n_zero", type=click.IntRange(min=0), default=None, help="Zero experts (default: paper's rule).")
@click.option("--copy", "n_copy", type=click.IntRange(min=0), default=None, help="Copy experts (default: paper's rule).")
@click.option("--constant", "n_constant", type=click.IntRange(min=0), default=None,
              help="Constant experts (default: paper's rule).")
@click.option("--gating-residual/--no-gating-residual", default=True, show_default=True,
              help="Link consecutive MoE layers' router logits.")
@click.option("--zero-semantics", "zero_expert_semantics", default=None,
              type=click.Choice(["drop_and_renormalize", "keep_weight"]),
              help="What a selected Zero expert does (default: drop_and_renormalize for families that renormalise "
                   "their top-k weights, keep_weight otherwise).")
@click.option("--link", type=click.Choice(["auto", "reflink", "hard", "copy"]), default="auto", show_default=True,
              help="Unchanged shards: auto (reflink, else copy), reflink, hard (the output shares the source's "
                   "files: editing one edits both) or copy.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Cast floating-point tensors while streaming (default: keep every dtype, decode nothing).")
@click.option("--revision", default=None, help="Branch, tag or commit when SOURCE is a Hub repo id.")
@click.option("--source-sha256/--no-source-sha256", "source_sha256", default=True, show_default=True,
              help="Record every source shard's sha256 in upcycle.json: free for a Hub-cache source, otherwise one "
                   "read of each linked or copied shard (all that link mode costs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def convert(source, output, **options) -> None:
    """Convert the MoE checkpoint SOURCE (a folder or a Hub repo id) into an MoE++ checkpoint in OUTPUT."""
    from .surgery.convert import ConvertOptions
    from .surgery.convert import convert as run_convert

    report = run_convert(source, output, ConvertOptions(**options), command=_command_line())
    counts = report.plan.counts
    click.echo(
        f"converted {report.plan.spec.name} ({report.plan.expert_layout} experts, {len(report.plan.moe_layers)} MoE "
        f"layers): {report.plan.n_ffn} FFN + {counts.zero} zero, {counts.copy} copy, {counts.constant} constant "
        f"experts per layer; +{report.added_parameters:,} parameters; wrote {report.output}"
    )


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(checkpoint, as_json) -> None:
    """Describe CHECKPOINT: family, layers, experts by type, parameters, files, provenance."""
    from .inspect_checkpoint import format_summary, inspect_checkpoint

    summary = inspect_checkpoint(checkpoint)
    click.echo(json.dumps(summary.as_dict(), indent=2) if as_json else format_summary(summary))


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("converted", type=click.Path(path_type=Path))
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest allowed absolute logit difference (float32).")
def verify(source, converted, tolerance) -> None:
    """Check that CONVERTED computes what SOURCE computes, on probe tokens."""
    from .verify import verify as run_verify

    report = run_verify(source, converted, tolerance)
    generation = "identical" if report.greedy_generation_equal else "different"
    message = f"largest logit difference {report.max_logit_difference:.3e} (tolerance {tolerance:g}); " \
              f"greedy generation {generation}"
    if not report.passed:
        where = "" if report.first_parting_layer is None else \
            f"; hidden states first part at decoder layer {report.first_parting_layer}"
        raise UpcycleError(f"verification failed: {message}{where}")
    click.echo(f"ok: {message}")


@cli.command()
@click.option("--output", type=click.Path(path_type=Path), default=Path("upcycle-demo"), show_default=True,
              help="Folder for the demo's checkpoints, results.json and plots.")
@click.option("--train-steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps per budget (LoRA on the experts, routers, distillation).")
def demo(output, train_steps) -> None:
    """Run the whole job on the embedded default model (no download)."""
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions(output=output, train_steps=train_steps), echo=click.echo)


# Commands of other parts live in their own modules and attach themselves to `cli` on import.
from . import cli_budget, cli_publish, cli_train  # noqa: F401


def main() -> None:
    """Entry point: user errors become one sentence and exit code 1, Ctrl-C exit code 130, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except UpcycleError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    except OSError as error:
        if os.environ.get("UPCYCLE_DEBUG"):
            raise
        click.echo(f"error: {error.strerror or error} ({error.filename or 'unknown file'})", err=True)
        sys.exit(1)
