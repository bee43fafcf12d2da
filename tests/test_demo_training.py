"""upcycle.demo_training: the demo's arms trained side by side, in processes of their own."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from upcycle.demo_training import TrainJob, train_side_by_side
from upcycle.errors import UpcycleError
from upcycle.training.options import TrainOptions
from upcycle.training.recipe import run_training


def small_job(tmp_path, model, corpus, name: str, **overrides) -> TrainJob:
    options = TrainOptions(model=str(model), data=str(corpus / "train.txt"), output=str(tmp_path / name),
                           run_dir=str(tmp_path / "runs" / name), steps=2, block_size=32, micro_batch_size=2,
                           max_tokens=4_000, eval_max_blocks=2, target_ffn_per_token=1.5, checkpoint_every=0,
                           progress=False, tensorboard=False, **overrides)
    return TrainJob(name, options, seed=3)


def weights(folder) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found |= load_file(str(shard))
    return found


def test_side_by_side_trains_what_one_process_trains(tmp_path, trained_moepp, text_corpus):
    """Each arm's checkpoint equals the same recipe run in this process with the same threads and seed."""
    jobs = [small_job(tmp_path, trained_moepp, text_corpus, "moepp"),
            small_job(tmp_path, trained_moepp, text_corpus, "control", routing_rule="dynamic_skipping")]
    train_side_by_side(jobs, show_progress=False)
    threads = torch.get_num_threads()
    alone = dataclasses.replace(jobs[0].options, output=str(tmp_path / "alone"), run_dir=str(tmp_path / "runs/alone"))
    try:
        torch.set_num_threads(max(1, threads // 2))
        torch.manual_seed(3)
        run_training(alone)
    finally:
        torch.set_num_threads(threads)
    side, single = weights(tmp_path / "moepp"), weights(tmp_path / "alone")
    assert side.keys() == single.keys()
    for key in side:
        assert torch.equal(side[key], single[key]), key
    assert (tmp_path / "control" / "config.json").is_file()


def test_a_failed_arm_is_one_sentence_naming_it(tmp_path, trained_moepp, text_corpus, capfd):
    jobs = [small_job(tmp_path, trained_moepp, text_corpus, "moepp"),
            small_job(tmp_path, tmp_path / "missing", text_corpus, "control")]
    with pytest.raises(UpcycleError, match="training the demo's control arm failed"):
        train_side_by_side(jobs, show_progress=False)
    assert "error: control: " in capfd.readouterr().err
