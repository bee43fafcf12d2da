"""Tiny random Mixtral sources, saved by transformers in each on-disk layout (no network, seconds)."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import upcycle

upcycle.register_auto_classes()  # tests load converted checkpoints with the Auto classes in-process

# Session fixtures on real text (text_corpus, text_tokenizer, trained_mixtral, trained_moepp, text_model).
pytest_plugins = ("text_fixtures",)

TINY_MIXTRAL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
)


def tiny_mixtral(seed: int = 0, **overrides) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**(TINY_MIXTRAL | overrides))).eval()
    # Sharpen the routers (transformers' init gives near-uniform logits) so routing decisions are not ties.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(25.0)
    return model


def save_source(model: MixtralForCausalLM, folder: Path, layout: str, sharded: bool) -> Path:
    """layout "per-expert" (classic Hub keys w1/w2/w3) or "fused" (transformers 5 in-memory keys)."""
    model.save_pretrained(
        folder, save_original_format=(layout == "per-expert"), max_shard_size="40KB" if sharded else "10GB"
    )
    return folder


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def source_model() -> MixtralForCausalLM:
    return tiny_mixtral()


@pytest.fixture(scope="session")
def per_expert_source(tmp_path_factory, source_model) -> Path:
    return save_source(source_model, tmp_path_factory.mktemp("src") / "per-expert", "per-expert", sharded=False)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, per_expert_source) -> Path:
    from upcycle.surgery.convert import ConvertOptions, convert

    output = tmp_path_factory.mktemp("out") / "moepp"
    convert(per_expert_source, output, ConvertOptions())
    return output
