"""Downstream tasks through lm-evaluation-harness: `upcycle eval --tasks`, the local tasks, the routing of each
task's tokens against a direct count, `lm_eval` itself on our checkpoints, and one sentence for every bad input.

No test reaches the network: the local tasks are built from the standard library, and every run here is offline
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, in this process and in the subprocesses).
"""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from upcycle.budget.calibrate import calibrate_model
from upcycle.checkpoint.loading import load_causal_lm
from upcycle.data.blocks import load_checkpoint_tokenizer, load_token_blocks
from upcycle.data.corpus import demo_part
from upcycle.errors import UpcycleError
from upcycle.evaluation.downstream import TaskOptions, evaluate_tasks
from upcycle.evaluation.local_tasks import (
    CLOZE_TASK,
    LOCAL_TASKS,
    MASK,
    MAX_CONTEXT_CHARS,
    MIN_CONTEXT_CHARS,
    MODULE_TASK,
    write_local_tasks,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LIMIT = 6


@pytest.fixture(autouse=True)
def offline(monkeypatch, task_cache):
    """No network, the shipped tasks cached in a session folder, lm-eval's progress bars off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("UPCYCLE_CACHE", str(task_cache))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def task_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("upcycle-cache")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks") / "local"
    assert write_local_tasks(folder) == [MODULE_TASK, CLOZE_TASK]
    return folder


def _subprocess_env(tmp_path: Path) -> dict:
    return {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "UPCYCLE_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _items(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def test_local_tasks_are_held_out_and_deterministic(task_folder, tmp_path):
    again = tmp_path / "again"
    write_local_tasks(again)
    for task in LOCAL_TASKS:
        assert (again / f"{task}.jsonl").read_bytes() == (task_folder / f"{task}.jsonl").read_bytes()
        assert str(again / f"{task}.jsonl") in (again / f"{task}.yaml").read_text()
    modules = _items(task_folder, MODULE_TASK)
    assert len(modules) >= 50
    for item in modules:  # 4 distinct held-out modules, the answer's own name masked in its excerpt
        assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
        assert all(demo_part(f"module:{name}") == "heldout" for name in item["choices"])
        answer = item["choices"][item["gold"]]
        assert f" {answer} " not in f" {item['docstring']} " or MASK in item["docstring"]
    assert {item["gold"] for item in modules} == {0, 1, 2, 3}
    cloze = _items(task_folder, CLOZE_TASK)
    assert len(cloze) >= 200
    for item in cloze:  # LAMBADA's rule: the target word occurs earlier in its passage of a few hundred characters
        assert re.fullmatch(r"[A-Za-z_]\w{2,}", item["target"]) and item["separator"] in ("", " ")
        assert re.search(rf"(?<!\w){item['target']}(?!\w)", item["context"])
        assert MIN_CONTEXT_CHARS <= len(item["context"] + item["separator"]) <= MAX_CONTEXT_CHARS
        assert not item["context"][-1].isspace() and (item["separator"] or not re.match(r"\w", item["context"][-1]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UpcycleError, match="holds other files"):
        write_local_tasks(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def calibrated(trained_moepp, text_corpus, text_tokenizer):
    """The tiny trained MoE++ model calibrated to 1.5 FFN experts per token: every expert type in use."""
    model = load_causal_lm(trained_moepp)
    blocks = load_token_blocks(text_corpus / "heldout.txt", text_tokenizer, 64, max_tokens=20_000).train[:16]
    calibrate_model(model, list(blocks.split(8)), target=1.5)
    return model, load_checkpoint_tokenizer(trained_moepp)


def _fed_sequences(model, tokenizer, folder: Path, task_name: str) -> list[list[int]]:
    """The distinct token sequences lm-eval feeds a causal model for a loglikelihood task's first LIMIT docs:
    (context + continuation)[:-1] per request, built with lm-eval's own tokenization; requests sharing one input
    share one forward."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(folder), include_defaults=False).load([task_name])["tasks"][task_name]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal")
    inputs = {tuple((context + continuation)[-(lm.max_length + 1):][:-1])
              for context, continuation in (lm._encode_pair(*instance.args) for instance in task.instances)}
    return [list(sequence) for sequence in sorted(inputs)]


