"""Continued training of an MoE++ checkpoint toward a compute budget: the recipe behind `upcycle train`.

Launch it like any accelerate script (one process, several CPU processes, DDP or FSDP on GPUs); it takes exactly
the options of `upcycle train` (`--help` lists them), so a recipe config plus three paths is a whole run:

    python recipes/continued_training.py --config recipes/default.yaml --model M --data D --output O
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        recipes/continued_training.py --config recipes/default.yaml --model M --data D --output O
    accelerate launch --config_file recipes/accelerate/ddp.yaml \\
        recipes/continued_training.py --config recipes/gpu_ddp.yaml --model M --data D --output O

What one run does (upcycle/training/recipe.py, read top to bottom):

1. Check the options (upcycle/training/options.py: one dataclass for validation, YAML keys and flags), the
   input checkpoint, the output folder and the run folder, before anything is loaded.
2. Tokenize the text with the checkpoint's own tokenizer into packed blocks, with a held-out split
   (upcycle/data.py). Each step's blocks are a pure function of (seed, step), split across processes
   (upcycle/training/data_order.py), so a resumed run reads exactly what the killed one would have read.
3. Load the model in float32 and choose what learns (upcycle/training/trainable.py):
   - default: the routers (source rows, zero-computation rows, gating residual) and the constant experts;
     FFN expert weights get no gradient at all, so a step costs far less than full fine-tuning;
   - lora: peft LoRA on attention and on the fused FFN expert weights, merged into the weights on save;
   - full: everything.
4. Losses (upcycle/training/losses.py): cross-entropy + beta * heterogeneous balance loss (tau weighs the
   zero-computation experts), plus optional KL self-distillation toward the source: the starting weights of the
   trained set, restored for a no_grad teacher pass with every selection bias at -inf, compute the source.
5. The budget controller (upcycle/budget/controller.py): after every step, each layer's selection biases move by
   lr * spread * (measured FFN experts per token - target); the target ramps from the source's top-k.
6. Every N steps a training checkpoint (model, optimizer, scheduler, RNG, controller); a NaN or inf loss or
   gradient stops the run with one sentence and keeps the last good checkpoint; `--resume` continues.
7. At the end: perplexity and FFN experts per token on held-out text, then the MoE++ checkpoint (convert's
   format, loads with transformers alone) with a "train" step in upcycle.json and a fresh model card.
"""

import sys


def main() -> None:
    """Run `upcycle train` with this script's arguments (errors: one sentence, exit code 1)."""
    from upcycle.cli import main as upcycle_main

    sys.argv = ["upcycle", "train", *sys.argv[1:]]
    upcycle_main()


if __name__ == "__main__":
    main()
