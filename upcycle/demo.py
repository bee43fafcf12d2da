"""`upcycle demo`: the whole job on the embedded default, with no download.

The shipped source (upcycle/assets/demo_model: a small Mixtral trained on the standard library's documentation by
recipes/train_demo_source.py) is converted, then at each budget (1.5 and 1.0 FFN experts per token) calibrated,
trained (LoRA on the experts, routers, self-distillation), and evaluated on the held-out documentation against
the source and against the better training-free variable-k baseline at the same budget. Writes results.json, plots and the checkpoints.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .budget.calibrate import CalibrateOptions, calibrate
from .checkpoint.loading import load_causal_lm
from .checkpoint.output_dir import atomic_output_dir
from .data.blocks import load_checkpoint_tokenizer, load_token_blocks
from .data.corpus import write_corpus
from .errors import UpcycleError
from .evaluation.baselines import BASELINES
from .evaluation.evaluate import evaluate_baseline, evaluate_model
from .evaluation.plots import write_eval_plots, write_quality_vs_compute
from .evaluation.token_kinds import ffn_experts_by_token_kind
from .surgery.convert import ConvertOptions, convert
from .training.options import TrainOptions
from .training.recipe import run_training

DEMO_MODEL = Path(__file__).parent / "assets" / "demo_model"
DEMO_MARKER = "results.json"
BUDGETS = (1.5, 1.0)
BLOCK_SIZE = 256


@dataclass
class DemoOptions:
    output: Path = Path("upcycle-demo")
    train_steps: int = 300
    # Tuned on the demo model (bench/RESULTS.md, "Quality versus compute"): LoRA on the FFN experts with the
    # routers (at 1.0 the routing is top-1 and only the experts' adapting to it moves perplexity: routers alone
    # tie the training-free baseline), self-distillation toward the source, and no balance loss (the source's
    # routing is unbalanced by its training, and balancing it moves tokens away from the experts that learned them).
    trainable: str = "lora"
    learning_rate: float = 1e-3
    distill_weight: float = 1.0
    balance_loss_coef: float = 0.0
    calibration_blocks: int = 32
    max_heldout_blocks: int | None = None  # None: every held-out block (about 55k tokens)


def check_demo_output(output: Path) -> None:
    """The demo replaces its own earlier output, and refuses any other existing folder."""
    if output.exists() and not (output / DEMO_MARKER).is_file():
        raise UpcycleError(f"{output} exists and is not an earlier demo output; choose another --output")


class Progress:
    def __init__(self, echo):
        self.echo, self.start = echo, time.time()

    def __call__(self, message: str) -> None:
        self.echo(f"[{time.time() - self.start:6.0f} s] {message}")


def summary(report, label: str) -> dict:
    return {"label": label, "perplexity": report.perplexity, "perplexity_interval_95": report.perplexity_interval_95,
            "ffn_experts_per_token": report.ffn_experts_per_token, "kl_to_source": report.kl_to_source,
            "zero_computation_share": report.zero_computation_share,
            "ffn_experts_histogram": report.ffn_experts_histogram}


def best_baseline(converted, calibration: torch.Tensor, heldout: torch.Tensor, target: float) -> dict:
    """The better training-free baseline at the target: dynamic skipping or top-p, knob fitted on calibration.

    `converted`: the MoE++ model straight from convert (it computes the source), whose routers run the rules.
    """
    candidates = []
    for rule in BASELINES:
        report = evaluate_baseline(converted, calibration, heldout, rule, target)
        candidates.append(summary(report, "baseline") | {"rule": rule, "knob": report.baseline["knob"]})
    return min(candidates, key=lambda result: result["perplexity"])


def run_budget(target: float, moepp: Path, folder: Path, data: Path, heldout: torch.Tensor, source,
               options: DemoOptions, progress: Progress) -> dict:
    name = f"{target:g}"
    calibrated = folder / f"calibrated-{name}"
    calibrate(moepp, calibrated, str(data / "train.txt"),
              CalibrateOptions(target_ffn_per_token=target, batches=options.calibration_blocks // 8,
                               block_size=BLOCK_SIZE))
    calibrated_report = evaluate_model(load_causal_lm(calibrated), heldout, source_model=source)
    progress(f"budget {name}: calibrated, perplexity {calibrated_report.perplexity:.2f} at "
             f"{calibrated_report.ffn_experts_per_token:.2f} FFN experts per token")
    trained = folder / f"trained-{name}"
    run_training(TrainOptions(
        model=str(calibrated), data=str(data / "train.txt"), eval_data=str(data / "heldout.txt"),
        output=str(trained), run_dir=str(folder / "runs" / name), target_ffn_per_token=target,
        steps=options.train_steps, trainable=options.trainable, learning_rate=options.learning_rate,
        distill_weight=options.distill_weight, balance_loss_coef=options.balance_loss_coef,
        block_size=BLOCK_SIZE, micro_batch_size=8, checkpoint_every=0, eval_max_blocks=8, ramp_fraction=0.0,
        lr_schedule="cosine", warmup_steps=10, progress=True, tensorboard=False,
    ), command=f"upcycle demo (budget {name})")
    trained_model = load_causal_lm(trained)
    trained_report = evaluate_model(trained_model, heldout, source_model=source)
    progress(f"budget {name}: trained, perplexity {trained_report.perplexity:.2f} at "
             f"{trained_report.ffn_experts_per_token:.2f} FFN experts per token")
    return {"target": target, "calibrated": summary(calibrated_report, "calibrated"),
            "trained": summary(trained_report, "trained"), "_trained_model": trained_model,
            "_trained_report": trained_report}


def format_table(results: dict) -> str:
    source = results["source"]
    lines = [f"{'':<22}{'FFN experts/token':>18}{'perplexity':>12}{'vs source':>11}",
             f"{'source':<22}{source['ffn_experts_per_token']:>18.2f}{source['perplexity']:>12.2f}{'':>11}"]
    for budget in results["budgets"]:
        for kind in ("baseline", "calibrated", "trained"):
            row = budget[kind]
            label = f"{kind} @ {budget['target']:g}" + (f" ({row['rule']})" if kind == "baseline" else "")
            change = 100 * (row["perplexity"] / source["perplexity"] - 1)
            lines.append(f"{label:<22}{row['ffn_experts_per_token']:>18.2f}{row['perplexity']:>12.2f}"
                         f"{change:>+10.1f}%")
    return "\n".join(lines)


def run_demo(options: DemoOptions, echo=print) -> dict:
    output = Path(options.output)
    check_demo_output(output)
    if not (DEMO_MODEL / "config.json").is_file():
        raise UpcycleError(f"the embedded demo model is missing from {DEMO_MODEL}; "
                           "reinstall upcycle or run recipes/train_demo_source.py")
    progress = Progress(echo)
    with atomic_output_dir(output, overwrite=True) as partial:
        data = partial / "data"
        write_corpus(data)
        tokenizer = load_checkpoint_tokenizer(DEMO_MODEL)
        parts = load_token_blocks(data / "heldout.txt", tokenizer, BLOCK_SIZE, heldout_fraction=0.5)
        heldout = torch.cat([parts.train, parts.heldout])[: options.max_heldout_blocks]  # (n, L) held-out docs
        calibration = load_token_blocks(data / "train.txt", tokenizer, BLOCK_SIZE).train[: options.calibration_blocks]
        source = load_causal_lm(DEMO_MODEL)
        source_report = evaluate_model(source, heldout)
        progress(f"source: perplexity {source_report.perplexity:.2f} on {source_report.tokens:,} held-out tokens")
        moepp = partial / "moepp"
        convert(DEMO_MODEL, moepp, ConvertOptions(), command="upcycle demo")
        progress("converted to MoE++ (function-preserving)")
        converted = load_causal_lm(moepp)

        results = {"source": summary(source_report, "source"), "budgets": []}
        points = [results["source"]]
        for target in BUDGETS:
            baseline = best_baseline(converted, calibration, heldout, target)
            progress(f"budget {target:g}: baseline ({baseline['rule']}) perplexity {baseline['perplexity']:.2f}")
            budget = {"baseline": baseline} | run_budget(target, moepp, partial, data, heldout, source, options,
                                                         progress)
            points += [budget["baseline"], budget["calibrated"], budget["trained"]]
            results["budgets"].append(budget)

        plots = partial / "plots"
        write_quality_vs_compute(points, plots / "perplexity_vs_ffn_experts.png",
                                 title="held-out perplexity vs FFN experts per token")
        lowest = results["budgets"][-1]
        write_eval_plots(lowest["_trained_report"].as_dict(), plots)
        kinds = ffn_experts_by_token_kind(lowest.pop("_trained_model"), heldout[:32], tokenizer)
        write_token_kind_plot(kinds, plots / "ffn_experts_by_token_kind.png")
        results["token_kinds"] = kinds
        for budget in results["budgets"]:
            budget.pop("_trained_model", None)
            budget.pop("_trained_report", None)
        (partial / DEMO_MARKER).write_text(json.dumps(results, indent=2) + "\n")
        echo(format_table(results))
    progress(f"wrote {output.resolve()} (results.json, plots/, checkpoints)")
    return results


def write_token_kind_plot(kinds: dict, path: Path) -> Path:
    from .evaluation.plots import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.5, 3.2))
    names = list(kinds)
    axes.bar(names, [kinds[name]["ffn_experts_per_token"] for name in names], color="#4c72b0")
    axes.set_ylabel("FFN experts per token")
    axes.set_title("by kind of token (lowest budget, trained)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
