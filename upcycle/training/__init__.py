"""Continued training of MoE++ checkpoints toward a compute budget (`upcycle train`; see docs/training.md)."""

from .options import TrainOptions, build_options
from .recipe import TrainingReport, TrainingStopped, run_training

__all__ = ["TrainOptions", "TrainingReport", "TrainingStopped", "build_options", "run_training"]
