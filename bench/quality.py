"""Quality against compute on the embedded default, against trained controls, over seeds: the demo's pipeline.

At each budget (1.5, 1.0, 0.75 FFN experts per token) the demo's arms: the source, the better training-free rule,
the trained control (the source routed by a fixed rule, trained with the same recipe, tokens, steps, trainable
set and distillation), MoE++ calibrated and trained. The trained arms run once per seed (LoRA initialisation and
data order); every perplexity is on the same held-out blocks, and every comparison is paired on them.

Goals (issue "Routers that learn which tokens need compute, proven against trained controls"):
- at 1.0 and at 0.75 the trained MoE++ beats its trained control: the paired 95% interval excludes 1 (each seed);
- at 1.5 the trained MoE++ is within 1% of the source's perplexity;
- at 1.0 at least 15% of (token, layer) pairs use two FFN experts and at least 15% use none.

    python bench/quality.py [--output /tmp/quality] [--seeds 0,1,2] [--train-steps 200] [--max-heldout-blocks N]
    python bench/quality.py --results /tmp/quality/results.json      # check the goals of an earlier run
Writes results.json (the demo's shape, plus "seeds" per budget) in the output folder.
"""

import argparse
import json
import statistics
from pathlib import Path

from upcycle.demo import DemoOptions, format_table, run_demo


def seed_rows(budget: dict) -> list[dict]:
    """Per-seed trained-vs-control entries (the demo's single seed when only one was run)."""
    if "seeds" in budget:
        return budget["seeds"]
    trained = budget["trained"]
    return [{"seed": 0, "control_perplexity": budget["control"]["perplexity"],
             "trained_perplexity": trained["perplexity"], "paired_vs_control": trained["paired_vs_control"],
             "trained_ffn_experts_histogram": trained["ffn_experts_histogram"]}]


def check_goals(results: dict) -> list[str]:
    source = results["source"]["perplexity"]
    lines = []
    for budget in results["budgets"]:
        target, rows = budget["target"], seed_rows(budget)
        ratios = [row["paired_vs_control"]["perplexity_ratio"] for row in rows]
        beats = [row["paired_vs_control"]["interval_95"][1] < 1.0 for row in rows]
        line = (f"budget {target:g}: trained/control ratio per seed "
                + ", ".join(f"{row['paired_vs_control']['perplexity_ratio']:.3f} "
                            f"({row['paired_vs_control']['interval_95'][0]:.3f}-"
                            f"{row['paired_vs_control']['interval_95'][1]:.3f})" for row in rows)
                + f"; mean {statistics.mean(ratios):.3f}")
        if target < 1.5:
            line += f" -> beats the control in {sum(beats)}/{len(beats)} seeds (goal: all)"
        else:
            increase = [row["trained_perplexity"] / source - 1 for row in rows]
            line += (f"; vs source {', '.join(f'{100 * value:+.1f}%' for value in increase)} (goal <= +1%: "
                     f"{'met' if max(increase) <= 0.01 else 'NOT met'})")
        if target == 1.0:
            histogram = budget["trained"]["ffn_experts_histogram"]
            two, none = histogram.get("2", 0.0), histogram.get("0", 0.0)
            line += (f"; (token, layer) pairs with 2 FFN experts {100 * two:.1f}%, with none {100 * none:.1f}% "
                     f"(goal >= 15% each: {'met' if min(two, none) >= 0.15 else 'NOT met'})")
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("/tmp/upcycle-quality"))
    parser.add_argument("--seeds", default="0,1,2", help="Seeds of the trained arms, comma-separated.")
    parser.add_argument("--train-steps", type=int, default=DemoOptions.train_steps)
    parser.add_argument("--max-heldout-blocks", type=int, default=None, help="Default: every held-out block.")
    parser.add_argument("--budgets", default="1.5,1.0,0.75")
    parser.add_argument("--results", type=Path, help="check an existing results.json instead of running")
    args = parser.parse_args()
    if args.results:
        results = json.loads(args.results.read_text())
    else:
        results = run_demo(DemoOptions(
            output=args.output, train_steps=args.train_steps, max_heldout_blocks=args.max_heldout_blocks,
            seeds=tuple(int(seed) for seed in args.seeds.split(",")),
            budgets=tuple(float(budget) for budget in args.budgets.split(","))))
    print(format_table(results))
    print("\n".join(check_goals(results)))


if __name__ == "__main__":
    main()
