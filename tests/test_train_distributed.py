"""Two CPU processes through `accelerate launch` (gloo): both ranks really train, on different blocks."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.training.metrics import read_metrics

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "continued_training.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_command() -> list[str]:
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if found is None:
        pytest.skip("accelerate's launcher is not installed")
    return [found]


def test_two_cpu_processes_through_accelerate_launch(tmp_path, trained_moepp, text_corpus):
    output = tmp_path / "out"
    command = [*accelerate_command(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(RECIPE), "--model", str(trained_moepp), "--data", str(text_corpus / "train.txt"),
               "--output", str(output), "--steps", "3", "--target-ffn-per-token", "1.5", "--no-progress",
               "block_size=32", "micro_batch_size=2", "max_tokens=8000", "eval_max_blocks=8", "checkpoint_every=2"]
    # Without ACCELERATE_USE_CPU=1, `--multi_gpu` on a machine without GPUs starts two processes that both
    # believe they are rank 0 of 1.
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("trained 3 steps") == 1  # only the main process reports

    records = read_metrics(tmp_path / "out-training")
    start = records[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["distributed_type"] == "MULTI_CPU"
    steps = [record for record in records if "event" not in record]
    assert [record["step"] for record in steps] == [1, 2, 3]
    for record in steps:
        rank0, rank1 = record["blocks_by_process"]
        assert record["world_size"] == 2 and len(rank0) == len(rank1) == 2
        assert not set(rank0) & set(rank1)  # each process trained on its own shard of the blocks
        assert record["tokens"] == 2 * 2 * 32
    # Both processes saved their RNG state in the step-2 checkpoint.
    checkpoint = tmp_path / "out-training" / "checkpoints" / "step-000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    heldout = records[-1]
    assert heldout["event"] == "heldout" and heldout["heldout_tokens"] == 8 * 32
    history = json.loads((output / "upcycle.json").read_text())["history"]
    assert history[-1]["step"] == "train" and history[-1]["world_size"] == 2
    model = load_causal_lm(output)
    biases = torch.stack([block.gate.selection_bias for block in model.moe_blocks()])
    assert torch.isfinite(biases).all()  # the controller switched the zero-computation experts on
    tokens = torch.arange(64).view(2, 32) % model.config.vocab_size
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()
