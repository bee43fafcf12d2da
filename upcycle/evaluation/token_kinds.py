"""FFN experts per token by kind of token (punctuation, word pieces, words), as in the MoE++ paper's figures.

A token's kind comes from its decoded text: no letter or digit -> punctuation (whitespace included); a leading
space before letters -> a word (the start of one, for a byte-level BPE); letters with no leading space -> a word
piece (the continuation of a word, or a word glued to punctuation).
"""

import torch

from .routing_record import record_routing

TOKEN_KINDS = ("punctuation", "word piece", "word")


def token_kind(text: str) -> str:
    if not any(character.isalnum() for character in text):
        return "punctuation"
    return "word" if text[:1].isspace() else "word piece"


@torch.no_grad()
def ffn_experts_by_token_kind(model, blocks: torch.Tensor, tokenizer, batch_size: int = 8) -> dict[str, dict]:
    """Mean FFN experts per token (averaged over MoE layers) and token count, per kind, on blocks (n, L)."""
    kinds = {token_id: token_kind(tokenizer.decode([token_id])) for token_id in range(len(tokenizer))}
    with record_routing(model, keep_tokens=True) as record:
        for batch in blocks.split(batch_size):
            model(batch, use_cache=False)
    ffn_used = record.ffn_used.double().mean(dim=1)  # (T,) averaged over MoE layers
    totals = {kind: [0.0, 0] for kind in TOKEN_KINDS}
    for token_id, used in zip(record.token_ids.tolist(), ffn_used.tolist()):
        total = totals[kinds.get(token_id, "punctuation")]
        total[0] += used
        total[1] += 1
    return {kind: {"ffn_experts_per_token": total[0] / max(total[1], 1), "tokens": total[1]}
            for kind, total in totals.items()}
