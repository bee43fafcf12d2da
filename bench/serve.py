"""vLLM offline serving: the source Mixtral against its MoE++ conversion at the full budget, 1.5 and 1.0 FFN
experts per token (upcycle's vLLM plugin, vllm_plugin/), one run, interleaved round by round.

Two steps, in two venvs (vLLM pins its own torch and transformers):

    .venv/bin/python bench/serve.py prepare build/bench-serve        # project venv: source, convert, calibrate
    .venv-vllm/bin/python bench/serve.py run build/bench-serve       # vLLM venv with the plugin installed

`prepare` makes a random Mixtral sized so that its MoE layers dominate (hidden 768, 8 experts of 2048, top-2,
4 layers, vocab 4096 with the demo model's tokenizer), `upcycle convert`s it and `upcycle calibrate`s the
conversion to 1.5 and 1.0 FFN experts per token on CPython's pydoc topics; it also stores the prompts (token
ids of held-out-ish pydoc text). `run` loads the four checkpoints into four in-process vLLM engines and, for
--rounds rounds, in the order source, full, 1.5, 1.0: one prefill-only call (max_tokens 1) and one call
generating --new-tokens tokens for a batch of --batch prompts (ignore_eos, greedy). Reported per model (medians
over rounds): output tokens/s of the generation call; time per output token = (T_gen - T_prefill) / (new - 1),
the time of one decode step of the whole batch; FFN rows per token actually computed (plugin counters); the FFN
kernels' share of time (vLLM's FusedMoE runner, timed in every arm). Ideal gain at budget b (k = 2):
the source's FFN share f times (1 - b/k) of its time; achieved/ideal is reported for 1.5 and 1.0.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = ["source", "moepp-full", "moepp-1.5", "moepp-1.0"]
DEMO_MODEL = Path(__file__).resolve().parents[1] / "upcycle/assets/demo_model"


def prepare(out: Path, prompt_tokens: int, n_prompts: int) -> None:
    import shutil

    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    upcycle = str(Path(sys.executable).with_name("upcycle"))
    config = MixtralConfig(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=12, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           pad_token_id=3)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(out / "source")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, out / "source" / name)
    from pydoc_data.topics import topics

    names = sorted(topics)
    (out / "calibration.txt").write_text("\n\n".join(topics[n] for n in names[: len(names) // 2]))
    subprocess.run([upcycle, "convert", str(out / "source"), str(out / "moepp-full"), "--overwrite"], check=True)
    for target in ("1.5", "1.0"):
        subprocess.run([upcycle, "calibrate", str(out / "moepp-full"), "--data", str(out / "calibration.txt"),
                        "--target-ffn-per-token", target, "--output", str(out / f"moepp-{target}"),
                        "--max-tokens", "30000", "--batches", "4", "--overwrite"], check=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "source")
    ids = tokenizer("\n\n".join(topics[n] for n in names[len(names) // 2:])).input_ids
    prompts = [ids[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(n_prompts)]
    (out / "prompts.json").write_text(json.dumps(prompts))


def run(out: Path, rounds: int, batch: int, new_tokens: int, dtype: str) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: counters readable
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    from upcycle_vllm.layer import ffn_row_counts

    ffn_seconds = {"current": None}
    original_forward = MoERunner.forward

    def timed_forward(self, *args, **kwargs):  # FusedMoE kernels, for every arm alike
        start = time.perf_counter()
        result = original_forward(self, *args, **kwargs)
        if ffn_seconds["current"] is not None:
            ffn_seconds[ffn_seconds["current"]] += time.perf_counter() - start
        return result

    MoERunner.forward = timed_forward
    prompts = [{"prompt_token_ids": p} for p in json.loads((out / "prompts.json").read_text())[:batch]]
    engines = {}
    for arm in ARMS:
        engines[arm] = LLM(model=str(out / arm), dtype=dtype, enforce_eager=True, skip_tokenizer_init=True,
                           max_model_len=1024, seed=0, kv_cache_memory_bytes=256 * 2**20,
                           enable_prefix_caching=False)
    prefill = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False, ignore_eos=True)
    generate = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, detokenize=False,
                              ignore_eos=True)
    times = {arm: {"prefill": [], "generate": [], "ffn": []} for arm in ARMS}
    rows = {arm: [0, 0] for arm in ARMS}  # ffn rows, tokens (MoE++ arms, all MoE layers)
    for arm in ARMS:  # warm-up, not timed
        engines[arm].generate(prompts, generate, use_tqdm=False)
    for _ in range(rounds):
        for arm in ARMS:
            engines[arm].apply_model(functools.partial(ffn_row_counts, reset=True))
            start = time.perf_counter()
            engines[arm].generate(prompts, prefill, use_tqdm=False)
            times[arm]["prefill"].append(time.perf_counter() - start)
            ffn_seconds[arm] = 0.0
            ffn_seconds["current"] = arm
            start = time.perf_counter()
            engines[arm].generate(prompts, generate, use_tqdm=False)
            times[arm]["generate"].append(time.perf_counter() - start)
            ffn_seconds["current"] = None
            times[arm]["ffn"].append(ffn_seconds[arm])
            for layer in engines[arm].apply_model(functools.partial(ffn_row_counts, reset=True))[0].values():
                rows[arm][0] += layer["ffn_rows"]
                rows[arm][1] += layer["tokens"]
    results = {}
    for arm in ARMS:
        t_gen = statistics.median(times[arm]["generate"])
        t_pre = statistics.median(times[arm]["prefill"])
        results[arm] = {
            "output_tokens_per_s": batch * new_tokens / t_gen,
            "time_per_output_token_ms": 1000 * (t_gen - t_pre) / (new_tokens - 1),
            "generate_s": t_gen,
            "prefill_s": t_pre,
            "ffn_share": statistics.median(f / g for f, g in zip(times[arm]["ffn"], times[arm]["generate"])),
            "ffn_rows_per_token": rows[arm][0] / rows[arm][1] if rows[arm][1] else 2.0,
            "runs_generate_s": times[arm]["generate"],
        }
    source = results["source"]
    for arm in ARMS[1:]:
        result = results[arm]
        result["throughput_vs_source"] = result["output_tokens_per_s"] / source["output_tokens_per_s"]
        result["tpot_vs_source"] = result["time_per_output_token_ms"] / source["time_per_output_token_ms"]
        ideal_saving = source["ffn_share"] * (1 - result["ffn_rows_per_token"] / 2)  # share of source time
        achieved_saving = 1 - result["generate_s"] / source["generate_s"]
        result["ideal_time_saving"] = ideal_saving
        result["achieved_time_saving"] = achieved_saving
        result["achieved_over_ideal"] = achieved_saving / ideal_saving if ideal_saving > 0 else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.prompt_tokens, n_prompts=64)
        return
    results = run(args.out, args.rounds, args.batch, args.new_tokens, args.dtype)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{'model':<12} {'tok/s':>8} {'TPOT ms':>8} {'FFN rows/tok':>12} {'FFN share':>9} "
          f"{'vs source':>9} {'saving':>7} {'ideal':>7} {'ach/ideal':>9}")
    for arm, r in results.items():
        line = (f"{arm:<12} {r['output_tokens_per_s']:>8.1f} {r['time_per_output_token_ms']:>8.2f} "
                f"{r['ffn_rows_per_token']:>12.3f} {r['ffn_share']:>9.1%}")
        if arm != "source":
            ratio = "-" if r["achieved_over_ideal"] is None else f"{r['achieved_over_ideal']:.2f}"
            line += (f" {r['throughput_vs_source']:>9.3f} {r['achieved_time_saving']:>7.1%}"
                     f" {r['ideal_time_saving']:>7.1%} {ratio:>9}")
        print(line)


if __name__ == "__main__":
    main()
