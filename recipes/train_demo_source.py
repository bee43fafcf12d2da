"""Train the embedded default: a small Mixtral on the CPython standard library's own documentation.

This reproduces `upcycle/assets/demo_model/` from scratch on any machine (no download): the text is the running
Python's pydoc topics and standard-library docstrings (upcycle.data.corpus, fixed held-out split by document name),
the tokenizer a byte-level BPE trained on the train split, the model a Mixtral (8 experts, top-2) trained with
AdamW and Mixtral's own load-balancing loss. The checkpoint with the best validation loss is kept; its held-out
perplexity and how specialised its routers are go into `training.json` beside the weights.

    python recipes/train_demo_source.py --output upcycle/assets/demo_model            # about 30 min on 2 cores
    python recipes/train_demo_source.py --output /tmp/demo_source --steps 20          # a smoke run
"""

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM
from upcycle.data.corpus import write_corpus
from upcycle.data.tokenizer_training import train_bpe_tokenizer

from upcycle.data.blocks import load_texts, load_token_blocks

MODEL = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
             tie_word_embeddings=True, router_aux_loss_coef=0.02, rope_theta=10000.0)
BLOCK_SIZE = 256


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted mean next-token cross-entropy over blocks (n, L)."""
    model.eval()
    total, count = 0.0, 0
    for batch in blocks.split(batch_size):
        loss = model(batch, labels=batch, use_cache=False).loss
        total += loss.item() * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def router_specialisation(model, blocks: torch.Tensor) -> dict:
    """Mean router entropy vs uniform, and each expert's share of top-1 choices, on held-out blocks."""
    model.eval()
    logits = model(blocks[:8], output_router_logits=True, use_cache=False).router_logits  # per layer (T, N)
    n_experts = logits[0].shape[-1]
    entropies, shares = [], []
    for layer_logits in logits:
        probabilities = torch.softmax(layer_logits.float(), dim=-1)
        entropies.append(-(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1).mean().item())
        shares.append(torch.bincount(probabilities.argmax(-1), minlength=n_experts).div(len(probabilities)).tolist())
    return {"router_entropy_per_layer": entropies, "uniform_entropy": math.log(n_experts),
            "top1_share_per_layer": shares}


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as folder:
        sizes = write_corpus(Path(folder))
        tokenizer = train_bpe_tokenizer(load_texts(Path(folder) / "train.txt"), vocab_size=4096)
        # validation (early stopping): 3% of the train documents; held-out: the corpus' own held-out split
        train = load_token_blocks(Path(folder) / "train.txt", tokenizer, BLOCK_SIZE, args.seed, 0.03)
        heldout_parts = load_token_blocks(Path(folder) / "heldout.txt", tokenizer, BLOCK_SIZE, args.seed, 0.5)
    heldout = torch.cat([heldout_parts.train, heldout_parts.heldout])
    print(f"corpus {sizes}; blocks of {BLOCK_SIZE}: train {len(train.train)}, validation {len(train.heldout)}, "
          f"held-out {len(heldout)} ({heldout.numel():,} tokens)", flush=True)

    config = MixtralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    model = MixtralForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    best_loss, best_state, best_step, history = float("inf"), None, 0, []
    start = time.time()
    for step in range(args.steps):
        model.train()
        indices = torch.randint(0, len(train.train), (args.batch_size,),
                                generator=torch.Generator().manual_seed(args.seed * 100_003 + step))
        batch = train.train[indices]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate, warmup=min(100, args.steps // 10 + 1))
        loss = model(batch, labels=batch, output_router_logits=True, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            validation = mean_loss(model, train.heldout)
            history.append({"step": step + 1, "train_loss": loss.item(), "validation_loss": validation})
            print(f"step {step + 1}: train {loss.item():.3f}, validation {validation:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            if validation < best_loss:
                best_loss, best_step = validation, step + 1
                best_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(best_state)
    save_checkpoint(model, tokenizer, args, {"best_step": best_step, "validation_loss": best_loss, "corpus": sizes,
                                             "history": history, "train_seconds": round(time.time() - start)},
                    heldout)


def save_checkpoint(model, tokenizer, args, facts: dict, heldout: torch.Tensor) -> None:
    """Write the weights, tokenizer and training.json (held-out perplexity, router specialisation)."""
    heldout_loss = mean_loss(model, heldout)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "python": sys.version.split()[0],
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "block_size": BLOCK_SIZE,
        "learning_rate": args.learning_rate, "parameters": sum(p.numel() for p in model.parameters()),
        **facts,
        "heldout_loss": heldout_loss, "heldout_perplexity": math.exp(heldout_loss), "heldout_tokens": heldout.numel(),
        **router_specialisation(model, heldout),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    (args.output / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"held-out perplexity {report['heldout_perplexity']:.2f} (best step {facts['best_step']}); "
          f"wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
