"""The demo's trained arms, side by side: a budget's trained control and trained MoE++ run the recipe at the same
time, each in its own process with half of the machine's threads.

Why: the demo's model is small, so one training process does not keep two cores busy (measured on 2 CPU cores:
30 steps take 20.5 s with two threads and 28.7 s with one), and the two arms of a budget are independent. Side by
side they finish in about the time one takes alone with a little more, which keeps `upcycle demo` within its ten
minutes. Each arm is the same call of the recipe as `upcycle train` (`run_training`), seeded the same way; a
failed arm stops the demo with its own one-sentence error, and Ctrl-C stops both.
Progress: one bar over both arms' steps, read from their metrics files (RUN_DIR/metrics.jsonl) as they grow.
"""

import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UpcycleError
from .training.metrics import read_metrics
from .training.options import TrainOptions

POLL_SECONDS = 1.0


@dataclass
class TrainJob:
    """One arm: the recipe's options, the seed of LoRA's initialisation, and a name for messages."""

    name: str
    options: TrainOptions
    seed: int


def _train(job: TrainJob, threads: int) -> None:
    """A child process: one arm of the recipe (the user's errors become one line and exit code 1)."""
    from .training.recipe import run_training

    torch.set_num_threads(threads)
    torch.manual_seed(job.seed)  # LoRA's initialisation
    try:
        run_training(job.options, command=f"upcycle demo ({job.name})")
    except UpcycleError as error:
        print(f"error: {job.name}: {error}", file=sys.stderr)
        sys.exit(1)


def _steps_done(job: TrainJob) -> int:
    return sum("step" in record and "event" not in record for record in read_metrics(Path(job.options.run_dir)))


def train_side_by_side(jobs: list[TrainJob], show_progress: bool = True) -> None:
    """Run the jobs at the same time, one process each; returns when all have written their outputs."""
    threads = max(1, torch.get_num_threads() // len(jobs))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or tokenizer threads
    processes = [context.Process(target=_train, args=(job, threads), name=job.name) for job in jobs]
    total = sum(job.options.steps for job in jobs)
    bar = tqdm(total=total, desc=f"train ({' + '.join(job.name for job in jobs)})", unit="step",
               dynamic_ncols=True) if show_progress else None
    try:
        for process in processes:
            process.start()
        while any(process.is_alive() for process in processes):
            time.sleep(POLL_SECONDS)
            if bar is not None:
                bar.update(sum(_steps_done(job) for job in jobs) - bar.n)
    except BaseException:  # Ctrl-C or any failure here: no arm keeps running behind the user's back
        for process in processes:
            process.terminate()
        raise
    finally:
        for process in processes:
            process.join()
        if bar is not None:
            bar.close()
    failed = [(job, process.exitcode) for job, process in zip(jobs, processes) if process.exitcode != 0]
    if failed:
        job, code = failed[0]
        raise UpcycleError(f"training the demo's {job.name} arm failed (exit code {code}); its messages are above "
                           f"and its run folder is {job.options.run_dir}")
