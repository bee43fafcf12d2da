"""What `upcycle eval` runs: perplexity and routing on held-out text (`--data`), downstream tasks (`--tasks`), or
both, merged into one JSON object and one text report.

`EvalRequest` holds every option of the command; `validate()` refuses a bad combination in one sentence before
anything loads, and `run_eval(request)` runs the parts: the tasks' options and names are checked (an unknown task
is refused) before the perplexity part spends minutes, then perplexity, then the tasks.
"""

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UpcycleError
from .task_selection import quiet_task_output, task_names


@dataclass(kw_only=True)
class EvalRequest:
    """Options of `upcycle eval` (the command's flags, by field name)."""

    checkpoint: Path
    data: str | None = None  # held-out text for perplexity; None: tasks only
    data_settings: dict = field(default_factory=dict)  # DataOptions fields and batch_size, as the command takes them
    source: Path | None = None  # adds KL(source || model) and the paired perplexity ratio
    max_blocks: int | None = None
    plots_dir: Path | None = None
    baseline: str | None = None  # a training-free rule evaluated at target_ffn_per_token
    target_ffn_per_token: float | None = None
    fit_blocks: int = 32
    tasks: str | None = None  # comma-separated lm-evaluation-harness task names, as given
    include_path: list[Path] = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def task_names(self) -> list[str]:
        return task_names(self.tasks)

    def validate(self) -> None:
        """Refuse, in one sentence, options that contradict each other or belong to a part that does not run."""
        names = self.task_names
        if self.data is None and not names:
            raise UpcycleError("eval needs --data (perplexity on held-out text), --tasks (downstream tasks) or both")
        perplexity_only = {"--source": self.source, "--max-blocks": self.max_blocks, "--plots": self.plots_dir,
                           "--baseline": self.baseline, "--target-ffn-per-token": self.target_ffn_per_token}
        task_only = {"--include-path": self.include_path or None, "--limit": self.limit,
                     "--num-fewshot": self.num_fewshot, "--device": None if self.device == "cpu" else self.device,
                     "--dtype": None if self.dtype == "float32" else self.dtype}
        for flags, needed, given_part in ((perplexity_only, "--data", self.data), (task_only, "--tasks", names)):
            given = [flag for flag, value in flags.items() if value is not None]
            if given and not given_part:
                raise UpcycleError(f"{given[0]} applies to {needed}; pass {needed} too")
        if self.baseline is not None and self.plots_dir is not None:
            raise UpcycleError("--plots draws the model's own per-layer routing; drop it with --baseline")


def run_eval(request: EvalRequest) -> tuple[dict, str]:
    """(one JSON-ready object, the text report) of the parts the request asks for."""
    request.validate()
    names = request.task_names
    task_options = manager = None
    if names:
        quiet_task_output()
        from .downstream import TaskOptions, task_manager

        task_options = TaskOptions(limit=request.limit, batch_size=request.data_settings.get("batch_size", 8),
                                   include_path=list(request.include_path), num_fewshot=request.num_fewshot,
                                   device=request.device, dtype=request.dtype)
        task_options.validate()  # bad options and unknown tasks are refused before the perplexity part runs
        manager = task_manager(names, task_options.include_path)
    result, text = {}, []
    if request.data is not None:
        _perplexity_part(request, result, text)
    if names:
        from .downstream import evaluate_checkpoint_tasks, format_task_results

        task_results = evaluate_checkpoint_tasks(request.checkpoint, names, task_options, manager)
        result["tasks"] = [task_result.as_dict() for task_result in task_results]
        text.append(format_task_results(task_results))
    return result, "\n\n".join(text)


def _perplexity_part(request: EvalRequest, result: dict, text: list[str]) -> None:
    """Perplexity and routing on --data (or a baseline's), and the plots; added to `result` and `text`."""
    from .evaluate import EvalOptions, evaluate_checkpoint, format_report

    options = EvalOptions(max_blocks=request.max_blocks, baseline=request.baseline,
                          target_ffn_per_token=request.target_ffn_per_token, fit_blocks=request.fit_blocks,
                          **request.data_settings)
    report = evaluate_checkpoint(request.checkpoint, request.data, request.source, options)
    result |= report.as_dict()
    text.append(format_report(report))
    if request.plots_dir is not None:
        from .plots import write_eval_plots

        result["plots"] = [str(path) for path in write_eval_plots(result, request.plots_dir)]
        text.append(f"plots: {', '.join(result['plots'])}")
