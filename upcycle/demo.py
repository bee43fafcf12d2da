"""`upcycle demo`: the whole job on the embedded default, with no download, against trained controls.

The shipped source (upcycle/assets/demo_model: a small Mixtral trained by recipes/train_demo_source.py on the
source part of the standard library's text) is converted; then at each budget (1.5, 1.0 and 0.75 FFN experts per
token), on the adaptation part of the text:
- the better training-free rule (dynamic skipping or top-p; below 1, top-1 skipping unconfident layers);
- the trained control: the source routed by a fixed rule (at 1.0 plain top-1), trained with the same recipe,
  the same tokens, steps, trainable set and distillation as MoE++ (`upcycle train --routing-rule`);
- MoE++ calibrated (no training) and trained (the recipe with its relaxed selection and budget controller).
Each is evaluated on the held-out part, with its paired perplexity ratio against the trained control, and how its
compute is spent: the share of (token, layer) pairs using 0, 1 and 2 FFN experts, per layer and overall, and
FFN experts per token by kind of token. The source and, at each budget, the baseline, the trained control and the
trained MoE++ also run one downstream task (demo_tasks.py: a shipped local lm-eval task, with the routing of its
tokens), and the trained MoE++ at the lowest budget gets `upcycle analyze`'s routing analyses (demo_analysis.py).
Writes results.json, plots, analysis/ and the checkpoints.
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
from .data.corpus import write_demo_corpus
from .demo_analysis import analyse_lowest_budget
from .demo_tasks import DEFAULT_TASK, DemoTask, check_task, describe, task_cell, task_footnote
from .demo_training import TrainJob, train_side_by_side
from .errors import UpcycleError
from .evaluation.baselines import BASELINES
from .evaluation.evaluate import baseline_range, evaluate_baseline, evaluate_model, paired_against
from .evaluation.plots import write_eval_plots, write_quality_vs_compute
from .evaluation.token_kinds import ffn_experts_by_token_kind
from .surgery.convert import ConvertOptions, convert
from .training.options import TrainOptions

DEMO_MODEL = Path(__file__).parent / "assets" / "demo_model"
DEMO_MARKER = "results.json"
BUDGETS = (1.5, 1.0, 0.75)
BLOCK_SIZE = 256
ARMS = ("baseline", "control", "calibrated", "trained")


@dataclass
class DemoOptions:
    output: Path = Path("upcycle-demo")
    train_steps: int = 150
    # The same recipe for MoE++ and its trained control (bench/RESULTS.md, "Quality versus compute"): LoRA on the
    # attention and FFN experts with the routers, self-distillation toward the source, no balance loss (the
    # source's routing is unbalanced by its training); MoE++ adds its relaxed selection and budget controller.
    trainable: str = "lora"
    learning_rate: float = 1e-3
    distill_weight: float = 1.0
    balance_loss_coef: float = 0.0
    calibration_blocks: int = 32
    max_heldout_blocks: int | None = 256  # about 65k tokens; None: every held-out block
    budgets: tuple[float, ...] = BUDGETS
    seeds: tuple[int, ...] = (0,)  # seeds of the trained arms (bench/quality.py runs three)
    token_kind_blocks: int = 32
    task: str = DEFAULT_TASK  # the downstream task (a local one: no download), see demo_tasks.py
    task_limit: int | None = None  # examples of the task; None: all of them
    analysis_blocks: int = 32  # held-out blocks of the routing analyses (demo_analysis.py)

    def validate(self) -> None:
        """Refuse bad values in one sentence, before anything is written."""
        check_task(self.task, self.task_limit)
        if self.analysis_blocks < 1:
            raise UpcycleError(f"analysis_blocks must be at least 1, got {self.analysis_blocks}")


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
            "ffn_experts_histogram": report.ffn_experts_histogram,
            "ffn_experts_histogram_per_layer": [layer.ffn_experts_histogram for layer in report.per_layer],
            "ffn_experts_per_token_per_layer": [layer.ffn_experts_per_token for layer in report.per_layer]}


def best_baseline(converted, calibration: torch.Tensor, heldout: torch.Tensor, target: float) -> tuple[dict, object]:
    """The better training-free rule that reaches the target, knob fitted on calibration; (summary, report).

    `converted`: the MoE++ model straight from convert (it computes the source), whose routers run the rules.
    """
    top_k = converted.moe_blocks()[0].gate.top_k
    rules = [rule for rule in BASELINES if (bounds := baseline_range(rule, top_k))[0] <= target <= bounds[1]]
    if target == 1.0:  # every rule that keeps a token's first expert is plain top-1 here: fit and evaluate one
        rules = rules[:1]
    candidates = []
    for rule in rules:
        report = evaluate_baseline(converted, calibration, heldout, rule, target)
        candidates.append((summary(report, "baseline") | {"rule": rule, "knob": report.baseline["knob"]}, report))
    return min(candidates, key=lambda candidate: candidate[0]["perplexity"])


def control_rule(target: float, baseline_rule: str) -> str:
    """The trained control's rule: plain top-1 at 1.0 (what every rule that keeps the first expert becomes),
    else the better training-free rule at that budget (below 1: top-1 skipping unconfident layers)."""
    return "top_k" if target == 1.0 else baseline_rule


class DemoRun:
    """One demo run's shared state: data, the source, the converted model, options, progress."""

    def __init__(self, folder: Path, options: DemoOptions, progress: Progress):
        self.folder, self.options, self.progress = folder, options, progress
        self.data = folder / "data"
        write_demo_corpus(self.data)
        self.tokenizer = load_checkpoint_tokenizer(DEMO_MODEL)
        heldout = load_token_blocks(self.data / "heldout.txt", self.tokenizer, BLOCK_SIZE, heldout_fraction=0.5)
        self.heldout = torch.cat([heldout.train, heldout.heldout])[: options.max_heldout_blocks]  # (n, L)
        self.calibration = load_token_blocks(self.data / "adaptation.txt", self.tokenizer,
                                             BLOCK_SIZE).train[: options.calibration_blocks]
        self.moepp = folder / "moepp"
        self.task = DemoTask(options.task, options.task_limit, self.tokenizer)

    def train_job(self, name: str, model: Path, target: float, seed: int, **extra) -> TrainJob:
        """The recipe on the adaptation text (MoE++, or a control with `routing_rule`), as one side-by-side job."""
        options = self.options
        return TrainJob(name, TrainOptions(
            model=str(model), data=str(self.data / "adaptation.txt"), eval_data=str(self.data / "heldout.txt"),
            output=str(self.folder / name), run_dir=str(self.folder / "runs" / name), target_ffn_per_token=target,
            steps=options.train_steps, trainable=options.trainable, learning_rate=options.learning_rate,
            distill_weight=options.distill_weight, balance_loss_coef=options.balance_loss_coef, seed=seed,
            block_size=BLOCK_SIZE, micro_batch_size=8, checkpoint_every=0, eval_max_blocks=8, ramp_fraction=0.0,
            lr_schedule="cosine", warmup_steps=10, progress=False, tensorboard=False, **extra,
        ), seed)