def test_task_routing_is_a_direct_count_of_the_fed_tokens(calibrated, task_folder):
    """Each task's routing statistics equal a count, with each router's own select_experts, over the sequences
    lm-eval fed the model, each run alone (no padding); padding of lm-eval's batches is not counted."""
    model, tokenizer = calibrated
    options = TaskOptions(limit=LIMIT, batch_size=4, include_path=[task_folder], keep_tokens=True)
    results = evaluate_tasks(model, tokenizer, list(LOCAL_TASKS), options)
    assert [result.name for result in results] == list(LOCAL_TASKS)
    blocks = model.moe_blocks()
    for result in results:
        sequences = _fed_sequences(model, tokenizer, task_folder, result.name)
        assert result.samples == LIMIT and result.routing["tokens"] == sum(map(len, sequences))
        assert sorted(result.record.token_ids.tolist()) == sorted(token for seq in sequences for token in seq)
        used = torch.zeros(len(blocks), 3)  # (L, 3) tokens that used 0, 1, 2 FFN experts
        types = torch.zeros(3)  # slots that went to zero, copy, constant experts
        with torch.no_grad():
            for sequence in sequences:
                router_logits = model(torch.tensor([sequence]), output_router_logits=True).router_logits
                for position, (block, logits) in enumerate(zip(blocks, router_logits, strict=True)):
                    index = block.gate.select_experts(logits.float())  # (T, k)
                    layout = block.layout
                    used[position] += torch.bincount((index < layout.n_ffn).sum(-1), minlength=3)
                    bounds = (layout.n_ffn, layout.copy_start, layout.constant_start, layout.n_total)
                    for kind, (start, end) in enumerate(itertools.pairwise(bounds)):
                        types[kind] += ((index >= start) & (index < end)).sum()
        tokens = result.routing["tokens"]
        per_layer = (used * torch.arange(3)).sum(dim=1) / tokens  # (L,)
        assert result.routing["ffn_experts_per_token_per_layer"] == pytest.approx(per_layer.tolist(), abs=2e-3)
        assert result.routing["ffn_experts_per_token"] == pytest.approx(per_layer.mean().item(), abs=2e-3)
        shares = types / (tokens * len(blocks) * 2)
        assert list(result.routing["zero_computation_share"].values()) == pytest.approx(shares.tolist(), abs=2e-3)
        assert 1.3 < result.routing["ffn_experts_per_token"] < 1.7  # calibrated to 1.5 on other text
        assert result.routing["zero_computation_share"]["zero"] > 0
        assert result.routing["layers"] == [0, 1, 2]


