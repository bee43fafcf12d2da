"""`upcycle train`: a thin wrapper over upcycle.training.run_training; its flags come from TrainOptions."""

import dataclasses
from pathlib import Path

import click

from .cli import _command_line, cli
from .training.options import FIELDS, TrainOptions, field_type


def _flag_help(field: dataclasses.Field) -> str:
    default = field.default
    shown = "none" if default is None else default
    return f"{field.metadata['help']} [default: {shown}]"


def options_from_dataclass(command):
    """One click option per TrainOptions field (default None = not given, so the YAML config can set it)."""
    for name, field in reversed(FIELDS.items()):
        flag = "--" + name.replace("_", "-")
        base, _ = field_type(name)
        if base is bool:
            command = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=_flag_help(field))(command)
        else:
            kind = click.Choice(field.metadata["choices"]) if "choices" in field.metadata else base
            command = click.option(flag, name, type=kind, default=None, help=_flag_help(field))(command)
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
    from .errors import UpcycleError
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


__all__ = ["TrainOptions", "train"]
