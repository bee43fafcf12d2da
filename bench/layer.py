"""Speed of the MoE++ layer vs the source Mixtral, measured in one interleaved run (issue "MoE++ that is faster").

Source: transformers' MixtralForCausalLM (default experts implementation). MoE++: the same weights converted by
`upcycle convert`, timed at its full budget (no zero-computation expert selected), and calibrated on real text
(the standard library's documentation, BPE-tokenized) to 1.5 and 1.0 FFN experts per token, timed on held-out
text. Forward and forward+backward, whole model and MoE layers alone. Prints medians and ratios to the source.

    python bench/layer.py [--repeats 7] [--threads 2] [--dtype float32]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from upcycle.budget.calibrate import calibrate_model
from upcycle.checkpoint.loading import load_causal_lm
from upcycle.data.corpus import split_documents, stdlib_documents
from upcycle.data.tokenizer_training import train_bpe_tokenizer
from upcycle.evaluation.evaluate import evaluate_model
from upcycle.surgery.convert import ConvertOptions, convert

SHAPE = dict(hidden_size=512, intermediate_size=1792, num_local_experts=8, num_experts_per_tok=2,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
BATCH, SEQUENCE = 4, 256


def token_blocks(tokenizer, texts: list[str], n_blocks: int) -> torch.Tensor:
    """Concatenate documents (eos between) and cut (n_blocks, SEQUENCE) token blocks."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n_blocks * SEQUENCE:
            break
    return torch.tensor(ids[: n_blocks * SEQUENCE]).view(n_blocks, SEQUENCE)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def capture_moe_inputs(model, tokens: torch.Tensor, moepp: bool) -> list[tuple]:
    """The inputs each MoE block receives on `tokens`: (hidden (B, S, D),) or (hidden, previous_logits)."""
    captured = []
    blocks = model.moe_blocks() if moepp else [layer.mlp for layer in model.model.layers]
    hooks = [block.register_forward_pre_hook(lambda m, args: captured.append(tuple(
        a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))) for block in blocks]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for hook in hooks:
        hook.remove()
    return captured


def moe_layers_step(blocks, inputs, backward: bool) -> None:
    for block, args in zip(blocks, inputs):
        if backward:
            hidden = args[0].clone().requires_grad_()
            output = block(hidden, *args[1:])
            output = output[0] if isinstance(output, tuple) else output
            output.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                block(*args)


def whole_model_step(model, tokens, backward: bool) -> None:
    if backward:
        model(tokens, labels=tokens, use_cache=False).loss.backward()
    else:
        with torch.no_grad():
            model(tokens, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    train_docs, heldout_docs = split_documents(stdlib_documents(), 0.1)
    tokenizer = train_bpe_tokenizer([text for _, text in train_docs], vocab_size=4096)
    calibration = token_blocks(tokenizer, [text for _, text in train_docs], 16)  # (16, S)
    heldout = token_blocks(tokenizer, [text for _, text in heldout_docs], 16)  # (16, S)
    timing_tokens = heldout[:BATCH]  # (B, S)

    torch.manual_seed(0)
    source = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), **SHAPE))
    with tempfile.TemporaryDirectory() as folder:
        source.save_pretrained(Path(folder) / "source")
        convert(Path(folder) / "source", Path(folder) / "moepp", ConvertOptions())
        moepp = load_causal_lm(Path(folder) / "moepp")
    source, moepp = source.to(dtype), moepp.to(dtype)
    print(f"experts implementation: source {source.config._experts_implementation}, "
          f"MoE++ {moepp.config._experts_implementation}; dtype {args.dtype}; threads {args.threads}")

    budgets = {"full": [block.gate.selection_bias.clone() for block in moepp.moe_blocks()]}
    for target in (1.5, 1.0):
        calibrate_model(moepp, list(calibration.split(4)), target)
        measured = evaluate_model(moepp, heldout, batch_size=4).ffn_experts_per_token
        print(f"calibrated to {target}: {measured:.3f} FFN experts per token on held-out text")
        budgets[str(target)] = [block.gate.selection_bias.clone() for block in moepp.moe_blocks()]

    def set_budget(name: str) -> None:
        for block, bias in zip(moepp.moe_blocks(), budgets[name]):
            block.gate.selection_bias.copy_(bias)

    moe_inputs = {"source": capture_moe_inputs(source, timing_tokens, moepp=False)}
    for name in budgets:
        set_budget(name)
        moe_inputs[name] = capture_moe_inputs(moepp, timing_tokens, moepp=True)

    variants = ["source", *budgets]
    results: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for scope in ("model", "moe_layers"):
            for backward in (False, True):
                for variant in variants:
                    model = source if variant == "source" else moepp
                    if variant != "source":
                        set_budget(variant)
                    model.train(backward)
                    if scope == "model":
                        seconds = timed(lambda model=model, backward=backward: whole_model_step(model, timing_tokens, backward))
                    else:
                        blocks = [layer.mlp for layer in model.model.layers]
                        seconds = timed(lambda blocks=blocks, variant=variant, backward=backward:
                                        moe_layers_step(blocks, moe_inputs[variant], backward))
                    model.zero_grad(set_to_none=True)
                    if repeat:
                        results.setdefault((scope, backward, variant), []).append(seconds)

    print(f"\nmedian of {args.repeats} interleaved repeats, batch {BATCH} x {SEQUENCE}; speed-up = source / variant")
    print(f"{'scope':<11} {'pass':<17} {'variant':<8} {'ms':>9} {'speed-up':>9}")
    for scope in ("model", "moe_layers"):
        for backward in (False, True):
            base = statistics.median(results[(scope, backward, "source")])
            for variant in variants:
                median = statistics.median(results[(scope, backward, variant)])
                label = "forward+backward" if backward else "forward"
                print(f"{scope:<11} {label:<17} {variant:<8} {median * 1000:>9.1f} {base / median:>8.2f}x")


if __name__ == "__main__":
    main()
