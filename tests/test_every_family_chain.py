"""Every family that convert accepts, through every command: convert (then both training-free baselines fitted to
1.5 on the converted model) -> calibrate to 1.5 -> eval (the held-out budget within 0.1 of the target) -> eval
--tasks on the source and on the calibrated model (a local lm-evaluation-harness task, offline: metrics and the
routing of its tokens per MoE layer, the calibrated budget within 0.3 of the target on the task's own text) ->
train a few steps (each trainable set on some family) -> eval, on a tiny model of the family built by
transformers' own classes (OpenMoE: the project's), with a real BPE tokenizer and real text (the standard
library's documentation).

In-process (the CLI's entry point, as a shell runs it) and through the installed `upcycle` command in a fresh
process (no prompt, pure JSON on stdout, no traceback), which ends with lm-evaluation-harness's own `lm_eval`
command on the calibrated checkpoint (its remote code; the same scores as `upcycle eval --tasks`): three families
in-process and DeepSeek-V3 installed in the default run (about 2 minutes on 2 cores), every family both ways with
`-m slow`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli
from test_families import FAMILIES, tiny_source
from test_openmoe import save_openmoe_source, tiny_openmoe
from text_fixtures import TOKENIZER_VOCAB, corpus_tokenizer, stdlib_corpus

from upcycle.evaluation.local_tasks import MODULE_TASK

TARGET = 1.5
DATA = ["--block-size", "64", "--max-tokens", "40000"]
TASKS = ["--tasks", MODULE_TASK, "--limit", "4", "--json"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
# family -> (tiny family in test_families (None: OpenMoE), config overrides, trainable set of its train step)
CHAIN = {
    "mixtral": ("mixtral", {}, "default"),
    "qwen2_moe": ("qwen2_moe", {}, "lora"),
    "qwen3_moe": ("qwen3_moe", {}, "full"),
    "olmoe": ("olmoe", {}, "default"),
    "deepseek_v2_group_limited": ("deepseek_v2", {}, "lora"),
    "deepseek_v2_greedy": ("deepseek_v2", {"topk_method": "greedy"}, "full"),
    "deepseek_v3_groups": ("deepseek_v3", {}, "default"),
    "deepseek_v3_no_groups": ("deepseek_v3", {"n_group": 1, "topk_group": 1}, "lora"),
    "openmoe": (None, {}, "full"),
}


def build_source(name: str, folder: Path, tokenizer) -> Path:
    """A tiny random source of the family with the corpus tokenizer's vocabulary, saved with that tokenizer."""
    family, overrides, _ = CHAIN[name]
    overrides = overrides | {"vocab_size": TOKENIZER_VOCAB}
    if family is None:
        save_openmoe_source(tiny_openmoe(seed=1, **overrides), folder)
    elif family == "mixtral":
        from conftest import tiny_mixtral

        tiny_mixtral(seed=1, **overrides).save_pretrained(folder)
    else:
        tiny_source(FAMILIES[family], seed=1, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chain_commands(source: Path, corpus: Path, work: Path, trainable: str) -> list[list[str]]:
    train, heldout = str(corpus / "train.txt"), str(corpus / "heldout.txt")
    return [
        ["convert", str(source), str(work / "moepp")],
        ["calibrate", str(work / "moepp"), "--data", train, "--target-ffn-per-token", str(TARGET),
         "--output", str(work / "calibrated"), "--batches", "8", *DATA],
        ["eval", str(work / "calibrated"), "--data", heldout, "--json", *DATA],
        ["eval", str(source), *TASKS],
        ["eval", str(work / "calibrated"), *TASKS],
        ["train", "--model", str(work / "calibrated"), "--data", train, "--output", str(work / "trained"),
         "--steps", "2", "--target-ffn-per-token", str(TARGET), "--trainable", trainable, "--micro-batch-size", "4",
         "--eval-max-blocks", "4", "--checkpoint-every", "0", "--no-progress", "--no-tensorboard", *DATA],
        ["eval", str(work / "trained"), "--data", heldout, "--json", "--plots", str(work / "plots"), *DATA],
    ]


def check_evaluations(outputs: list[str], work: Path) -> None:
    """The four evals printed one JSON document each; the calibrated budget holds on held-out text and, more
    loosely (a few hundred tokens of another kind of text), on a task's tokens."""
    calibrated, source_tasks, calibrated_tasks, trained = (json.loads(text) for text in outputs)
    assert abs(calibrated["ffn_experts_per_token"] - TARGET) <= 0.1, calibrated["ffn_experts_per_token"]
    layers = len(calibrated["per_layer"])
    for report, budget in ((source_tasks, None), (calibrated_tasks, TARGET)):
        (task,) = report["tasks"]
        assert task["name"] == MODULE_TASK and task["samples"] == 4
        assert set(task["metrics"]) == {"acc", "acc_norm"} and 0 <= task["metrics"]["acc"]["value"] <= 1
        routing = task["routing"]
        assert routing["tokens"] > 0 and len(routing["ffn_experts_per_token_per_layer"]) == layers
        if budget is not None:
            assert abs(routing["ffn_experts_per_token"] - budget) <= 0.3, routing["ffn_experts_per_token"]
        else:  # a source uses its top-k for every token
            assert len(set(routing["ffn_experts_per_token_per_layer"])) == 1
    assert calibrated["is_moepp"] and len(calibrated["per_layer"]) >= 1
    assert trained["ffn_experts_per_token"] is not None and trained["perplexity"] > 1.0
    assert all(Path(path).is_file() for path in trained["plots"])
    assert (work / "trained" / "config.json").is_file()


@pytest.fixture(scope="module")
def chain_inputs(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory), corpus_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory) -> Path:
    """Where the local tasks are built once for the module's runs (UPCYCLE_CACHE)."""
    return tmp_path_factory.mktemp("upcycle-cache")