def run_budget(run: DemoRun, target: float, converted) -> dict:
    """Baseline, trained control, calibrated and trained MoE++ at one budget, each paired against the control."""
    name, progress = f"{target:g}", run.progress
    baseline, reports = best_baseline(converted, run.calibration, run.heldout, target)
    progress(f"budget {name}: baseline ({baseline['rule']}) perplexity {baseline['perplexity']:.2f}")
    baseline["task"], _ = run.task.baseline_entry(converted, baseline["rule"], baseline["knob"])
    progress(f"budget {name}: baseline on {describe(baseline['task'])}")
    rule = control_rule(target, baseline["rule"])
    calibrated_dir = run.folder / f"calibrated-{name}"
    calibrate(run.moepp, calibrated_dir, str(run.data / "adaptation.txt"),
              CalibrateOptions(target_ffn_per_token=target, batches=run.options.calibration_blocks // 8,
                               block_size=BLOCK_SIZE))
    calibrated_report = evaluate_model(load_causal_lm(calibrated_dir), run.heldout)
    progress(f"budget {name}: calibrated, perplexity {calibrated_report.perplexity:.2f} at "
             f"{calibrated_report.ffn_experts_per_token:.2f} FFN experts per token")
    seeds = []
    for seed in run.options.seeds:
        suffix = f"{name}" if seed == run.options.seeds[0] else f"{name}-seed{seed}"
        jobs = [run.train_job(f"control-{suffix}", run.moepp, target, seed, routing_rule=rule),
                run.train_job(f"trained-{suffix}", calibrated_dir, target, seed)]
        train_side_by_side(jobs)
        control_model = load_causal_lm(Path(jobs[0].options.output))
        control_report = evaluate_model(control_model, run.heldout)
        progress(f"budget {name}: trained control ({rule}), perplexity {control_report.perplexity:.2f} at "
                 f"{control_report.ffn_experts_per_token:.2f} FFN experts per token")
        trained_model = load_causal_lm(Path(jobs[1].options.output))
        trained_report = evaluate_model(trained_model, run.heldout)
        paired = paired_against(trained_report, control_report)
        progress(f"budget {name}: trained MoE++, perplexity {trained_report.perplexity:.2f} at "
                 f"{trained_report.ffn_experts_per_token:.2f} FFN experts per token; vs control "
                 f"{paired['perplexity_ratio']:.3f} ({paired['interval_95'][0]:.3f}-{paired['interval_95'][1]:.3f})")
        seeds.append({"seed": seed, "control": (control_model, control_report),
                      "trained": (trained_model, trained_report), "paired_vs_control": paired})
    first = seeds[0]
    control_model, control_report = first["control"]
    trained_model, trained_report = first["trained"]
    control_task, _ = run.task.entry(control_model)
    progress(f"budget {name}: trained control on {describe(control_task)}")
    trained_task, trained_task_result = run.task.entry(trained_model)
    progress(f"budget {name}: trained MoE++ on {describe(trained_task)}")
    budget = {
        "target": target,
        "baseline": baseline,
        "control": summary(control_report, "control") | {
            "rule": rule, "knob_per_layer": [block.gate.routing_rule_knob for block in control_model.moe_blocks()],
            "task": control_task},
        "calibrated": summary(calibrated_report, "calibrated"),
        "trained": summary(trained_report, "trained") | {"task": trained_task},
        "token_kinds": ffn_experts_by_token_kind(trained_model, run.heldout[: run.options.token_kind_blocks],
                                                 run.tokenizer),
        "_reports": {"trained": trained_report},
        "_trained": {"name": f"trained-{name}", "model": trained_model, "task_result": trained_task_result},
    }
    for arm, report in (("baseline", reports), ("calibrated", calibrated_report), ("trained", trained_report)):
        budget[arm]["paired_vs_control"] = paired_against(report, control_report)
    if len(seeds) > 1:
        budget["seeds"] = [{"seed": entry["seed"], "control_perplexity": entry["control"][1].perplexity,
                            "trained_perplexity": entry["trained"][1].perplexity,
                            "trained_ffn_experts_per_token": entry["trained"][1].ffn_experts_per_token,
                            "trained_ffn_experts_histogram": entry["trained"][1].ffn_experts_histogram,
                            "paired_vs_control": entry["paired_vs_control"]} for entry in seeds]
    return budget


