"""`upcycle demo`: the main job on the embedded default, with no download.

For now: build a small Mixtral from the shipped config (seeded random weights), convert it, verify the
conversion against transformers' MixtralForCausalLM, then raise the selection biases to show the budget knob.
"""

import json
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from .checkpoint.output_dir import atomic_output_dir
from .errors import UpcycleError
from .inspect_checkpoint import format_summary, inspect_checkpoint
from .surgery.convert import ConvertOptions, convert
from .verify import load_causal_lm, probe_tokens, verify

DEMO_CONFIG = Path(__file__).parent / "assets" / "demo_mixtral_config.json"
DEMO_MARKER = "upcycle-demo.json"


def check_demo_output(output: Path) -> None:
    """The demo replaces its own earlier output, and refuses any other existing folder."""
    if output.exists() and not (output / DEMO_MARKER).is_file():
        raise UpcycleError(f"{output} exists and is not an earlier demo output; choose another --output")


def run_demo(output: Path, echo=print) -> dict:
    output = Path(output)
    check_demo_output(output)
    results: dict = {}
    with atomic_output_dir(output, overwrite=True) as partial:
        torch.manual_seed(0)
        config = MixtralConfig(**json.loads(DEMO_CONFIG.read_text()))
        source = MixtralForCausalLM(config).eval()
        source.save_pretrained(partial / "source")
        echo(f"built a {sum(p.numel() for p in source.parameters()):,}-parameter Mixtral from {DEMO_CONFIG.name}")
        report = convert(partial / "source", partial / "moepp", ConvertOptions(), command="upcycle demo")
        echo(f"converted: +{report.added_parameters:,} parameters in {report.added_tensors} new tensors")
        echo(format_summary(inspect_checkpoint(partial / "moepp")))
        check = verify(partial / "source", partial / "moepp")
        echo(f"verify: largest logit difference {check.max_logit_difference:.2e}, "
             f"greedy generation {'identical' if check.greedy_generation_equal else 'DIFFERENT'}")
        results["verify"] = {"max_logit_difference": check.max_logit_difference,
                             "greedy_generation_equal": check.greedy_generation_equal}
        results["budget_knob"] = budget_sweep(partial / "moepp", echo)
        (partial / DEMO_MARKER).write_text(json.dumps(results, indent=2) + "\n")
    echo(f"wrote {output}")
    return results


@torch.no_grad()
def budget_sweep(checkpoint: Path, echo) -> list[dict]:
    """Raise every selection bias by hand and show FFN experts per token falling (no training)."""
    model = load_causal_lm(checkpoint)
    tokens = probe_tokens(model.config.vocab_size, batch=4, length=64)
    rows = []
    for bias in (float("-inf"), -0.5, 0.0, 0.5, 2.0):
        for block in model.moe_blocks():
            block.gate.selection_bias.fill_(bias)
        stats = model(tokens, output_router_logits=True).routing_statistics
        row = {"selection_bias": bias, "ffn_experts_per_token": stats["ffn_experts_per_token"].mean().item()}
        rows.append(row)
        echo(f"  selection bias {bias:>5}: {row['ffn_experts_per_token']:.2f} FFN experts per token")
    return rows
