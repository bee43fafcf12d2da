"""The continued-training recipe, top to bottom: what `upcycle train` and recipes/continued_training.py run.

1. check the options, the input checkpoint, the output and run folders (before anything heavy);
2. tokenize the data with the checkpoint's own tokenizer into packed blocks, with a held-out split;
3. load the MoE++ model in float32, choose the trainable set (default / lora / full), wrap it with accelerate
   (one CPU process, several CPU processes, DDP or FSDP on GPUs; bf16 autocast when asked);
4. start the budget controller on the first batch (or restore everything from the newest checkpoint: --resume);
5. each step: the gradient-accumulation micro-batches (cross-entropy + beta * balance loss, plus optional
   self-distillation), stop on a non-finite loss or gradient, clip, AdamW step, controller step, metrics,
   a training checkpoint every N steps;
6. evaluate perplexity and FFN experts per token on the held-out blocks;
7. write the MoE++ checkpoint atomically, with provenance and model card.
"""

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ..budget.calibrate import calibrate_model, fit_rule_per_layer
from ..budget.controller import BudgetController
from ..checkpoint.loading import load_causal_lm
from ..checkpoint.output_dir import check_output_path
from ..data.blocks import load_checkpoint_tokenizer
from ..errors import UpcycleError
from ..evaluation.baselines import knob_search
from . import checkpointing
from .data_order import BlockOrder
from .heldout import evaluate_heldout
from .losses import StartingWeights, compute_losses
from .metrics import MetricsLog
from .options import TrainOptions, options_record
from .output import train_step_record, write_trained_checkpoint
from .trainable import select_trainable


class TrainingStopped(UpcycleError):
    """Training stopped on a non-finite loss or gradient; the last good checkpoint is kept."""


@dataclass
class TrainingReport:
    output: Path
    run_dir: Path
    steps: int
    heldout: dict  # perplexity, heldout_loss, ffn_experts_per_token (+ per layer), heldout_tokens
    trainable: dict
    is_main_process: bool = True  # False on the other processes of a distributed run


class SelectionBiases:
    """The live (Z,) selection-bias buffers of every MoE layer, looked up on each call: moving or wrapping the
    model (accelerate's prepare, FSDP) may replace buffer tensors, never the modules that hold them."""

    def __init__(self, moe_blocks: list):
        self.moe_blocks = moe_blocks

    def __call__(self) -> list[torch.Tensor]:
        return [block.gate.selection_bias for block in self.moe_blocks]


