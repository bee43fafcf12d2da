"""The demo's downstream task: one shipped local lm-eval task, run for the models of the demo's table.

`DemoTask.entry(model)` runs the task through upcycle.evaluation.downstream (lm-eval's metrics and standard errors,
the routing of exactly the task's tokens from the model's own routers) and returns the entry results.json keeps
per model: {"name", "samples", "metrics": {metric: {"value", "stderr"}}, "ffn_experts_per_token"}. A training-free
baseline runs with its rule active on the converted model's routers (`variable_k_routing` with the fitted knob), so
lm-eval's forwards route by the rule; a trained control's routers carry their own rule.

Which models: the source, and at each budget the baseline, the trained control and the trained MoE++ (the first
seed's, when bench/quality.py trains several). Calibrated MoE++ is left out: it cannot go below one FFN expert per
token without training, so at 1.0 and below it routes as the top-1 baseline does, and its task numbers would
repeat the baseline's at the cost of three more runs (about 4 s each on 2 CPU cores for the whole cloze task).
The default task is the cloze (`upcycle_stdlib_cloze`): measured on the embedded model (task version 2, 322
items), its accuracy falls from 0.18 (source) to 0.16 (dynamic skipping at 1.0) to 0.08 (top-1 confident at
0.75), where the module task (`upcycle_stdlib_module`) stays near its chance level of 0.25 for all three.
"""

import contextlib
import io

from .errors import UpcycleError
from .evaluation.baselines import variable_k_routing
from .evaluation.downstream import TaskOptions, evaluate_tasks, quiet_lm_eval, task_manager
from .evaluation.local_tasks import CLOZE_TASK, LOCAL_TASKS

DEFAULT_TASK = CLOZE_TASK
TASK_ARMS = ("baseline", "control", "trained")  # the arms of each budget that run the task (see above)
HEADLINE_METRICS = ("acc", "acc_norm")  # the table's column: the first of these a task reports, else its first


def check_task(task: str, limit: int | None) -> None:
    """Refuse a task the demo cannot run offline, or a bad limit, in one sentence."""
    if task not in LOCAL_TASKS:
        raise UpcycleError(f"the demo runs one of the local tasks {', '.join(LOCAL_TASKS)} (no download), "
                           f"got {task!r}")
    if limit is not None and limit < 1:
        raise UpcycleError(f"--task-limit must be at least 1 example, got {limit}")


class DemoTask:
    """One local task, its lm-eval task manager built once, run on any model of the demo."""

    def __init__(self, name: str, limit: int | None, tokenizer):
        check_task(name, limit)
        quiet_lm_eval()
        self.name, self.tokenizer = name, tokenizer
        self.options = TaskOptions(limit=limit)
        self.manager = task_manager([name], [])  # writes the local tasks into the user's cache on first use

    def entry(self, model) -> tuple[dict, object]:
        """(the results.json entry, the TaskResult with its routing record) of the task on `model`."""
        # lm-eval draws unlabelled bars (building requests, bootstrapping) on stderr: kept out of the demo's display
        with contextlib.redirect_stderr(io.StringIO()):
            result = evaluate_tasks(model, self.tokenizer, [self.name], self.options, self.manager)[0]
        entry = {"name": result.name, "samples": result.samples, "metrics": result.metrics,
                 "ffn_experts_per_token": result.routing.get("ffn_experts_per_token")}
        return entry, result

    def baseline_entry(self, converted, rule: str, knob: float) -> tuple[dict, object]:
        """The task on the converted model with a training-free rule active on its routers."""
        with variable_k_routing(converted, rule, knob):
            return self.entry(converted)


def headline(entry: dict) -> tuple[str, dict]:
    """(metric name, {"value", "stderr"}) of the entry's headline metric."""
    metrics = entry["metrics"]
    name = next((metric for metric in HEADLINE_METRICS if metric in metrics), next(iter(metrics)))
    return name, metrics[name]


def task_cell(row: dict) -> str:
    """'0.183 ±0.022' for a row with a task entry, '' for one without (calibrated, an older results.json)."""
    if "task" not in row:
        return ""
    _, numbers = headline(row["task"])
    stderr = f" ±{numbers['stderr']:.3f}" if numbers["stderr"] is not None else ""
    return f"{numbers['value']:.3f}{stderr}"


def describe(entry: dict) -> str:
    """One progress line's worth: 'upcycle_stdlib_cloze acc 0.183 ± 0.022 (322 examples, 2.00 FFN ...)'."""
    metric, numbers = headline(entry)
    stderr = f" ± {numbers['stderr']:.3f}" if numbers["stderr"] is not None else ""
    used = entry["ffn_experts_per_token"]
    routing = f", {used:.2f} FFN experts per token on its tokens" if used is not None else ""
    return f"{entry['name']} {metric} {numbers['value']:.3f}{stderr} ({entry['samples']} examples{routing})"


def task_footnote(results: dict) -> str | None:
    """The line under the table that names the task column's task and metric."""
    entry = results["source"].get("task")
    if entry is None:
        return None
    metric, _ = headline(entry)
    return (f"task: {entry['name']}, {metric} on {entry['samples']} examples (± standard error); not run for "
            "calibrated MoE++")
