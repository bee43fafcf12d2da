"""Training checkpoints: everything a killed run needs to continue to the same losses.

RUN_DIR/checkpoints/step-000010/ holds accelerate's state (model weights, optimizer, LR scheduler, RNG states of
every process, and the registered budget controller) plus training_state.json (the step, the world size and the
options that decide the data order). A checkpoint is written into a `.partial` sibling and renamed when complete,
so a run killed while saving leaves the previous checkpoint as the newest; only the newest `keep` are kept. The
`.partial` folder holds an owner marker (process id and start time): the next save removes partial folders whose
owner no longer runs (one line on stderr). A disk that fills up while saving removes the partial folder and stops
with one sentence naming the file; the previous checkpoint stays the newest.
The data order is a pure function of (seed, step) (see data_order.py), so no sampler state is needed.
"""

import json
import logging
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..checkpoint.output_dir import DISK_FULL, claim, disk_full_sentence, release, remove_stale_partials
from ..errors import UpcycleError

PARTIAL = re.compile(r"step-\d+\.partial")


class _TiedWeightsNote(logging.Filter):
    """accelerate logs "Removed shared tensor {'lm_head.weight'} while saving" for tied weights on every save:
    expected (the tie is restored on load), and read by users as a warning about their model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())

STATE_FILE = "training_state.json"
# Options that must match for a resumed run to read the same blocks and build the same trainable set.
RESUME_MUST_MATCH = ("trainable", "seed", "micro_batch_size", "gradient_accumulation_steps", "block_size",
                     "heldout_fraction", "max_tokens", "lora_rank", "target_ffn_per_token")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    complete = [path for path in folder.glob("step-*") if path.is_dir() and (path / STATE_FILE).is_file()
                and not path.name.endswith(".partial")]
    return sorted(complete, key=lambda path: int(path.name.split("-")[1]))


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, world_size: int, options: dict,
                    keep: int) -> Path:
    """Save the full training state after `step` optimizer steps (every process calls this)."""
    final = checkpoints_dir(run_dir) / f"step-{step:06d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        remove_stale_partials(final.parent, PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        claim(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "world_size": world_size,
                     "options": {key: options[key] for key in RESUME_MUST_MATCH}}
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            release(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        if error.errno not in DISK_FULL:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        newest = list_checkpoints(run_dir)
        kept = (f"the newest complete checkpoint {newest[-1].name} is kept (resume with --resume)" if newest
                else "no complete checkpoint was written yet")
        sentence = disk_full_sentence(error, partial, final, kept)
        shutil.rmtree(partial, ignore_errors=True)
        raise UpcycleError(sentence) from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def newest_checkpoint(run_dir: Path, options: dict, world_size: int) -> tuple[Path, int]:
    """The checkpoint to resume from and its step; refuses one that a different setup wrote."""
    found = list_checkpoints(run_dir)
    if not found:
        raise UpcycleError(f"--resume: {checkpoints_dir(run_dir)} holds no complete training checkpoint")
    path = found[-1]
    state = json.loads((path / STATE_FILE).read_text())
    for key, saved in state["options"].items():
        if options.get(key) != saved:
            raise UpcycleError(f"--resume: the checkpoint {path.name} was trained with {key}={saved!r}, "
                               f"this run has {key}={options.get(key)!r}; use the same value")
    if state["world_size"] != world_size:
        raise UpcycleError(f"--resume: the checkpoint {path.name} was written by {state['world_size']} processes, "
                           f"this run has {world_size}; resume with the same number of processes")
    return path, int(state["step"])


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    accelerator.load_state(str(path))
