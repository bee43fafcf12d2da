"""Continued training of MoE++ checkpoints toward a compute budget (`upcycle train`; see docs/training.md).

The recipe (torch, transformers, accelerate) is imported on first use, so that `upcycle --help` and the CLI's
option parsing stay light.
"""

from .options import TrainOptions, build_options

_FROM_RECIPE = ("TrainingReport", "TrainingStopped", "run_training", "recipe")


def __getattr__(name: str):
    if name in _FROM_RECIPE:
        import importlib

        recipe = importlib.import_module(f"{__name__}.recipe")  # `from . import recipe` would recurse here
        return recipe if name == "recipe" else getattr(recipe, name)
    raise AttributeError(f"module 'upcycle.training' has no attribute {name!r}")


__all__ = ["TrainOptions", "TrainingReport", "TrainingStopped", "build_options", "run_training"]
