"""Faults leave nothing behind and say one sentence (issue 15).

Hard kills (SIGKILL) at several points of a convert and of a training checkpoint write, then the next run; a full
disk during convert and during a training checkpoint (a patched write that raises ENOSPC: no root, no tmpfs);
Ctrl-C (SIGINT) during calibrate. Killed runs are real processes: a small prelude patches one function of the
installed package to touch a flag file and sleep at the chosen point, the test waits for the flag and kills the
process; the next run is the installed `upcycle` command.
"""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import folder_digest, save_source, tiny_mixtral

from upcycle.checkpoint import output_dir, safetensors_writer
from upcycle.checkpoint.output_dir import OWNER_FILE, owner_record, process_start_time, remove_stale_partials
from upcycle.training.metrics import read_metrics

UPCYCLE = str(Path(sys.executable).parent / "upcycle")
INTERRUPTED = "interrupted; nothing partial was left behind"
# Run the entry point with one function paused (before or after its n-th call): touch FLAG, then sleep until killed.
PRELUDE = """
import faulthandler, importlib, signal, sys, time
from pathlib import Path
faulthandler.register(signal.SIGUSR1)  # a stuck run prints where it is (stop_at, on timeout)
# Ctrl-C as in a terminal, even when these tests run in a background job of a script, whose shell starts them with
# SIGINT ignored (a Python started that way never installs its KeyboardInterrupt handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
target, when, nth, flag, *argv = sys.argv[1:]
module_name, _, attribute = target.partition(":")
owner = importlib.import_module(module_name)
*parents, name = attribute.split(".")
for part in parents:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def paused(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == int(nth):
        Path(flag).touch(); time.sleep(600)
    result = real(*args, **kwargs)
    if when == "after" and calls[0] == int(nth):
        Path(flag).touch(); time.sleep(600)
    return result
setattr(owner, name, paused)
sys.argv = ["upcycle", *argv]
from upcycle.cli import main
main()
"""
TRAIN_ARGS = ("--steps", "6", "--no-progress", "--target-ffn-per-token", "1.5", "block_size=32", "max_tokens=8000",
              "checkpoint_every=2", "eval_max_blocks=4", "tensorboard=false")
COMPARED = ("loss", "lm_loss", "balance_loss", "ffn_experts_per_token", "selection_bias", "grad_norm")