def format_table(results: dict) -> str:
    source = results["source"]
    task_header = "task (± se)" if "task" in source else ""  # an older results.json has no task column
    lines = [(f"{'':<34}{'FFN/token':>10}{'0 / 1 / 2 FFN (%)':>20}{'perplexity':>12}{'vs source':>11}"
             f"{'vs trained control (95%)':>28}{task_header:>16}").rstrip(),
             (f"{'source':<34}{source['ffn_experts_per_token']:>10.2f}{'':>20}{source['perplexity']:>12.2f}"
              f"{'':>39}{task_cell(source):>16}").rstrip()]
    for budget in results["budgets"]:
        for kind in ARMS:
            row = budget[kind]
            label = f"{kind} @ {budget['target']:g}" + (f" ({row['rule']})" if "rule" in row else "")
            change = 100 * (row["perplexity"] / source["perplexity"] - 1)
            histogram = row.get("ffn_experts_histogram") or {}
            shares = " / ".join(f"{100 * histogram.get(str(count), 0.0):.0f}" for count in range(3))
            paired = row.get("paired_vs_control")
            versus = (f"{paired['perplexity_ratio']:.3f} ({paired['interval_95'][0]:.3f}-"
                      f"{paired['interval_95'][1]:.3f})" if paired else "1")
            lines.append(f"{label:<34}{row['ffn_experts_per_token']:>10.2f}{shares:>20}{row['perplexity']:>12.2f}"
                         f"{change:>+10.1f}%{versus:>28}{task_cell(row):>16}".rstrip())
    footnote = task_footnote(results)
    return "\n".join(lines + ([footnote] if footnote else []))


