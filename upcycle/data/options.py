"""How text becomes token blocks: the one set of data options that calibrate, eval and train share.

Written once here; the CLI builds its flags from these fields (help text and defaults included), the training
recipe's YAML keys are the same names, and `validate` refuses bad values in one sentence.
"""

from dataclasses import dataclass, field

from ..errors import UpcycleError


def check_data_settings(block_size: int, heldout_fraction: float, max_tokens: int | None) -> None:
    """Refuse settings no token blocks can be made with, in one sentence (before anything is read or loaded)."""
    if block_size < 2:
        raise UpcycleError(f"block_size must be at least 2 tokens, got {block_size}")
    if not 0.0 < heldout_fraction < 1.0:
        raise UpcycleError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if max_tokens is not None and max_tokens < 2 * block_size:
        raise UpcycleError(f"max_tokens must allow at least two blocks of {block_size} tokens")


def option(default, help: str, **extra):
    """A dataclass field carrying its CLI help (and choices): the single truth for flags, YAML keys, validation."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(kw_only=True)
class DataOptions:
    """Options of `load_token_blocks`; the data path itself is an argument of each command."""

    text_field: str = option("text", "The text field of .jsonl/.parquet data.")
    block_size: int = option(256, "Tokens per packed sequence.")
    heldout_fraction: float = option(0.1, "Share of documents held out (split by a hash of each document).")
    max_tokens: int | None = option(None, "Read at most this many tokens of the data (documents in order; "
                                          "none: all).")
    seed: int = option(0, "Seed of the training blocks' order.")

    def validate_data_options(self) -> None:
        check_data_settings(self.block_size, self.heldout_fraction, self.max_tokens)

    def token_blocks(self, data, tokenizer):
        """Packed train and held-out blocks of `data` (upcycle.data.blocks.load_token_blocks) with these options."""
        from .blocks import load_token_blocks

        return load_token_blocks(data, tokenizer, self.block_size, self.seed, self.heldout_fraction,
                                 self.max_tokens, self.text_field)
