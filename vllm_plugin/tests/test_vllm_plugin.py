"""The plugin against transformers' remote code (run in the vLLM venv; `make test-vllm` does all of it).

The reference (checkpoints, transformers' greedy generations and log-probabilities, FFN experts per token) is
written by make_reference.py in the project's venv; UPCYCLE_VLLM_REFERENCE names its folder. vLLM serves every
checkpoint in one subprocess (vllm_check.py), through the plugin's `vllm.general_plugins` entry point.

Tolerances (float32 on both sides): generated tokens equal; a difference is accepted only at a near tie, where
transformers' top-2 log-probability margin is below TIE_MARGIN (the rest of that sequence is then not compared);
log-probabilities of the compared tokens within LOGPROB_TOL (measured: at most 5e-6 on CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from upcycle_vllm.layer import ExpertLayout, ZeroComputationExperts, normalize_top_k_weights

CHECKPOINTS = ["demo", "demo-1.5", "demo-1.0", "demo-perturbed", "qwen3", "qwen3-other-denominator"]
LOGPROB_TOL = 1e-4
TIE_MARGIN = 1e-4


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = os.environ.get("UPCYCLE_VLLM_REFERENCE")
    if not path:
        pytest.fail("set UPCYCLE_VLLM_REFERENCE to the folder make_reference.py wrote (make test-vllm does)")
    return Path(path)


@pytest.fixture(scope="session")
def reference(reference_dir) -> dict:
    return json.loads((reference_dir / "reference.json").read_text())


@pytest.fixture(scope="session")
def served(reference_dir, reference) -> dict:
    """vLLM's results for every checkpoint, from one subprocess (engine start-up dominates)."""
    script = Path(__file__).with_name("vllm_check.py")
    names = [name for name in CHECKPOINTS if name in reference]
    run = subprocess.run([sys.executable, str(script), str(reference_dir), *names],
                         capture_output=True, text=True, timeout=900, check=False)
    results = {}
    for line in run.stdout.splitlines():
        if line.startswith("UPCYCLE_VLLM_RESULT "):
            result = json.loads(line.removeprefix("UPCYCLE_VLLM_RESULT "))
            results[result["name"]] = result
    if run.returncode != 0 or len(results) != len(names):
        pytest.fail(f"vllm_check.py exited {run.returncode}; last output:\n{(run.stdout + run.stderr)[-6000:]}")
    return results


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_generations_and_logprobs_match_transformers(name, reference, served):
    if name not in reference:
        pytest.skip(f"{name}: not made by this upcycle (see make_reference.py)")
    compared = 0
    for expected, got in zip(reference[name]["prompts"], served[name]["generations"], strict=True):
        for step, (want, token) in enumerate(zip(expected["token_ids"], got["token_ids"], strict=True)):
            if token != want:
                assert expected["margins"][step] < TIE_MARGIN, (
                    f"{name}, prompt {expected['prompt']!r}, step {step}: vLLM {token}, transformers {want} "
                    f"(margin {expected['margins'][step]:.2e})")
                break
            assert got["logprobs"][step] == pytest.approx(expected["logprobs"][step], abs=LOGPROB_TOL)
            compared += 1
    assert compared >= 0.9 * sum(len(p["token_ids"]) for p in reference[name]["prompts"])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_ffn_rows_are_the_ffn_slots(name, reference, served):
    """The FFN kernels process exactly the (token, slot) rows routed to FFN experts: zero-computation slots cost
    no FFN row. Measured rows per token equal transformers' FFN experts per token on the same prompts."""
    if name not in reference:
        pytest.skip(f"{name}: not made by this upcycle (see make_reference.py)")
    layers = served[name]["layers"]
    n_tokens = sum(len(p["prompt_token_ids"]) for p in reference[name]["prompts"])
    assert all(layer["tokens"] == n_tokens for layer in layers.values())
    rows_per_token = sum(layer["ffn_rows"] for layer in layers.values()) / (n_tokens * len(layers))
    assert rows_per_token == pytest.approx(reference[name]["ffn_experts_per_token"], abs=1e-6)
    if name.startswith("demo-1"):
        assert rows_per_token < 2 - 0.4


LAYOUT = ExpertLayout(n_ffn=4, n_zero=1, n_copy=1, n_constant=2)  # indices: FFN 0-3, zero 4, copy 5, constant 6-7


def test_zero_expert_semantics_worked_cases():
    index = torch.tensor([[0, 1], [4, 2], [5, 3], [4, 5], [4, 4]])
    weights = torch.tensor([[0.3, 0.1], [0.2, 0.2], [0.1, 0.3], [0.2, 0.2], [0.5, 0.5]])
    dropped = normalize_top_k_weights(weights, index, LAYOUT, True, "drop_and_renormalize")
    expected = torch.tensor([[0.75, 0.25], [0.0, 1.0], [0.25, 0.75], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(dropped, expected)
    kept = normalize_top_k_weights(weights, index, LAYOUT, True, "keep_weight")
    torch.testing.assert_close(kept[1], torch.tensor([0.5, 0.5]))
    # A family that does not renormalise keeps the mass of the k gathered weights.
    unnormalised = normalize_top_k_weights(weights, index, LAYOUT, False, "drop_and_renormalize")
    torch.testing.assert_close(unnormalised[1], torch.tensor([0.0, 0.4]))


def test_zero_copy_constant_outputs():
    torch.manual_seed(0)
    experts = ZeroComputationExperts(LAYOUT, hidden_size=8, params_dtype=torch.float32)
    experts.constant_vectors.data.normal_()
    experts.constant_ratio_weight.data.normal_()
    x = torch.randn(3, 8)
    index = torch.tensor([[4, 0], [5, 1], [7, 6]])  # zero + FFN, copy + FFN, constant 1 + constant 0
    weights = torch.tensor([[0.0, 1.0], [0.4, 0.6], [0.7, 0.3]])
    output = experts(x, index, weights)
    torch.testing.assert_close(output[0], torch.zeros(8))
    torch.testing.assert_close(output[1], 0.4 * x[1])
    expected = torch.zeros(8)
    for slot, constant in ((0, 1), (1, 0)):
        a = torch.softmax(experts.constant_ratio_weight[constant] @ x[2], dim=-1)
        expected += weights[2, slot] * (a[0] * x[2] + a[1] * experts.constant_vectors[constant])
    torch.testing.assert_close(output[2], expected)