def run_demo(options: DemoOptions, echo=print) -> dict:
    output = Path(options.output)
    options.validate()
    check_demo_output(output)
    if not (DEMO_MODEL / "config.json").is_file():
        raise UpcycleError(f"the embedded demo model is missing from {DEMO_MODEL}; "
                           "reinstall upcycle or run recipes/train_demo_source.py")
    progress = Progress(echo)
    with atomic_output_dir(output, overwrite=True) as partial:
        run = DemoRun(partial, options, progress)
        source_model = load_causal_lm(DEMO_MODEL)
        source_report = evaluate_model(source_model, run.heldout)
        progress(f"source: perplexity {source_report.perplexity:.2f} on {source_report.tokens:,} held-out tokens")
        source_task, _ = run.task.entry(source_model)
        progress(f"source: {describe(source_task)}")
        convert(DEMO_MODEL, run.moepp, ConvertOptions(), command="upcycle demo")
        progress("converted to MoE++ (function-preserving)")
        converted = load_causal_lm(run.moepp)

        results = {"source": summary(source_report, "source") | {"task": source_task}, "budgets": [],
                   "heldout_tokens": source_report.tokens, "train_steps": options.train_steps,
                   "seeds": list(options.seeds)}
        points = [results["source"]]
        for target in options.budgets:
            budget = run_budget(run, target, converted)
            points += [budget[arm] for arm in ARMS]
            results["budgets"].append(budget)

        results["analysis"] = analyse_lowest_budget(partial, results["budgets"], source_model,
                                                    run.heldout[: options.analysis_blocks], run.tokenizer, progress)

        plots = partial / "plots"
        write_quality_vs_compute(points, plots / "perplexity_vs_ffn_experts.png",
                                 title="held-out perplexity vs FFN experts per token")
        lowest = results["budgets"][-1]
        write_eval_plots(lowest["_reports"]["trained"].as_dict(), plots)
        write_token_kind_plot({f"{budget['target']:g}": budget["token_kinds"] for budget in results["budgets"]},
                              plots / "ffn_experts_by_token_kind.png")
        for budget in results["budgets"]:
            budget.pop("_reports")
            budget.pop("_trained")
        (partial / DEMO_MARKER).write_text(json.dumps(results, indent=2) + "\n")
        echo(format_table(results))
    progress(f"wrote {output.resolve()} (results.json, plots/, analysis/, checkpoints)")
    return results


def write_token_kind_plot(kinds_by_budget: dict[str, dict], path: Path) -> Path:
    """Grouped bars: FFN experts per token of each kind of token, one group per budget (trained MoE++)."""
    from .evaluation.plots import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 3.4))
    budgets = list(kinds_by_budget)
    kinds = list(next(iter(kinds_by_budget.values())))
    width = 0.8 / len(kinds)
    for position, kind in enumerate(kinds):
        axes.bar([index + position * width for index in range(len(budgets))],
                 [kinds_by_budget[budget][kind]["ffn_experts_per_token"] for budget in budgets], width, label=kind)
    axes.set_xticks([index + width * (len(kinds) - 1) / 2 for index in range(len(budgets))],
                    [f"budget {budget}" for budget in budgets])
    axes.set_ylabel("FFN experts per token")
    axes.set_title("by kind of token (trained MoE++)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
