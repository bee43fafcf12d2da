"""What the softmax denominator costs a family that does not renormalise its top-k weights (issue 11).

Switching zero-computation experts on adds their exp(logit) to the softmax denominator of every token. A family
that renormalises its top-k weights (Mixtral) cancels it; one that does not (Qwen2-MoE, OLMoE, DeepSeek-V2,
OpenMoE) sees every FFN weight shrink, also for tokens that keep all their FFN experts. This bench measures it:

1. source (cached): transformers' Qwen2-MoE (8 experts, top-2, `norm_topk_prob` false, as the published
   Qwen2-MoE checkpoints) holding the shipped demo Mixtral's weights, fine-tuned briefly without renormalisation
   on the demo's text (the CPython standard library's documentation, `upcycle.data.corpus`) with the schedule of
   recipes/train_demo_source.py, so that it is a model of its own that fits its unrenormalised top-2 weights;
2. `upcycle convert` (the family default, `keep_weight`), then for each `zero_computation_denominator`
   (`switched_on`: one softmax over FFN and switched-on zero-computation experts; `ffn_only`: FFN weights from the
   softmax over FFN experts only, the source's probabilities) `upcycle calibrate` at 1.5 and 1.0 FFN experts per
   token (calibration data: train.txt);
3. held-out perplexity of the source and of every calibrated model on the same blocks (heldout.txt), and the
   paired ratio ffn_only / switched_on with its 95% bootstrap interval over blocks
   (`upcycle.evaluation.evaluate.paired_ratio`).

    .venv/bin/python bench/denominator.py [--cache /tmp/upcycle-denominator] [--steps 60] [--max-blocks 120]

The source is built once per cache folder (delete it to rebuild); converted and calibrated checkpoints are
rebuilt every run.
"""

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.data.blocks import load_checkpoint_tokenizer, load_token_blocks
from upcycle.data.corpus import write_corpus
from upcycle.evaluation.evaluate import paired_ratio

ROOT = Path(__file__).resolve().parent.parent
UPCYCLE = str(Path(sys.executable).parent / "upcycle")
DEMO_MODEL = ROOT / "upcycle" / "assets" / "demo_model"
BLOCK_SIZE = 256
VARIANTS = ("switched_on", "ffn_only")
TARGETS = (1.5, 1.0)