def learning_rate_factor(options: TrainOptions):
    """LR multiplier per step: linear warm-up, then constant or cosine decay to 10%."""
    def factor(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        if options.lr_schedule == "constant":
            return 1.0
        progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def set_selection_learning(model, options: TrainOptions, rule_blocks: torch.Tensor) -> None:
    """A control (`routing_rule`): every router routes by the rule, each layer's knob fitted on `rule_blocks` to
    the target (`fit_rule_per_layer`). MoE++: the selection signal (`selection_signal`) is switched on."""
    routers = [block.gate for block in model.moe_blocks()]
    if options.routing_rule is not None:
        was_training = model.training
        fit_rule_per_layer(model.eval(), list(rule_blocks.split(8)), options.routing_rule,
                           options.target_ffn_per_token)
        model.train(was_training)
        return
    signal = resolved_selection_signal(options, routers[0])
    for router in routers:
        router.routing_rule = None
        router.selection_signal, router.selection_temperature = signal, options.selection_temperature


def routing_rule_fields(moe_blocks: list) -> dict:
    """The config fields that make a saved control route by its rule (MoE++ routing when there is none)."""
    knobs = [block.gate.routing_rule_knob for block in moe_blocks]
    if moe_blocks[0].gate.routing_rule is None:
        return {"routing_rule": None, "routing_rule_knob": 0.0, "routing_rule_layer_knobs": None}
    return {"routing_rule": moe_blocks[0].gate.routing_rule, "routing_rule_knob": sum(knobs) / len(knobs),
            "routing_rule_layer_knobs": knobs}


def resolved_selection_signal(options: TrainOptions, router) -> str | None:
    """`auto`: straight_through when the budget needs tokens that use fewer than k - 1 FFN experts (below one FFN
    expert per token for top-2: some tokens must skip the layer), none otherwise. Measured on the demo
    (bench/RESULTS.md): at 0.75 straight_through is ahead of the trained control in 4 of 5 seeds (mean 0.983),
    output_change is not (1.016); at 1.0 every signal ties or loses to the trained top-1 control, none ties."""
    if options.selection_signal == "auto":
        target = options.target_ffn_per_token
        return "straight_through" if target is not None and target < router.top_k - 1 else None
    return None if options.selection_signal == "none" else options.selection_signal


def land_on_budget(model, options: TrainOptions, blocks: torch.Tensor) -> None:
    """After training, on `blocks` of the training text: a control's knob is fitted again; an MoE++ model's biases
    are calibrated again (their differences kept, one offset per layer), so both arms end on the budget."""
    if options.routing_rule is not None:
        set_selection_learning(model, options, blocks)
        return
    was_training = model.training
    calibrate_model(model.eval(), list(blocks.split(8)), options.target_ffn_per_token)
    model.train(was_training)


KNOB_STEP = 0.05  # knob change per FFN expert per token of error, per step (the knobs live in [0, 1])


def steer_rule_knob(moe_blocks: list, options: TrainOptions, measured: torch.Tensor) -> list[float]:
    """A control's budget during training: each layer's knob follows its measured FFN experts per token (L,), as
    MoE++'s controller steers its biases (training moves the router's probabilities, so a fixed knob drifts).
    Thresholds (dynamic_skipping, top_1_confident) rise when too many experts are used, p (top_p) falls;
    top_k has no knob to steer."""
    routers = [block.gate for block in moe_blocks]
    if options.routing_rule != "top_k":
        direction = 1.0 if knob_search(options.routing_rule)[2] else -1.0
        for router, used in zip(routers, measured.tolist()):
            step = direction * KNOB_STEP * (used - options.target_ffn_per_token)
            router.routing_rule_knob = min(1.0, max(0.0, router.routing_rule_knob + step))
    return [router.routing_rule_knob for router in routers]


class RuleKnobs:
    """A control's per-layer knobs as training state: checkpointed with the run, so a resumed control continues
    from the knobs it had steered to, as MoE++ continues from its controller's biases."""

    def __init__(self, moe_blocks: list):
        self.routers = [block.gate for block in moe_blocks]

    def state_dict(self) -> dict:
        return {"knobs": [router.routing_rule_knob for router in self.routers]}

    def load_state_dict(self, state: dict) -> None:
        for router, knob in zip(self.routers, state["knobs"], strict=True):
            router.routing_rule_knob = float(knob)


def check_paths(options: TrainOptions) -> None:
    """Refuse an existing output, a run folder with checkpoints (without --resume), before loading anything."""
    model_dir, output = Path(options.model), Path(options.output)
    if not (model_dir / "config.json").is_file():
        raise UpcycleError(f"{model_dir} is not a checkpoint folder (no config.json)")
    check_output_path(output, options.overwrite, protected=(model_dir,))
    run_dir = options.resolved_run_dir
    if not options.resume and checkpointing.list_checkpoints(run_dir):
        raise UpcycleError(f"{run_dir} already holds training checkpoints; pass --resume to continue that run, "
                           "or remove the folder")


def check_distributed_support(options: TrainOptions, distributed_type: str) -> None:
    """Refuse combinations the recipe does not support, once accelerate says how it was launched."""
    if options.trainable == "lora" and distributed_type == "FSDP":
        raise UpcycleError("--lora is not supported with FSDP (merging sharded adapters); use DDP or --full")
    if distributed_type not in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP"):
        raise UpcycleError(f"the recipe runs on one process, DDP or FSDP; accelerate was launched with "
                           f"{distributed_type}")


def load_model(options: TrainOptions):
    model = load_causal_lm(Path(options.model))
    if not hasattr(model, "moe_blocks"):
        raise UpcycleError(f"{options.model} is not an MoE++ checkpoint; convert it first with `upcycle convert` "
                           "(a trained control too: it computes the source until --routing-rule drops slots)")
    model.config.balance_tau = options.balance_tau
    model.config.balance_loss_coef = options.balance_loss_coef
    if options.activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def run_training(options: TrainOptions, command: str = "") -> TrainingReport:
    options.validate()
    check_paths(options)
    accelerator = Accelerator(mixed_precision=options.mixed_precision, step_scheduler_with_optimizer=False)
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    check_distributed_support(options, accelerator.distributed_type.name)

    # Data: the checkpoint's tokenizer, packed blocks, held-out split
    tokenizer = load_checkpoint_tokenizer(options.model)
    blocks = options.token_blocks(options.data, tokenizer)
    heldout = blocks.heldout
    if options.eval_data:  # every block of a separate held-out text
        evaluation = dataclasses.replace(options, max_tokens=None).token_blocks(options.eval_data, tokenizer)
        heldout = torch.cat([evaluation.train, evaluation.heldout])
    heldout = heldout[: options.eval_max_blocks] if options.eval_max_blocks else heldout

    # Model, trainable set, optimizer, accelerate
    model = load_model(options)
    moe_blocks = model.moe_blocks()
    source_top_k = moe_blocks[0].gate.top_k  # the router's own top-k, whatever the family's config calls it
    rule_blocks = blocks.train[: options.budget_fit_blocks]
    set_selection_learning(model, options, rule_blocks)
    model, trainable = select_trainable(model, options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate,
                                  weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(options))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    selection_biases = SelectionBiases(moe_blocks)
    # the distillation teacher's weights: taken now, before a resumed run loads its checkpoint
    starting_weights = StartingWeights(model) if options.distill_weight > 0 else None

    controller = None
    if options.target_ffn_per_token is not None and options.routing_rule is None:
        controller = BudgetController(source_top_k, options.target_ffn_per_token, options.steps,
                                      options.ramp_fraction, options.controller_lr, options.controller_start_share)
        accelerator.register_for_checkpointing(controller)
    elif options.routing_rule is not None:
        accelerator.register_for_checkpointing(RuleKnobs(moe_blocks))

    run_dir, record = options.resolved_run_dir, options_record(options)
    order = BlockOrder(blocks.train.shape[0], options.seed, options.micro_batch_size,
                       options.gradient_accumulation_steps, world_size)
    start_step = 0
    if options.resume:
        path, start_step = checkpointing.newest_checkpoint(run_dir, record, world_size)
        checkpointing.load_checkpoint(accelerator, path)
    elif controller is not None:
        with torch.no_grad(), accelerator.autocast():
            first = blocks.train[order.indices(0, 0, rank)].to(device)
            router_logits = model(input_ids=first, output_router_logits=True, use_cache=False).router_logits
            scores = [block.gate.selection_scores(logits) for block, logits in zip(moe_blocks, router_logits)]
        controller.initialise(scores, selection_biases(), moe_blocks[0].layout.n_ffn,
                              reduce_mean=lambda tensor: accelerator.reduce(tensor.to(device), "mean"))
    if controller is not None:
        controller.apply(selection_biases())

    metrics = MetricsLog(run_dir, options.steps, start_step, accelerator.is_main_process, options.progress,
                         options.tensorboard)
    metrics.event({"event": "resume" if options.resume else "start", "step": start_step, "world_size": world_size,
                   "distributed_type": accelerator.distributed_type.name, "device": str(device),
                   "train_blocks": blocks.train.shape[0], "heldout_blocks": heldout.shape[0],
                   "block_size": options.block_size, **trainable.as_dict()})
    try:
        for step in range(start_step, options.steps):
            metrics.step(train_step(step, model, optimizer, scheduler, accelerator, controller, blocks.train, order,
                                    selection_biases, options, starting_weights))
            done = step + 1
            if options.checkpoint_every and done % options.checkpoint_every == 0 and done < options.steps:
                checkpointing.save_checkpoint(accelerator, run_dir, done, world_size, record,
                                              options.keep_checkpoints)
        if options.target_ffn_per_token is not None:  # training moved the routing: land the budget again
            land_on_budget(accelerator.unwrap_model(model), options, rule_blocks)
        # Held-out evaluation, then the output checkpoint
        with accelerator.autocast():
            result = evaluate_heldout(model, heldout, options.micro_batch_size, rank, world_size,
                                      reduce_sum=lambda tensor: accelerator.reduce(tensor, "sum"), device=device)
        metrics.event({"event": "heldout", "step": options.steps, **result})
    except TrainingStopped as stopped:
        metrics.event({"event": "stopped", "reason": str(stopped)})
        raise
    finally:
        metrics.close()
    state_dict = accelerator.get_state_dict(model)  # every process (FSDP gathers the shards)
    if accelerator.is_main_process:
        train_record = train_step_record(
            command, record, trainable.as_dict(), result,
            {"per_layer_level": controller.bias_levels(), "controller_steps": controller.step}
            if controller is not None else None, world_size)
        write_trained_checkpoint(accelerator.unwrap_model(model), state_dict, Path(options.model),
                                 Path(options.output), options.overwrite, train_record,
                                 {"balance_tau": options.balance_tau, "balance_loss_coef": options.balance_loss_coef,
                                  **routing_rule_fields(moe_blocks)})
    accelerator.wait_for_everyone()
    return TrainingReport(Path(options.output).resolve(), run_dir, options.steps, result, trainable.as_dict(),
                          accelerator.is_main_process)


def train_step(step: int, model, optimizer, scheduler, accelerator: Accelerator, controller: BudgetController | None,
               train_blocks: torch.Tensor, order: BlockOrder, selection_biases: "SelectionBiases",
               options: TrainOptions, starting_weights: StartingWeights | None = None) -> dict:
    """One optimizer step (0-based `step`) over the accumulation micro-batches; returns its metrics record."""
    started = time.perf_counter()
    accumulation = options.gradient_accumulation_steps
    sums: dict[str, torch.Tensor] = {}
    rank = accelerator.process_index
    for micro_step in range(accumulation):
        indices = order.indices(step, micro_step, rank)  # (micro_batch_size,)
        batch = train_blocks[indices].to(accelerator.device)  # (b, S)
        last = micro_step == accumulation - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                losses = compute_losses(model, batch, selection_biases(), options.balance_loss_coef,
                                        options.distill_weight, options.distill_temperature, starting_weights,
                                        routers=[block.gate for block in selection_biases.moe_blocks])
            accelerator.backward(losses.loss / accumulation)
        for name in ("lm_loss", "balance_loss", "distill_kl", "ffn_experts_per_token"):
            sums[name] = sums.get(name, 0) + getattr(losses, name).float() / accumulation
        sums["loss"] = sums.get("loss", 0) + losses.loss.detach().float() / accumulation
        if micro_step == 0:
            first_indices = indices.to(accelerator.device)
    means = {name: accelerator.reduce(value, "mean") for name, value in sums.items()}
    blocks_by_process = accelerator.gather(first_indices).view(accelerator.num_processes, -1).tolist()
    loss = means["loss"].item()
    if not math.isfinite(loss):
        raise TrainingStopped(stop_message(step + 1, f"the loss is {loss}", options))
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm or math.inf)
    grad_norm = float(grad_norm) if grad_norm is not None else math.nan
    if not math.isfinite(grad_norm):
        raise TrainingStopped(stop_message(step + 1, f"the gradient norm is {grad_norm}", options))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    ffn_per_layer = means["ffn_experts_per_token"]  # (L,)
    record = {"step": step + 1, "loss": loss, "lm_loss": means["lm_loss"].item(),
              "balance_loss": means["balance_loss"].item(), "distill_kl": means["distill_kl"].item(),
              "ffn_experts_per_token": ffn_per_layer.mean().item(),
              "ffn_experts_per_token_per_layer": ffn_per_layer.tolist(),
              "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
    if controller is not None:
        record |= controller.update(ffn_per_layer)
        controller.apply(selection_biases())
    elif options.routing_rule is not None:
        record["routing_rule_knobs"] = steer_rule_knob(selection_biases.moe_blocks, options, ffn_per_layer)
    tokens = order.blocks_per_step * train_blocks.shape[1]
    seconds = time.perf_counter() - started
    record |= {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
               "world_size": accelerator.num_processes, "blocks_by_process": blocks_by_process}
    return record


def stop_message(step: int, what: str, options: TrainOptions) -> str:
    found = checkpointing.list_checkpoints(options.resolved_run_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no training checkpoint was saved before it"
    return (f"training stopped at step {step}: {what}; {kept} (lower learning_rate and continue with --resume); "
            "no output was written")
