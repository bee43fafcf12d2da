"""FFN experts per token by kind of token (punctuation, word pieces, words or their parts of speech), as in the
MoE++ paper's figures. What a token's kind is, from the text around it, is `parts_of_speech`'s one definition;
what each token used is `record_routing`'s."""

import torch

from .parts_of_speech import BASE_KINDS, token_kinds_of_blocks
from .routing_record import record_routing


def by_token_kind(kinds: list[str], ffn_used: torch.Tensor, order: tuple[str, ...] = ()) -> dict[str, dict]:
    """kinds (T,) and ffn_used (T, L) -> per kind: mean FFN experts per token (over layers) and token count.

    Kinds in `order` come first, in that order, even when no token has them (count 0); the rest follow, hungriest
    first."""
    per_token = ffn_used.double().mean(dim=1)  # (T,)
    table: dict[str, list[float]] = {kind: [] for kind in order}
    for kind, used in zip(kinds, per_token.tolist()):
        table.setdefault(kind, []).append(used)
    rows = {kind: {"ffn_experts_per_token": sum(values) / max(len(values), 1), "tokens": len(values)}
            for kind, values in table.items()}
    rest = sorted((kind for kind in rows if kind not in order), key=lambda kind: -rows[kind]["ffn_experts_per_token"])
    return {kind: rows[kind] for kind in (*order, *rest)}


@torch.no_grad()
def ffn_experts_by_token_kind(model, blocks: torch.Tensor, tokenizer, batch_size: int = 8,
                              tagger=None) -> dict[str, dict]:
    """Mean FFN experts per token (averaged over MoE layers) and token count per kind, on blocks (n, L): without
    a tagger the kinds are punctuation, word piece and word, always in that order."""
    with record_routing(model, keep_tokens=True) as record:
        for batch in blocks.split(batch_size):
            model(batch, use_cache=False)
    kinds = token_kinds_of_blocks(record.token_ids, blocks.shape[1], tokenizer, tagger)
    return by_token_kind(kinds, record.ffn_used, BASE_KINDS if tagger is None else ())