def stop_at(tmp_path: Path, target: str, when: str, nth: int, args: list, sig=signal.SIGKILL,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Start `upcycle ARGS` with `target` paused at its nth call, send `sig` once it pauses, return the result."""
    flag = tmp_path / f"paused-{time.monotonic_ns()}"
    process = subprocess.Popen([sys.executable, "-c", PRELUDE, target, when, str(nth), str(flag), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"{target} was never reached (exit {process.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    process.send_signal(sig)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where it hangs, every thread, instead of only that it did
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{target}: still running 120 s after signal {sig!r}; its stacks: {err[-6000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def upcycle(*args) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it."""
    return subprocess.run([UPCYCLE, *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=300)


def partials(folder: Path) -> list[str]:
    return sorted(path.name for path in Path(folder).iterdir() if "upcycle-partial" in path.name
                  or path.name.endswith(".partial"))


def assert_one_sentence(stderr: str, *needles: str) -> str:
    """No traceback, and the last line is the one sentence; returns it."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "BufferError" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, stderr)
    return last


def step_records(run_dir: Path) -> dict[int, dict]:
    return {record["step"]: record for record in read_metrics(run_dir) if "event" not in record}


# ---------------------------------------------------------------- convert


@pytest.fixture
def sharded_source(tmp_path) -> Path:
    return save_source(tiny_mixtral(), tmp_path / "sharded", "per-expert", sharded=True)


@pytest.mark.parametrize("target, when, nth", [
    ("upcycle.surgery.convert:write_shards", "before", 1),  # the partial folder exists, nothing in it yet
    ("upcycle.surgery.convert:copy_with_sha256", "after", 2),  # some shards written
    ("upcycle.surgery.convert:write_model_card", "before", 1),  # everything but the card
])
def test_convert_killed_leaves_a_partial_that_the_next_run_removes(tmp_path, sharded_source, target, when, nth):
    before = folder_digest(sharded_source)
    output = tmp_path / "out"
    killed = stop_at(tmp_path, target, when, nth, ["convert", sharded_source, output, "--link", "copy"])
    assert killed.returncode == -signal.SIGKILL
    [left] = partials(tmp_path)
    assert left.startswith(".out.upcycle-partial-")
    assert (tmp_path / left / OWNER_FILE).is_file() and not output.exists()

    again = upcycle("convert", sharded_source, output, "--link", "copy")
    assert again.returncode == 0, again.stderr
    [line] = again.stderr.strip().splitlines()
    assert line.startswith(f"upcycle: removed {tmp_path / left} (") and "which no longer runs" in line, line
    assert partials(tmp_path) == []
    assert not (output / OWNER_FILE).exists() and (output / "README.md").is_file()
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert all((output / name).is_file() for name in set(index["weight_map"].values()))
    assert folder_digest(sharded_source) == before


def test_a_partial_whose_owner_runs_is_never_touched(tmp_path, sharded_source):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = tmp_path / f".other.upcycle-partial-{owner.pid}"
        live.mkdir()
        marker = owner_record() | {"pid": owner.pid, "start_time": process_start_time(owner.pid)}
        (live / OWNER_FILE).write_text(json.dumps(marker))
        (live / "model-00001-of-00002.safetensors").write_bytes(b"half")
        result = upcycle("convert", sharded_source, tmp_path / "out")
        assert result.returncode == 0 and "removed" not in result.stderr, result.stderr
        assert (live / "model-00001-of-00002.safetensors").read_bytes() == b"half"
        # The same pid with another start time is a reused pid: its writer is gone.
        (live / OWNER_FILE).write_text(json.dumps(marker | {"start_time": (marker["start_time"] or 0) + 1}))
        if marker["start_time"] is not None:
            assert remove_stale_partials(tmp_path) == [live] and not live.exists()
        # Another host's partial cannot be checked from here: left alone.
        live.mkdir(exist_ok=True)
        (live / OWNER_FILE).write_text(json.dumps(marker | {"host": "elsewhere", "pid": 2**22 + 1}))
        assert remove_stale_partials(tmp_path) == [] and live.exists()
    finally:
        owner.kill()
        owner.wait()


class TinyDisk:
    """`open` for the writers of output_dir and safetensors_writer: files whose writes fail with ENOSPC once
    `capacity` bytes are written in all (as a real full disk does: write() says no file name)."""

    def __init__(self, capacity: int):
        self.capacity, self.written = capacity, 0

    def open(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 (returned, closed by the caller)
        if "w" not in mode:
            return handle
        disk = self

        class Full:
            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data):
                size = memoryview(data).nbytes
                if disk.written + size > disk.capacity:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.written += size
                return handle.write(data)

        return Full()


@pytest.mark.parametrize("capacity", ["first shard", "new tensors"])
def test_disk_full_during_convert_is_one_sentence(capsys, tmp_path, sharded_source, monkeypatch, capacity):
    shards = sorted(sharded_source.glob("*.safetensors"))
    size = 1000 if capacity == "first shard" else sum(path.stat().st_size for path in shards) + 16
    disk = TinyDisk(size)
    monkeypatch.setattr(output_dir, "open", disk.open, raising=False)
    monkeypatch.setattr(safetensors_writer, "open", disk.open, raising=False)
    before = folder_digest(sharded_source)
    output = tmp_path / "out"
    capsys.readouterr()  # the fixture's progress output
    result = run_cli(capsys, "convert", sharded_source, output, "--link", "copy")
    assert result.exit_code == 1
    line = assert_one_sentence(result.stderr, f"the disk holding {tmp_path} is full (No space left on device)",
                               f"while writing {output}/model-", "nothing was written")
    assert result.stderr.strip() == line
    if capacity == "new tensors":  # the shard of the MoE++ tensors comes after the source's shards
        assert line.split("while writing ")[1].startswith(f"{output}/model-{len(shards) + 1:05d}-of-"), line
    assert not output.exists() and partials(tmp_path) == []
    assert folder_digest(sharded_source) == before


def test_pickle_with_objects_other_than_tensors_says_what_was_refused(capsys, tmp_path, per_expert_source):
    source = tmp_path / "bin-source"
    source.mkdir()
    shutil.copyfile(per_expert_source / "config.json", source / "config.json")
    with open(source / "pytorch_model.bin", "wb") as handle:  # a plain pickle (protocol 4) of non-tensors
        pickle.dump({"model.embed_tokens.weight": [1.0, 2.0], "note": {"step": 3}}, handle, protocol=4)
    capsys.readouterr()
    result = run_cli(capsys, "convert", source, tmp_path / "out")
    assert result.exit_code == 1
    line = assert_one_sentence(result.stderr, "pytorch_model.bin was refused",
                               "objects other than tensors", "weights_only=True")
    assert result.stderr.strip() == line and not (tmp_path / "out").exists()


def test_what_push_publishes_names_no_local_path(capsys, tmp_path, per_expert_source):
    source = tmp_path / "private" / "models" / "my-mixtral"
    shutil.copytree(per_expert_source, source)
    output = tmp_path / "moepp"
    capsys.readouterr()
    assert run_cli(capsys, "convert", source.resolve(), output).exit_code == 0
    record = json.loads((output / "upcycle.json").read_text())
    card = (output / "README.md").read_text()
    for text in (json.dumps(record), card):
        assert str(tmp_path) not in text and "private" not in text
    assert record["source"] == "my-mixtral" and record["source_kind"] == "local folder"
    assert len(record["source_config_sha256"]) == 64
    assert f"the local folder `my-mixtral` (its config.json has sha256 `{record['source_config_sha256'][:16]}`)" in card
    assert record["history"][0]["command"].startswith("upcycle convert my-mixtral ")


# ---------------------------------------------------------------- calibrate


def test_ctrl_c_during_calibrate_leaves_nothing(tmp_path, trained_moepp, text_corpus):
    before = folder_digest(trained_moepp)
    output = tmp_path / "calibrated"
    args = ["calibrate", trained_moepp, "--data", text_corpus / "train.txt", "--output", output,
            "--target-ffn-per-token", "1.5", "--block-size", "32", "--max-tokens", "6000", "--batches", "2"]
    stopped = stop_at(tmp_path, "upcycle.budget.calibrate:write_calibrated_checkpoint", "before", 1, args,
                      sig=signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert assert_one_sentence(stopped.stderr).startswith(INTERRUPTED)
    assert not output.exists() and partials(tmp_path) == []
    assert folder_digest(trained_moepp) == before


# ---------------------------------------------------------------- train


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, trained_moepp, text_corpus) -> dict[int, dict]:
    """Step records of a run that nothing stopped: what every resumed run must reproduce."""
    import contextlib
    import io

    from upcycle.cli import main

    folder = tmp_path_factory.mktemp("uninterrupted")
    argv = ["upcycle", "train", "--model", str(trained_moepp), "--data", str(text_corpus / "train.txt"), "--output",
            str(folder / "out"), *TRAIN_ARGS]
    old_argv, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err, \
                pytest.raises(SystemExit) as ex:
            main()
            sys.exit(0)
    finally:
        sys.argv = old_argv
    assert ex.value.code in (0, None), err.getvalue()
    assert "Removed shared tensor" not in err.getvalue()
    return step_records(folder / "out-training")


def assert_same_losses(run_dir: Path, uninterrupted: dict[int, dict]) -> None:
    got = step_records(run_dir)
    assert sorted(got) == sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    for step, record in got.items():
        for key in COMPARED:
            assert record[key] == uninterrupted[step][key], (step, key)


def train_args(model, corpus, output) -> list:
    return ["train", "--model", model, "--data", corpus / "train.txt", "--output", output, *TRAIN_ARGS]


def test_disk_full_during_a_training_checkpoint_keeps_the_last_one(capsys, tmp_path, trained_moepp, text_corpus,
                                                                  monkeypatch, uninterrupted):
    from accelerate import Accelerator

    real_save, calls = Accelerator.save_state, []

    def full_at_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = real_save(self, output_dir, **kwargs)
        if len(calls) == 2:  # the files are there (the disk filled while the last was written)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return result

    monkeypatch.setattr(Accelerator, "save_state", full_at_second_save)
    output = tmp_path / "out"
    capsys.readouterr()
    result = run_cli(capsys, *train_args(trained_moepp, text_corpus, output))
    assert result.exit_code == 1
    run_dir = tmp_path / "out-training"
    line = assert_one_sentence(result.stderr, f"the disk holding {run_dir / 'checkpoints'} is full",
                               "while writing ", "step-000004/", "the newest complete checkpoint step-000002 is kept")
    assert result.stderr.strip() == line
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    assert not output.exists() and partials(tmp_path) == []

    monkeypatch.setattr(Accelerator, "save_state", real_save)
    resumed = run_cli(capsys, *train_args(trained_moepp, text_corpus, output), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "Removed shared tensor" not in resumed.stderr
    assert_same_losses(run_dir, uninterrupted)


@pytest.mark.slow
def test_train_killed_while_writing_a_checkpoint_resumes_to_the_same_losses(tmp_path, trained_moepp, text_corpus,
                                                                             uninterrupted):
    output = tmp_path / "out"
    args = train_args(trained_moepp, text_corpus, output)
    killed = stop_at(tmp_path, "accelerate:Accelerator.save_state", "after", 2, args)  # step 4's, unfinished
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "out-training" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000002", "step-000004.partial"]

    resumed = upcycle(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"upcycle: removed {checkpoints / 'step-000004.partial'} (" in resumed.stderr
    assert "Removed shared tensor" not in resumed.stderr and "Traceback" not in resumed.stderr
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000002", "step-000004"]
    assert output.is_dir() and partials(tmp_path) == [] and partials(checkpoints) == []
    assert_same_losses(tmp_path / "out-training", uninterrupted)


@pytest.mark.slow
def test_train_killed_while_writing_its_output_leaves_the_checkpoints(tmp_path, trained_moepp, text_corpus):
    output = tmp_path / "out"
    args = train_args(trained_moepp, text_corpus, output)
    killed = stop_at(tmp_path, "upcycle.training.output:write_provenance", "before", 1, args)
    assert killed.returncode == -signal.SIGKILL
    [left] = partials(tmp_path)
    assert not output.exists()
    resumed = upcycle(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"upcycle: removed {tmp_path / left} (" in resumed.stderr
    assert output.is_dir() and partials(tmp_path) == []
