"""Training metrics: one JSON object per line in RUN_DIR/metrics.jsonl, TensorBoard scalars when installed, and a
progress bar with the loss, FFN experts per token and tokens/s. Only the main process writes.
"""

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": valid JSON, still readable
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics file (for tests, benchmarks and resumed runs)."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class MetricsLog:
    """JSONL (+ TensorBoard) writer and progress bar; a no-op on processes other than the main one."""

    def __init__(self, run_dir: Path, total_steps: int, first_step: int, is_main: bool, progress: bool,
                 tensorboard: bool):
        self.is_main = is_main
        self.file = None
        self.tensorboard = None
        self.bar = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 (open for the whole run, closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self.tensorboard = None
        if progress:
            self.bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True)

    def event(self, record: dict) -> None:
        """A record that is not a training step (start, resume, held-out evaluation, stop)."""
        if self.file is not None:
            self.file.write(json.dumps(_json_safe(record)) + "\n")
            self.file.flush()

    def step(self, record: dict) -> None:
        """A training step's record: to the file, TensorBoard and the progress bar."""
        if not self.is_main:
            return
        self.event(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", ffn_per_token=f"{record['ffn_experts_per_token']:.2f}",
                                 tokens_per_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.file is not None:
            self.file.close()
