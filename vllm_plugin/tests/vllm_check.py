"""Serve checkpoints with vLLM (the plugin, through its entry point) and compare with transformers' reference.

Runs in the vLLM venv, one engine per checkpoint, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Prints one JSON object per checkpoint:

    python vllm_plugin/tests/vllm_check.py REFERENCE_DIR NAME [NAME ...] [--dtype float32]

For each prompt of REFERENCE_DIR/reference.json: vLLM's greedy continuation (same token ids in, ignore_eos) and
the log-probability of each generated token; then one prefill-only pass over the prompts with the FFN-row
counters reset, giving vLLM's FFN rows per token (FFN experts per token actually computed).
"""

import argparse
import functools
import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def check(reference_dir: str, name: str, dtype: str) -> dict:
    from upcycle_vllm.layer import ffn_row_counts
    from vllm import LLM, SamplingParams

    with open(os.path.join(reference_dir, "reference.json")) as file:
        reference = json.load(file)[name]
    prompts = [{"prompt_token_ids": p["prompt_token_ids"]} for p in reference["prompts"]]
    n_new = len(reference["prompts"][0]["token_ids"])
    llm = LLM(model=os.path.join(reference_dir, name), dtype=dtype, enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=256, seed=0, kv_cache_memory_bytes=64 * 2**20, enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=n_new, min_tokens=n_new, logprobs=1, detokenize=False,
                            ignore_eos=True)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    generations = []
    for output in outputs:
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        generations.append({"token_ids": token_ids,
                            "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]})
    llm.apply_model(functools.partial(ffn_row_counts, reset=True))
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, detokenize=False), use_tqdm=False)
    layers = llm.apply_model(functools.partial(ffn_row_counts, reset=True))[0]
    del llm
    gc.collect()
    return {"name": name, "generations": generations, "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("reference_dir")
    parser.add_argument("names", nargs="+")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    for name in args.names:
        print("UPCYCLE_VLLM_RESULT " + json.dumps(check(args.reference_dir, name, args.dtype)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
