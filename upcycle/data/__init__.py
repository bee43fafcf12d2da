"""Data: text sources, packed token blocks and their options, the standard-library corpus, tokenizer training."""
