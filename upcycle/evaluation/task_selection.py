"""What the commands that run downstream tasks (`eval --tasks`, `analyze --tasks`) do before anything heavy loads:
read the task names, and keep lm-eval's output off the terminal.

Torch-free on purpose: tqdm reads TQDM_DISABLE once, when it is first imported (torch imports it), so the commands
call `quiet_task_output` before importing upcycle.evaluation.downstream.
"""

import os

from ..errors import UpcycleError


def task_names(text: str | None) -> list[str]:
    """`--tasks a,b` -> ["a", "b"]; [] when the flag was not given; one sentence for a flag with no name."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if text is not None and not names:
        raise UpcycleError(f"--tasks takes task names separated by commas, got {text!r}")
    return names


def quiet_task_output() -> None:
    """No lm-eval progress bars (TQDM_DISABLE, unless the user set it) and no lm-eval or datasets log lines."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from .downstream import quiet_lm_eval

    quiet_lm_eval()