@pytest.fixture
def offline_tasks(monkeypatch, task_cache) -> dict:
    """No network for the tasks' datasets, the local tasks cached in the module's folder; the environment of an
    installed run."""
    for name, value in (OFFLINE | {"UPCYCLE_CACHE": str(task_cache)}).items():
        monkeypatch.setenv(name, value)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return OFFLINE | {"UPCYCLE_CACHE": str(task_cache)}


DEFAULT_RUN = ("mixtral", "qwen2_moe", "openmoe")  # softmax renormalising, not renormalising, router_topk


@pytest.mark.parametrize("name", [name if name in DEFAULT_RUN else pytest.param(name, marks=pytest.mark.slow)
                                  for name in CHAIN])
def test_every_family_through_every_command(capsys, tmp_path, chain_inputs, offline_tasks, name):
    corpus, tokenizer = chain_inputs
    source = build_source(name, tmp_path / "source", tokenizer)
    evaluations = []
    for command in chain_commands(source, corpus, tmp_path, CHAIN[name][2]):
        result = run_cli(capsys, *command)
        assert result.exit_code == 0, f"upcycle {command[0]}: {result.stderr}"
        if command[0] == "eval":
            evaluations.append(result.stdout)
        if command[0] == "convert":
            check_baselines(tmp_path / "moepp", corpus)
    check_evaluations(evaluations, tmp_path)


def check_baselines(moepp: Path, corpus: Path) -> None:
    """Every training-free baseline runs on the family's converted model and hold the budget on held-out text."""
    from upcycle.checkpoint.loading import load_causal_lm
    from upcycle.data.blocks import load_checkpoint_tokenizer, load_token_blocks
    from upcycle.evaluation.baselines import BASELINES, fit_knob, measure

    tokenizer = load_checkpoint_tokenizer(moepp)
    fit = load_token_blocks(corpus / "train.txt", tokenizer, 64, max_tokens=20_000).train[:32]
    heldout = load_token_blocks(corpus / "heldout.txt", tokenizer, 64, max_tokens=20_000).heldout[:32]
    model = load_causal_lm(moepp)
    for rule in BASELINES:
        target = 0.75 if rule == "top_1_confident" else TARGET  # the only rule below one FFN expert per token
        knob = fit_knob(model, fit, rule, target, steps=10)
        assert abs(measure(model, heldout, rule, knob) - target) <= 0.15, rule


def installed_chain(tmp_path: Path, chain_inputs, name: str, environment: dict) -> None:
    """The same chain through the installed `upcycle` command, stdin closed (a prompt would fail or hang)."""
    corpus, tokenizer = chain_inputs
    source = build_source(name, tmp_path / "source", tokenizer)
    upcycle = shutil.which("upcycle", path=str(Path(sys.executable).parent)) or "upcycle"
    environment = os.environ | environment | {"PYTHONWARNINGS": "ignore"}
    evaluations = []
    for command in chain_commands(source, corpus, tmp_path, CHAIN[name][2]):
        done = subprocess.run([upcycle, *command], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=environment, timeout=600, check=False)
        assert done.returncode == 0, f"upcycle {command[0]}: {done.stderr}"
        for stream in (done.stdout, done.stderr):
            assert "custom code" not in stream and "Traceback" not in stream
        if command[0] == "eval":
            evaluations.append(done.stdout)
    check_evaluations(evaluations, tmp_path)
    calibrated_task = json.loads(evaluations[2])["tasks"][0]
    written = run_lm_eval(tmp_path / "calibrated", tmp_path, environment)
    for metric in ("acc", "acc_norm"):  # lm-eval's own command scores what `upcycle eval --tasks` scored
        assert written[f"{metric},none"] == pytest.approx(calibrated_task["metrics"][metric]["value"], abs=1e-9)


def run_lm_eval(checkpoint: Path, work: Path, environment: dict) -> dict:
    """lm-evaluation-harness's own command on a checkpoint we wrote, through its remote code: the local module
    task (written with `write_local_tasks`, as docs/evaluation.md shows); lm-eval's results for the task."""
    from upcycle.evaluation.local_tasks import write_local_tasks

    write_local_tasks(work / "tasks")
    lm_eval = Path(sys.executable).parent / "lm_eval"
    done = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={checkpoint},trust_remote_code=True",
         "--tasks", MODULE_TASK, "--include_path", str(work / "tasks"), "--limit", "4", "--batch_size", "4",
         "--device", "cpu", "--output_path", str(work / "lm-eval")],
        capture_output=True, text=True, cwd=work, env=environment, stdin=subprocess.DEVNULL, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next((work / "lm-eval").rglob("results_*.json")).read_text())["results"][MODULE_TASK]


def test_installed_command_runs_the_chain_without_a_prompt(tmp_path, chain_inputs, offline_tasks):
    installed_chain(tmp_path, chain_inputs, "deepseek_v3_groups", offline_tasks)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CHAIN if name != "deepseek_v3_groups"])
def test_installed_command_runs_every_family(tmp_path, chain_inputs, offline_tasks, name):
    installed_chain(tmp_path, chain_inputs, name, offline_tasks)
