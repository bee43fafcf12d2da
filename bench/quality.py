"""Quality against compute on the embedded default: the demo's pipeline, with its goals checked.

Goals (issue "The embedded demo..."): at 1.5 FFN experts per token the trained MoE++ is within 2% of the source's
held-out perplexity, at 1.0 within 8%, and at every budget it beats the better training-free baseline (dynamic
skipping or top-p routing) at the same mean number of FFN experts. Every number comes from one run.

    python bench/quality.py [--output /tmp/quality] [--train-steps 150] [--results existing/results.json]
"""

import argparse
import json
from pathlib import Path

from upcycle.demo import DemoOptions, format_table, run_demo

GOALS = {1.5: 0.02, 1.0: 0.08}  # budget -> largest allowed perplexity increase over the source


def check_goals(results: dict) -> list[str]:
    source = results["source"]["perplexity"]
    lines = []
    for budget in results["budgets"]:
        target, trained, baseline = budget["target"], budget["trained"], budget["baseline"]
        increase = trained["perplexity"] / source - 1
        allowed = GOALS.get(target)
        within = allowed is None or increase <= allowed
        beats = trained["perplexity"] < baseline["perplexity"]
        lines.append(
            f"budget {target:g}: trained {trained['perplexity']:.2f} at {trained['ffn_experts_per_token']:.2f} FFN "
            f"experts/token = {100 * increase:+.1f}% vs source (goal <= {100 * allowed:.0f}%: "
            f"{'met' if within else 'NOT met'}); baseline {baseline['rule']} {baseline['perplexity']:.2f} at "
            f"{baseline['ffn_experts_per_token']:.2f} ({'beaten' if beats else 'NOT beaten'})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("/tmp/upcycle-quality"))
    parser.add_argument("--train-steps", type=int, default=DemoOptions.train_steps)
    parser.add_argument("--results", type=Path, help="check an existing results.json instead of running")
    args = parser.parse_args()
    if args.results:
        results = json.loads(args.results.read_text())
        print(format_table(results))
    else:
        results = run_demo(DemoOptions(output=args.output, train_steps=args.train_steps))
    print("\n".join(check_goals(results)))


if __name__ == "__main__":
    main()
