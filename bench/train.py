"""Training speed: the default recipe (routers + constant experts) vs full fine-tuning of the same model.

Both run the recipe's own step (`upcycle.training.recipe.train_step`: forward, balance loss, backward, clipping,
AdamW, budget controller) on the same MoE++ model and the same token blocks, interleaved step by step in one
process so that machine load affects both alike. Reports tokens/s of each, their ratio, and which parameters
received gradients (the default recipe must give FFN expert weights none).

    python bench/train.py                 # about a minute on 2 CPU cores
    python bench/train.py --rounds 20 --hidden-size 512
"""

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import MixtralConfig, MixtralForCausalLM

from upcycle.budget.controller import BudgetController
from upcycle.checkpoint.loading import load_causal_lm
from upcycle.surgery.convert import ConvertOptions, convert
from upcycle.training.data_order import BlockOrder
from upcycle.training.options import TrainOptions
from upcycle.training.recipe import SelectionBiases, train_step
from upcycle.training.trainable import is_ffn_expert, select_trainable


def build_checkpoint(folder: Path, args) -> Path:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                           intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=2 * args.block_size, tie_word_embeddings=False)
    MixtralForCausalLM(config).save_pretrained(folder / "source")
    convert(folder / "source", folder / "moepp", ConvertOptions())
    return folder / "moepp"


class Arm:
    """One trainable set: model, optimizer, controller, prepared by the shared accelerator."""

    def __init__(self, checkpoint: Path, trainable: str, accelerator: Accelerator, options: TrainOptions,
                 first_batch: torch.Tensor):
        self.options = dataclasses.replace(options, trainable=trainable)
        model = load_causal_lm(checkpoint).train()
        blocks = model.moe_blocks()
        self.biases = SelectionBiases(blocks)
        model, self.summary = select_trainable(model, self.options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.controller = BudgetController(model.config.num_experts_per_tok, 1.5, options.steps)
        with torch.no_grad():
            router_logits = model(input_ids=first_batch, output_router_logits=True).router_logits
        self.controller.initialise(router_logits, self.biases(), blocks[0].layout.n_ffn)
        self.controller.apply(self.biases())
        self.tokens_per_s: list[float] = []  # wall clock, as the recipe's metrics report it
        self.tokens_per_cpu_s: list[float] = []  # per CPU-second of this process: robust on a shared machine

    def step(self, step: int, accelerator: Accelerator, train_blocks: torch.Tensor, order: BlockOrder) -> None:
        cpu_started = time.process_time()
        record = train_step(step, self.model, self.optimizer, self.scheduler, accelerator, self.controller,
                            train_blocks, order, self.biases, self.options)
        self.tokens_per_cpu_s.append(record["tokens"] / max(time.process_time() - cpu_started, 1e-9))
        self.tokens_per_s.append(record["tokens_per_s"])

    def expert_parameters_with_gradients(self) -> tuple[int, int]:
        """(FFN expert parameters that hold a gradient after backward, all FFN expert parameters)."""
        self._backward_once()
        named = [(name, p) for name, p in self.model.named_parameters() if is_ffn_expert(name)]
        with_grad = sum(p.numel() for _, p in named if p.grad is not None)
        return with_grad, sum(p.numel() for _, p in named)

    def _backward_once(self) -> None:
        tokens = torch.randint(0, self.model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(9))
        self.model(input_ids=tokens, labels=tokens, output_router_logits=True).loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="measured steps of each arm")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps of each arm first")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: no waiting on sibling threads when the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    options = TrainOptions(model="bench", data="bench", output="bench", steps=args.warmup + args.rounds,
                           block_size=args.block_size, micro_batch_size=args.micro_batch_size,
                           learning_rate=1e-4, target_ffn_per_token=1.5, progress=False).validate()
    generator = torch.Generator().manual_seed(0)
    n_blocks = args.micro_batch_size * (args.warmup + args.rounds)
    train_blocks = torch.randint(0, args.vocab_size, (n_blocks, args.block_size), generator=generator)  # (n, S)
    order = BlockOrder(n_blocks, 0, args.micro_batch_size, 1, 1)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_checkpoint(Path(folder), args)
        arms = {name: Arm(checkpoint, name, accelerator, options, train_blocks[: args.micro_batch_size])
                for name in ("default", "full")}
    for step in range(args.warmup + args.rounds):
        for arm in arms.values():  # interleaved: the same step of both arms back to back
            arm.step(step, accelerator, train_blocks, order)

    speeds = {name: statistics.median(arm.tokens_per_s[args.warmup:]) for name, arm in arms.items()}
    cpu_speeds = {name: statistics.median(arm.tokens_per_cpu_s[args.warmup:]) for name, arm in arms.items()}
    ratio = speeds["default"] / speeds["full"]
    cpu_ratio = cpu_speeds["default"] / cpu_speeds["full"]
    gradients = {name: arm.expert_parameters_with_gradients() for name, arm in arms.items()}
    total = next(iter(arms.values())).summary.total_parameters
    print(f"date {datetime.date.today().isoformat()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model: {args.layers} layers, hidden {args.hidden_size}, 8 FFN experts top-2 + 1/1/2 zero-computation, "
          f"{total:,} parameters; {args.micro_batch_size} x {args.block_size} tokens per step")
    print("| trainable set | trainable parameters | FFN expert params with gradients | tokens/s (wall, median) "
          "| tokens per CPU-second (median) |")
    print("|---|---|---|---|---|")
    for name, arm in arms.items():
        with_grad, experts = gradients[name]
        print(f"| {name} | {arm.summary.trainable_parameters:,} | {with_grad:,} of {experts:,} | {speeds[name]:,.0f} "
              f"| {cpu_speeds[name]:,.0f} |")
    print(f"speed-up of the default recipe over full fine-tuning: {ratio:.2f}x wall clock, "
          f"{cpu_ratio:.2f}x per CPU-second")
    if gradients["default"][0] != 0:
        raise SystemExit("the default recipe computed FFN expert gradients")


if __name__ == "__main__":
    main()
