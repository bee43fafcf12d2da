"""Train the embedded default: a small Mixtral on the CPython standard library's own documentation and source.

This reproduces `upcycle/assets/demo_model/` from scratch on any machine (no download). The text is the running
Python's demo corpus (upcycle.data.corpus.write_demo_corpus: pydoc topics, module docstrings and the source files,
cut into three parts by a stable hash of the module name). The tokenizer is a byte-level BPE trained on
source.txt, the model a Mixtral (8 experts, top-2) trained on source.txt, one shuffled pass after another, with
AdamW and Mixtral's own load-balancing loss. The checkpoint with the best validation loss (a fixed slice of
adaptation.txt) is kept; heldout.txt is read only to evaluate it. training.json beside the weights holds the
source-train loss (a fixed sample of source blocks, eval mode), the validation and held-out losses, held-out
perplexity, the sizes of the three parts and how specialised the routers are.

    python recipes/train_demo_source.py --output upcycle/assets/demo_model --threads 1   # about 40 min, 1 core
    python recipes/train_demo_source.py --output /tmp/demo_source --steps 20             # a smoke run
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

from upcycle.data.blocks import load_texts
from upcycle.data.corpus import DEMO_PARTS, write_demo_corpus
from upcycle.data.tokenizer_training import train_bpe_tokenizer

MODEL = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
             tie_word_embeddings=True, router_aux_loss_coef=0.02, rope_theta=10000.0)
BLOCK_SIZE = 256
VALIDATION_BLOCKS = 256  # evenly spaced over adaptation.txt: many modules, about 65k tokens
SOURCE_SAMPLE_BLOCKS = 256  # a fixed random sample of the training blocks, for the source-train loss


def part_blocks(path: Path, tokenizer) -> tuple[torch.Tensor, int]:
    """Every document of a part, eos after each, concatenated and cut into (n, BLOCK_SIZE) blocks in file order
    (the tail shorter than a block is dropped); and the part's token count."""
    ids = tokenizer(load_texts(path), add_special_tokens=False)["input_ids"]
    stream = torch.tensor([token for document in ids for token in [*document, tokenizer.eos_token_id]])
    n_blocks = stream.numel() // BLOCK_SIZE
    return stream[: n_blocks * BLOCK_SIZE].view(n_blocks, BLOCK_SIZE), stream.numel()


def evenly_spaced(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """`count` blocks spread evenly over the whole tensor (all of them when there are fewer)."""
    if len(blocks) <= count:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, count).round().long()]


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
        sizes = write_demo_corpus(Path(folder))
        tokenizer = train_bpe_tokenizer(load_texts(Path(folder) / "source.txt"), vocab_size=4096)
        blocks = {}
        for part in DEMO_PARTS:
            blocks[part], sizes[part]["tokens"] = part_blocks(Path(folder) / f"{part}.txt", tokenizer)
    source, heldout = blocks["source"], blocks["heldout"]  # the whole held-out part: evaluation only
    validation = evenly_spaced(blocks["adaptation"], VALIDATION_BLOCKS)  # early stopping, never held-out
    source_sample = source[torch.randperm(len(source), generator=torch.Generator().manual_seed(args.seed))
                           [:SOURCE_SAMPLE_BLOCKS]]
    print(f"corpus {sizes}; blocks of {BLOCK_SIZE}: source {len(source)}, validation {len(validation)} "
          f"(of {len(blocks['adaptation'])} adaptation), held-out {len(heldout)} ({heldout.numel():,} tokens); "
          f"{args.steps * args.batch_size / len(source):.2f} passes over source", flush=True)

    config = MixtralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    model = MixtralForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    best_loss, best_state, best_step, history = float("inf"), None, 0, []
    # one shuffled pass over the source blocks after another: every block is seen once before any twice
    generator = torch.Generator().manual_seed(args.seed)
    passes = math.ceil(args.steps * args.batch_size / len(source))
    order = torch.cat([torch.randperm(len(source), generator=generator) for _ in range(passes)])
    start = time.time()
    for step in range(args.steps):
        model.train()
        batch = source[order[step * args.batch_size:(step + 1) * args.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate, warmup=min(100, args.steps // 10 + 1))
        loss = model(batch, labels=batch, output_router_logits=True, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            validation_loss = mean_loss(model, validation)
            source_loss = mean_loss(model, source_sample)
            history.append({"step": step + 1, "batch_loss": loss.item(), "source_train_loss": source_loss,
                            "validation_loss": validation_loss})
            print(f"step {step + 1}: batch {loss.item():.3f}, source-train {source_loss:.3f}, "
                  f"validation {validation_loss:.3f} ({time.time() - start:.0f} s)", flush=True)
            if validation_loss < best_loss:
                best_loss, best_step = validation_loss, step + 1
                best_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(best_state)
    save_checkpoint(model, tokenizer, args, {
        "best_step": best_step, "passes_over_source": round(best_step * args.batch_size / len(source), 3),
        "source_train_loss": mean_loss(model, source_sample), "source_sample_blocks": len(source_sample),
        "validation_loss": best_loss, "validation_blocks": len(validation), "corpus": sizes,
        "history": history, "train_seconds": round(time.time() - start)}, heldout)


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
        "heldout_minus_source_train_loss": heldout_loss - facts["source_train_loss"],
        **router_specialisation(model, heldout),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    (args.output / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"source-train loss {facts['source_train_loss']:.3f}, validation {facts['validation_loss']:.3f}, "
          f"held-out {heldout_loss:.3f} (perplexity {report['heldout_perplexity']:.2f}; best step "
          f"{facts['best_step']}); wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
