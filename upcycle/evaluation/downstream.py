"""Downstream tasks through lm-evaluation-harness, with the routing each task caused, for MoE++ and source models.

`evaluate_tasks(model, tokenizer, tasks, options)` runs each task on its own through lm-eval's Python API (its
HFLM wrapper around the in-memory model, its task registry, its metrics and standard errors) inside a fresh
`record_routing` context, so the routing statistics of a task are those of exactly the tokens the task fed the
model: FFN experts per token (overall and per MoE layer), the share of each zero-computation type, and the share
of (token, layer) pairs that used 0..k FFN experts, counted from the model's own routers (routing_record.py).

Two things make lm-eval's forwards countable as tokens: `MaskedHFLM` (`_masked_hflm_class`) passes the attention
mask of lm-eval's right-padded loglikelihood batches (lm-eval passes none; a causal model computes the same logits
for the real positions either way), so padding is not counted; and batch-size auto-detection (extra forwards) is
not offered.

Tasks are found in lm-eval's registry plus `--include-path` folders plus the shipped local tasks
(local_tasks.py), which are built on first use, so `--tasks upcycle_stdlib_module,upcycle_stdlib_cloze` needs
neither a network nor a task folder. A Hub task needs its dataset online or in the Hugging Face cache.
"""

import contextlib
import difflib
import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UpcycleError
from .local_tasks import LOCAL_TASKS, cached_local_tasks
from .routing_record import RoutingRecord, record_routing

BOOTSTRAP_ITERS = 1000  # resamples for the standard error of non-mean metrics (perplexity); lm-eval's default 1e5
SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}  # lm-eval's simple_evaluate defaults
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class TaskOptions:
    """Options of `upcycle eval --tasks` (and `upcycle analyze --tasks`)."""

    limit: float | None = None  # examples per task: a count (>= 1) or a fraction (< 1); None: all
    batch_size: int = 8  # sequences per forward pass
    include_path: list[Path] = field(default_factory=list)  # folders of task YAML files of one's own
    num_fewshot: int | None = None  # None: each task's own default (0 when it sets none)
    keep_tokens: bool = False  # keep every token's routing in TaskResult.record (for per-token analyses)
    bootstrap_iters: int = BOOTSTRAP_ITERS
    device: str = "cpu"  # where the checkpoint is loaded (evaluate_checkpoint_tasks)
    dtype: str = "float32"  # float32, bfloat16 or float16 (evaluate_checkpoint_tasks)

    def validate(self) -> None:
        """Refuse bad values in one sentence, before any model or task is loaded."""
        if self.limit is not None and not self.limit > 0:
            raise UpcycleError(f"--limit must be a positive number of examples (or a fraction below 1), got "
                               f"{self.limit:g}")
        if self.limit is not None and self.limit >= 1 and self.limit != int(self.limit):
            raise UpcycleError(f"--limit must be a whole number of examples or a fraction below 1, got {self.limit:g}")
        if self.batch_size < 1:
            raise UpcycleError("--batch-size must be at least 1")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UpcycleError("--num-fewshot must be 0 or more")
        if self.dtype not in DTYPES:
            raise UpcycleError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        for folder in self.include_path:
            if not Path(folder).is_dir():
                raise UpcycleError(f"--include-path {folder} is not a folder")
            if not any(Path(folder).rglob("*.yaml")):
                raise UpcycleError(f"--include-path {folder} holds no task YAML files")
        _check_device(self.device)

    @property
    def lm_eval_limit(self) -> int | float | None:
        return int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit


