"""The `upcycle` command: one short function per command, each a thin wrapper over the library.

The top of the house: commands import the library lazily (inside each command) so that `upcycle --help` and a
plain `convert` start without torch or transformers; nothing in the library imports this module.
Shared option groups: `data_options` (calibrate, eval) and `options_from_dataclass` (train's TrainOptions).
"""

import dataclasses
import json
import os
import shlex
import sys
import typing
from pathlib import Path

import click

from .errors import UpcycleError
from .training.options import FIELDS, TrainOptions


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
@click.option("--denominator", "zero_computation_denominator", default="ffn_only", show_default=True,
              type=click.Choice(["ffn_only", "switched_on"]),
              help="FFN experts' weights: ffn_only keeps the source's softmax over FFN experts whatever is switched "
                   "on (better measured, docs/layer-math.md); switched_on shares one softmax with the "
                   "zero-computation experts. No effect on families that renormalise their top-k.")
@click.option("--zero-computation-scores", "zero_computation_scores", default="relative", show_default=True,
              type=click.Choice(["relative", "absolute"]),
              help="What zero-computation experts compete with: relative adds the token's best FFN score to their "
                   "router outputs, so a calibrated Zero expert skips a token's weak experts as dynamic skipping "
                   "does (docs/layer-math.md); absolute uses the router outputs alone.")
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
    from .checkpoint.inspect import format_summary, inspect_checkpoint

    summary = inspect_checkpoint(checkpoint)
    click.echo(json.dumps(summary.as_dict(), indent=2) if as_json else format_summary(summary))


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("converted", type=click.Path(path_type=Path))
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest allowed absolute logit difference (float32).")
def verify(source, converted, tolerance) -> None:
    """Check that CONVERTED computes what SOURCE computes, on probe tokens."""
    from .surgery.verify import verify as run_verify

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
@click.option("--train-steps", type=click.IntRange(min=1), default=150, show_default=True,
              help="Training steps of each trained arm (MoE++ and its trained control) at each budget.")
@click.option("--max-heldout-blocks", type=click.IntRange(min=1), default=256, show_default=True,
              help="Evaluate on at most this many held-out blocks of 256 tokens (about 65k tokens by default); "
                   "fewer make a quick look, not a measurement.")
@click.option("--budgets", default="1.5,1.0,0.75", show_default=True,
              help="Comma-separated budgets in FFN experts per token (between 0 and the source's top-k).")
@click.option("--task", default="upcycle_stdlib_cloze", show_default=True,
              help="The downstream task run for the source, baselines, trained controls and trained MoE++: one of "
                   "the local tasks upcycle_stdlib_cloze, upcycle_stdlib_module (no download).")
@click.option("--task-limit", type=click.IntRange(min=1), default=None,
              help="Run at most this many examples of the task (default: all of them).")
def demo(output, train_steps, max_heldout_blocks, budgets, task, task_limit) -> None:
    """Run the whole job on the embedded default model (no download), against trained controls."""
    from .demo import DemoOptions, run_demo

    try:
        targets = tuple(float(value) for value in budgets.split(",") if value.strip())
    except ValueError:
        raise UpcycleError(f"--budgets takes numbers separated by commas, got {budgets!r}") from None
    if not targets or any(not 0.0 <= target <= 2.0 for target in targets):
        raise UpcycleError(f"--budgets must be between 0 and 2 FFN experts per token (top-2), got {budgets!r}")
    run_demo(DemoOptions(output=output, train_steps=train_steps, max_heldout_blocks=max_heldout_blocks,
                         budgets=targets, task=task, task_limit=task_limit), echo=click.echo)


def _option_type(owner: type, name: str) -> type:
    """The base type of a dataclass field: `int | None` -> int."""
    annotation = typing.get_type_hints(owner)[name]
    members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return members[0] if members else annotation


def _dataclass_option(owner: type, field: dataclasses.Field, default):
    """One click option for a dataclass field: its help, choices, type; `default` None means "not given"."""
    flag, base = "--" + field.name.replace("_", "-"), _option_type(owner, field.name)
    shown = "none" if field.default is None else field.default
    help_text = f"{field.metadata['help']} [default: {shown}]"
    if base is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", field.name, default=default, help=help_text)
    kind = click.Choice(field.metadata["choices"]) if "choices" in field.metadata else base
    return click.option(flag, field.name, type=kind, default=default, help=help_text)