def test_attention_mask_leaves_lm_eval_metrics_unchanged(calibrated, task_folder):
    """Our HFLM passes the padding mask that lm-eval's own does not: the metrics are lm-eval's, unchanged."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = calibrated
    ours = evaluate_tasks(model, tokenizer, [MODULE_TASK], TaskOptions(limit=LIMIT, batch_size=4,
                                                                       include_path=[task_folder]))
    task = TaskManager(include_path=str(task_folder), include_defaults=False).load([MODULE_TASK])
    task["tasks"][MODULE_TASK].set_config(key="num_fewshot", value=0)
    plain = evaluate(lm=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, backend="causal"),
                     task_dict=task, limit=LIMIT, bootstrap_iters=0, log_samples=False)["results"][MODULE_TASK]
    for metric in ("acc", "acc_norm"):
        assert ours[0].metrics[metric]["value"] == pytest.approx(plain[f"{metric},none"], abs=1e-9)
        stderr = ours[0].metrics[metric]["stderr"]
        assert stderr is not None and stderr >= 0


def test_eval_command_with_tasks_and_data(capsys, trained_mixtral, text_corpus):
    """A source checkpoint through `upcycle eval`: shipped tasks without --include-path, perplexity and tasks
    in one JSON object; a source uses its top-k (2) FFN experts for every token of every task."""
    result = run_cli(capsys, "eval", trained_mixtral, "--tasks", f"{MODULE_TASK},{CLOZE_TASK}", "--limit", "4",
                     "--batch-size", "4", "--data", text_corpus / "heldout.txt", "--block-size", "64",
                     "--max-blocks", "2", "--max-tokens", "4000", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["perplexity"] > 1 and report["ffn_experts_per_token"] == 2.0
    assert [task["name"] for task in report["tasks"]] == [MODULE_TASK, CLOZE_TASK]
    for task in report["tasks"]:
        assert task["samples"] == 4 and task["routing"]["tokens"] > 0
        assert task["routing"]["ffn_experts_per_token_per_layer"] == [2.0, 2.0, 2.0]
        assert task["routing"]["zero_computation_share"] == {"zero": 0.0, "copy": 0.0, "constant": 0.0}
        for numbers in task["metrics"].values():
            assert set(numbers) == {"value", "stderr"}
    assert set(report["tasks"][0]["metrics"]) == {"acc", "acc_norm"}
    assert set(report["tasks"][1]["metrics"]) == {"acc", "perplexity"}


def test_eval_command_prints_a_table(capsys, trained_moepp, task_folder):
    result = run_cli(capsys, "eval", trained_moepp, "--tasks", MODULE_TASK, "--include-path", task_folder,
                     "--limit", "0.05", "--batch-size", "8", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["task", "metric", "value"]
    assert lines[1].startswith(MODULE_TASK) and "acc" in lines[1]
    routing = next(line for line in lines if line.startswith(MODULE_TASK) and "tokens" in line)
    assert routing.split()[1] == "2.000"  # converted, not calibrated: the source's top-2


def test_lm_eval_console_script_runs_our_checkpoint(trained_moepp, task_folder, tmp_path):
    """`lm_eval --model hf --model_args pretrained=CHECKPOINT,trust_remote_code=True` on a converted checkpoint
    (the remote code copied into it), on a local task: lm-eval's own numbers equal `upcycle eval`'s."""
    done = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={trained_moepp},trust_remote_code=True",
         "--tasks", MODULE_TASK, "--include_path", str(task_folder), "--limit", str(LIMIT), "--batch_size", "4",
         "--device", "cpu", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=_subprocess_env(tmp_path), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][MODULE_TASK]
    model = load_causal_lm(trained_moepp)
    ours = evaluate_tasks(model, load_checkpoint_tokenizer(trained_moepp), [MODULE_TASK],
                          TaskOptions(limit=LIMIT, include_path=[task_folder]))[0]
    for metric in ("acc", "acc_norm"):
        assert ours.metrics[metric]["value"] == pytest.approx(written[f"{metric},none"], abs=1e-9)


def test_hub_task_offline_is_one_sentence(trained_moepp, tmp_path):
    """A Hub task (arc_easy) with no network and no cached dataset: one sentence, exit 1, no traceback."""
    done = subprocess.run([str(BIN / "upcycle"), "eval", str(trained_moepp), "--tasks", "arc_easy", "--limit", "2"],
                          capture_output=True, text=True, cwd=tmp_path, env=_subprocess_env(tmp_path), timeout=300,
                          check=False)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load task 'arc_easy'"), done.stderr
    assert "Hub cannot be reached" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "no_such_task_anywhere"], "unknown task 'no_such_task_anywhere'"),
    (["--tasks", MODULE_TASK, "--limit", "0"], "--limit must be a positive number"),
    (["--tasks", MODULE_TASK, "--limit", "2.5"], "--limit must be a whole number"),
    (["--tasks", MODULE_TASK, "--include-path", "missing-folder"], "is not a folder"),
    (["--tasks", MODULE_TASK, "--include-path", "."], "holds no task YAML files"),
    (["--tasks", MODULE_TASK, "--device", "cuda:7"], "--device"),
    (["--tasks", " , "], "--tasks takes task names"),
    (["--limit", "3", "--data", "x.txt"], "--limit applies to --tasks"),
    (["--tasks", MODULE_TASK, "--source", "."], "--source applies to --data"),
    ([], "eval needs --data"),
])
def test_bad_inputs_are_one_sentence(capsys, trained_moepp, tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    if "cuda:7" in arguments and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    result = run_cli(capsys, "eval", trained_moepp, *arguments)
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_routing_record_is_optional_for_a_dense_model(task_folder):
    """A model without MoE routers still runs its tasks: no routing, no error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from upcycle.data.tokenizer_training import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["a small text to train on, with a few words " * 40], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=512)).eval()
    result = evaluate_tasks(model, tokenizer, [MODULE_TASK], TaskOptions(limit=2, include_path=[task_folder]))[0]
    assert result.routing == {"tokens": 0} and result.record is None and result.samples == 2
