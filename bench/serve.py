"""vLLM offline serving: the source Mixtral against its MoE++ conversion at the full budget, 1.5 and 1.0 FFN
experts per token (upcycle's vLLM plugin, vllm_plugin/), one run, interleaved round by round.

Two steps, in two venvs (vLLM pins its own torch and transformers):

    .venv/bin/python bench/serve.py prepare build/bench-serve        # project venv: source, convert, calibrate
    .venv-vllm/bin/python bench/serve.py run build/bench-serve       # vLLM venv with the plugin installed

`prepare` makes a random Mixtral sized so that its MoE layers dominate (hidden 768, 8 experts of 2048, top-2,
4 layers, vocab 4096 with the demo model's tokenizer), `upcycle convert`s it and `upcycle calibrate`s the
conversion to 1.5 and 1.0 FFN experts per token on CPython's pydoc topics; it also stores the prompts (token
ids of the pydoc topics calibration did not read). `run` loads the four checkpoints into four in-process vLLM engines and, for
--rounds rounds, in the order source, full, 1.5, 1.0: one prefill-only call (max_tokens 1) and one call
generating --new-tokens tokens for a batch of --batch prompts (ignore_eos, greedy). Reported per model (medians
over rounds, and the best of them, which a busy shared machine disturbs least): prompt tokens/s of the prefill
call; output tokens/s of the generation call; time per output token = (T_gen - T_prefill) / (new - 1),
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
    from upcycle_vllm.layer import ffn_row_counts
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

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
    phases = ("prefill", "generate")
    times = {arm: {key: [] for key in ("prefill", "generate", "ffn_prefill", "ffn_generate")} for arm in ARMS}
    rows = {arm: {phase: [0, 0] for phase in phases} for arm in ARMS}  # FFN rows, tokens (all MoE++ layers)
    for arm in ARMS:  # warm-up, not timed
        engines[arm].generate(prompts, generate, use_tqdm=False)
    for _ in range(rounds):
        for arm in ARMS:
            for phase, params in (("prefill", prefill), ("generate", generate)):
                engines[arm].apply_model(functools.partial(ffn_row_counts, reset=True))
                ffn_seconds[arm] = 0.0
                ffn_seconds["current"] = arm
                start = time.perf_counter()
                engines[arm].generate(prompts, params, use_tqdm=False)
                times[arm][phase].append(time.perf_counter() - start)
                ffn_seconds["current"] = None
                times[arm][f"ffn_{phase}"].append(ffn_seconds[arm])
                for layer in engines[arm].apply_model(functools.partial(ffn_row_counts, reset=True))[0].values():
                    rows[arm][phase][0] += layer["ffn_rows"]
                    rows[arm][phase][1] += layer["tokens"]
    n_prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    return {"best": summarise(times, rows, min, n_prompt_tokens, batch, new_tokens),
            "median": summarise(times, rows, statistics.median, n_prompt_tokens, batch, new_tokens)}


def summarise(times: dict, rows: dict, aggregate, n_prompt_tokens: int, batch: int, new_tokens: int) -> dict:
    """Per arm: prefill and decode speed from the aggregated (best or median) times over rounds, FFN shares and
    rows per token, and against the source: achieved time saving, ideal saving, their ratio."""
    results = {}
    for arm in ARMS:
        t = {key: aggregate(values) for key, values in times[arm].items()}
        per_token = {phase: rows[arm][phase][0] / rows[arm][phase][1] if rows[arm][phase][1] else 2.0
                     for phase in ("prefill", "generate")}
        decode_rows = rows[arm]["generate"][0] - rows[arm]["prefill"][0]
        decode_tokens = rows[arm]["generate"][1] - rows[arm]["prefill"][1]
        results[arm] = {
            "prefill_tokens_per_s": n_prompt_tokens / t["prefill"],
            "prefill_ffn_share": t["ffn_prefill"] / t["prefill"],
            "prefill_ffn_rows_per_token": per_token["prefill"],
            "output_tokens_per_s": batch * new_tokens / t["generate"],
            "time_per_output_token_ms": 1000 * (t["generate"] - t["prefill"]) / (new_tokens - 1),
            "decode_ffn_share": (t["ffn_generate"] - t["ffn_prefill"]) / (t["generate"] - t["prefill"]),
            "decode_ffn_rows_per_token": decode_rows / decode_tokens if decode_tokens else 2.0,
            "aggregated_s": t,
            "runs_s": times[arm],
        }
    source = results["source"]
    for arm in ARMS[1:]:
        r = results[arm]
        r["prefill_vs_source"] = r["prefill_tokens_per_s"] / source["prefill_tokens_per_s"]
        r["tpot_vs_source"] = r["time_per_output_token_ms"] / source["time_per_output_token_ms"]
        r["throughput_vs_source"] = r["output_tokens_per_s"] / source["output_tokens_per_s"]
        for phase, speed, rows_key in (("prefill", "prefill_vs_source", "prefill_ffn_rows_per_token"),
                                       ("decode", "tpot_vs_source", "decode_ffn_rows_per_token")):
            ideal = source[f"{phase}_ffn_share"] * (1 - r[rows_key] / 2)  # share of the source's time
            achieved = 1 - 1 / r[speed] if phase == "prefill" else 1 - r[speed]
            r[f"{phase}_ideal_saving"] = ideal
            r[f"{phase}_achieved_saving"] = achieved
            r[f"{phase}_achieved_over_ideal"] = achieved / ideal if ideal > 0.005 else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
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

    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    for kind, table in results.items():
        print(f"\n{kind} of {args.rounds} rounds")
        print(f"{'model':<11} | {'prefill tok/s':>13} {'rows/tok':>8} {'FFN share':>9} {'saving':>7} {'ideal':>6} "
              f"{'ach/ideal':>9} | {'TPOT ms':>8} {'rows/tok':>8} {'FFN share':>9} {'saving':>7} {'ideal':>6} "
              f"{'ach/ideal':>9} | {'out tok/s':>9}")
        for arm, r in table.items():
            cells = {phase: ["", "", ""] for phase in ("prefill", "decode")}
            if arm != "source":
                for phase in cells:
                    cells[phase] = [f"{r[f'{phase}_achieved_saving']:.1%}", f"{r[f'{phase}_ideal_saving']:.1%}",
                                    ratio(r[f"{phase}_achieved_over_ideal"])]
            p, d = cells["prefill"], cells["decode"]
            print(f"{arm:<11} | {r['prefill_tokens_per_s']:>13.0f} {r['prefill_ffn_rows_per_token']:>8.3f} "
                  f"{r['prefill_ffn_share']:>9.1%} {p[0]:>7} {p[1]:>6} {p[2]:>9} | "
                  f"{r['time_per_output_token_ms']:>8.1f} {r['decode_ffn_rows_per_token']:>8.3f} "
                  f"{r['decode_ffn_share']:>9.1%} {d[0]:>7} {d[1]:>6} {d[2]:>9} | {r['output_tokens_per_s']:>9.1f}")


if __name__ == "__main__":
    main()
