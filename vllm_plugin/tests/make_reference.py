"""Write the tiny MoE++ checkpoints and transformers' reference generations that the vLLM tests check.

Runs in the project's own venv (transformers 5.x, `upcycle` installed), not in the vLLM venv: it uses only the
installed `upcycle` command (`convert`, `calibrate`) and `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`, the way a user would, so the reference is transformers' remote code.

    python vllm_plugin/tests/make_reference.py OUT_DIR [--demo-model PATH]

OUT_DIR/<name>/ holds each checkpoint; OUT_DIR/reference.json, per checkpoint: the prompts' token ids, the greedy
continuation, each generated token's log-probability and its margin over the runner-up (for tie-aware
comparison), and transformers' mean FFN experts per token over the prompts (routing statistics).

Checkpoints:
- demo           the demo Mixtral converted (full budget: every selection bias -inf)
- demo-1.5       demo calibrated to 1.5 FFN experts per token (upcycle calibrate on CPython's pydoc topics)
- demo-1.0       demo calibrated to 1.0
- demo-perturbed demo with random MoE++ tensors (router rows, gating residual, constant experts, finite biases):
                 Zero, Copy and Constant all selected and the gating residual non-zero
- qwen3          a random tiny Qwen3-MoE (norm_topk_prob false, so keep_weight semantics; one dense layer
                 between MoE layers, so the residual skips it), converted and perturbed the same way
- qwen3-other-denominator  qwen3 with the other `zero_computation_denominator` (switched_on / ffn_only), made
                 only when `upcycle convert` writes that field
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

N_NEW_TOKENS = 24
PROMPTS = [
    "The return statement",
    "A class definition defines a class object",
    "Exceptions are raised",
    "for loop",
    "The import statement is used to",
    "Lists are mutable sequences",
]


def upcycle(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("upcycle")), *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def write_calibration_text(path: Path) -> None:
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[name] for name in sorted(topics)))


def perturb(checkpoint: Path, seed: int) -> None:
    """Give every new MoE++ tensor (they all sit in the last shard) random values and finite selection biases."""
    from safetensors.torch import load_file, save_file

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = checkpoint / max(index["weight_map"].values())
    tensors = load_file(shard)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if name.endswith("selection_bias"):
            # Copy and Constant experts compete with the FFN experts; the Zero expert a little less often.
            values = torch.randn(tensor.shape, generator=generator) * 0.3 + 0.2
        elif name.endswith("residual_weight"):
            values = torch.randn(tensor.shape, generator=generator) * 0.2
        elif name.endswith("zero_computation_weight"):
            values = torch.randn(tensor.shape, generator=generator) * 0.05
        else:  # constant_vectors, constant_ratio_weight
            values = torch.randn(tensor.shape, generator=generator) * 0.5
        tensors[name] = values.to(tensor.dtype).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})


def make_qwen3_source(path: Path, tokenizer_from: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
        max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.08,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, path / name)


@torch.no_grad()
def reference(checkpoint: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    records, ffn_per_token = [], []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        stats = model(ids, output_router_logits=True).routing_statistics
        ffn_per_token.append((stats["ffn_experts_per_token"].mean().item(), ids.shape[1]))
        out = model.generate(ids, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, suppress_tokens=None)
        generated = out.sequences[0, ids.shape[1]:].tolist()
        logprobs, margins = [], []
        for step, token in enumerate(generated):
            row = torch.log_softmax(out.logits[step][0].float(), dim=-1)
            top2 = torch.topk(row, 2).values
            logprobs.append(row[token].item())
            margins.append((top2[0] - top2[1]).item())
        records.append({"prompt": prompt, "prompt_token_ids": ids[0].tolist(), "token_ids": generated,
                        "logprobs": logprobs, "margins": margins})
    total = sum(n for _, n in ffn_per_token)
    return {"eos_token_id": eos, "prompts": records,
            "ffn_experts_per_token": sum(v * n for v, n in ffn_per_token) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--demo-model", type=Path,
                        default=Path(__file__).resolve().parents[2] / "upcycle/assets/demo_model")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    text = out / "calibration.txt"
    write_calibration_text(text)
    upcycle("convert", str(args.demo_model), str(out / "demo"), "--link", "copy", "--overwrite")
    for target in ("1.5", "1.0"):
        upcycle("calibrate", str(out / "demo"), "--data", str(text), "--target-ffn-per-token", target,
                "--output", str(out / f"demo-{target}"), "--max-tokens", "40000", "--batches", "4", "--overwrite")
    upcycle("convert", str(args.demo_model), str(out / "demo-perturbed"), "--link", "copy", "--overwrite")
    perturb(out / "demo-perturbed", seed=1)
    make_qwen3_source(out / "qwen3-source", args.demo_model)
    upcycle("convert", str(out / "qwen3-source"), str(out / "qwen3"), "--link", "copy", "--overwrite")
    perturb(out / "qwen3", seed=2)
    names = ["demo", "demo-1.5", "demo-1.0", "demo-perturbed", "qwen3"]
    config = json.loads((out / "qwen3" / "config.json").read_text())
    if "zero_computation_denominator" in config:  # an upcycle that writes the field: check the other value too
        other = {"ffn_only": "switched_on", "switched_on": "ffn_only"}[config["zero_computation_denominator"]]
        shutil.copytree(out / "qwen3", out / "qwen3-other-denominator", dirs_exist_ok=True)
        config["zero_computation_denominator"] = other
        (out / "qwen3-other-denominator" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        names.append("qwen3-other-denominator")
    results = {}
    for name in names:
        results[name] = reference(out / name)
        print(f"{name}: transformers FFN experts per token {results[name]['ffn_experts_per_token']:.3f}")
    (out / "reference.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
