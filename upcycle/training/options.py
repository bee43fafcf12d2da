"""Every option of `upcycle train`: one dataclass is the single truth for validation, YAML configs and CLI help.

Precedence, lowest first: the defaults below, a YAML config (`--config`, flat `name: value` keys named as the
fields), explicit command-line flags, then `KEY=VALUE` overrides.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.options import DataOptions
from ..data.options import option as _option
from ..errors import UpcycleError
from ..modeling.moepp_fields import ROUTING_RULES

TRAINABLE_SETS = ("default", "lora", "full")
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
SELECTION_SIGNALS = ("auto", "output_change", "straight_through", "none")  # moepp_layer's, plus auto and none


@dataclass
class TrainOptions(DataOptions):
    """Continued training of an MoE++ checkpoint toward a compute budget (see docs/training.md).

    The data options (text_field, block_size, heldout_fraction, max_tokens, seed) are DataOptions'; only the
    block size's default differs (training sequences are shorter than evaluation blocks by default).
    """

    # What to train, on what, into where
    model: str | None = _option(None, "MoE++ checkpoint folder to train (made by `upcycle convert`).")
    data: str | None = _option(None, "Training text: a .txt, .jsonl or .parquet file, a folder, or a Hub dataset.")
    output: str | None = _option(None, "Folder for the trained MoE++ checkpoint (written atomically at the end).")
    eval_data: str | None = _option(None, "Held-out text for the final evaluation (default: the held-out split "
                                          "of --data).")
    run_dir: str | None = _option(None, "Folder for training checkpoints and metrics (default: OUTPUT-training).")
    overwrite: bool = _option(False, "Replace an existing OUTPUT folder.")
    # Budget
    target_ffn_per_token: float | None = _option(
        None, "Compute budget: mean FFN experts per token the controller steers to (None: keep the biases).")
    controller_lr: float = _option(
        0.3, "Integral-controller step: bias change per step, in router-logit spreads per FFN expert of error.")
    ramp_fraction: float = _option(0.3, "Share of the steps over which the target ramps from the source's top-k.")
    controller_start_share: float = _option(
        0.02, "Switched-off selection biases start where this share of tokens picks a zero-computation expert.")
    routing_rule: str | None = _option(
        None, "Train a control instead of MoE++ routing: the source's routing with FFN slots dropped by this rule "
              "(top_k, dynamic_skipping, top_p, top_1_confident), its knob fitted to --target-ffn-per-token on the "
              "training text before and after training.", choices=ROUTING_RULES)
    selection_signal: str = _option(
        "auto", "How routers learn which tokens need FFN experts (docs/training.md): output_change (targets from "
                "how much each FFN expert moves the layer's output), straight_through (first-order loss change "
                "through a relaxed selection), none (only through the top-k weights), or auto (straight_through below "
                "k - 1 FFN experts per token, none otherwise: the measured better ones).",
        choices=SELECTION_SIGNALS)
    selection_temperature: float = _option(
        1.0, "Temperature of the selection signal's sigmoid, in spreads of the FFN-vs-zero-computation margins.")
    budget_fit_blocks: int = _option(
        32, "Training blocks the budget is landed on after training (a control's knob, MoE++'s bias offsets).")
    # Trainable set and losses
    trainable: str = _option("default", "Trainable set: default (routers + constant experts), lora or full.",
                             choices=TRAINABLE_SETS)
    lora_rank: int = _option(8, "LoRA rank (--lora).")
    lora_alpha: float = _option(16.0, "LoRA alpha (--lora).")
    lora_dropout: float = _option(0.0, "LoRA dropout (--lora).")
    balance_tau: float = _option(0.75, "tau: weight of zero-computation experts in the balance loss, in (0, 1].")
    balance_loss_coef: float = _option(0.01, "beta: loss = cross-entropy + beta * heterogeneous balance loss.")
    distill_weight: float = _option(0.0, "Weight of the KL self-distillation toward the source's routing (0: off).")
    distill_temperature: float = _option(1.0, "Softmax temperature of the self-distillation.")
    # Optimisation
    steps: int = _option(100, "Optimizer steps.")
    learning_rate: float = _option(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _option(0.0, "AdamW weight decay.")
    lr_schedule: str = _option("constant", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULES)
    warmup_steps: int = _option(0, "Linear warm-up steps.")
    max_grad_norm: float = _option(1.0, "Gradient clipping norm (0: no clipping).")
    micro_batch_size: int = _option(4, "Sequences per process per forward pass.")
    gradient_accumulation_steps: int = _option(1, "Micro-batches per optimizer step.")
    block_size: int = _option(128, "Tokens per training sequence (and per held-out block).")
    mixed_precision: str = _option("no", "Mixed precision (bf16/fp16 need a GPU).", choices=MIXED_PRECISION)
    activation_checkpointing: bool = _option(False, "Recompute decoder layers in the backward pass to save memory.")
    # Data
    eval_max_blocks: int | None = _option(None, "Evaluate on at most this many held-out blocks (None: all).")
    # Checkpoints and logs
    checkpoint_every: int = _option(50, "Save a training checkpoint every N steps (0: never).")
    keep_checkpoints: int = _option(2, "Training checkpoints to keep (the newest).")
    resume: bool = _option(False, "Continue from the newest training checkpoint in the run folder.")
    progress: bool = _option(True, "Show a progress bar.")
    tensorboard: bool = _option(True, "Also log to TensorBoard when it is installed.")

    def validate(self) -> "TrainOptions":
        """Refuse bad values with one sentence each, before anything is loaded."""
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise UpcycleError(f"missing {name}: pass --{name} (or set `{name}:` in the config)")
        for name, choices in (("trainable", TRAINABLE_SETS), ("mixed_precision", MIXED_PRECISION),
                              ("lr_schedule", LR_SCHEDULES), ("selection_signal", SELECTION_SIGNALS)):
            if getattr(self, name) not in choices:
                raise UpcycleError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        positive = ("steps", "micro_batch_size", "gradient_accumulation_steps", "block_size", "lora_rank",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UpcycleError(f"{name} must be 1 or more, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "weight_decay", "max_grad_norm", "distill_weight",
                     "controller_lr", "lora_dropout"):
            if getattr(self, name) < 0:
                raise UpcycleError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.distill_temperature <= 0:
            raise UpcycleError("learning_rate and distill_temperature must be greater than 0")
        if not 0.0 < self.balance_tau <= 1.0:
            raise UpcycleError(f"balance_tau must be in (0, 1], got {self.balance_tau}")
        if not 0.0 <= self.ramp_fraction <= 1.0 or not 0.0 < self.controller_start_share < 1.0:
            raise UpcycleError("ramp_fraction must be in [0, 1] and controller_start_share in (0, 1)")
        if self.routing_rule is not None:
            if self.routing_rule not in ROUTING_RULES:
                raise UpcycleError(f"routing_rule must be one of {', '.join(ROUTING_RULES)}, got {self.routing_rule!r}")
            if self.target_ffn_per_token is None:
                raise UpcycleError("a control (--routing-rule) needs --target-ffn-per-token: its knob is fitted to it")
            target = self.target_ffn_per_token
            if self.routing_rule == "top_k" and (target < 1 or abs(target - round(target)) > 1e-9):
                raise UpcycleError(f"the top_k rule reaches whole numbers of FFN experts per token only, got {target:g}")
        if self.selection_temperature <= 0 or self.budget_fit_blocks < 1:
            raise UpcycleError("selection_temperature must be greater than 0 and budget_fit_blocks 1 or more")
        if self.target_ffn_per_token is not None and self.target_ffn_per_token < 0:
            raise UpcycleError(f"target_ffn_per_token must be 0 or more, got {self.target_ffn_per_token}")
        self.validate_data_options()
        if self.eval_max_blocks is not None and self.eval_max_blocks < 1:
            raise UpcycleError(f"eval_max_blocks must be 1 or more (or null), got {self.eval_max_blocks}")
        return self

    @property
    def resolved_run_dir(self) -> Path:
        output = Path(self.output)
        return Path(self.run_dir) if self.run_dir else output.parent / f"{output.name}-training"


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}


def field_type(name: str) -> tuple[type, bool]:
    """(base type, accepts None) of a field: `float | None` -> (float, True)."""
    annotation = typing.get_type_hints(TrainOptions)[name]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return members[0], True
    return annotation, False


def coerce(name: str, value):
    """Check and convert one value (from YAML or a KEY=VALUE override) to the field's type."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UpcycleError(f"unknown training option {name!r}{hint}")
    base, optional = field_type(name)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UpcycleError(f"training option {name} cannot be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UpcycleError(f"training option {name} expects {base.__name__}, got {value!r}")


def parse_override(text: str) -> tuple[str, object]:
    """`KEY=VALUE` -> (key, typed value); VALUE is read as YAML (so 0.5, true, null work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UpcycleError(f"overrides look like KEY=VALUE (for example learning_rate=3e-4), got {text!r}")
    key = key.strip().lstrip("-").replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise UpcycleError(f"cannot read the value of override {text!r}") from error
    return key, coerce(key, value)


def load_yaml_config(path: Path) -> dict:
    """A recipe config: a flat mapping of option names to values (comments say how to launch it)."""
    path = Path(path)
    if not path.is_file():
        raise UpcycleError(f"the config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UpcycleError(f"the config {path} is not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(raw, dict):
        raise UpcycleError(f"the config {path} must be a mapping of option names to values")
    return {key: coerce(key, value) for key, value in raw.items()}


def build_options(config: Path | None = None, flags: dict | None = None,
                  overrides: tuple[str, ...] | list[str] = ()) -> TrainOptions:
    """Defaults < YAML config < explicit flags (None = not given) < KEY=VALUE overrides; then validate."""
    values: dict = {}
    if config is not None:
        values |= load_yaml_config(config)
    values |= {key: coerce(key, value) for key, value in (flags or {}).items() if value is not None}
    values |= dict(parse_override(text) for text in overrides)
    return TrainOptions(**values).validate()


def options_record(options: TrainOptions) -> dict:
    """The options as plain JSON-able data (for provenance and training checkpoints)."""
    return dataclasses.asdict(options)