@dataclass
class TaskResult:
    """One task: its metrics, the examples evaluated, and the routing of every token it fed the model."""

    name: str
    metrics: dict[str, dict]  # metric -> {"value": float, "stderr": float | None}; "metric,filter" unless "none"
    samples: int  # examples evaluated
    routing: dict  # RoutingRecord.summary() of this task's tokens (None numbers for a model without routers)
    record: RoutingRecord | None = field(default=None, repr=False)  # None for a model without MoE routers

    def as_dict(self) -> dict:
        return {"name": self.name, "samples": self.samples, "metrics": self.metrics, "routing": self.routing}


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        raise UpcycleError(f"--device {device!r} is not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise UpcycleError(f"--device {device}: CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UpcycleError(f"--device {device}: MPS is not available on this machine")


def quiet_lm_eval() -> None:
    """Keep lm-eval's and datasets' log lines and progress bars out of a command's output."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def task_manager(names: list[str], include_path: list[Path]):
    """An lm-eval TaskManager that knows every name, or one sentence naming the first unknown one.

    Indexing lm-eval's ~15k built-in tasks costs seconds, so the local folders are tried alone first.
    """
    from lm_eval.tasks import TaskManager

    if not names:
        raise UpcycleError("--tasks names no task")
    folders = [str(folder) for folder in include_path]
    if any(name in LOCAL_TASKS for name in names):
        folders.insert(0, str(cached_local_tasks()))
    if folders:
        manager = TaskManager(include_path=folders, include_defaults=False)
        if all(name in manager.all_tasks for name in names):
            return manager
    manager = TaskManager(include_path=folders or None)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UpcycleError(f"unknown task {name!r} (not in lm-eval's registry, the local tasks "
                               f"{', '.join(LOCAL_TASKS)} or --include-path){hint}")
    return manager


def _load_task(manager, name: str) -> dict:
    """lm-eval's {"tasks": {leaf: Task}, "groups": ...} for one name; its dataset read here (the Hub for a Hub
    task), so a missing dataset is one sentence."""
    try:
        return manager.load([name])
    except ConnectionError as error:
        raise UpcycleError(f"cannot load task {name!r}: its dataset is not in the Hugging Face cache and the Hub "
                           f"cannot be reached ({_first_line(error)})") from error
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as error:
        raise UpcycleError(f"cannot load task {name!r}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _masked_hflm_class():
    """HFLM whose right-padded loglikelihood batches carry their attention mask (see the module docstring)."""
    import lm_eval.models.huggingface as hf_module
    from lm_eval.models.huggingface import HFLM

    class MaskedHFLM(HFLM):
        _row_lengths: torch.Tensor | None = None  # (B,) real length of each row of the batch about to run

        @contextlib.contextmanager
        def _recording_row_lengths(self) -> Iterator[None]:
            """Read the row lengths off lm-eval's own padding call (the only place they exist)."""
            original = hf_module.pad_and_concat

            def pad_and_concat(max_length, tensors, padding_side="right"):
                self._row_lengths = torch.tensor([tensor.reshape(-1).shape[0] for tensor in tensors])
                return original(max_length, tensors, padding_side=padding_side)

            hf_module.pad_and_concat = pad_and_concat
            try:
                yield
            finally:
                hf_module.pad_and_concat = original
                self._row_lengths = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            with self._recording_row_lengths():
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
            lengths = self._row_lengths
            if attn_mask is not None or lengths is None:
                return super()._model_call(inps, attn_mask, labels)
            if lengths.shape[0] != inps.shape[0] or int(lengths.max()) != inps.shape[1]:
                raise UpcycleError("this lm-eval version batches requests in a way upcycle cannot read the padding "
                                   "of; install lm-eval 0.4.13 to 0.4.x")
            mask = torch.arange(inps.shape[1]) < lengths[:, None]  # (B, S) True on real tokens
            with torch.no_grad():
                return self.model(inps, attention_mask=mask.long().to(inps.device)).logits

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return MaskedHFLM


def _metrics(results: dict) -> dict[str, dict]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, ...} -> {"acc": {"value": v, "stderr": s}, ...}."""
    metrics = {}
    for key, value in results.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr"):
            continue
        stderr = results.get(f"{metric}_stderr,{filter_name}")
        name = metric if filter_name == "none" else f"{metric},{filter_name}"
        metrics[name] = {"value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return metrics


def _seed(task) -> None:
    import numpy

    random.seed(SEEDS["random"])
    numpy.random.seed(SEEDS["numpy"])
    torch.manual_seed(SEEDS["torch"])
    task.set_fewshot_seed(seed=SEEDS["fewshot"])


def _prepare(task, num_fewshot: int | None) -> None:
    """lm-eval's simple_evaluate rules: --num-fewshot overrides a task's default unless the task fixes 0."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    _seed(task)