def load_recipe():
    """recipes/train_demo_source.py as a module (mean_loss, learning_rate)."""
    spec = importlib.util.spec_from_file_location("train_demo_source", ROOT / "recipes" / "train_demo_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def heldout_blocks(corpus: Path, tokenizer) -> torch.Tensor:
    """Every block of the held-out documents (n, L), as recipes/train_demo_source.py and the demo take them."""
    parts = load_token_blocks(corpus / "heldout.txt", tokenizer, BLOCK_SIZE, 0, 0.5)
    return torch.cat([parts.train, parts.heldout])


def build_source(cache: Path, steps: int, threads: int) -> Path:
    """The non-renormalising source, built once into cache/source: transformers' Qwen2-MoE holding the demo
    Mixtral's weights (zero attention biases, a zero one-wide shared expert), `norm_topk_prob` false, fine-tuned
    `steps` steps on the demo's train split so that it fits its unrenormalised top-2 weights (best validation)."""
    source, corpus = cache / "source", cache / "corpus"
    if (source / "training.json").exists():
        return source
    recipe = load_recipe()
    torch.manual_seed(0)
    sizes = write_corpus(corpus)
    tokenizer = load_checkpoint_tokenizer(DEMO_MODEL)
    train = load_token_blocks(corpus / "train.txt", tokenizer, BLOCK_SIZE, 0, 0.03)
    heldout = heldout_blocks(corpus, tokenizer)
    mixtral = MixtralForCausalLM.from_pretrained(DEMO_MODEL).eval()
    fields = {key: getattr(mixtral.config, key) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "rope_parameters")}
    config = Qwen2MoeConfig(**fields, intermediate_size=mixtral.config.intermediate_size,
                            moe_intermediate_size=mixtral.config.intermediate_size,
                            num_experts=mixtral.config.num_local_experts,
                            num_experts_per_tok=mixtral.config.num_experts_per_tok,
                            shared_expert_intermediate_size=1, decoder_sparse_step=1, mlp_only_layers=[],
                            norm_topk_prob=True, router_aux_loss_coef=0.01)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_proj.bias") or ".shared_expert" in name:
                parameter.zero_()
    missing, unexpected = model.load_state_dict(mixtral.state_dict(), strict=False)
    assert not unexpected and all(key.endswith("_proj.bias") or ".shared_expert" in key for key in missing)
    probe = heldout[:2]
    with torch.no_grad():  # with renormalisation, the Qwen2-MoE computes the Mixtral
        torch.testing.assert_close(model.eval()(probe).logits, mixtral(probe).logits, atol=1e-4, rtol=1e-4)
    model.config.norm_topk_prob = False
    for layer in model.model.layers:
        layer.mlp.gate.norm_topk_prob = False
    before = recipe.mean_loss(model, train.heldout)
    print(f"demo Mixtral as Qwen2-MoE without renormalisation: validation {before:.3f}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    start = time.time()
    for step in range(steps):
        model.train()
        indices = torch.randint(0, len(train.train), (8,), generator=torch.Generator().manual_seed(step))
        batch = train.train[indices]
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate(step, steps, 1e-3, warmup=steps // 10 + 1)
        loss = model(batch, labels=batch, output_router_logits=True, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0:
            print(f"step {step + 1}: train {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    after = recipe.mean_loss(model, train.heldout)
    print(f"fine-tuned {steps} steps: validation {after:.3f}", flush=True)
    if after > before:
        raise SystemExit("fine-tuning made validation worse; use fewer steps")
    source.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    report = {"from": "upcycle/assets/demo_model", "steps": steps, "batch_size": 8, "validation_loss_before": before,
              "validation_loss": after, "corpus": sizes, "train_seconds": round(time.time() - start),
              "threads": threads}
    (source / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return source


def upcycle(*args: str) -> None:
    print("$ upcycle " + " ".join(args), flush=True)
    subprocess.run([UPCYCLE, *args], check=True, stdout=subprocess.DEVNULL)


def set_denominator(checkpoint: Path, variant: str) -> None:
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["zero_computation_denominator"] = variant
    config_path.write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def block_losses(model, blocks: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, float | None]:
    """(n,) mean next-token loss per block, and the mean FFN experts per token (None for the source)."""
    model.eval()
    losses, ffn = [], []
    for batch in blocks.split(batch_size):
        output = model(batch, use_cache=False, output_router_logits=hasattr(model, "moe_blocks"))
        nll = F.cross_entropy(output.logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")
        losses.append(nll.mean(dim=1))
        statistics = getattr(output, "routing_statistics", None)
        if statistics is not None:
            ffn.append(statistics["ffn_experts_per_token"].mean().item())
    return torch.cat(losses).double(), (sum(ffn) / len(ffn) if ffn else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/upcycle-denominator"))
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps of the source (batch 8 x 256)")
    parser.add_argument("--max-blocks", type=int, default=None, help="held-out blocks to evaluate (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = build_source(args.cache, args.steps, args.threads)
    corpus = args.cache / "corpus"
    converted = args.cache / "converted"
    upcycle("convert", str(source), str(converted), "--overwrite", "--no-source-sha256")
    checkpoints = {}
    for variant in VARIANTS:
        start = args.cache / f"converted-{variant}"
        shutil.rmtree(start, ignore_errors=True)
        shutil.copytree(converted, start)
        set_denominator(start, variant)
        for target in TARGETS:
            calibrated = args.cache / f"{variant}-{target:g}"
            upcycle("calibrate", str(start), "--target-ffn-per-token", f"{target:g}", "--output", str(calibrated),
                    "--data", str(corpus / "train.txt"), "--overwrite")
            checkpoints[variant, target] = calibrated
    blocks = heldout_blocks(corpus, load_checkpoint_tokenizer(source))[: args.max_blocks]
    source_losses, _ = block_losses(load_causal_lm(source), blocks)
    results = {"blocks": len(blocks), "block_size": BLOCK_SIZE,
               "source_perplexity": math.exp(source_losses.mean().item()), "targets": {}}
    print(f"held-out: {len(blocks)} blocks of {BLOCK_SIZE}; source perplexity {results['source_perplexity']:.2f}")
    for target in TARGETS:
        losses, row = {}, {}
        for variant in VARIANTS:
            losses[variant], ffn = block_losses(load_causal_lm(checkpoints[variant, target]), blocks)
            ratio, interval = paired_ratio(losses[variant], source_losses)
            row[variant] = {"perplexity": math.exp(losses[variant].mean().item()), "ffn_experts_per_token": ffn,
                            "ratio_to_source": ratio, "ratio_to_source_interval_95": interval}
        ratio, interval = paired_ratio(losses["ffn_only"], losses["switched_on"])
        row["ffn_only_over_switched_on"] = {"ratio": ratio, "interval_95": interval}
        results["targets"][f"{target:g}"] = row
        print(f"target {target:g}: " + "; ".join(
            f"{variant} {row[variant]['perplexity']:.2f} at {row[variant]['ffn_experts_per_token']:.3f} FFN/token "
            f"(x{row[variant]['ratio_to_source']:.4f} source)" for variant in VARIANTS)
            + f"; ffn_only / switched_on {ratio:.4f} (95% {interval[0]:.4f}-{interval[1]:.4f})", flush=True)
    (args.cache / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
