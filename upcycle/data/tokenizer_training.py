"""Train a real byte-level BPE tokenizer (the tokenizers library) in seconds, as a transformers tokenizer.

Used for the embedded default model and the tests: the data pipeline then runs on real subword tokens, not
random ids. Byte-level BPE covers every string (no unknown characters); `<unk>` exists only because tools expect it.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `vocab_size` tokens (special tokens first: ids 0-3), deterministic.

    No template adds bos/eos on encoding: the data pipeline places eos between documents itself.
    `tokenizer.save_pretrained(folder)` writes it into a checkpoint folder (tokenizer.json + tokenizer_config.json).
    """
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text can be encoded
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1_000_000_000, **SPECIAL_TOKENS)
