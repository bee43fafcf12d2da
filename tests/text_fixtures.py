"""Real text, a real BPE tokenizer and a tiny *trained* Mixtral (and its MoE++ conversion), built once per session.

Plain functions taking pytest's `tmp_path_factory` (importable by any test, bench or demo test), plus
session fixtures wrapping them. Everything is cached for the session in a tmp folder:
- `stdlib_corpus`: train.txt / heldout.txt of the standard library's documentation (upcycle.data.corpus);
- `corpus_tokenizer`: a byte-level BPE tokenizer (2048 tokens) trained on train.txt;
- `tiny_trained_mixtral`: a 3-layer, 8-expert top-2 MixtralForCausalLM trained a few dozen steps on the corpus
  (so routers are not random), saved with its tokenizer;
- `tiny_trained_moepp`: that checkpoint converted by `upcycle.surgery.convert.convert` (default 1/1/2 split).
Cost: about 10-20 s on 2 busy cores, once per session.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

TOKENIZER_VOCAB = 2048
TRAIN_STEPS = 50
TRAIN_BATCH = (8, 64)  # (blocks, block_size)
TRAIN_MAX_TOKENS = 120_000
TINY_TEXT_MIXTRAL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

_CACHE: dict[str, object] = {}


@dataclass(frozen=True)
class TinyTextModel:
    corpus: Path  # folder with train.txt and heldout.txt
    source: Path  # trained Mixtral checkpoint with its tokenizer
    moepp: Path  # its MoE++ conversion (tokenizer copied by convert)


def _cached(key: str, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def stdlib_corpus(tmp_path_factory) -> Path:
    """Folder with train.txt and heldout.txt (documents separated by two blank lines)."""
    from upcycle.data.corpus import write_corpus

    def build() -> Path:
        folder = tmp_path_factory.mktemp("stdlib-corpus")
        write_corpus(folder)
        return folder

    return _cached("corpus", build)


def corpus_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer of TOKENIZER_VOCAB tokens trained on the corpus' train.txt."""
    from upcycle.data.blocks import load_texts
    from upcycle.data.tokenizer_training import train_bpe_tokenizer

    return _cached("tokenizer", lambda: train_bpe_tokenizer(
        load_texts(stdlib_corpus(tmp_path_factory) / "train.txt"), vocab_size=TOKENIZER_VOCAB))


def train_tiny_mixtral(tokenizer, data: Path, steps: int = TRAIN_STEPS, seed: int = 0) -> MixtralForCausalLM:
    """A tiny Mixtral trained `steps` AdamW steps on the packed train blocks of `data`."""
    from upcycle.data.blocks import load_token_blocks

    batch_blocks, block_size = TRAIN_BATCH
    blocks = load_token_blocks(data, tokenizer, block_size, seed=seed, max_tokens=TRAIN_MAX_TOKENS)
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           **TINY_TEXT_MIXTRAL)
    model = MixtralForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        start = (step * batch_blocks) % max(1, blocks.train.shape[0] - batch_blocks)
        batch = blocks.train[start:start + batch_blocks]  # (B, L)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def tiny_trained_mixtral(tmp_path_factory) -> Path:
    """Checkpoint folder of the trained tiny Mixtral, with its tokenizer saved in it."""

    def build() -> Path:
        tokenizer = corpus_tokenizer(tmp_path_factory)
        model = train_tiny_mixtral(tokenizer, stdlib_corpus(tmp_path_factory) / "train.txt")
        folder = tmp_path_factory.mktemp("tiny-text-mixtral") / "source"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return _cached("mixtral", build)


def tiny_trained_moepp(tmp_path_factory) -> Path:
    """The trained tiny Mixtral converted to MoE++ (default split 1 zero, 1 copy, 2 constant; gating residual)."""
    from upcycle.surgery.convert import ConvertOptions, convert

    def build() -> Path:
        output = tmp_path_factory.mktemp("tiny-text-moepp") / "moepp"
        convert(tiny_trained_mixtral(tmp_path_factory), output, ConvertOptions())
        return output

    return _cached("moepp", build)


def tiny_text_model(tmp_path_factory) -> TinyTextModel:
    return TinyTextModel(stdlib_corpus(tmp_path_factory), tiny_trained_mixtral(tmp_path_factory),
                         tiny_trained_moepp(tmp_path_factory))


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    return stdlib_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def text_tokenizer(tmp_path_factory):
    return corpus_tokenizer(tmp_path_factory)


@pytest.fixture(scope="session")
def trained_mixtral(tmp_path_factory) -> Path:
    return tiny_trained_mixtral(tmp_path_factory)


@pytest.fixture(scope="session")
def trained_moepp(tmp_path_factory) -> Path:
    return tiny_trained_moepp(tmp_path_factory)


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> TinyTextModel:
    return tiny_text_model(tmp_path_factory)