def data_options(command=None, *, data_required: bool = True):
    """The data options of calibrate and eval (upcycle.data.options.DataOptions, written once), with --data and
    --batch-size; the command receives them as keyword arguments named as the fields. `@data_options` makes
    --data required; `@data_options(data_required=False)` does not (eval: --tasks alone needs no text)."""
    from .data.options import DataOptions

    if command is None:
        return lambda command: data_options(command, data_required=data_required)
    for field in reversed(dataclasses.fields(DataOptions)):
        command = _dataclass_option(DataOptions, field, field.default)(command)
    command = click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                           help="Sequences per forward pass.")(command)
    return click.option("--data", required=data_required, default=None,
                        help="A .txt / .jsonl / .parquet file, a folder of .txt files, "
                             "or a Hub dataset name (online).")(command)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--target-ffn-per-token", "target", type=float, required=True,
              help="Mean FFN experts per token to reach (between top-k minus the zero-computation experts and top-k).")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for the calibrated checkpoint.")
@data_options
@click.option("--batches", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calibration batches (from the data's training blocks).")
@click.option("--priority", default="zero,constant,copy", show_default=True,
              help="Order in which zero-computation types take tokens, for layers whose biases are all -inf.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def calibrate(checkpoint, target, output, data, batches, priority, overwrite, **data_settings) -> None:
    """Set CHECKPOINT's selection biases so that a target number of FFN experts per token holds (no training)."""
    from .budget.calibrate import TOLERANCE, CalibrateOptions
    from .budget.calibrate import calibrate as run_calibrate

    options = CalibrateOptions(target_ffn_per_token=target, batches=batches, overwrite=overwrite,
                               priority=tuple(kind.strip() for kind in priority.split(",")), **data_settings)
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
@data_options(data_required=False)
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The source checkpoint: adds KL(source || model) per token.")
@click.option("--max-blocks", type=click.IntRange(min=1), default=None, help="Evaluate at most this many blocks.")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None,
              help="Write per-layer plots (PNG) into this folder.")
@click.option("--baseline", type=click.Choice(["dynamic_skipping", "top_p", "top_1_confident"]), default=None,
              help="Evaluate a training-free rule on a converted checkpoint instead of its own routing (with "
                   "--target-ffn-per-token): the control MoE++ must beat at the same compute.")
@click.option("--target-ffn-per-token", type=float, default=None,
              help="The baseline's budget: its threshold or p is fitted to it on the data's train blocks.")
@click.option("--fit-blocks", type=click.IntRange(min=1), default=32, show_default=True,
              help="Train blocks the baseline's knob is fitted on.")
@click.option("--tasks", default=None,
              help="Comma-separated lm-evaluation-harness tasks (arc_easy,hellaswag,... online; offline: "
                   "upcycle_stdlib_module,upcycle_stdlib_cloze): metrics with standard errors and each task's routing.")
@click.option("--include-path", "include_path", type=click.Path(path_type=Path), multiple=True,
              help="A folder of lm-eval task YAML files of your own (repeat for more).")
@click.option("--limit", type=float, default=None,
              help="Examples per task: a count, or a fraction below 1 (default: all).")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples per prompt (default: each task's).")
@click.option("--device", default="cpu", show_default=True, help="Device the tasks run on (cpu, cuda, cuda:1, ...).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Weights' dtype for the tasks.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(checkpoint, data, source, max_blocks, plots_dir, baseline, target_ffn_per_token, fit_blocks, tasks,
             include_path, limit, num_fewshot, device, dtype, as_json, **data_settings) -> None:
    """Perplexity, FFN experts per token and how they are spent, zero-computation shares, load balance (and KL to
    SOURCE) on held-out text (--data); or a training-free baseline's (--baseline) on a converted checkpoint; and
    downstream tasks through lm-evaluation-harness (--tasks) with the routing of each task's tokens."""
    from .evaluation.eval_request import EvalRequest, run_eval

    request = EvalRequest(checkpoint=checkpoint, data=data, data_settings=data_settings, source=source,
                          max_blocks=max_blocks, plots_dir=plots_dir, baseline=baseline,
                          target_ffn_per_token=target_ffn_per_token, fit_blocks=fit_blocks, tasks=tasks,
                          include_path=list(include_path), limit=limit, num_fewshot=num_fewshot, device=device,
                          dtype=dtype)
    result, text = run_eval(request)
    click.echo(json.dumps(result, indent=2) if as_json else text)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@data_options
@click.option("--output", type=click.Path(path_type=Path), required=True,
              help="Folder for analysis.json and the plots (written atomically).")
@click.option("--tasks", default=None,
              help="Comma-separated downstream tasks (e.g. upcycle_stdlib_module,upcycle_stdlib_cloze): one heatmap "
                   "row each, beside the data's.")
@click.option("--limit", "task_limit", type=float, default=None,
              help="Examples per task: a count, or a fraction below 1 (default: all).")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The source checkpoint: its router confidence is the reference of the adjacent-layer correlation.")
@click.option("--max-blocks", type=click.IntRange(min=1), default=None, help="Analyse at most this many blocks.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def analyze(checkpoint, data, output, tasks, task_limit, source, max_blocks, overwrite, as_json,
            **data_settings) -> None:
    """The MoE++ paper's routing analyses of an MoE++ CHECKPOINT on held-out text (and tasks): FFN experts per
    token by layer and task, zero-computation shares, adjacent-layer correlation, kinds of token, and routing
    scores with the gating residual on and off; each paper finding stated with its measured numbers."""
    from .evaluation.task_selection import quiet_task_output, task_names

    names = tuple(task_names(tasks))
    if names:
        quiet_task_output()  # before the analyses import torch (and with it tqdm)
    from .evaluation.analyses import AnalyzeOptions, analyze_checkpoint, format_analysis

    options = AnalyzeOptions(max_blocks=max_blocks, tasks=names, task_limit=task_limit, overwrite=overwrite,
                             **data_settings)
    result = analyze_checkpoint(checkpoint, data, output, source, options)
    click.echo(json.dumps(result, indent=2) if as_json else format_analysis(result))


def options_from_dataclass(command):
    """One click option per TrainOptions field (default None = not given, so the YAML config can set it)."""
    for field in reversed(FIELDS.values()):
        command = _dataclass_option(TrainOptions, field, None)(command)
    return command


@cli.command(context_settings={"show_default": False})
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="A recipe YAML (recipes/*.yaml): option names as keys.")
@click.option("--lora", "lora", is_flag=True, help="Shortcut for --trainable lora.")
@click.option("--full", "full", is_flag=True, help="Shortcut for --trainable full.")
@options_from_dataclass
def train(overrides, config, lora, full, **flags) -> None:
    """Train an MoE++ checkpoint toward a compute budget (routers + constant experts by default).

    Precedence: defaults < --config YAML < flags < KEY=VALUE overrides. Launch on several processes or GPUs
    with `accelerate launch recipes/continued_training.py ...` (see recipes/*.yaml).
    """
    from .training import build_options, run_training

    if lora and full:
        raise UpcycleError("choose one of --lora and --full")
    if lora or full:
        flags["trainable"] = "lora" if lora else "full"
    options = build_options(config, flags, overrides)
    report = run_training(options, command=_command_line())
    heldout = report.heldout
    if not report.is_main_process:
        return
    click.echo(f"trained {report.steps} steps ({report.trainable['trainable_set']} set, "
               f"{report.trainable['trainable_parameters']:,} trainable parameters); held-out perplexity "
               f"{heldout['perplexity']:.3f}, {heldout['ffn_experts_per_token']:.3f} FFN experts per token; "
               f"wrote {report.output}")


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private; an existing public repo is refused.")
@click.option("--revision", default=None, help="Branch to push to (created from main when missing).")
@click.option("--commit-message", default=None, help="Commit title (default: 'Upload MoE++ checkpoint with upcycle').")
@click.option("--base-model", default=None,
              help="The source's Hub id for the card's base_model (default: from the card or the provenance).")
@click.option("--exclude", multiple=True, help="Glob of files not to upload; repeat for more.")
@click.option("--dry-run", is_flag=True, help="Print the files, their sizes and the card; no network, no token.")
def push(checkpoint, repo_id, private, revision, commit_message, base_model, exclude, dry_run) -> None:
    """Publish CHECKPOINT to the Hugging Face Hub as REPO_ID, with a refreshed model card.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written.
    """
    from .publish.push import PushOptions, format_plan, plan_push
    from .publish.push import push as run_push

    options = PushOptions(private=private, revision=revision, commit_message=commit_message, base_model=base_model,
                          exclude=list(exclude))
    plan = plan_push(checkpoint, repo_id, options)
    if dry_run:
        click.echo(format_plan(plan))
        return
    report = run_push(plan)
    click.echo(f"pushed {report.files} files ({report.total_bytes:,} bytes) to {report.url}")


def main() -> None:
    """Entry point: user errors become one sentence and exit code 1, Ctrl-C exit code 130, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except UpcycleError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except OSError as error:
        if os.environ.get("UPCYCLE_DEBUG"):
            raise
        import errno  # here, not at the top: this part of the file is the entry point's

        cause = "the disk is full (No space left on device)" if error.errno == errno.ENOSPC else (
            error.strerror or str(error))
        where = f" while working on {error.filename}" if error.filename else ""
        click.echo(f"error: {cause}{where}; nothing partial was left behind", err=True)
        sys.exit(1)


INTERRUPTED = "interrupted; nothing partial was left behind (complete outputs and training checkpoints are kept)"