@torch.no_grad()
def evaluate_tasks(model, tokenizer, tasks: list[str], options: TaskOptions | None = None,
                   manager=None) -> list[TaskResult]:
    """Run each task (a group runs as its tasks, each on its own) and record the routing of its tokens.

    `manager`: a `task_manager(tasks, options.include_path)` already built (it costs seconds), else one is built.
    """
    from lm_eval.evaluator import evaluate

    options = options or TaskOptions()
    options.validate()
    manager = manager or task_manager(tasks, options.include_path)
    loaded = {name: _load_task(manager, name) for name in tasks}  # every dataset before the first forward
    lm = _masked_hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size,
                              backend="causal")
    was_training = model.training
    model.eval()
    results = []
    try:
        for name in tasks:
            for leaf, task in loaded[name]["tasks"].items():
                _prepare(task, options.num_fewshot)
                # lm-eval print()s progress (bootstrapping) to stdout, where `--json` output goes: kept out
                with _routing(model, options.keep_tokens) as record, contextlib.redirect_stdout(io.StringIO()):
                    output = evaluate(lm=lm, task_dict={"tasks": {leaf: task}, "groups": {}},
                                      limit=options.lm_eval_limit, bootstrap_iters=options.bootstrap_iters,
                                      log_samples=False)
                samples = output["n-samples"][leaf]["effective"]
                routing = record.summary() if record is not None else {"tokens": 0}
                results.append(TaskResult(leaf, _metrics(output["results"][leaf]), samples, routing, record))
    finally:
        model.train(was_training)
    return results


@contextlib.contextmanager
def _routing(model, keep_tokens: bool) -> Iterator[RoutingRecord | None]:
    """A fresh RoutingRecord, or None for a model without MoE routers (its tasks still run)."""
    from .routing_record import find_routers

    if not find_routers(model):
        yield None
        return
    with record_routing(model, keep_tokens=keep_tokens) as record:
        yield record


def evaluate_checkpoint_tasks(checkpoint: Path, tasks: list[str], options: TaskOptions | None = None,
                              manager=None) -> list[TaskResult]:
    """Load CHECKPOINT (MoE++ or source) with its tokenizer on options.device in options.dtype; run the tasks."""
    from ..checkpoint.loading import load_causal_lm
    from ..data.blocks import load_checkpoint_tokenizer

    options = options or TaskOptions()
    options.validate()
    manager = manager or task_manager(tasks, options.include_path)  # unknown names: refused before loading
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    model = load_causal_lm(Path(checkpoint)).to(device=options.device, dtype=DTYPES[options.dtype])
    return evaluate_tasks(model, tokenizer, tasks, options, manager)


def format_task_results(results: list[TaskResult]) -> str:
    """A table: one row per task and metric (value ± standard error), then the task's routing."""
    lines = [f"{'task':<28} {'metric':<12} {'value':>9} {'± stderr':>9}  {'examples':>8}"]
    for result in results:
        for position, (metric, numbers) in enumerate(result.metrics.items()):
            stderr = f"{numbers['stderr']:.4f}" if numbers["stderr"] is not None else "n/a"
            task, samples = (result.name, str(result.samples)) if position == 0 else ("", "")
            lines.append(f"{task:<28} {metric:<12} {numbers['value']:>9.4f} {stderr:>9}  {samples:>8}")
    lines.append("")
    lines.append("routing of each task's tokens: FFN experts per token (overall; per MoE layer), share of the k slots "
                 "that went to zero / copy / constant experts")
    for result in results:
        routing = result.routing
        if not routing.get("tokens"):
            lines.append(f"{result.name:<28} no routing recorded (not an MoE model, or no tokens)")
            continue
        per_layer = " ".join(f"{value:.2f}" for value in routing["ffn_experts_per_token_per_layer"])
        shares = " / ".join(f"{share:.3f}" for share in routing["zero_computation_share"].values())
        lines.append(f"{result.name:<28} {routing['ffn_experts_per_token']:.3f} ({per_layer}); {shares}; "
                     f"{routing['tokens']:,} tokens")
    return "\n".join(lines)
